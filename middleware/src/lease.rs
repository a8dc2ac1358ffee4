//! The lease a request runs under, as the handler sees it: fencing token, attempt number and
//! recovery points.
//!
//! The layer fences its own store writes with the lease token, but the handler's effects (a row
//! in the application's database, a call to a payment provider) are not fenced by anything: a
//! holder that stalled past `lock_ttl` and its takeover both run. [`Lease`] hands the token to the
//! handler so it can fence its writes itself, and lets it record how far it got
//! ([`Lease::checkpoint`]) so that a takeover resumes there instead of starting over.
//!
//! # Fencing the handler's own writes
//!
//! Tokens of one key only grow (see [`LeaseToken`]): a takeover always holds a larger token than
//! the run it replaces. Keep the last token that wrote a resource next to it and refuse older
//! ones, in the same statement as the write:
//!
//! ```sql
//! UPDATE accounts SET balance = balance - $amount, last_fence = $token
//! WHERE id = $id AND last_fence < $token      -- 0 rows: a newer run owns this key, stop
//! ```
//!
//! `examples/fencing.rs` (`cargo run -p tower-idempotency --example fencing --features sqlite`)
//! runs this pattern against SQLite with a stalled holder and its takeover.
//!
//! # Recovery points
//!
//! ```
//! use tower_idempotency::lease::Lease;
//!
//! async fn book_ride(lease: Lease) -> Result<&'static str, Box<dyn std::error::Error>> {
//!     // A takeover starts where the previous run last checkpointed.
//!     let mut step = lease.recovery_point().map_or("start", |point| point.name());
//!     if step == "start" {
//!         // ... create the ride ...
//!         lease.checkpoint("ride_created", b"ride 17".as_slice()).await?;
//!         step = "ride_created";
//!     }
//!     if step == "ride_created" {
//!         // ... charge, with the lease token as the provider's idempotency key ...
//!         lease.checkpoint("charged", b"ch_42".as_slice()).await?;
//!     }
//!     // ... send the receipt ...
//!     Ok("booked")
//! }
//! ```
//!
//! # Effects and record in one transaction (PostgreSQL)
//!
//! Checkpoints and fencing narrow the gaps; a handler whose effects live in the PostgreSQL
//! database that holds the records closes them. With a `PostgresStore` built on the
//! application's own pool (`PostgresStore::from_pool`), each phase commits its effect rows
//! together with its recovery point (`checkpoint_in`), and the last phase commits its rows
//! together with the stored response (`complete_in`), which marks the response
//! [`CompletedByHandler`] so the layer does not store it again:
//!
//! ```ignore
//! let mut tx = pool.begin().await?;
//! let receipt = sqlx::query_scalar("INSERT INTO receipts (ride) VALUES ($1) RETURNING id")
//!     .bind(ride).fetch_one(&mut *tx).await?;
//! let response = store.complete_in(&mut tx, &lease, json_response(receipt)).await?; // fenced
//! tx.commit().await?;                     // effect rows and stored response, or neither
//! Ok(response)
//! ```
//!
//! A crash before the commit leaves neither: the lease lapses after `lock_ttl` and the retry runs
//! the phase once, from the last committed checkpoint. A holder whose lease was taken over gets
//! [`StoreError::LeaseLost`] from `checkpoint_in` / `complete_in`, and its transaction rolls back
//! with its effects. See `PostgresStore::complete_in` and `examples/axum-payments`.

mod completed;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::scope::RecordKey;
use crate::store::{IdempotencyStore, LeaseToken, StoreError};

pub use completed::CompletedByHandler;

/// The longest checkpoint name, in bytes.
pub const MAX_CHECKPOINT_NAME: usize = 64;
/// The most data one checkpoint carries, in bytes. Recovery points name a step and the few ids
/// the next step needs, not payloads: the bound keeps records small in every store.
pub const MAX_CHECKPOINT_DATA: usize = 4096;

/// The record TTL of a lease made without [`Lease::with_ttl`]: `Policy::default().ttl`.
const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// `Idempotency-Lease-Token`: the fencing token the proxy forwards to its upstream.
pub static IDEMPOTENCY_LEASE_TOKEN: HeaderName = HeaderName::from_static("idempotency-lease-token");
/// `Idempotency-Attempt`: which run of the request this is (1 the first, 2 the first takeover).
pub static IDEMPOTENCY_ATTEMPT: HeaderName = HeaderName::from_static("idempotency-attempt");

/// A named recovery point: how far a run of the request got, and what the next step needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    name: String,
    data: Bytes,
}

impl Checkpoint {
    /// A checkpoint, if `name` is 1 to [`MAX_CHECKPOINT_NAME`] bytes and `data` at most
    /// [`MAX_CHECKPOINT_DATA`].
    pub fn new(name: impl Into<String>, data: impl Into<Bytes>) -> Result<Self, CheckpointError> {
        let (name, data) = (name.into(), data.into());
        if name.is_empty() || name.len() > MAX_CHECKPOINT_NAME {
            return Err(CheckpointError::InvalidName(name.len()));
        }
        if data.len() > MAX_CHECKPOINT_DATA {
            return Err(CheckpointError::TooLarge(data.len()));
        }
        Ok(Self { name, data })
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The data stored with it.
    pub fn data(&self) -> &Bytes {
        &self.data
    }
}

/// A checkpoint was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The name is empty or longer than [`MAX_CHECKPOINT_NAME`] bytes.
    #[error("a checkpoint name must be 1 to {MAX_CHECKPOINT_NAME} bytes, not {0}")]
    InvalidName(usize),
    /// The data is longer than [`MAX_CHECKPOINT_DATA`] bytes.
    #[error("checkpoint data must be at most {MAX_CHECKPOINT_DATA} bytes, not {0}")]
    TooLarge(usize),
    /// The store refused it: [`StoreError::LeaseLost`] means this run no longer holds the lease
    /// (it stalled and was taken over): stop, a newer run owns the request.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CheckpointError {
    /// Whether this run lost its lease: a newer run holds the key, and this one must stop.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::Store(StoreError::LeaseLost))
    }
}

/// Stores a checkpoint for the lease; erased so that [`Lease`] need not be generic over the store.
type CheckpointFn = dyn Fn(RecordKey, LeaseToken, Checkpoint) -> BoxFuture<'static, Result<(), StoreError>>
    + Send
    + Sync;

/// The lease a request runs under, in the extensions of every request the layer runs.
///
/// Cheap to clone. In axum, take it with `Extension<Lease>`, or (feature `axum`) as an extractor
/// of its own (`lease: Lease`, or `Option<Lease>` on routes that may run without one).
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    key: RecordKey,
    token: LeaseToken,
    attempt: u32,
    recovery_point: Option<Checkpoint>,
    forward: bool,
    ttl: Duration,
    store: Arc<CheckpointFn>,
}

impl Lease {
    /// The lease of `key` as `store` granted it ([`Begin::Acquired`](crate::Begin::Acquired)).
    /// `forward` is the route's [`Policy::forward_lease`](crate::Policy::forward_lease).
    pub fn new<St: IdempotencyStore>(
        store: Arc<St>,
        key: RecordKey,
        (token, attempt, recovery_point): (LeaseToken, u32, Option<Checkpoint>),
        forward: bool,
    ) -> Self {
        let store: Arc<CheckpointFn> = Arc::new(move |key, token, checkpoint| {
            let store = store.clone();
            // The future owns everything it uses, and `St: Send + Sync + 'static`, so it is
            // `Send + 'static` without going through `dyn IdempotencyStore` (see `DynStore`).
            Box::pin(async move { St::checkpoint(&store, &key, token, &checkpoint).await })
        });
        Self {
            inner: Arc::new(Inner {
                key,
                token,
                attempt,
                recovery_point,
                forward,
                ttl: DEFAULT_RECORD_TTL,
                store,
            }),
        }
    }

    /// Sets how long the record is kept once completed ([`ttl`](Self::ttl)); the layer passes
    /// the route's [`Policy::ttl`](crate::Policy::ttl).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        Arc::make_mut(&mut self.inner).ttl = ttl;
        self
    }

    /// How long the record is kept once completed: the route's `ttl` (default 24 h). A handler
    /// that completes the record itself (`PostgresStore::complete_in`) stores it for this long.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The record key (a sha256 digest of scope and idempotency key).
    pub fn key(&self) -> &RecordKey {
        &self.inner.key
    }

    /// The fencing token: larger than the token of every earlier run of this key.
    pub fn token(&self) -> LeaseToken {
        self.inner.token
    }

    /// 1 on the first run, `n` on the `n - 1`-th takeover of the request.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Whether an earlier run of this request lost its lease (crashed or stalled past
    /// `lock_ttl`): its effects may exist, and it may even still be running.
    pub fn is_takeover(&self) -> bool {
        self.inner.attempt > 1
    }

    /// The last checkpoint an earlier run stored: where to resume.
    pub fn recovery_point(&self) -> Option<&Checkpoint> {
        self.inner.recovery_point.as_ref()
    }

    /// Whether the route forwards the lease to an upstream (`forward_lease`): the proxy then sends
    /// [`IDEMPOTENCY_LEASE_TOKEN`] and [`IDEMPOTENCY_ATTEMPT`].
    pub fn is_forwarded(&self) -> bool {
        self.inner.forward
    }

    /// Stores a recovery point in the record, fenced by the token. A run that lost its lease gets
    /// an error for which [`CheckpointError::is_lease_lost`] is true, and nothing changes.
    /// Replaces the previous checkpoint; a takeover sees the last one.
    pub async fn checkpoint(
        &self,
        name: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Result<(), CheckpointError> {
        let checkpoint = Checkpoint::new(name, data)?;
        (self.inner.store)(self.inner.key, self.token(), checkpoint).await?;
        Ok(())
    }

    /// Sets [`IDEMPOTENCY_LEASE_TOKEN`] and [`IDEMPOTENCY_ATTEMPT`] in `headers`.
    pub fn insert_headers(&self, headers: &mut HeaderMap) {
        headers.insert(
            IDEMPOTENCY_LEASE_TOKEN.clone(),
            HeaderValue::from(self.token().0),
        );
        headers.insert(
            IDEMPOTENCY_ATTEMPT.clone(),
            HeaderValue::from(self.attempt()),
        );
    }
}

/// Removes [`IDEMPOTENCY_LEASE_TOKEN`] and [`IDEMPOTENCY_ATTEMPT`]: a client must never be able
/// to hand an upstream a token of its own making.
pub fn remove_lease_headers(headers: &mut HeaderMap) {
    headers.remove(&IDEMPOTENCY_LEASE_TOKEN);
    headers.remove(&IDEMPOTENCY_ATTEMPT);
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.inner.key)
            .field("token", &self.token())
            .field("attempt", &self.attempt())
            .field(
                "recovery_point",
                &self.recovery_point().map(Checkpoint::name),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;

    use super::Lease;

    /// The request carries no [`Lease`]: the route is not behind the idempotency layer, its method
    /// is not covered, the request had no key, or the store failed and the route runs requests
    /// unprotected (`on_store_error = forward`). Answers `500` (a wiring mistake, not the
    /// client's); take `Option<Lease>` where running without a lease is expected.
    #[derive(Debug)]
    pub struct MissingLease;

    impl IntoResponse for MissingLease {
        fn into_response(self) -> Response {
            let body = serde_json::json!({
                "type": "about:blank",
                "title": "Internal Server Error",
                "status": 500,
                "detail": "this handler needs an idempotency lease, and the request carries none",
            });
            let mut response = Response::new(axum_core::body::Body::from(body.to_string()));
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/problem+json"),
            );
            response
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Lease {
        type Rejection = MissingLease;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts.extensions.get::<Lease>().cloned().ok_or(MissingLease)
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for Lease {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Lease>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extract::MissingLease;
