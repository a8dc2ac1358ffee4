//! Running the proxy: listeners, connections, configuration reloads, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::signal::unix::{Signal, SignalKind, signal};

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_idempotency::{ClientIp, IdempotencyLayer, ReplayCacheLimits};

use crate::config::Config;
use crate::reload::ConfigFile;
use crate::store::{self, OpenError};
use crate::telemetry;
use crate::upstream::{ClientAddr, Upstream};
use crate::{admin, admin_records};

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    /// The configuration's routes are invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Runs the proxy described by `config` until `shutdown` resolves, then drains in-flight
/// requests for up to `proxy.shutdown_timeout`: it waits for open connections to finish their
/// requests and for every lease to settle, including requests whose client left (they run on
/// tasks of their own), so that their responses are stored before the proxy exits.
///
/// Prints `listening on http://ADDR` (and `admin listening on http://ADDR`) to stdout once the
/// listeners are bound, so that a supervisor or a test can find ports chosen by the system.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    serve(config, None, shutdown).await
}

/// [`run`], and on SIGHUP reads `file` again and applies its policies and routes (see
/// [`crate::reload`]); an invalid file is logged, naming the key and line, and changes nothing.
pub async fn run_reloading(
    config: Config,
    file: ConfigFile,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    serve(config, Some(file), shutdown).await
}

async fn serve(
    config: Config,
    file: Option<ConfigFile>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let routes = config.routes()?;
    // The recorder first: the SQL stores take their batch-size histogram handle when they open.
    let metrics = telemetry::install_metrics().map_err(StartError::Metrics)?;
    let store = store::open(&config.store).await?;

    let layer = IdempotencyLayer::new(store.clone())
        .routes(routes)
        .store_timeout(config.store.timeout)
        .poll_interval(config.store.poll_interval)
        .replay_cache(config.store.replay_cache_limits());
    if config.store.replay_cache_limits() != ReplayCacheLimits::OFF && !layer.replay_cache_enabled()
    {
        tracing::warn!(
            store = config.store.backend.kind().as_str(),
            "this store cannot report forgotten records to every process; the replay cache \
             (replay_cache_bytes, replay_cache_entries) stays off"
        );
    }
    let upstream = Upstream::new(&config.upstream(), &config.proxy);
    let tunnels = upstream.tunnels();
    let service = layer.layer(upstream);
    // Installed before the listeners announce themselves: until then SIGHUP would kill.
    let mut hangups = file
        .as_ref()
        .and_then(|_| match signal(SignalKind::hangup()) {
            Ok(hangups) => Some(hangups),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reloads are unavailable");
                None
            }
        });

    let listener = bind(config.proxy.listen).await?;
    let proxy_addr = local_addr(&listener, config.proxy.listen);
    let admin = match &config.admin {
        Some(admin) => {
            let listener = bind(admin.listen).await?;
            let addr = local_addr(&listener, admin.listen);
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the admin listener is reachable beyond this host");
            }
            Some((listener, addr))
        }
        None => None,
    };
    println!("listening on http://{proxy_addr}");
    if let Some((_, addr)) = &admin {
        println!("admin listening on http://{addr}");
    }
    tracing::info!(
        %proxy_addr,
        upstream = %config.proxy.upstream,
        store = config.store.backend.kind().as_str(),
        "idempotency-proxy started"
    );

    let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
    let records = admin_records::RecordsState {
        records: layer.records(),
        token: config.admin.as_ref().and_then(|admin| admin.token.clone()),
    };
    let admin_task = admin.map(|(listener, _)| {
        let app = admin::router(store.clone(), metrics, records)
            .into_make_service_with_connect_info::<SocketAddr>();
        let mut stopped = admin_stopped.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await;
        })
    });

    let mut connections = auto::Builder::new(TokioExecutor::new());
    connections
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.proxy.header_read_timeout)
        .keep_alive(true);
    connections
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(None);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(()) = hangup(&mut hangups) => {
                if let Some(file) = &file {
                    reload(file, &layer);
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let client = ClientAddr::new(peer);
        let handler = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(client.clone());
            request.extensions_mut().insert(ClientIp(peer.ip()));
            let started = Instant::now();
            let logged = tracing::enabled!(tracing::Level::DEBUG)
                .then(|| (request.method().clone(), request.uri().path().to_owned()));
            let response = service.clone().oneshot(request);
            async move {
                let response = response.await?;
                telemetry::response(response.status().as_u16());
                if let Some((method, path)) = logged {
                    tracing::debug!(
                        %method,
                        path,
                        status = response.status().as_u16(),
                        replayed = response.headers().contains_key("idempotent-replayed"),
                        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "request"
                    );
                }
                Ok::<_, Infallible>(response)
            }
        });
        // With upgrades: a WebSocket handshake the layer lets through becomes a tunnel.
        let connection = connections.serve_connection_with_upgrades(TokioIo::new(stream), handler);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let leases = layer.leases_in_flight();
    tracing::info!(
        connections = graceful.count(),
        leases = leases.count(),
        tunnels = tunnels.count(),
        timeout = ?config.proxy.shutdown_timeout,
        "shutting down: draining in-flight requests and open tunnels"
    );
    // Connections first (no new request can take a lease once they are gone), then the leases
    // of requests whose clients left, which no connection waits for any more, and the upgraded
    // connections (WebSocket tunnels), which hyper no longer counts as connections.
    let drain = async {
        graceful.shutdown().await;
        leases.idle().await;
        tunnels.closed().await;
    };
    if tokio::time::timeout(config.proxy.shutdown_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            leases = leases.count(),
            tunnels = tunnels.count(),
            "shutdown timeout reached with work still in flight: the keys of requests still \
             running stay locked until lock_ttl passes; open connections and upgraded ones \
             (WebSocket tunnels) are closed now"
        );
    }
    let _ = stop_admin.send(true);
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// The next SIGHUP, or never without a handler.
async fn hangup(hangups: &mut Option<Signal>) -> Option<()> {
    match hangups {
        Some(hangups) => hangups.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies the file's policies and routes to new requests, or keeps the running ones if the file
/// is invalid.
fn reload<St>(file: &ConfigFile, layer: &IdempotencyLayer<St>)
where
    St: tower_idempotency::IdempotencyStore,
{
    tracing::info!(path = %file.path().display(), "SIGHUP received: reloading the configuration");
    match file.reload() {
        Ok(reloaded) => {
            layer.replace_routes(reloaded.routes);
            telemetry::config_reload(true);
            for key in &reloaded.needs_restart {
                tracing::warn!(
                    key = key.as_str(),
                    "`{key}` changed but only takes effect after a restart; the running value stays"
                );
            }
            tracing::info!("configuration reloaded: policies and routes apply to new requests");
        }
        Err(error) => {
            telemetry::config_reload(false);
            tracing::error!("configuration reload failed, keeping the running one: {error}");
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
