//! Black-box tests: the built `idempotency-proxy` binary against real upstreams and real stores.
//!
//! One test binary (fewer links, parallel tests) with a module per area. Tests that need
//! PostgreSQL or Redis read `DATABASE_URL` / `REDIS_URL` and fail, naming the URL, when the
//! server is unreachable; tests that kill a store start their own server processes.

#![allow(
    unreachable_pub,
    reason = "a test binary has no public API: pub marks what modules share"
)]

mod support;

mod body_lifecycle;
mod callers;
mod example_config;
mod http2_upstream;
mod late_outcome;
mod lease;
mod lifecycle;
mod operators;
mod paths;
mod pool;
mod proxy;
mod records;
mod redis;
mod stores;
mod upgrade;
