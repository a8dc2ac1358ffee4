//! The outcome every response of the layer carries, and the application's hook on it.

use std::sync::Arc;

use http::Response;

use super::body::ResponseBody;
use crate::policy::Policy;
use crate::problem::Problem;
use crate::telemetry::{self as m, Outcome};

/// A callback run once per response the layer hands back, with what the layer did and the
/// response head (which it may change, for example to add a header).
pub type OutcomeHook = Arc<dyn Fn(Outcome, &mut http::response::Parts) + Send + Sync>;

/// Puts `outcome` in the response's extensions.
pub(crate) fn tagged<B>(mut response: Response<B>, outcome: Outcome) -> Response<B> {
    response.extensions_mut().insert(outcome);
    response
}

/// The layer's own answer: a problem documented as the route says, counted and tagged.
pub(crate) fn refused<B>(
    policy: &Policy,
    outcome: Outcome,
    problem: Problem,
) -> Response<ResponseBody<B>> {
    m::outcome(outcome);
    let response = problem
        .documented(&policy.problem_docs())
        .into_response(ResponseBody::full);
    tagged(response, outcome)
}

/// Runs the hook on a finished response, whose outcome extension is always set by then.
pub(crate) fn run_hook<B>(hook: &OutcomeHook, response: Response<B>) -> Response<B> {
    let (mut parts, body) = response.into_parts();
    let outcome = parts
        .extensions
        .get::<Outcome>()
        .copied()
        .unwrap_or(Outcome::Uncovered);
    hook(outcome, &mut parts);
    Response::from_parts(parts, body)
}
