//! Metrics the layer emits through the [`metrics`] facade.
//!
//! Nothing is recorded unless the application installs a recorder (the proxy installs a
//! Prometheus one). No metric carries a key, a scope or any other request data as a label.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `idempotency_requests_total` | counter | `outcome`: see [`Outcome`] |
//! | `idempotency_store_duration_seconds` | histogram | `operation`: `begin`, `complete`, `release`, `renew`, `watch` |
//! | `idempotency_store_errors_total` | counter | `operation` |
//! | `idempotency_leases_in_flight` | gauge | |
//! | `idempotency_leases_lost_total` | counter | |
//! | `idempotency_responses_not_stored_total` | counter | `reason`: see [`NotStored`] |
//! | `idempotency_reaped_records_total` | counter | `backend`: `postgres`, `sqlite` (SQL stores' reapers) |
//! | `idempotency_store_batch_size` | histogram | `backend`: `postgres`, `sqlite`; `operation`: `begin`, `complete` (PostgreSQL), `write` (SQLite's single writer): calls merged into one statement or transaction (group commit) |

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

use crate::store::StoreError;

/// Counter of covered, keyed requests by outcome.
pub const REQUESTS_TOTAL: &str = "idempotency_requests_total";
/// Histogram of store call latency.
pub const STORE_DURATION_SECONDS: &str = "idempotency_store_duration_seconds";
/// Counter of failed store calls.
pub const STORE_ERRORS_TOTAL: &str = "idempotency_store_errors_total";
/// Gauge of leases this process holds.
pub const LEASES_IN_FLIGHT: &str = "idempotency_leases_in_flight";
/// Counter of leases found taken over by another request.
pub const LEASES_LOST_TOTAL: &str = "idempotency_leases_lost_total";
/// Counter of responses produced under a lease but not kept for replay.
pub const RESPONSES_NOT_STORED_TOTAL: &str = "idempotency_responses_not_stored_total";

/// Registers the help text and units of every metric above with the installed recorder (a
/// Prometheus exporter shows the text as `# HELP`), and registers the metrics once so that the
/// layer records through ready handles instead of looking each metric up per request. Call it
/// once, after installing the recorder and before serving.
pub fn describe() {
    register_handles();
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Keyed requests on covered routes, by what the idempotency layer did with them"
    );
    describe_histogram!(
        STORE_DURATION_SECONDS,
        Unit::Seconds,
        "Latency of idempotency store calls, by operation"
    );
    describe_counter!(
        STORE_ERRORS_TOTAL,
        Unit::Count,
        "Idempotency store calls that failed or timed out, by operation"
    );
    describe_gauge!(
        LEASES_IN_FLIGHT,
        Unit::Count,
        "Requests this process is running under an idempotency lease"
    );
    describe_counter!(
        LEASES_LOST_TOTAL,
        Unit::Count,
        "Leases found taken over by another request after lock_ttl"
    );
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    describe_histogram!(
        crate::store::STORE_BATCH_SIZE,
        Unit::Count,
        "Store calls merged into one statement or transaction (group commit), by backend and operation"
    );
    describe_counter!(
        RESPONSES_NOT_STORED_TOTAL,
        Unit::Count,
        "Responses produced under a lease but released instead of stored, by reason"
    );
}

/// What the layer did with a request: the `outcome` label of `idempotency_requests_total`, and
/// the response extension every response the layer hands back carries
/// (`response.extensions().get::<Outcome>()`), also passed to
/// [`IdempotencyLayer::on_outcome`](crate::IdempotencyLayer::on_outcome).
///
/// The `Observed*` outcomes come from routes in [`Mode::Observe`](crate::policy::Mode): the
/// request ran, and this is what enforcement would have done instead. The last five
/// ([`Outcome::ObservedWouldRefuseUpgrade`], [`Outcome::Unkeyed`], [`Outcome::Uncovered`],
/// [`Outcome::InvalidTarget`], [`Outcome::UpgradeRefused`]) are only response extensions, never
/// counted (the metric counts keyed requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Ran under a new lease.
    Executed,
    /// Answered from a stored response.
    Replayed,
    /// `409`: its key was in flight.
    Conflict,
    /// `422`: its key was used for a different request.
    Mismatch,
    /// `503`: the store failed and the route rejects on store errors.
    Rejected,
    /// Ran unprotected: the store failed and the route forwards on store errors.
    Forwarded,
    /// `413`: its body was over the limit.
    TooLarge,
    /// `400`: its key was invalid.
    InvalidKey,
    /// `400`: the route requires a key and it had none.
    MissingKey,
    /// `400`: its body could not be read.
    InvalidBody,
    /// `429`: its caller had `max_in_flight_per_caller` requests in progress.
    Throttled,
    /// `408`: its body did not arrive within `body_read_timeout`.
    BodyTimeout,
    /// `403`: its caller presented no credentials and the route rejects anonymous callers.
    Anonymous,
    /// Observe mode: ran (unprotected, not stored); enforcement would have replayed.
    ObservedWouldReplay,
    /// Observe mode: ran (unprotected, not stored) alongside the running request with its key;
    /// enforcement would have answered `409` (or, with `on_conflict = "wait"`, waited).
    ObservedWouldConflict,
    /// Observe mode: ran (unprotected, not stored); enforcement would have answered `422`.
    ObservedWouldMismatch,
    /// Observe mode: the store failed and it ran unprotected; enforcement would have answered
    /// `503` (with `on_store_error = "forward"` the outcome is [`Outcome::Forwarded`]).
    ObservedWouldReject,
    /// Observe mode: ran unkeyed; enforcement would have answered `400` (missing key).
    ObservedWouldMissingKey,
    /// Observe mode: ran unkeyed; enforcement would have answered `400` (invalid key).
    ObservedWouldInvalidKey,
    /// Observe mode: ran unkeyed, its body unread; enforcement would have answered `413`.
    ObservedWouldTooLarge,
    /// Observe mode: ran unkeyed; enforcement would have answered `429`.
    ObservedWouldThrottle,
    /// Observe mode: ran unkeyed; enforcement would have answered `403`.
    ObservedWouldRejectAnonymous,
    /// Observe mode: an `Upgrade` on a covered method passed through; enforcement would have
    /// answered `400`.
    ObservedWouldRefuseUpgrade,
    /// A covered method without a key on a route that does not require one: passed through.
    Unkeyed,
    /// A method or route the layer does not cover: passed through untouched.
    Uncovered,
    /// `400`: the request path is ambiguous (answered before any route applies).
    InvalidTarget,
    /// `400`: an `Upgrade` on a covered method.
    UpgradeRefused,
}

impl Outcome {
    /// The outcomes counted in `idempotency_requests_total`, in declaration order.
    const ALL: [Self; 22] = [
        Self::Executed,
        Self::Replayed,
        Self::Conflict,
        Self::Mismatch,
        Self::Rejected,
        Self::Forwarded,
        Self::TooLarge,
        Self::InvalidKey,
        Self::MissingKey,
        Self::InvalidBody,
        Self::Throttled,
        Self::BodyTimeout,
        Self::Anonymous,
        Self::ObservedWouldReplay,
        Self::ObservedWouldConflict,
        Self::ObservedWouldMismatch,
        Self::ObservedWouldReject,
        Self::ObservedWouldMissingKey,
        Self::ObservedWouldInvalidKey,
        Self::ObservedWouldTooLarge,
        Self::ObservedWouldThrottle,
        Self::ObservedWouldRejectAnonymous,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::Forwarded => "forwarded",
            Self::TooLarge => "too_large",
            Self::InvalidKey => "invalid_key",
            Self::MissingKey => "missing_key",
            Self::InvalidBody => "invalid_body",
            Self::Throttled => "throttled",
            Self::BodyTimeout => "body_timeout",
            Self::Anonymous => "anonymous",
            Self::ObservedWouldReplay => "observed_would_replay",
            Self::ObservedWouldConflict => "observed_would_conflict",
            Self::ObservedWouldMismatch => "observed_would_mismatch",
            Self::ObservedWouldReject => "observed_would_reject",
            Self::ObservedWouldMissingKey => "observed_would_missing_key",
            Self::ObservedWouldInvalidKey => "observed_would_invalid_key",
            Self::ObservedWouldTooLarge => "observed_would_too_large",
            Self::ObservedWouldThrottle => "observed_would_throttle",
            Self::ObservedWouldRejectAnonymous => "observed_would_reject_anonymous",
            Self::ObservedWouldRefuseUpgrade => "observed_would_refuse_upgrade",
            Self::Unkeyed => "unkeyed",
            Self::Uncovered => "uncovered",
            Self::InvalidTarget => "invalid_target",
            Self::UpgradeRefused => "upgrade_refused",
        }
    }

    /// Whether the route was in observe mode and enforcement would have answered otherwise.
    pub fn is_observed(self) -> bool {
        self.as_str().starts_with("observed_")
    }

    fn is_counted(self) -> bool {
        (self as usize) < Self::ALL.len()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a response produced under a lease was not stored (the lease was released instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStored {
    /// A 5xx status.
    ServerError,
    /// A status in the policy's `never_store` (default `408`, `425`, `429`).
    NeverStore,
    /// The body was over `max_response_body`.
    TooLarge,
    /// The response had trailers, which a replay cannot repeat.
    Trailers,
    /// Reading the body failed (or timed out) after the head: the outcome is unknown, and the
    /// lease is kept until it expires.
    BodyError,
    /// The inner service returned an error instead of a response.
    InnerError,
    /// The response was marked [`OutcomeUnknown`](crate::OutcomeUnknown): the lease is kept
    /// until it expires.
    OutcomeUnknown,
}

impl NotStored {
    const ALL: [Self; 7] = [
        Self::ServerError,
        Self::NeverStore,
        Self::TooLarge,
        Self::Trailers,
        Self::BodyError,
        Self::InnerError,
        Self::OutcomeUnknown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerError => "server_error",
            Self::NeverStore => "never_store",
            Self::TooLarge => "too_large",
            Self::Trailers => "trailers",
            Self::BodyError => "body_error",
            Self::InnerError => "inner_error",
            Self::OutcomeUnknown => "outcome_unknown",
        }
    }
}

/// A store operation, as labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Begin,
    Complete,
    Release,
    Renew,
    Watch,
}

impl Operation {
    const ALL: [Self; 5] = [
        Self::Begin,
        Self::Complete,
        Self::Release,
        Self::Renew,
        Self::Watch,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Begin => "begin",
            Self::Complete => "complete",
            Self::Release => "release",
            Self::Renew => "renew",
            Self::Watch => "watch",
        }
    }
}

/// Handles registered once by [`describe`], so the hot path skips building and looking up a
/// metric key per call. Without them (no `describe` call) every call looks its metric up, which
/// is slower but right whenever the recorder was installed.
struct Handles {
    outcomes: [Counter; Outcome::ALL.len()],
    not_stored: [Counter; NotStored::ALL.len()],
    store_durations: [Histogram; Operation::ALL.len()],
    store_errors: [Counter; Operation::ALL.len()],
    leases_in_flight: Gauge,
    leases_lost: Counter,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn register_handles() {
    HANDLES.get_or_init(|| Handles {
        outcomes: Outcome::ALL.map(|o| counter!(REQUESTS_TOTAL, "outcome" => o.as_str())),
        not_stored: NotStored::ALL
            .map(|r| counter!(RESPONSES_NOT_STORED_TOTAL, "reason" => r.as_str())),
        store_durations: Operation::ALL
            .map(|op| histogram!(STORE_DURATION_SECONDS, "operation" => op.as_str())),
        store_errors: Operation::ALL
            .map(|op| counter!(STORE_ERRORS_TOTAL, "operation" => op.as_str())),
        leases_in_flight: gauge!(LEASES_IN_FLIGHT),
        leases_lost: counter!(LEASES_LOST_TOTAL),
    });
}

pub(crate) fn outcome(outcome: Outcome) {
    if !outcome.is_counted() {
        return;
    }
    match HANDLES.get() {
        Some(handles) => handles.outcomes[outcome as usize].increment(1),
        None => counter!(REQUESTS_TOTAL, "outcome" => outcome.as_str()).increment(1),
    }
}

pub(crate) fn not_stored(reason: NotStored) {
    match HANDLES.get() {
        Some(handles) => handles.not_stored[reason as usize].increment(1),
        None => counter!(RESPONSES_NOT_STORED_TOTAL, "reason" => reason.as_str()).increment(1),
    }
}

pub(crate) fn store_call<T>(operation: Operation, took: Duration, result: &Result<T, StoreError>) {
    let failed = matches!(result, Err(error) if !matches!(error, StoreError::LeaseLost));
    match HANDLES.get() {
        Some(handles) => {
            handles.store_durations[operation as usize].record(took);
            if failed {
                handles.store_errors[operation as usize].increment(1);
            }
        }
        None => {
            histogram!(STORE_DURATION_SECONDS, "operation" => operation.as_str()).record(took);
            if failed {
                counter!(STORE_ERRORS_TOTAL, "operation" => operation.as_str()).increment(1);
            }
        }
    }
}

pub(crate) fn lease_acquired() {
    match HANDLES.get() {
        Some(handles) => handles.leases_in_flight.increment(1.0),
        None => gauge!(LEASES_IN_FLIGHT).increment(1.0),
    }
}

pub(crate) fn lease_settled() {
    match HANDLES.get() {
        Some(handles) => handles.leases_in_flight.decrement(1.0),
        None => gauge!(LEASES_IN_FLIGHT).decrement(1.0),
    }
}

pub(crate) fn lease_lost() {
    match HANDLES.get() {
        Some(handles) => handles.leases_lost.increment(1),
        None => counter!(LEASES_LOST_TOTAL).increment(1),
    }
}
