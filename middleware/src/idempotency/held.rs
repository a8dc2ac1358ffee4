//! The held lease: the run of a keyed request under it, its renewal every third of `lock_ttl`, and
//! how it is settled (the response stored, the lease released, or left to expire when the
//! outcome is unknown), including on drop. A response whose body is not ready at once goes on to
//! the [tee](super::tee).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::Service;

use super::OutcomeUnknown;
use super::body::{RequestBody, ResponseBody};
use super::body_timeout::BodyTimeout;
use super::callers::CallerPermit;
use super::late::{self, LateOutcome};
use super::layer::Shared;
use super::tee::{Copy, Stream};
use crate::BoxError;
use crate::headers::{self, IDEMPOTENCY_TTL};
use crate::lease::CompletedByHandler;
use crate::policy::Policy;
use crate::problem::{Problem, ProblemKind};
use crate::record::StoredResponse;
use crate::scope::RecordKey;
use crate::store::{IdempotencyStore, LeaseToken, StoreError};
use crate::telemetry as m;

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
/// A held lease. Dropped without being settled (a panic in the inner service, a cancelled task),
/// it releases itself so that the key is free for a retry at once rather than after `lock_ttl`.
pub(super) struct Lease<St: IdempotencyStore> {
    shared: Arc<Shared<St>>,
    policy: Arc<Policy>,
    key: RecordKey,
    token: LeaseToken,
    settled: bool,
    _permit: Option<CallerPermit>,
}

impl<St: IdempotencyStore> Lease<St> {
    pub(super) fn new(
        shared: Arc<Shared<St>>,
        policy: Arc<Policy>,
        key: RecordKey,
        token: LeaseToken,
        permit: Option<CallerPermit>,
    ) -> Self {
        m::lease_acquired();
        shared.leases.acquired();
        Self {
            shared,
            policy,
            key,
            token,
            settled: false,
            _permit: permit,
        }
    }

    pub(super) async fn run<S, ReqB, ResB>(
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
        // Renewal never finishes on its own: this ends when the work does, and drops it. The work
        // is polled first, so a response ready at once never arms the renewal timer.
        tokio::select! {
            biased;
            done = work => done,
            never = renewal => match never {},
        }
    }

    pub(super) fn renewal(
        &self,
    ) -> impl Future<Output = std::convert::Infallible> + Send + 'static {
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
            let mut parts = parts;
            let kept = self.complete(&parts, whole.clone()).await;
            if let Some(kept) = kept.filter(|_| self.policy.advertises_expiry()) {
                parts
                    .headers
                    .insert(IDEMPOTENCY_TTL.clone(), headers::ttl_value(kept));
            }
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
            settled: self.settled,
            _permit: self._permit.take(),
        };
        self.settled = true;
        taken
    }

    /// Stores the response, retrying a failing store briefly: giving up means a retry after the
    /// lease expires runs the request again. Returns how long the stored record is kept at least,
    /// counted from now, or `None` when it was not stored.
    pub(super) async fn complete(
        &mut self,
        parts: &http::response::Parts,
        body: Bytes,
    ) -> Option<Duration> {
        let mut headers = parts.headers.clone();
        // Dropped before storing: such headers (a session cookie) never sit in the store.
        for name in &self.policy.replay_drop_headers {
            headers.remove(name);
        }
        let stored = StoredResponse::new(parts.status, headers, body);
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=COMPLETE_ATTEMPTS {
            // Before the call: the record's ttl runs from some moment after this one.
            let started = Instant::now();
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
                    self.settle();
                    return Some(
                        (started + self.policy.ttl).saturating_duration_since(Instant::now()),
                    );
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
                    return None;
                }
                Err(StoreError::LeaseLost) => {
                    m::lease_lost();
                    tracing::warn!(
                        key = ?self.key,
                        "lease lost before the response could be stored: another request took \
                         it over after lock_ttl; its result stands and this one is discarded"
                    );
                    self.settle();
                    return None;
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
        None
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
    pub(super) fn outcome_unknown(&mut self, error: &BoxError) {
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
