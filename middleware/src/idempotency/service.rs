use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::Service;

use super::body::{RequestBody, ResponseBody, Streamed};
use super::body_timeout::BodyTimeout;
use super::callers::CallerPermit;
use super::future::ResponseFuture;
use super::late::{self, LateOutcome};
use super::layer::Shared;
use super::replay_cache::Cached;
use super::{observe, outcome};
use crate::BoxError;
use crate::fingerprint::Fingerprint;
use crate::headers::IDEMPOTENT_REPLAYED;
use crate::key::{KeyError, parse_key};
use crate::lease::CompletedByHandler;
use crate::path;
use crate::policy::{Anonymous, Mode, OnConflict, OnStoreError, Policy};
use crate::problem::{Problem, ProblemKind};
use crate::record::StoredResponse;
use crate::scope::{ClientIp, RecordKey, Scope, presents_credentials};
use crate::store::{Begin, IdempotencyStore, LeaseToken, StoreError};
use crate::telemetry::{self as m, Outcome};

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

/// The problem answer for a response body that failed before its head was sent: `504` when it
/// stalled ([`BodyTimeout`]), `502` otherwise.
fn body_failed(error: &BoxError) -> Problem {
    if BodyTimeout::is_in(error.as_ref()) {
        Problem::new(
            ProblemKind::UpstreamTimeout,
            format!("the response body stalled: {error}; the operation may have run"),
        )
    } else {
        Problem::new(
            ProblemKind::UpstreamUnavailable,
            format!("the response body failed: {error}; the operation may have run"),
        )
    }
}

/// Frames buffered between the detached task and a slow client before the task waits.
const STREAM_BUFFER: usize = 16;
/// Attempts to store a response before giving up on it (the client still gets it).
const COMPLETE_ATTEMPTS: u32 = 3;

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

/// A covered request with a valid key, on its way through the state machine.
struct Keyed<St> {
    shared: Arc<Shared<St>>,
    policy: Arc<Policy>,
    record_key: RecordKey,
    parts: Parts,
    /// Holds the caller's place until the request is over, response streamed and stored.
    permit: Option<CallerPermit>,
}

impl<St: IdempotencyStore> Keyed<St> {
    async fn handle<S, ReqB, ResB>(
        self,
        inner: S,
        body: ReqB,
    ) -> Result<Response<ResponseBody<ResB>>, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Body<Data = Bytes> + Send + 'static,
        ReqB::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let body = match self.buffer_body(body).await {
            Ok(body) => body,
            Err((outcome, rejection)) => {
                return Ok(outcome::refused(&self.policy, outcome, rejection));
            }
        };
        let fingerprint = Fingerprint::of_request(
            &self.parts.method,
            &self.parts.uri,
            &self.parts.headers,
            &self.policy.fingerprint_headers,
            &self.policy.fingerprint.prepare(&body),
        );
        let observed = match self.begin(&fingerprint).await {
            Ok(Begun::Acquired(granted)) => {
                m::outcome(Outcome::Executed);
                let response = self.execute(inner, body, granted, fingerprint).await?;
                return Ok(outcome::tagged(response, Outcome::Executed));
            }
            Ok(Begun::Answered(response)) => return Ok(response),
            Ok(Begun::Observed(observed)) => observe::noted(observed, self.parts.uri.path()),
            Err(error) => match (self.policy.on_store_error, self.policy.mode) {
                (OnStoreError::Reject, Mode::Enforce) => {
                    tracing::warn!(%error, "idempotency store failed; rejecting the request");
                    return Ok(outcome::refused(
                        &self.policy,
                        Outcome::Rejected,
                        Problem::new(
                            ProblemKind::StoreUnavailable,
                            "the idempotency store is unavailable; the request was not run",
                        )
                        .retry_after(self.policy.retry_after),
                    ));
                }
                (OnStoreError::Reject, _) => {
                    tracing::warn!(%error, "idempotency store failed; observe mode runs the request");
                    observe::noted(Outcome::ObservedWouldReject, self.parts.uri.path())
                }
                (OnStoreError::Forward, _) => {
                    m::outcome(Outcome::Forwarded);
                    tracing::warn!(%error, "idempotency store failed; running the request unprotected");
                    Outcome::Forwarded
                }
            },
        };
        // Runs without a lease, and its response is not stored: what the store holds (another
        // request's lease or record) is left as it was.
        let mut inner = inner;
        let request = Request::from_parts(self.parts, RequestBody::buffered(body));
        let response = inner.call(request).await?.map(ResponseBody::inner);
        Ok(outcome::tagged(response, observed))
    }

    /// Reads the whole request body, refusing bodies over the policy's limit (`413`) before
    /// reading them where `Content-Length` already tells, and bodies slower than
    /// `body_read_timeout` (`408`). Nothing has run and no lease is held yet, so a refusal leaves
    /// nothing behind.
    async fn buffer_body<B>(&self, body: B) -> Result<Bytes, (Outcome, Problem)>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let limit = self.policy.max_request_body;
        let too_large = || {
            (
                Outcome::TooLarge,
                Problem::new(
                    ProblemKind::BodyTooLarge,
                    format!("the request body is larger than {limit} bytes"),
                ),
            )
        };
        if body.size_hint().lower() > limit as u64 {
            return Err(too_large());
        }
        let timeout = self.policy.body_read_timeout;
        let Ok(collected) =
            tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await
        else {
            return Err((
                Outcome::BodyTimeout,
                Problem::new(
                    ProblemKind::BodyReadTimeout,
                    format!(
                        "the request body did not arrive within {}ms; nothing was run",
                        timeout.as_millis()
                    ),
                ),
            ));
        };
        match collected {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
            Err(error) => Err((
                Outcome::InvalidBody,
                Problem::new(
                    ProblemKind::InvalidBody,
                    format!("the request body could not be read: {error}"),
                ),
            )),
        }
    }

    /// One `begin` call that finishes even if abandoned. When the client goes away or the store
    /// timeout fires mid-call, the store may still carry the call out; the call then finishes in
    /// the background and releases a lease it acquired, instead of leaving the key locked for
    /// `lock_ttl` by a lease nobody will use.
    fn begin_call(
        &self,
        fingerprint: Fingerprint,
    ) -> Detached<impl Future<Output = BeginResult> + use<St>> {
        let (shared, key, lock_ttl) = (self.shared.clone(), self.record_key, self.policy.lock_ttl);
        let store = shared.store.clone();
        let call = async move {
            // On `St` itself: the `Arc` forwarding impl would box the future once more.
            St::begin(&store, &key, &fingerprint, lock_ttl).await
        };
        Detached::new(
            call,
            Box::new(move |begun: BeginResult| {
                Box::pin(async move {
                    if let Ok(Begin::Acquired { token, .. }) = begun {
                        let store = shared.store();
                        let _ = shared
                            .timed(m::Operation::Release, store.release(&key, token))
                            .await;
                    }
                })
            }),
        )
    }

    /// Takes the lease, or answers from the record: replay, `422`, `409`, or after waiting.
    async fn begin<B>(&self, fingerprint: &Fingerprint) -> Result<Begun<B>, StoreError> {
        let observing = self.policy.mode == Mode::Observe;
        if let Some(cached) = self
            .shared
            .replay_cache
            .as_ref()
            .and_then(|cache| cache.get(&self.record_key, fingerprint))
        {
            return Ok(match (cached, observing) {
                (Cached::Replay(_), true) => Begun::Observed(Outcome::ObservedWouldReplay),
                (Cached::Mismatch, true) => Begun::Observed(Outcome::ObservedWouldMismatch),
                (Cached::Replay(stored), false) => Begun::Answered(self.replay(stored)),
                (Cached::Mismatch, false) => Begun::Answered(self.mismatch()),
            });
        }
        // Observe mode never waits: the duplicate runs at once, as without the layer.
        let subscription = (self.policy.on_conflict == OnConflict::Wait && !observing)
            .then(|| self.shared.store.subscribe(&self.record_key));
        let deadline = Instant::now() + self.policy.wait_timeout;
        loop {
            // Armed before looking, so a completion between the look and the wait is not missed.
            let completed = subscription.as_ref().map(|s| s.notified());
            let call = self.begin_call(*fingerprint);
            let begun = self.shared.timed(m::Operation::Begin, call).await?;
            match begun {
                Begin::Acquired {
                    token,
                    attempt,
                    recovery_point,
                } => return Ok(Begun::Acquired((token, attempt, recovery_point))),
                Begin::Completed(_) if observing => {
                    return Ok(Begun::Observed(Outcome::ObservedWouldReplay));
                }
                // Hook for the replay cache: once `Begin::Completed` carries the record's expiry,
                // a replay read from the store can be cached here too (see `ReplayCache`).
                Begin::Completed(stored) => return Ok(Begun::Answered(self.replay(stored))),
                Begin::Mismatch if observing => {
                    return Ok(Begun::Observed(Outcome::ObservedWouldMismatch));
                }
                Begin::Mismatch => return Ok(Begun::Answered(self.mismatch())),
                Begin::InFlight if observing => {
                    return Ok(Begun::Observed(Outcome::ObservedWouldConflict));
                }
                Begin::InFlight => {
                    let now = Instant::now();
                    if let Some(completed) = completed.filter(|_| now < deadline) {
                        let store = self.shared.store();
                        let watched = self
                            .shared
                            .timed(m::Operation::Watch, store.watch(&self.record_key))
                            .await;
                        if matches!(watched, Ok(false)) {
                            // Completed or released between the two calls: look again now.
                            continue;
                        }
                        // Polling too finds a lease whose holder died and has since expired.
                        let nap = (deadline - now).min(self.shared.poll_interval);
                        let _woken = tokio::time::timeout(nap, completed).await;
                        continue;
                    }
                    return Ok(Begun::Answered(outcome::refused(
                        &self.policy,
                        Outcome::Conflict,
                        Problem::new(
                            ProblemKind::InFlight,
                            format!(
                                "a request with this `{}` is still in progress",
                                self.policy.header
                            ),
                        )
                        .retry_after(self.policy.retry_after),
                    )));
                }
            }
        }
    }

    /// The stored response, as a replay.
    fn replay<B>(&self, stored: StoredResponse) -> Response<ResponseBody<B>> {
        m::outcome(Outcome::Replayed);
        let mut response = stored.into_response(ResponseBody::full);
        // Records stored before the header was listed do not replay it either.
        for name in &self.policy.replay_drop_headers {
            response.headers_mut().remove(name);
        }
        response.headers_mut().insert(
            IDEMPOTENT_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
        outcome::tagged(response, Outcome::Replayed)
    }

    /// `422`: the key was used for another request.
    fn mismatch<B>(&self) -> Response<ResponseBody<B>> {
        outcome::refused(
            &self.policy,
            Outcome::Mismatch,
            Problem::new(
                ProblemKind::KeyReused,
                format!(
                    "this `{}` was already used for a different request",
                    self.policy.header
                ),
            ),
        )
    }

    /// Runs the request under the lease. It runs in the client's task, but a client that goes
    /// away does not cancel it: the unfinished work moves to a task of its own, and the response
    /// is still stored for the retry.
    async fn execute<S, ReqB, ResB>(
        self,
        inner: S,
        body: Bytes,
        granted: Granted,
        fingerprint: Fingerprint,
    ) -> Result<Response<ResponseBody<ResB>>, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Send + 'static,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let token = granted.0;
        // The handler's view of the lease: its token to fence its own writes, its checkpoints.
        let handler_lease = crate::lease::Lease::new(
            self.shared.store.clone(),
            self.record_key,
            granted,
            self.policy.forward_lease,
        )
        .with_ttl(self.policy.ttl);
        let mut parts = self.parts;
        parts.extensions.insert(handler_lease);
        let lease = Lease::new(
            self.shared,
            self.policy,
            self.record_key,
            token,
            fingerprint,
            self.permit,
        );
        let request = Request::from_parts(parts, RequestBody::buffered(body));
        // The client's response is made even if nobody is left to read it: storing it is the point.
        Detached::new(lease.run(inner, request), Box::new(|_| Box::pin(async {}))).await
    }
}

/// What to do, on a task of its own, with the output of a [`Detached`] future whose caller left.
type Abandoned<T> = Box<dyn FnOnce(T) -> BoxFuture<'static, ()> + Send>;

/// A future that finishes even if its caller stops waiting: dropped before completion, it moves
/// to a task of its own, and its output goes to `abandoned` there. Running in the caller's task
/// until then spares every request a spawn and a cross-thread wake-up, which is most of what a
/// detached task would cost.
struct Detached<F: Future + Send + 'static>
where
    F::Output: Send,
{
    future: Option<std::pin::Pin<Box<F>>>,
    abandoned: Option<Abandoned<F::Output>>,
}

impl<F: Future + Send + 'static> Detached<F>
where
    F::Output: Send,
{
    fn new(future: F, abandoned: Abandoned<F::Output>) -> Self {
        Self {
            future: Some(Box::pin(future)),
            abandoned: Some(abandoned),
        }
    }
}

impl<F: Future + Send + 'static> Future for Detached<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(future) = self.future.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for Detached<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        // A future that panicked must not be polled again; its lease guard releases the lease.
        if std::thread::panicking() {
            return;
        }
        if let (Some(future), Some(abandoned), Ok(runtime)) = (
            self.future.take(),
            self.abandoned.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            runtime.spawn(async move { abandoned(future.await).await });
        }
    }
}

type BeginResult = Result<Begin, StoreError>;

/// A lease as `begin` granted it: token, attempt, recovery point.
type Granted = (LeaseToken, u32, Option<crate::lease::Checkpoint>);

enum Begun<B> {
    Acquired(Granted),
    Answered(Response<ResponseBody<B>>),
    /// Observe mode: what enforcement would have answered; the request runs without a lease.
    Observed(Outcome),
}

impl<St: IdempotencyStore> Shared<St> {
    /// The store itself. Calls go to `St`'s methods rather than through the `Arc<St>`
    /// forwarding impl, which would box every store future a second time.
    pub(crate) fn store(&self) -> &St {
        &self.store
    }

    /// Runs one store operation under the store timeout, recording its latency and errors.
    pub(crate) async fn timed<T>(
        &self,
        operation: m::Operation,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.store_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.store_timeout)),
        };
        m::store_call(operation, started.elapsed(), &result);
        result
    }
}

/// A held lease. Dropped without being settled (a panic in the inner service, a cancelled task),
/// it releases itself so that the key is free for a retry at once rather than after `lock_ttl`.
pub(super) struct Lease<St: IdempotencyStore> {
    shared: Arc<Shared<St>>,
    policy: Arc<Policy>,
    key: RecordKey,
    token: LeaseToken,
    /// The request's, for the replay cache.
    fingerprint: Fingerprint,
    settled: bool,
    _permit: Option<CallerPermit>,
}

impl<St: IdempotencyStore> Lease<St> {
    fn new(
        shared: Arc<Shared<St>>,
        policy: Arc<Policy>,
        key: RecordKey,
        token: LeaseToken,
        fingerprint: Fingerprint,
        permit: Option<CallerPermit>,
    ) -> Self {
        m::lease_acquired();
        shared.leases.acquired();
        Self {
            shared,
            policy,
            key,
            token,
            fingerprint,
            settled: false,
            _permit: permit,
        }
    }

    async fn run<S, ReqB, ResB>(
        mut self,
        mut inner: S,
        request: Request<RequestBody<ReqB>>,
    ) -> Result<Response<ResponseBody<ResB>>, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let renewal = self.renewal();
        let work = async {
            match inner.call(request).await {
                Ok(response) => Ok(self.deliver(response).await),
                Err(error) => {
                    m::not_stored(m::NotStored::InnerError);
                    self.release().await;
                    Err(error)
                }
            }
        };
        // Renewal never finishes on its own: this ends when the work does, and drops it.
        tokio::select! {
            done = work => done,
            never = renewal => match never {},
        }
    }

    fn renewal(&self) -> impl Future<Output = std::convert::Infallible> + Send + 'static {
        renew_until_dropped(
            self.shared.clone(),
            self.key,
            self.token,
            self.policy.clone(),
        )
    }

    /// Hands the response on while keeping a copy to store.
    async fn deliver<ResB>(&mut self, response: Response<ResB>) -> Response<ResponseBody<ResB>>
    where
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let (parts, body) = response.into_parts();
        if let Some(completed) = parts.extensions.get::<CompletedByHandler>()
            && completed.completes(&self.key, self.token)
        {
            // The handler stored the record in its own transaction, which has committed.
            completed.wake_waiters();
            self.settle();
            return Response::from_parts(parts, ResponseBody::inner(body));
        }
        if parts.extensions.get::<OutcomeUnknown>().is_some()
            && let Some(call) = parts
                .extensions
                .get::<LateOutcome>()
                .and_then(LateOutcome::take)
        {
            // The call may still answer: wait for it under the lease rather than lose it.
            let window = self.policy.lock_ttl;
            tokio::spawn(late::await_late(self.take(), call, window));
            return late::pending(window)
                .documented(&self.policy.problem_docs())
                .into_response(ResponseBody::full);
        }
        if parts.extensions.get::<OutcomeUnknown>().is_some() {
            // The operation may still be running, or may have run: a retry now could run it a
            // second time alongside. Keep the lease, unrenewed, so retries wait out lock_ttl.
            m::not_stored(m::NotStored::OutcomeUnknown);
            tracing::warn!(
                key = ?self.key,
                lock_ttl = ?self.policy.lock_ttl,
                "the outcome of the request is unknown; its key stays locked until lock_ttl passes"
            );
            self.settle();
            return Response::from_parts(parts, ResponseBody::inner(body));
        }
        if !self.policy.is_storable(parts.status) {
            m::not_stored(if parts.status.is_server_error() {
                m::NotStored::ServerError
            } else {
                m::NotStored::NeverStore
            });
            self.release().await;
            return Response::from_parts(parts, ResponseBody::inner(body));
        }
        let size_hint = body.size_hint();
        let mut body = Box::pin(body);
        let mut copy = Copy::new(self.policy.max_response_body);

        // Most responses are small and of known length, or produced at once: read the whole body
        // here (waiting for it when its length is known and fits, taking only what is ready
        // otherwise), and store it before the client sees the response, so a retry sent the
        // moment the response arrives is a replay, not a conflict. This spares the common case
        // the streaming task and its channel.
        let known_to_fit = size_hint
            .exact()
            .is_some_and(|len| len <= self.policy.max_response_body as u64);
        let mut ready = Vec::new();
        let mut ended = false;
        while !ended {
            let next = if known_to_fit {
                Some(body.frame().await)
            } else {
                body.frame().now_or_never()
            };
            match next {
                Some(Some(Ok(frame))) => ready.push(copy.keep(frame)),
                Some(Some(Err(error))) => {
                    // Nothing was sent yet: the client gets a problem answer instead of a head
                    // followed by a broken body.
                    let error: BoxError = error.into();
                    self.outcome_unknown(&error);
                    return body_failed(&error)
                        .documented(&self.policy.problem_docs())
                        .into_response(ResponseBody::full);
                }
                Some(None) => ended = true,
                None => break,
            }
        }
        if ended && copy.storable {
            let whole = copy.whole();
            self.complete(&parts, whole.clone()).await;
            return Response::from_parts(parts, ResponseBody::full(whole));
        }

        // Otherwise the rest of the body streams through a channel from a task of its own, which
        // keeps reading even if the client goes away, so that the response is still stored.
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let stream = Stream {
            lease: self.take(),
            head: parts.clone(),
            body,
            copy,
            ready,
            ended,
        };
        tokio::spawn(stream.run(sender));
        Response::from_parts(parts, ResponseBody::streamed(receiver, size_hint))
    }

    pub(super) fn shared(&self) -> &Arc<Shared<St>> {
        &self.shared
    }

    pub(super) fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub(super) fn key(&self) -> &RecordKey {
        &self.key
    }

    pub(super) fn token(&self) -> LeaseToken {
        self.token
    }

    /// Moves the lease out, leaving a settled husk whose drop does nothing.
    fn take(&mut self) -> Self {
        let taken = Self {
            shared: self.shared.clone(),
            policy: self.policy.clone(),
            key: self.key,
            token: self.token,
            fingerprint: self.fingerprint,
            settled: self.settled,
            _permit: self._permit.take(),
        };
        self.settled = true;
        taken
    }

    /// Stores the response, retrying a failing store briefly: giving up means a retry after the
    /// lease expires runs the request again.
    pub(super) async fn complete(&mut self, parts: &http::response::Parts, body: Bytes) {
        let mut headers = parts.headers.clone();
        // Dropped before storing: such headers (a session cookie) never sit in the store.
        for name in &self.policy.replay_drop_headers {
            headers.remove(name);
        }
        let stored = StoredResponse::new(parts.status, headers, body);
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=COMPLETE_ATTEMPTS {
            // Before the call: the record's ttl runs from some moment after this one.
            let mark = self.shared.replay_cache.as_ref().map(|cache| cache.mark());
            let store = self.shared.store();
            let result = self
                .shared
                .timed(m::Operation::Complete, async {
                    store
                        .complete(&self.key, self.token, &stored, self.policy.ttl)
                        .await
                })
                .await;
            match result {
                Ok(()) => {
                    if let (Some(cache), Some(mark)) = (&self.shared.replay_cache, mark) {
                        cache.fill(mark, self.key, self.fingerprint, &stored, self.policy.ttl);
                    }
                    self.settle();
                    return;
                }
                Err(StoreError::LeaseLost) if attempt > 1 => {
                    // The reply to an earlier attempt was lost: that attempt may have stored the
                    // response (then this is our own completion refusing a second one).
                    tracing::warn!(
                        key = ?self.key,
                        "storing the response: outcome of the earlier attempt unknown, and the \
                         lease is no longer ours; a retry gets the stored response or runs again"
                    );
                    self.settle();
                    return;
                }
                Err(StoreError::LeaseLost) => {
                    m::lease_lost();
                    tracing::warn!(
                        key = ?self.key,
                        "lease lost before the response could be stored: another request took \
                         it over after lock_ttl; its result stands and this one is discarded"
                    );
                    self.settle();
                    return;
                }
                Err(error) if attempt < COMPLETE_ATTEMPTS => {
                    tracing::warn!(%error, attempt, "storing the response failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "storing the response failed; a retry after lock_ttl will run again"
                    );
                    self.settle();
                }
            }
        }
    }

    pub(super) async fn release(&mut self) {
        if self.settled {
            return;
        }
        self.settle();
        let store = self.shared.store();
        let result = self
            .shared
            .timed(m::Operation::Release, async {
                store.release(&self.key, self.token).await
            })
            .await;
        match result {
            Ok(()) => {}
            Err(StoreError::LeaseLost) => m::lease_lost(),
            Err(error) => {
                tracing::warn!(%error, "releasing a lease failed; it expires after lock_ttl")
            }
        }
    }

    /// The response body broke after the head: the operation ran, or is running. As with
    /// [`OutcomeUnknown`], nothing is stored and the lease is kept, unrenewed, until `lock_ttl`,
    /// so a retry neither runs alongside it nor replays a broken response.
    fn outcome_unknown(&mut self, error: &BoxError) {
        if self.settled {
            // Already released (a response too large to keep): nothing more to decide.
            return;
        }
        m::not_stored(m::NotStored::BodyError);
        tracing::warn!(
            key = ?self.key,
            %error,
            lock_ttl = ?self.policy.lock_ttl,
            "the response body failed; the outcome is unknown and the key stays locked until \
             lock_ttl passes"
        );
        self.settle();
    }

    pub(super) fn settle(&mut self) {
        if !self.settled {
            self.settled = true;
            m::lease_settled();
            self.shared.leases.settled();
        }
    }
}

/// The rest of a response body that was not ready at once: teed to the client and the store.
struct Stream<St: IdempotencyStore, B> {
    lease: Lease<St>,
    head: http::response::Parts,
    body: std::pin::Pin<Box<B>>,
    copy: Copy,
    /// Frames read before streaming began, not yet sent on.
    ready: Vec<Streamed>,
    /// Whether the body already ended (normally) before streaming began.
    ended: bool,
}

impl<St, B> Stream<St, B>
where
    St: IdempotencyStore,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async fn run(mut self, sender: mpsc::Sender<Streamed>) {
        let mut client = ClientStream {
            sender: Some(sender),
        };
        let renewal = self.lease.renewal();
        let end = tokio::select! {
            end = self.tee(&mut client) => end,
            never = renewal => match never {},
        };
        // The lease is settled (stored, released, or left to expire) and no longer renewed. Only
        // now does the client learn that the body is over: a client that has the whole body can
        // rely on its retry being a replay.
        client.send(end).await;
    }

    /// Forwards each frame as it arrives while keeping the copy, then stores or settles the
    /// lease; returns how the body ended, for the client.
    async fn tee(&mut self, client: &mut ClientStream) -> Streamed {
        for message in std::mem::take(&mut self.ready) {
            client.send(message).await;
        }
        while !self.ended {
            if !self.copy.storable {
                self.lease.release().await;
                if client.is_gone() {
                    // Nobody will read the rest and it will not be stored: stop reading it.
                    return Streamed::End;
                }
            }
            // The body's own error type need not be `Send`: convert it before any await.
            let next = self
                .body
                .frame()
                .await
                .map(|frame| frame.map_err(Into::into));
            match next {
                Some(Ok(frame)) => client.send(self.copy.keep(frame)).await,
                Some(Err(error)) => {
                    self.lease.outcome_unknown(&error);
                    return Streamed::Error(error);
                }
                None => self.ended = true,
            }
        }
        if self.copy.storable {
            let whole = self.copy.whole();
            self.lease.complete(&self.head, whole).await;
        } else {
            self.lease.release().await;
        }
        Streamed::End
    }
}

impl<St: IdempotencyStore> Drop for Lease<St> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.settle();
        let (shared, key, token) = (self.shared.clone(), self.key, self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let store = shared.store();
                let _ = shared
                    .timed(m::Operation::Release, store.release(&key, token))
                    .await;
            });
        }
    }
}

/// Keeps a lease alive every third of `lock_ttl` until dropped.
async fn renew_until_dropped<St: IdempotencyStore>(
    shared: Arc<Shared<St>>,
    key: RecordKey,
    token: LeaseToken,
    policy: Arc<Policy>,
) -> std::convert::Infallible {
    let every = policy.renew_every().max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let store = shared.store();
        let renewed = shared
            .timed(
                m::Operation::Renew,
                store.renew(&key, token, policy.lock_ttl),
            )
            .await;
        match renewed {
            Ok(()) => {}
            Err(StoreError::LeaseLost) => {
                m::lease_lost();
                tracing::warn!(?key, "lease lost while the request was running");
                return std::future::pending().await;
            }
            Err(error) => tracing::warn!(%error, "renewing a lease failed; will try again"),
        }
    }
}

/// The copy of a response body kept for the store.
struct Copy {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    storable: bool,
}

impl Copy {
    fn new(limit: usize) -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            limit,
            storable: true,
        }
    }

    /// Keeps a data frame's bytes (sharing, not copying, them) and returns the frame as a message
    /// for the client. Trailers make the response unstorable: a replay could not repeat them.
    fn keep(&mut self, frame: Frame<Bytes>) -> Streamed {
        match frame.into_data() {
            Ok(data) => {
                if self.storable {
                    self.len += data.len();
                    if self.len > self.limit {
                        self.refuse(m::NotStored::TooLarge);
                    } else {
                        self.chunks.push(data.clone());
                    }
                }
                Streamed::Frame(Frame::data(data))
            }
            Err(frame) => {
                self.refuse(m::NotStored::Trailers);
                Streamed::Frame(frame)
            }
        }
    }

    fn refuse(&mut self, reason: m::NotStored) {
        if self.storable {
            m::not_stored(reason);
            self.storable = false;
            self.chunks = Vec::new();
        }
    }

    /// The body as one buffer: no copy when it came in one frame.
    fn whole(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [only] => only.clone(),
            chunks => {
                let mut whole = BytesMut::with_capacity(self.len);
                for chunk in chunks {
                    whole.extend_from_slice(chunk);
                }
                whole.freeze()
            }
        }
    }
}

/// The client's end of a streamed response: each frame goes on as it arrives; only the end of the
/// stream waits for the record (see [`Stream::run`]).
struct ClientStream {
    sender: Option<mpsc::Sender<Streamed>>,
}

impl ClientStream {
    async fn send(&mut self, message: Streamed) {
        if let Some(sender) = &self.sender
            && sender.send(message).await.is_err()
        {
            self.sender = None;
        }
    }

    fn is_gone(&self) -> bool {
        self.sender.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_shares_a_single_frame() {
        let mut copy = Copy::new(100);
        let data = Bytes::from_static(b"hello");
        copy.keep(Frame::data(data.clone()));
        assert_eq!(copy.whole().as_ptr(), data.as_ptr());
    }

    #[test]
    fn a_body_over_the_limit_is_not_storable() {
        let mut copy = Copy::new(4);
        copy.keep(Frame::data(Bytes::from_static(b"abc")));
        assert!(copy.storable);
        copy.keep(Frame::data(Bytes::from_static(b"de")));
        assert!(!copy.storable);
        assert!(copy.chunks.is_empty(), "an unstorable copy holds no memory");
    }

    #[test]
    fn trailers_make_a_response_unstorable() {
        let mut copy = Copy::new(100);
        copy.keep(Frame::trailers(http::HeaderMap::new()));
        assert!(!copy.storable);
    }
}
