//! Idempotency keys for tower and axum: a retried `POST` runs once, and the retry gets the first
//! response back.
//!
//! Clients send an `Idempotency-Key` header (a UUID per logical operation). [`IdempotencyLayer`]
//! remembers `key -> response` in an [`IdempotencyStore`] and answers retries from it instead of
//! running the operation again.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! async fn charge() -> &'static str { "charged once" }
//!
//! #[tokio::main]
//! async fn main() {
//!     let app = Router::new()
//!         .route("/payments", post(charge))
//!         .layer(IdempotencyLayer::new(MemoryStore::new()));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//!     axum::serve(listener, app).await.unwrap();
//! }
//! ```
//!
//! # The request lifecycle
//!
//! For a request whose method the route's [`Policy`] covers (default `POST` and `PATCH`):
//!
//! 1. **Key.** No key: `400` if the policy requires one, else the request passes through
//!    untouched. An invalid key (empty, over 255 bytes, not visible ASCII; a quoted sf-string is
//!    accepted and unquoted): `400`.
//! 2. **Scope.** The record key is `sha256(scope || key)`: by default the scope is a digest of the
//!    policy's scope headers (`Authorization`), or whatever [`IdempotencyLayer::scope_with`] says.
//!    Two callers never see each other's responses, and no raw credential or key is stored.
//! 3. **Body.** The body is buffered up to `max_request_body` (else `413`; nothing is stored or
//!    run) and handed on without another copy.
//! 4. **Fingerprint.** sha256 of method, path and query, configured headers and body.
//! 5. **Begin.** One store call: a new lease, or a replay of the completed response (with
//!    `Idempotent-Replayed: true`), or `422` if the key was used for a different request, or, if
//!    the key is in flight, `409` with `Retry-After` ([`OnConflict::Reject`]) or a wait for its
//!    completion notification ([`OnConflict::Wait`]).
//! 6. **Run.** The inner service runs, renewing the lease every `lock_ttl / 3`. A client that
//!    disconnects does not cancel it: the unfinished request moves to a task of its own, and its
//!    response is stored for the retry.
//! 7. **Finish.** A response below 500 whose body fits `max_response_body` is stored for `ttl`,
//!    fenced by the lease token (a holder that lost its lease cannot overwrite the new holder's
//!    result). Otherwise the lease is released so a retry runs again; the client gets the whole
//!    response either way, streamed. A response marked [`OutcomeUnknown`] (an upstream timeout:
//!    the operation may still be running) keeps the lease until `lock_ttl` instead.
//! 8. **Store failure.** [`OnStoreError::Reject`] answers `503` (never risk a second execution);
//!    [`OnStoreError::Forward`] runs the request unprotected.
//!
//! Every error answer is `application/problem+json` (see [`problem`]).
//!
//! # Guarantees and their limits
//!
//! * **At most one execution per key while the lease is held.** The lease is renewed while the
//!   request runs. If the process dies, the lease expires after `lock_ttl` and the next request
//!   with the key runs again: an operation interrupted by a crash may run twice, the second time
//!   after `lock_ttl`. Make `lock_ttl` longer than a renewal can be delayed (GC pause, stalled
//!   store).
//! * **Replays are exact** (status, headers, body) for `ttl` after completion, for the same caller
//!   and the same request.
//! * **Store outages** are a per-route choice between `503` and running unprotected.
//! * The memory store forgets everything on restart; use SQLite for one durable process, and
//!   PostgreSQL or Redis for a fleet.
//!
//! # Stores
//!
//! [`MemoryStore`] (feature `memory`, default), `SqliteStore` (`sqlite`), `PostgresStore`
//! (`postgres`) and `RedisStore` (`redis`). Each implements [`IdempotencyStore`], whose contract
//! the [`conformance`] suite checks.

pub mod canonical_json;
pub mod conformance;
pub mod fingerprint;
pub mod headers;
mod idempotency;
pub mod key;
pub mod policy;
pub mod problem;
pub mod record;
pub mod scope;
pub mod store;
pub mod telemetry;

pub use idempotency::{
    Idempotency, IdempotencyLayer, OutcomeUnknown, RequestBody, ResponseBody, ResponseFuture,
    ScopeFn,
};
pub use policy::{OnConflict, OnStoreError, PathPattern, Policy, Routes};
pub use record::StoredResponse;
pub use scope::{RecordKey, Scope};
#[cfg(feature = "memory")]
pub use store::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "redis")]
pub use store::RedisStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{Begin, IdempotencyStore, LeaseToken, StoreError};

/// A type-erased error, as used by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
