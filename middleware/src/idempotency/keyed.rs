//! A keyed request: its body read and fingerprinted, then the begin/wait loop that takes the
//! lease or answers from the record (replay, `422`, `409`, or after waiting), and with the lease
//! the run handed to the [held lease](super::held).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower::Service;

use super::body::{RequestBody, ResponseBody};
use super::callers::CallerPermit;
use super::detached::Detached;
use super::held::Lease;
use super::layer::Shared;
use super::replay_cache::Cached;
use super::{observe, outcome};
use crate::BoxError;
use crate::fingerprint::Fingerprint;
use crate::headers::{self, IDEMPOTENCY_TTL, IDEMPOTENT_REPLAYED};
use crate::policy::{Mode, OnConflict, OnStoreError, Policy};
use crate::problem::{Problem, ProblemKind};
use crate::record::StoredResponse;
use crate::scope::RecordKey;
use crate::store::{Begin, IdempotencyStore, LeaseToken, StoreError};
use crate::telemetry::{self as m, Outcome};

/// A covered request with a valid key, on its way through the state machine.
pub(super) struct Keyed<St> {
    pub(super) shared: Arc<Shared<St>>,
    pub(super) policy: Arc<Policy>,
    pub(super) record_key: RecordKey,
    pub(super) parts: Parts,
    /// Holds the caller's place until the request is over, response streamed and stored.
    pub(super) permit: Option<CallerPermit>,
}

impl<St: IdempotencyStore> Keyed<St> {
    pub(super) async fn handle<S, ReqB, ResB>(
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
                let response = self.execute(inner, body, granted).await?;
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

    /// The answer to a request whose record the replay cache holds.
    fn answer_cached<B>(&self, cached: Cached, observing: bool) -> Begun<B> {
        match (cached, observing) {
            (Cached::Replay { .. }, true) => Begun::Observed(Outcome::ObservedWouldReplay),
            (Cached::Mismatch, true) => Begun::Observed(Outcome::ObservedWouldMismatch),
            (
                Cached::Replay {
                    response,
                    expires_in,
                },
                false,
            ) => Begun::Answered(self.replay(response, expires_in)),
            (Cached::Mismatch, false) => Begun::Answered(self.mismatch()),
        }
    }

    /// Takes the lease, or answers from the record: replay, `422`, `409`, or after waiting.
    async fn begin<B>(&self, fingerprint: &Fingerprint) -> Result<Begun<B>, StoreError> {
        let observing = self.policy.mode == Mode::Observe;
        // A miss hands back the mark for the first `begin` call below.
        let mut next_mark = None;
        if let Some(cache) = self.shared.replay_cache.as_deref() {
            match cache.get(&self.record_key, fingerprint) {
                Ok(cached) => return Ok(self.answer_cached(cached, observing)),
                Err(mark) => next_mark = Some(mark),
            }
        }
        // Observe mode never waits: the duplicate runs at once, as without the layer.
        let subscription = (self.policy.on_conflict == OnConflict::Wait && !observing)
            .then(|| self.shared.store.subscribe(&self.record_key));
        let deadline = Instant::now() + self.policy.wait_timeout;
        loop {
            // Armed before looking, so a completion between the look and the wait is not missed.
            let completed = subscription.as_ref().map(|s| s.notified());
            // Before the call: a replay it reads is cached no longer than the store keeps it.
            let mark = next_mark
                .take()
                .or_else(|| self.shared.replay_cache.as_ref().map(|cache| cache.mark()));
            let asked = Instant::now();
            let call = self.begin_call(*fingerprint);
            let begun = self.shared.timed(m::Operation::Begin, call).await?;
            match begun {
                Begin::Acquired {
                    token,
                    attempt,
                    recovery_point,
                } => {
                    if self.taken_over_while_paused(asked, token).await? {
                        // Another request holds the key now: answer as for any duplicate.
                        continue;
                    }
                    return Ok(Begun::Acquired((token, attempt, recovery_point)));
                }
                Begin::Completed { .. } if observing => {
                    return Ok(Begun::Observed(Outcome::ObservedWouldReplay));
                }
                Begin::Completed {
                    response,
                    expires_in,
                } => {
                    if let (Some(cache), Some(mark)) = (&self.shared.replay_cache, mark) {
                        let key = self.record_key;
                        cache.fill(mark, key, *fingerprint, &response, expires_in);
                    }
                    // Counted from before the call, as the cache does: the client is never told
                    // more than the record has left.
                    let left = (asked + expires_in).saturating_duration_since(Instant::now());
                    return Ok(Begun::Answered(self.replay(response, left)));
                }
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

    /// Whether the lease `begin` granted (asked for at `asked`) lapsed before the request could
    /// run and was taken over meanwhile. Normally microseconds pass between the store's answer and
    /// the run; a garbage-collection pause, a stopped or starved process can stretch that past
    /// `lock_ttl`, and running then would run the request alongside the one that took the key
    /// over. So a lease past half its `lock_ttl` is renewed first, fenced by its token: renewed,
    /// it is ours again and the request runs; refused, it was taken over. A store error is
    /// returned as it is, leaving the lease to lapse as a crashed holder's would.
    async fn taken_over_while_paused(
        &self,
        asked: Instant,
        token: LeaseToken,
    ) -> Result<bool, StoreError> {
        if asked.elapsed() < self.policy.lock_ttl / 2 {
            return Ok(false);
        }
        let store = self.shared.store();
        let lock_ttl = self.policy.lock_ttl;
        let renewal = store.renew(&self.record_key, token, lock_ttl);
        match self.shared.timed(m::Operation::Renew, renewal).await {
            Ok(()) => Ok(false),
            Err(StoreError::LeaseLost) => {
                tracing::warn!(
                    key = ?self.record_key,
                    ?lock_ttl,
                    "the lease lapsed between the store's answer and the run, and another \
                     request took the key over; this one is answered as its duplicate"
                );
                Ok(true)
            }
            Err(error) => Err(error),
        }
    }

    /// The stored response, as a replay of a record kept `expires_in` more.
    fn replay<B>(&self, stored: StoredResponse, expires_in: Duration) -> Response<ResponseBody<B>> {
        m::outcome(Outcome::Replayed);
        let mut response = stored.into_response(ResponseBody::full);
        let headers = response.headers_mut();
        // Records stored before the header was listed do not replay it either.
        for name in &self.policy.replay_drop_headers {
            headers.remove(name);
        }
        headers.insert(
            IDEMPOTENT_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
        if self.policy.advertises_expiry() {
            headers.insert(IDEMPOTENCY_TTL.clone(), headers::ttl_value(expires_in));
        }
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
            self.permit,
        );
        let request = Request::from_parts(parts, RequestBody::buffered(body));
        // The client's response is made even if nobody is left to read it: storing it is the point.
        Detached::new(lease.run(inner, request), Box::new(|_| Box::pin(async {}))).await
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
