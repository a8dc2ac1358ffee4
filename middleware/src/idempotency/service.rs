//! The service and its dispatch: the first step of the state machine, which decides for each
//! request whether it passes untouched, is refused (or, in observe mode, noted and run), or goes on
//! as a [`Keyed`] request through the begin/wait loop ([`keyed`](super::keyed)).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower::Service;

use super::body::{RequestBody, ResponseBody};
use super::future::ResponseFuture;
use super::keyed::Keyed;
use super::layer::Shared;
use super::{observe, outcome};
use crate::BoxError;
use crate::key::{KeyError, parse_key};
use crate::path;
use crate::policy::{Anonymous, Mode, Policy};
use crate::problem::{Problem, ProblemKind};
use crate::scope::{ClientIp, RecordKey, Scope, presents_credentials};
use crate::store::IdempotencyStore;
use crate::telemetry::Outcome;

/// Marks a response whose operation may or may not have taken effect: the inner service gave up
/// on it (an upstream timeout, a connection lost after the request was sent) while it may still be
/// running somewhere.
///
/// Put it in the response's extensions. The layer then neither stores the response nor releases
/// the lease: the lease is left to expire after `lock_ttl`, so a retry neither replays a failure
/// nor runs the operation a second time alongside the first. A plain `5xx` without the marker
/// means the operation did not take effect, and releases the lease at once.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_idempotency::OutcomeUnknown;
///
/// let mut timed_out = Response::new(());
/// *timed_out.status_mut() = StatusCode::GATEWAY_TIMEOUT;
/// timed_out.extensions_mut().insert(OutcomeUnknown);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutcomeUnknown;
/// Middleware that runs each keyed request once and replays its response to retries.
///
/// Built by [`IdempotencyLayer`](super::IdempotencyLayer).
pub struct Idempotency<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<St>>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let hook = self.shared.on_outcome.clone();
        self.dispatch(request).with_hook(hook.as_ref())
    }
}

impl<S, St: IdempotencyStore> Idempotency<S, St> {
    /// Hands the request on untouched, its response tagged with `outcome`.
    fn pass<ReqB, ResB>(
        &mut self,
        parts: Parts,
        body: ReqB,
        outcome: Outcome,
    ) -> ResponseFuture<S::Future, ResB, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Body<Data = Bytes> + Send + 'static,
        ReqB::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let request = Request::from_parts(parts, RequestBody::original(body));
        ResponseFuture::passthrough(self.inner.call(request), outcome)
    }

    /// Refuses the request, or in observe mode notes that enforcement would have and runs it.
    fn refuse_or_observe<ReqB, ResB>(
        &mut self,
        policy: &Policy,
        (parts, body): (Parts, ReqB),
        (refused, observed): (Outcome, Outcome),
        problem: Problem,
    ) -> ResponseFuture<S::Future, ResB, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Body<Data = Bytes> + Send + 'static,
        ReqB::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        if policy.mode == Mode::Observe {
            let observed = observe::noted(observed, parts.uri.path());
            return self.pass(parts, body, observed);
        }
        ResponseFuture::ready(outcome::refused(policy, refused, problem))
    }

    fn dispatch<ReqB, ResB>(
        &mut self,
        mut request: Request<ReqB>,
    ) -> ResponseFuture<S::Future, ResB, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Body<Data = Bytes> + Send + 'static,
        ReqB::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        // One look at the routes per request: a reload swaps them between requests, not within.
        let routes = self.shared.routes.current();
        // Routes, fingerprint and the inner service all see the path the upstream will act on.
        match path::normalize_uri(request.uri(), routes.merges_slashes()) {
            Ok(Some(normal)) => *request.uri_mut() = normal,
            Ok(None) => {}
            Err(error) => {
                // No route applies to a path that has no single meaning: the default's docs do.
                return ResponseFuture::ready(outcome::refused(
                    routes.default_policy(),
                    Outcome::InvalidTarget,
                    Problem::new(
                        ProblemKind::InvalidTarget,
                        format!("the request path is ambiguous: {error}"),
                    ),
                ));
            }
        }
        let policy = routes.policy_for(request.uri().path()).clone();
        let docs = policy.problem_docs();
        if !docs.is_default() {
            // For the inner service's own problem answers (the proxy's 502 and 504).
            request.extensions_mut().insert(docs);
        }
        let (parts, body) = request.into_parts();
        if !policy.covers(&parts.method) {
            return self.pass(parts, body, Outcome::Uncovered);
        }
        if asks_to_switch_protocols(&parts.headers) {
            let refusal = upgrade_refused(&parts.method);
            return self.refuse_or_observe(
                &policy,
                (parts, body),
                (Outcome::UpgradeRefused, Outcome::ObservedWouldRefuseUpgrade),
                refusal,
            );
        }
        let mut keys = parts.headers.get_all(&policy.header).iter();
        let key = match (keys.next(), keys.next()) {
            (None, _) if policy.required => {
                let detail = format!("this route requires the `{}` header", policy.header);
                return self.refuse_or_observe(
                    &policy,
                    (parts, body),
                    (Outcome::MissingKey, Outcome::ObservedWouldMissingKey),
                    Problem::new(ProblemKind::MissingKey, detail),
                );
            }
            (None, _) => return self.pass(parts, body, Outcome::Unkeyed),
            (Some(_), Some(_)) => Err(KeyError::Repeated),
            (Some(value), None) => parse_key(value),
        };
        let key = match key {
            Ok(key) => key,
            Err(error) => {
                let detail = format!("`{}`: {error}", policy.header);
                return self.refuse_or_observe(
                    &policy,
                    (parts, body),
                    (Outcome::InvalidKey, Outcome::ObservedWouldInvalidKey),
                    Problem::new(ProblemKind::InvalidKey, detail),
                );
            }
        };
        let (scope, anonymous) = match &self.shared.scope {
            Some(scope) => {
                let scope = scope(&parts);
                (scope, scope == Scope::anonymous())
            }
            None => (
                Scope::from_credentials(
                    &parts.headers,
                    &policy.scope_headers,
                    &policy.scope_cookies,
                ),
                !presents_credentials(&parts.headers, &policy.scope_headers, &policy.scope_cookies),
            ),
        };
        if anonymous && policy.anonymous == Anonymous::Reject {
            return self.refuse_or_observe(
                &policy,
                (parts, body),
                (Outcome::Anonymous, Outcome::ObservedWouldRejectAnonymous),
                Problem::new(
                    ProblemKind::CredentialsRequired,
                    "this route runs keyed requests only for callers who identify themselves",
                ),
            );
        }
        let record_key = RecordKey::new(&scope, &key);
        // Anonymous callers share a scope, not a limit: each client address has its own.
        let counted_as = match parts.extensions.get::<ClientIp>() {
            Some(client) if anonymous => Scope::of_client_ip(client.0),
            _ => scope,
        };
        // Counted before the body is read: the limit bounds what one caller can make us buffer.
        let permit = match policy.max_in_flight_per_caller {
            0 => None,
            limit => match self.shared.callers.admit(counted_as, limit) {
                Some(permit) => Some(permit),
                None => {
                    return self.refuse_or_observe(
                        &policy,
                        (parts, body),
                        (Outcome::Throttled, Outcome::ObservedWouldThrottle),
                        Problem::new(
                            ProblemKind::TooManyInFlight,
                            format!(
                                "this caller already has {limit} keyed requests in progress; \
                                 retry when one finishes"
                            ),
                        )
                        .retry_after(policy.retry_after),
                    );
                }
            },
        };
        if policy.mode == Mode::Observe && body.size_hint().lower() > policy.max_request_body as u64
        {
            // Observe mode runs it unread: enforcement would refuse it before reading it too.
            let observed = observe::noted(Outcome::ObservedWouldTooLarge, parts.uri.path());
            return self.pass(parts, body, observed);
        }
        // The clone takes the place of the service that was driven to readiness, which goes on
        // to run the request (the usual tower idiom).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let request = Keyed {
            shared: self.shared.clone(),
            policy: policy.clone(),
            record_key,
            parts,
            permit,
        };
        ResponseFuture::managed(Box::pin(request.handle(ready, body)))
    }
}

/// An `Upgrade` request (WebSocket and the like): its response is a switch to another protocol,
/// which can be neither stored nor replayed, so a covered method never passes with one.
fn asks_to_switch_protocols(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
}

fn upgrade_refused(method: &http::Method) -> Problem {
    Problem::new(
        ProblemKind::UpgradeNotAllowed,
        format!(
            "{method} is covered by idempotency on this route, and a protocol switch \
             (`Upgrade`) can be neither stored nor replayed; open the connection with a method \
             the route does not cover (usually GET)"
        ),
    )
}
