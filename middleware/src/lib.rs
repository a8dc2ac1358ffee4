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
//! # A retry is replayed
//!
//! The layer in front of a handler that counts its calls: the second request with the same key
//! gets the first response back, marked `Idempotent-Replayed`, and the handler ran once.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//!
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counted = calls.clone();
//! let service = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(MemoryStore::new()))
//!     .service(service_fn(move |_request: Request<_>| {
//!         let call = counted.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move { Ok::<_, Infallible>(Response::new(Full::from(format!("charge {call}")))) }
//!     }));
//!
//! let charge = || {
//!     Request::post("/payments")
//!         .header("idempotency-key", "8e03978e")
//!         .body(Full::from(r#"{"amount": 10}"#))
//!         .unwrap()
//! };
//! let first = service.clone().oneshot(charge()).await.unwrap();
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "charge 1");
//!
//! let retry = service.oneshot(charge()).await.unwrap();
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), "charge 1");
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```
//!
//! # The request lifecycle
//!
//! First, for every request, the path is normalised (RFC 3986 section 6, see [`path`]): routes
//! are matched against the normalised path and the inner service receives it; an ambiguous path
//! (`%2F`, a backslash, `%00`, `/../`) is refused with `400`. Then, for a request whose method
//! the route's [`Policy`] covers (default `POST` and `PATCH`):
//!
//! 1. **Key.** No key: `400` if the policy requires one, else the request passes through
//!    untouched. An invalid key (empty, over 255 bytes, not visible ASCII; a quoted sf-string is
//!    accepted and unquoted): `400`.
//! 2. **Scope.** The record key is `sha256(scope || key)`: by default the scope is a digest of the
//!    policy's scope headers (`Authorization`) and scope cookies, or whatever
//!    [`IdempotencyLayer::scope_with`] says. Two callers never see each other's responses, and no
//!    raw credential or key is stored. A caller without credentials is refused (`403`) where the
//!    route says [`Anonymous::Reject`]; over `max_in_flight_per_caller` requests in progress
//!    (anonymous callers counted per [`ClientIp`]), `429`.
//! 3. **Body.** The body is buffered up to `max_request_body` (else `413`; nothing is stored or
//!    run) within `body_read_timeout` (else `408`) and handed on without another copy.
//! 4. **Fingerprint.** sha256 of method, path and query, configured headers and body.
//! 5. **Begin.** The replay cache answers a repeated replay in process (on by default; see
//!    [`IdempotencyLayer::replay_cache`]); otherwise one store call: a new lease, or a replay of
//!    the completed response (with
//!    `Idempotent-Replayed: true`), or `422` if the key was used for a different request, or, if
//!    the key is in flight, `409` with `Retry-After` ([`OnConflict::Reject`]) or a wait for its
//!    completion notification ([`OnConflict::Wait`]).
//! 6. **Run.** The inner service runs, renewing the lease every `lock_ttl / 3`. A client that
//!    disconnects does not cancel it: the unfinished request moves to a task of its own, and its
//!    response is stored for the retry.
//! 7. **Finish.** A response below 500, not in `never_store` (default `408`, `425`, `429`), whose
//!    body fits `max_response_body` is stored for `ttl`,
//!    fenced by the lease token (a holder that lost its lease cannot overwrite the new holder's
//!    result). Otherwise the lease is released so a retry runs again; the client gets the whole
//!    response either way, streamed. A response marked [`OutcomeUnknown`] (an upstream timeout:
//!    the operation may still be running) keeps the lease until `lock_ttl` instead (or, with a
//!    [`LateOutcome`], awaits the late result for up to `lock_ttl` and stores it), and so does a
//!    response whose body fails after the head (see [`BodyTimeout`]). A streamed response's
//!    frames go on as they arrive; only its end waits until the record is stored.
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
//! the `conformance` suite (feature `conformance`) checks.
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `memory` | yes | [`MemoryStore`] |
//! | `sqlite` | | `SqliteStore` (sqlx) |
//! | `postgres` | | `PostgresStore` (sqlx), without TLS |
//! | `postgres-tls` | | `postgres` plus TLS (rustls, webpki roots) for `sslmode=require` |
//! | `redis` | | `RedisStore` for Redis and Redis Cluster (redis-rs), without TLS |
//! | `redis-tls` | | `redis` plus TLS (rustls, webpki roots) for `rediss://` URLs |
//! | `conformance` | | the store contract suite, for a store's tests (a dev-dependency feature) |

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod canonical_json;
#[cfg(feature = "conformance")]
pub mod conformance;
mod cookie;
pub mod fingerprint;
pub mod headers;
mod idempotency;
pub mod key;
pub mod lease;
pub mod path;
pub mod policy;
pub mod problem;
pub mod record;
pub mod scope;
pub mod store;
pub mod telemetry;

pub use idempotency::{
    BodyTimeout, Idempotency, IdempotencyLayer, LateOutcome, LeasesInFlight, OutcomeHook,
    OutcomeUnknown, Records, RecordsError, ReplayCacheLimits, RequestBody, ResponseBody,
    ResponseFuture, RouteError, ScopeFn,
};
pub use lease::{Checkpoint, CheckpointError, CompletedByHandler, Lease};
pub use policy::{Anonymous, Mode, OnConflict, OnStoreError, PathPattern, Policy, Routes};
pub use problem::ProblemDocs;
pub use record::StoredResponse;
pub use scope::{ClientIp, RecordKey, Scope};
#[cfg(feature = "memory")]
pub use store::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "redis")]
pub use store::RedisStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{Begin, IdempotencyStore, LeaseToken, StoreError};
pub use telemetry::Outcome;

/// The crate README (what crates.io shows), so that its example is compiled as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;

/// A type-erased error, as used by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
