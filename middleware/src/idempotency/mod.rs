//! The idempotency middleware: [`IdempotencyLayer`] and the [`Idempotency`] service.
//!
//! See the [crate docs](crate) for the request lifecycle and the guarantees.

mod body;
mod body_timeout;
mod callers;
mod detached;
mod future;
mod held;
mod keyed;
mod late;
mod layer;
mod leases;
mod observe;
mod outcome;
mod records;
mod replay_cache;
mod service;
mod tee;

pub use body::{RequestBody, ResponseBody};
pub use body_timeout::BodyTimeout;
pub use future::ResponseFuture;
pub use late::LateOutcome;
pub use layer::{IdempotencyLayer, RouteError, ScopeFn};
pub use leases::LeasesInFlight;
pub use outcome::OutcomeHook;
pub use records::{Records, RecordsError};
pub use replay_cache::ReplayCacheLimits;
pub use service::{Idempotency, OutcomeUnknown};
