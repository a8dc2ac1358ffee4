//! The idempotency middleware: [`IdempotencyLayer`] and the [`Idempotency`] service.
//!
//! See the [crate docs](crate) for the request lifecycle and the guarantees.

mod body;
mod body_timeout;
mod callers;
mod future;
mod layer;
mod leases;
mod service;

pub use body::{RequestBody, ResponseBody};
pub use body_timeout::BodyTimeout;
pub use future::ResponseFuture;
pub use layer::{IdempotencyLayer, RouteError, ScopeFn};
pub use leases::LeasesInFlight;
pub use service::{Idempotency, OutcomeUnknown};
