//! The late result of an unknown outcome: an inner service that gave up waiting (an upstream
//! timeout) hands the layer the unfinished call, and the layer keeps waiting for it, under the
//! lease, for up to `lock_ttl`, so that the operation's real result is stored and replayed rather
//! than run a second time.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::Response;
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Collected, LengthLimitError, Limited};
use tokio::time::Instant;

use crate::BoxError;
use crate::policy::Policy;
use crate::problem::{Problem, ProblemKind};
use crate::scope::RecordKey;
use crate::store::{IdempotencyStore, LeaseToken, StoreError};
use crate::telemetry as m;

use super::held::Lease;
use super::layer::Shared;

type LateResponse = Response<UnsyncBoxBody<Bytes, BoxError>>;
type LateFuture = BoxFuture<'static, Result<LateResponse, BoxError>>;

/// The unfinished call behind an [`OutcomeUnknown`](crate::OutcomeUnknown) response, for the
/// layer to keep waiting on.
///
/// Put it in the response's extensions next to `OutcomeUnknown`. Instead of leaving the key
/// locked and the result lost, the layer then
///
/// * answers the client `504` `outcome-pending` (see [the problem
///   docs](crate::problem#outcome-pending)) with a `Retry-After` of `lock_ttl`, the time the
///   result is waited for;
/// * keeps awaiting the call on a task of its own, renewing the lease, for up to `lock_ttl`;
/// * stores the late response if it arrives in time and may be stored (the usual rules: below
///   500, not in `never_store`, within `max_response_body`), which wakes waiting duplicates: the
///   retry replays the real outcome, and the operation ran once. A late response that may not be
///   stored releases the lease (the retry runs again, as for any such response);
/// * if the call neither answers nor fails within the window, or its body fails, leaves the
///   lease to expire unrenewed at the end of the window: the outcome stays unknown, and a retry
///   after that runs again, as with a plain `OutcomeUnknown`.
///
/// The pending call holds its lease: [`LeasesInFlight`](crate::LeasesInFlight) counts it, so a
/// graceful shutdown waits for it. Without a layer holding a lease (an uncovered route, a request
/// without a key) the extension is dropped with the response, and so is the call.
///
/// ```
/// use std::time::Duration;
/// use http::{Response, StatusCode};
/// use tower_idempotency::{LateOutcome, OutcomeUnknown};
///
/// # async fn example() {
/// let call = async {
///     tokio::time::sleep(Duration::from_secs(10)).await; // the slow operation
///     Ok::<_, std::convert::Infallible>(Response::new(String::from("done")))
/// };
/// let mut call = Box::pin(call);
/// if tokio::time::timeout(Duration::from_secs(5), &mut call).await.is_err() {
///     let mut timed_out = Response::new(String::new());
///     *timed_out.status_mut() = StatusCode::GATEWAY_TIMEOUT;
///     timed_out.extensions_mut().insert(OutcomeUnknown);
///     timed_out.extensions_mut().insert(LateOutcome::new(call));
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct LateOutcome {
    // Extensions must be `Clone + Sync`; the call is taken out once, by the layer.
    call: Arc<Mutex<Option<LateFuture>>>,
}

impl LateOutcome {
    /// Wraps the unfinished call: a future of the response the inner service gave up waiting for.
    pub fn new<F, B, E>(call: F) -> Self
    where
        F: Future<Output = Result<Response<B>, E>> + Send + 'static,
        E: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let call = call.map(|result| {
            result
                .map(|response| response.map(|body| body.map_err(Into::into).boxed_unsync()))
                .map_err(Into::into)
        });
        Self {
            call: Arc::new(Mutex::new(Some(call.boxed()))),
        }
    }

    /// The call, once: `None` if another copy of this extension took it already.
    pub(crate) fn take(&self) -> Option<LateFuture> {
        self.call.lock().ok()?.take()
    }
}

impl fmt::Debug for LateOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LateOutcome").finish_non_exhaustive()
    }
}

/// Waits for the late result under `lease` until `window` has passed, then stores it, releases
/// the lease, or leaves it to expire. Runs on a task of its own.
pub(super) async fn await_late<St: IdempotencyStore>(
    mut lease: Lease<St>,
    call: LateFuture,
    window: Duration,
) {
    let until = Instant::now() + window;
    let renewal = renew_until(
        lease.shared().clone(),
        *lease.key(),
        lease.token(),
        lease.policy().clone(),
        until,
    );
    // Renewal never finishes on its own; settling is bounded by the window.
    tokio::select! {
        () = settle_late(&mut lease, call, until) => {}
        never = renewal => match never {},
    }
}

async fn settle_late<St: IdempotencyStore>(
    lease: &mut Lease<St>,
    call: LateFuture,
    until: Instant,
) {
    let policy = lease.policy().clone();
    let response = match tokio::time::timeout_at(until, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return still_unknown(lease, &format!("the call failed: {error}")),
        Err(_) => return still_unknown(lease, "no result within lock_ttl"),
    };
    let (parts, body) = response.into_parts();
    if !policy.is_storable(parts.status) {
        m::not_stored(if parts.status.is_server_error() {
            m::NotStored::ServerError
        } else {
            m::NotStored::NeverStore
        });
        lease.release().await;
        return;
    }
    match tokio::time::timeout_at(until, collect(body, policy.max_response_body)).await {
        Ok(Ok(collected)) if collected.trailers().is_some() => {
            // A replay cannot repeat trailers: as for any response that has them.
            m::not_stored(m::NotStored::Trailers);
            lease.release().await;
        }
        Ok(Ok(collected)) => {
            tracing::info!(
                key = ?lease.key(),
                "the late result of an unknown outcome arrived; storing it"
            );
            lease.complete(&parts, collected.to_bytes()).await;
        }
        Ok(Err(error)) if error.is::<LengthLimitError>() => {
            m::not_stored(m::NotStored::TooLarge);
            lease.release().await;
        }
        Ok(Err(error)) => still_unknown(lease, &format!("its body failed: {error}")),
        Err(_) => still_unknown(lease, "its body did not end within lock_ttl"),
    }
}

/// The whole body, up to `limit` bytes. Boxed where the types are concrete: inside the spawned
/// task the compiler cannot prove `Limited`'s future `Send` for every lifetime.
fn collect(
    body: UnsyncBoxBody<Bytes, BoxError>,
    limit: usize,
) -> BoxFuture<'static, Result<Collected<Bytes>, BoxError>> {
    Limited::new(body, limit).collect().boxed()
}

/// No result to store: the lease, no longer renewed, expires at the end of the window.
fn still_unknown<St: IdempotencyStore>(lease: &mut Lease<St>, why: &str) {
    m::not_stored(m::NotStored::OutcomeUnknown);
    tracing::warn!(
        key = ?lease.key(),
        why,
        "the late result of an unknown outcome was not received; the key runs again once the \
         lease expires"
    );
    lease.settle();
}

/// Renews the lease every `lock_ttl / 3`, never past `until`, so the key is free at the end of
/// the window exactly as an unrenewed lease would have been. Once the window is over or the
/// lease is lost, it waits forever: whoever awaits it ends it by dropping it.
async fn renew_until<St: IdempotencyStore>(
    shared: Arc<Shared<St>>,
    key: RecordKey,
    token: LeaseToken,
    policy: Arc<Policy>,
    until: Instant,
) -> std::convert::Infallible {
    let every = policy.renew_every().max(Duration::from_millis(10));
    loop {
        tokio::time::sleep_until((Instant::now() + every).min(until)).await;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return std::future::pending().await;
        }
        let store = shared.store();
        let lease = left.min(policy.lock_ttl);
        match shared
            .timed(m::Operation::Renew, store.renew(&key, token, lease))
            .await
        {
            Ok(()) => {}
            Err(StoreError::LeaseLost) => {
                m::lease_lost();
                tracing::warn!(?key, "lease lost while awaiting a late result");
                return std::future::pending().await;
            }
            Err(error) => tracing::warn!(%error, "renewing a lease failed; will try again"),
        }
    }
}

/// The answer while the late result is awaited: `504` `outcome-pending`, retry after the window.
pub(super) fn pending(window: Duration) -> Problem {
    Problem::new(
        ProblemKind::OutcomePending,
        format!(
            "no answer in time; the operation may still be running. Its result is awaited for \
             up to {} and then replayed to a retry with the same key",
            whole_seconds(window)
        ),
    )
    .retry_after(window)
}

/// `window` in whole seconds, rounded up as `Retry-After` is.
fn whole_seconds(window: Duration) -> String {
    let secs = window.as_secs() + u64::from(window.subsec_nanos() > 0);
    format!("{secs}s")
}
