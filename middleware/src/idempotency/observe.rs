//! Observe mode ([`Mode::Observe`](crate::policy::Mode)): what enforcement would have done is
//! counted and logged, and the request runs anyway.

use crate::telemetry::{self as m, Outcome};

/// Counts and logs an observed outcome. Logged at `info`: during a shadow rollout these lines are
/// what the operator reads before switching the route to enforcing.
pub(crate) fn noted(outcome: Outcome, path: &str) -> Outcome {
    m::outcome(outcome);
    tracing::info!(
        outcome = outcome.as_str(),
        path,
        "observe mode: the request runs; enforcing idempotency would have answered otherwise"
    );
    outcome
}
