//! `idempotency-proxy`: a reverse proxy that gives any HTTP service the guarantees of
//! [`tower_idempotency`]: a retried `POST` with the same `Idempotency-Key` runs once upstream,
//! and the retry gets the stored response.
//!
//! The binary reads one TOML file (see [`config`] and `examples/proxy.toml`):
//!
//! ```text
//! idempotency-proxy --config proxy.toml           # run
//! idempotency-proxy check --config proxy.toml     # validate, print the per-route policy
//! idempotency-proxy migrate --config proxy.toml   # apply the store's schema
//! ```
//!
//! The library half exists so the binary's parts can be tested and embedded:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = idempotency_proxy::config::Config::load("proxy.toml".as_ref())?;
//! idempotency_proxy::server::run(config, idempotency_proxy::server::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
pub mod admin_records;
pub mod body_timeout;
pub mod config;
pub mod pool;
pub mod records;
pub mod reload;
pub mod report;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tunnels;
pub mod upstream;
