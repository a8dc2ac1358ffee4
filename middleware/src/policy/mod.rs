//! What the layer does for a request: which methods it covers, how long it keeps responses, what it
//! does on conflicts and store outages. One [`Policy`] is the default; [`Routes`] can override it
//! per path.

use std::time::Duration;

use http::{HeaderName, Method, StatusCode};

use crate::fingerprint::BodyFingerprint;
use crate::headers::IDEMPOTENCY_KEY;

mod routes;

pub use routes::{PathPattern, PatternError, Routes};

/// Whether a route enforces idempotency or only observes what enforcing would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Refuse, replay and lock as configured (the default).
    #[default]
    Enforce,
    /// Shadow rollout: keys are parsed, scoped and fingerprinted and leases taken as in
    /// enforcement, but nothing is refused or replayed. The request always runs; what would have
    /// happened is the response's [`Outcome`](crate::Outcome) (`observed_would_*`), counted in
    /// `idempotency_requests_total` and logged. A request that would have been a replay,
    /// a `409` or a `422` runs without a lease and its response is not stored, so the record of
    /// the first request stays as it was. See GUARANTEES.md.
    Observe,
}

/// What to do when a request arrives while another with the same key is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnConflict {
    /// Answer `409 Conflict` with `Retry-After` at once.
    #[default]
    Reject,
    /// Wait (woken by the store's completion notification) for the running request to finish, up
    /// to [`Policy::wait_timeout`], then replay its response; `409` if it is still running.
    Wait,
}

/// What to do when the store fails or cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Answer `503 Service Unavailable` with `Retry-After`: never risk a second execution
    /// (consistency over availability; the right choice for payments).
    #[default]
    Reject,
    /// Run the request without protection and count it in `idempotency_requests_total` with
    /// outcome `forwarded` (availability over consistency; for feeds and other harmless retries).
    Forward,
}

/// What to do with a covered, keyed request from a caller that presents none of the route's scope
/// credentials (no scope header, no scope cookie; with a custom scope function, one that returns
/// [`Scope::anonymous`](crate::Scope::anonymous)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Anonymous {
    /// Handle it: every anonymous caller shares one scope, so one may be replayed the response
    /// of another who sent the same key and request.
    #[default]
    Share,
    /// Answer `403` ([`credentials-required`](crate::problem#credentials-required)); it never
    /// runs.
    Reject,
}

/// The settings the layer applies to one request.
///
/// Built with `Policy::default()` and the `with_*` methods; checked with [`Policy::validate`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Policy {
    /// Whether the layer acts at all. A disabled route passes every request through untouched.
    pub enabled: bool,
    /// Methods the layer covers; others pass through untouched. Default `POST`, `PATCH`.
    pub methods: Vec<Method>,
    /// Whether a covered request without a key is refused (`400`) rather than passed through.
    pub required: bool,
    /// The header carrying the key. Default `Idempotency-Key`.
    pub header: HeaderName,
    /// How long a completed response is kept for replay. Default 24 hours.
    pub ttl: Duration,
    /// How long a lease lasts without renewal; the layer renews every third of it while the
    /// request runs, so this is how long a crashed holder blocks its key. Default 30 seconds.
    pub lock_ttl: Duration,
    /// What to do on a request whose key is in flight.
    pub on_conflict: OnConflict,
    /// How long [`OnConflict::Wait`] waits before answering `409`. Default 10 seconds.
    pub wait_timeout: Duration,
    /// What to do when the store fails.
    pub on_store_error: OnStoreError,
    /// Headers whose values identify the caller; the key is scoped to them. Default
    /// `Authorization`. Ignored when the layer has a custom scope function.
    pub scope_headers: Vec<HeaderName>,
    /// Cookies whose values identify the caller, besides the scope headers: the key is scoped to
    /// them too, and other cookies (which change between retries) do not count. Default none.
    /// Ignored when the layer has a custom scope function.
    pub scope_cookies: Vec<String>,
    /// What to do with a keyed request from a caller without credentials. Default
    /// [`Anonymous::Share`].
    pub anonymous: Anonymous,
    /// Headers whose values take part in the request fingerprint, besides method, path, query
    /// and body. Default none.
    pub fingerprint_headers: Vec<HeaderName>,
    /// Largest request body buffered for fingerprinting; larger bodies get `413`. Default 1 MiB.
    pub max_request_body: usize,
    /// Largest response body kept for replay; a larger one is streamed to the client and the lease
    /// released, so a retry runs again. Default 8 MiB.
    pub max_response_body: usize,
    /// The `Retry-After` sent with `409`, `429` and `503`. Default 1 second.
    pub retry_after: Duration,
    /// Most keyed requests one caller (scope) may have in progress in this process at once;
    /// more get `429` before their body is read. Bounds what one caller can make the layer
    /// buffer. Callers without credentials are counted per [`ClientIp`](crate::ClientIp) when
    /// the request carries one. `0` means no limit. Default 100.
    pub max_in_flight_per_caller: usize,
    /// Longest time reading a covered request's body may take; a slower body is answered `408`,
    /// before anything ran or any lease was taken. Default 30 seconds.
    pub body_read_timeout: Duration,
    /// Statuses never kept for replay, besides every `5xx` (which is never stored either): such a
    /// response is delivered, the lease released, and a retry runs again. They say "not done,
    /// try later". Default `408`, `425`, `429`.
    pub never_store: Vec<StatusCode>,
    /// Whether the lease is forwarded to the inner service's own upstream: the proxy then sends
    /// `Idempotency-Lease-Token` and `Idempotency-Attempt` (see [`Lease`](crate::Lease)), so the
    /// upstream can fence its writes. The handler-side [`Lease`](crate::Lease) extension is there
    /// either way. Default `false`.
    pub forward_lease: bool,
    /// [`Mode::Enforce`] (default) or [`Mode::Observe`] for a shadow rollout.
    pub mode: Mode,
    /// How the request body takes part in the fingerprint: as bytes (default) or as canonical
    /// JSON without some members ([`BodyFingerprint::Json`]).
    pub fingerprint: BodyFingerprint,
    /// The base of every problem `type` URI, which is `<base>#<slug>`. Default
    /// [`problem::TYPE_BASE`](crate::problem::TYPE_BASE).
    pub problem_type_base: Option<String>,
    /// When set, every idempotency error carries `Link: <docs_url>; rel="describedby"`.
    pub docs_url: Option<String>,
    /// Headers of a response left out of the stored record, so never replayed (for example
    /// `set-cookie`). They are dropped when the response is stored: the first response carries
    /// them, the store never holds them. Default none.
    pub replay_drop_headers: Vec<HeaderName>,
    /// Whether keyed responses that were stored (the first and every replay) carry
    /// [`Idempotency-TTL`](crate::headers::IDEMPOTENCY_TTL): the whole seconds the record is still
    /// kept. Default `true`.
    pub expiry_header: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            enabled: true,
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            header: IDEMPOTENCY_KEY.clone(),
            ttl: Duration::from_secs(24 * 60 * 60),
            lock_ttl: Duration::from_secs(30),
            on_conflict: OnConflict::Reject,
            wait_timeout: Duration::from_secs(10),
            on_store_error: OnStoreError::Reject,
            scope_headers: vec![http::header::AUTHORIZATION],
            scope_cookies: Vec::new(),
            anonymous: Anonymous::Share,
            fingerprint_headers: Vec::new(),
            max_request_body: 1024 * 1024,
            max_response_body: 8 * 1024 * 1024,
            retry_after: Duration::from_secs(1),
            max_in_flight_per_caller: 100,
            body_read_timeout: Duration::from_secs(30),
            never_store: vec![
                StatusCode::REQUEST_TIMEOUT,
                StatusCode::TOO_EARLY,
                StatusCode::TOO_MANY_REQUESTS,
            ],
            forward_lease: false,
            mode: Mode::Enforce,
            fingerprint: BodyFingerprint::Bytes,
            problem_type_base: None,
            docs_url: None,
            replay_drop_headers: Vec::new(),
            expiry_header: true,
        }
    }
}

/// A policy value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The offending field, as named in the proxy configuration.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

macro_rules! with_methods {
    ($($(#[$doc:meta])* $name:ident: $field:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        #[must_use]
        pub fn $name(mut self, value: impl Into<$ty>) -> Self {
            self.$field = value.into();
            self
        }
    )*};
}

impl Policy {
    with_methods! {
        /// Sets [`Policy::enabled`].
        with_enabled: enabled: bool;
        /// Sets [`Policy::methods`].
        with_methods: methods: Vec<Method>;
        /// Sets [`Policy::required`].
        with_required: required: bool;
        /// Sets [`Policy::header`].
        with_header: header: HeaderName;
        /// Sets [`Policy::ttl`].
        with_ttl: ttl: Duration;
        /// Sets [`Policy::lock_ttl`].
        with_lock_ttl: lock_ttl: Duration;
        /// Sets [`Policy::on_conflict`].
        with_on_conflict: on_conflict: OnConflict;
        /// Sets [`Policy::wait_timeout`].
        with_wait_timeout: wait_timeout: Duration;
        /// Sets [`Policy::on_store_error`].
        with_on_store_error: on_store_error: OnStoreError;
        /// Sets [`Policy::scope_headers`].
        with_scope_headers: scope_headers: Vec<HeaderName>;
        /// Sets [`Policy::scope_cookies`].
        with_scope_cookies: scope_cookies: Vec<String>;
        /// Sets [`Policy::anonymous`].
        with_anonymous: anonymous: Anonymous;
        /// Sets [`Policy::fingerprint_headers`].
        with_fingerprint_headers: fingerprint_headers: Vec<HeaderName>;
        /// Sets [`Policy::max_request_body`].
        with_max_request_body: max_request_body: usize;
        /// Sets [`Policy::max_response_body`].
        with_max_response_body: max_response_body: usize;
        /// Sets [`Policy::retry_after`].
        with_retry_after: retry_after: Duration;
        /// Sets [`Policy::max_in_flight_per_caller`].
        with_max_in_flight_per_caller: max_in_flight_per_caller: usize;
        /// Sets [`Policy::body_read_timeout`].
        with_body_read_timeout: body_read_timeout: Duration;
        /// Sets [`Policy::never_store`].
        with_never_store: never_store: Vec<StatusCode>;
        /// Sets [`Policy::forward_lease`].
        with_forward_lease: forward_lease: bool;
        /// Sets [`Policy::mode`].
        with_mode: mode: Mode;
        /// Sets [`Policy::fingerprint`].
        with_fingerprint: fingerprint: BodyFingerprint;
        /// Sets [`Policy::replay_drop_headers`].
        with_replay_drop_headers: replay_drop_headers: Vec<HeaderName>;
        /// Sets [`Policy::expiry_header`].
        with_expiry_header: expiry_header: bool;
    }

    /// Sets [`Policy::problem_type_base`].
    #[must_use]
    pub fn with_problem_type_base(mut self, base: impl Into<String>) -> Self {
        self.problem_type_base = Some(base.into());
        self
    }

    /// Sets [`Policy::docs_url`].
    #[must_use]
    pub fn with_docs_url(mut self, url: impl Into<String>) -> Self {
        self.docs_url = Some(url.into());
        self
    }

    /// How this route's problem answers are documented, for [`Problem::documented`].
    ///
    /// [`Problem::documented`]: crate::problem::Problem::documented
    pub fn problem_docs(&self) -> crate::problem::ProblemDocs {
        crate::problem::ProblemDocs::new(
            self.problem_type_base.as_deref(),
            self.docs_url.as_deref(),
        )
    }

    /// A problem answer of this route: its `type` under [`Policy::problem_type_base`], and a
    /// `Link` to [`Policy::docs_url`] when set.
    pub fn problem(
        &self,
        kind: crate::problem::ProblemKind,
        detail: impl Into<String>,
    ) -> crate::problem::Problem {
        crate::problem::Problem::new(kind, detail).documented(&self.problem_docs())
    }

    /// Checks the values work together: durations are positive and a lease outlives its renewal
    /// interval by a margin.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let fail = |field, reason: &str| {
            Err(PolicyError {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.ttl < Duration::from_millis(1) {
            return fail("ttl", "must be at least 1ms");
        }
        if self.lock_ttl < Duration::from_millis(30) {
            // Renewal runs every lock_ttl / 3: below this it would hammer the store.
            return fail("lock_ttl", "must be at least 30ms");
        }
        if self.enabled && self.methods.is_empty() {
            return fail("methods", "must name at least one method");
        }
        if self.retry_after.is_zero() {
            return fail("retry_after", "must be positive");
        }
        if self.body_read_timeout.is_zero() {
            return fail("body_read_timeout", "must be positive");
        }
        if let Some(bad) = self
            .scope_cookies
            .iter()
            .find(|name| !crate::cookie::is_valid_name(name))
        {
            return Err(PolicyError {
                field: "scope_cookies",
                reason: format!("{bad:?} is not a valid cookie name"),
            });
        }
        for (field, value) in [
            ("problem_type_base", &self.problem_type_base),
            ("docs_url", &self.docs_url),
        ] {
            if let Some(value) = value
                && let Err(reason) = crate::problem::check_absolute_uri(value)
            {
                return Err(PolicyError { field, reason });
            }
        }
        Ok(())
    }

    /// Whether a response with `status` is kept for replay: everything below 500 that is not in
    /// [`Policy::never_store`]. Any other releases the lease so that a retry runs again.
    pub fn is_storable(&self, status: StatusCode) -> bool {
        !status.is_server_error() && !self.never_store.contains(&status)
    }

    /// Whether stored responses carry `Idempotency-TTL`: only when enforcing, since an observed
    /// key is never replayed.
    pub(crate) fn advertises_expiry(&self) -> bool {
        self.expiry_header && self.mode == Mode::Enforce
    }

    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.enabled && self.methods.contains(method)
    }

    /// The renewal period: a third of the lease, so two renewals can fail before it lapses.
    pub(crate) fn renew_every(&self) -> Duration {
        self.lock_ttl / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_and_server_errors_are_never_stored_by_default() {
        let policy = Policy::default();
        for status in [408, 425, 429, 500, 503] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(!policy.is_storable(status), "{status}");
        }
        assert!(policy.is_storable(StatusCode::CREATED));
        assert!(policy.is_storable(StatusCode::CONFLICT));
        let keeps_429 = policy.with_never_store(Vec::new());
        assert!(keeps_429.is_storable(StatusCode::TOO_MANY_REQUESTS));
        assert!(!keeps_429.is_storable(StatusCode::BAD_GATEWAY));
    }

    #[test]
    fn validation_names_the_field() {
        let error = Policy::default()
            .with_lock_ttl(Duration::from_millis(1))
            .validate()
            .unwrap_err();
        assert_eq!(error.field, "lock_ttl");
        assert!(Policy::default().validate().is_ok());
    }
}
