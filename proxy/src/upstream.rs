//! Forwarding to the upstream service: a pooled keep-alive hyper client, hop-by-hop header
//! removal both ways, `X-Forwarded-*`, `502`/`504` problem answers, and protocol upgrades
//! (WebSocket) tunnelled both ways.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderValue, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tower::Service;
use tower_idempotency::headers::remove_hop_by_hop;
use tower_idempotency::lease::{Lease, remove_lease_headers};
use tower_idempotency::problem::{Problem, ProblemDocs, ProblemKind};
use tower_idempotency::{LateOutcome, OutcomeUnknown, RequestBody};

use crate::body_timeout::IdleTimeout;
use crate::config::ProxyConfig;
use crate::pool::{Pool, PoolSettings, PooledBody};
use crate::telemetry;
use crate::tunnels::{OpenTunnel, Tunnels};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The body of a response from [`Upstream`]: the upstream's own (failing when it stalls past
/// `upstream_body_timeout`), or a problem answer.
pub type UpstreamBody = Either<IdleTimeout<PooledBody<RequestBody<Incoming>>>, Full<Bytes>>;

/// The address of the client a request came from, set per connection.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    /// The address.
    pub addr: SocketAddr,
    /// Its IP as a header value, formatted once per connection rather than per request.
    ip: HeaderValue,
}

impl ClientAddr {
    /// The client at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { addr, ip }
    }
}

/// A service that forwards requests to the upstream; a clone shares its connections.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool<RequestBody<Incoming>>,
    target: Target,
    tunnels: Tunnels,
}

struct Target {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    /// Path prefix of the upstream URL without its trailing slash ("" for none).
    base_path: String,
    timeout: Duration,
    /// Longest silence between two frames of a response body.
    body_timeout: Duration,
    preserve_host: bool,
    /// HTTP/2 carries the host as `:authority` only.
    http2: bool,
}

impl Upstream {
    /// A client for `upstream` with the pool and timeout settings of `config`.
    pub fn new(upstream: &Uri, config: &ProxyConfig) -> Self {
        let pool = Pool::new(PoolSettings {
            upstream: upstream.clone(),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle: config.pool_max_idle,
            http2: config.upstream_http2,
        });
        let authority = upstream
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("127.0.0.1"));
        let host = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            shared: Arc::new(Shared {
                pool,
                target: Target {
                    scheme: upstream.scheme().cloned().unwrap_or(Scheme::HTTP),
                    authority,
                    host,
                    base_path: upstream.path().trim_end_matches('/').to_owned(),
                    timeout: config.upstream_timeout,
                    body_timeout: config.upstream_body_timeout(),
                    preserve_host: config.preserve_host,
                    http2: config.upstream_http2,
                },
                tunnels: Tunnels::default(),
            }),
        }
    }

    /// The upgraded connections (WebSocket tunnels) this service opened and that are still open.
    pub fn tunnels(&self) -> Tunnels {
        self.shared.tunnels.clone()
    }
}

impl Service<Request<RequestBody<Incoming>>> for Upstream {
    type Response = Response<UpstreamBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody<Incoming>>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.forward(request).await) })
    }
}

impl Shared {
    async fn forward(
        self: Arc<Self>,
        mut request: Request<RequestBody<Incoming>>,
    ) -> Response<UpstreamBody> {
        // The idempotency layer refuses upgrades on the methods it covers: what arrives here with
        // one is a request the layer passes through untouched, as any reverse proxy would.
        let client_side = is_upgrade(request.version(), request.headers())
            .then(|| hyper::upgrade::on(&mut request));
        // The route's problem docs, which the idempotency layer left when they are not defaults.
        let docs = request
            .extensions()
            .get::<ProblemDocs>()
            .cloned()
            .unwrap_or_default();
        if client_side.is_some() && self.target.http2 {
            let problem = Problem::new(
                ProblemKind::UpgradeNotAllowed,
                "the proxy speaks HTTP/2 to its upstream (upstream_http2), where a connection \
                 cannot switch protocols",
            );
            return problem.documented(&docs).into_response(problem_body);
        }
        let request = match self.target.rewrite(request) {
            Ok(request) => request,
            Err(problem) => return problem.documented(&docs).into_response(problem_body),
        };
        let started = Instant::now();
        // Pinned here rather than inside the timeout, so that a call that times out can be handed
        // on to the idempotency layer, which keeps waiting for its late result.
        let sender = self.clone();
        let mut call = Box::pin(async move { sender.pool.send(request).await });
        let outcome = tokio::time::timeout(self.target.timeout, &mut call).await;
        match outcome {
            Ok(Ok(mut response)) => {
                telemetry::upstream_call(started.elapsed(), response.status().as_u16());
                let protocol = response.headers().get(UPGRADE).cloned();
                remove_hop_by_hop(response.headers_mut());
                if let (Some(client_side), Some(protocol)) = (client_side, protocol)
                    && response.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    keep_upgrade(response.headers_mut(), protocol);
                    let upstream_side = hyper::upgrade::on(&mut response);
                    let open = self.tunnels.open();
                    tokio::spawn(tunnel(client_side, upstream_side, open));
                }
                let body_timeout = self.target.body_timeout;
                response.map(|body| Either::Left(IdleTimeout::new(body, body_timeout)))
            }
            Ok(Err(error)) => {
                telemetry::upstream_call(started.elapsed(), 502);
                let cause = error_chain(&error);
                tracing::warn!(error = %cause, "upstream request failed");
                let problem = Problem::new(
                    ProblemKind::UpstreamUnavailable,
                    format!("the upstream could not be reached: {cause}"),
                );
                // A failure to connect means the request never left: safe to run again. Any
                // later failure may have hit after the upstream acted on it.
                let sent = !error.is_not_sent();
                mark_unknown(problem.documented(&docs).into_response(problem_body), sent)
            }
            Err(_) => {
                telemetry::upstream_call(started.elapsed(), 504);
                tracing::warn!(timeout = ?self.target.timeout, "upstream timed out");
                let problem = Problem::new(
                    ProblemKind::UpstreamTimeout,
                    format!(
                        "the upstream did not answer within {}",
                        humantime::format_duration(self.target.timeout)
                    ),
                );
                // The upstream may still be working on it: the layer awaits its late answer.
                let mut response =
                    mark_unknown(problem.documented(&docs).into_response(problem_body), true);
                let body_timeout = self.target.body_timeout;
                let late = async move {
                    let mut response = call.await?;
                    remove_hop_by_hop(response.headers_mut());
                    Ok::<_, crate::pool::SendError>(
                        response.map(|body| IdleTimeout::new(body, body_timeout)),
                    )
                };
                response.extensions_mut().insert(LateOutcome::new(late));
                response
            }
        }
    }
}

/// Marks a failure the upstream may have acted on, so the idempotency layer keeps the key locked
/// until `lock_ttl` rather than letting a retry run the request again alongside it.
fn mark_unknown(
    mut response: Response<UpstreamBody>,
    maybe_executed: bool,
) -> Response<UpstreamBody> {
    if maybe_executed {
        response.extensions_mut().insert(OutcomeUnknown);
    }
    response
}

impl Target {
    /// Points the request at the upstream and sets the forwarding headers.
    fn rewrite<B>(&self, request: Request<B>) -> Result<Request<B>, Problem> {
        let (mut parts, body) = request.into_parts();
        let path_and_query = match (parts.uri.path_and_query(), self.base_path.is_empty()) {
            // Shares the parsed bytes: no copy, no second validation.
            (Some(original), true) => original.clone(),
            (None, true) => PathAndQuery::from_static("/"),
            (original, false) => {
                let original = original.map_or("/", PathAndQuery::as_str);
                PathAndQuery::try_from(format!("{}{original}", self.base_path))
                    .map_err(|_| invalid_target())?
            }
        };
        parts.uri = if !self.http2 && parts.method == http::Method::CONNECT {
            // HTTP/1.1 sends CONNECT in authority form.
            Uri::from(self.authority.clone())
        } else if !self.http2 {
            // HTTP/1.1 sends the origin form: the connection already names the upstream.
            Uri::from(path_and_query)
        } else {
            // HTTP/2 takes `:scheme` and `:authority` from an absolute URI.
            Uri::from_parts({
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(self.scheme.clone());
                uri.authority = Some(self.authority.clone());
                uri.path_and_query = Some(path_and_query);
                uri
            })
            .map_err(|_| invalid_target())?
        };

        let headers = &mut parts.headers;
        let protocol = is_upgrade(parts.version, headers)
            .then(|| headers.get(UPGRADE).cloned())
            .flatten();
        remove_hop_by_hop(headers);
        if let Some(protocol) = protocol {
            keep_upgrade(headers, protocol);
        }
        // Lease headers come from the proxy alone: a client's are dropped on every route.
        remove_lease_headers(headers);
        if let Some(lease) = parts.extensions.get::<Lease>().filter(|l| l.is_forwarded()) {
            lease.insert_headers(headers);
        }
        let original_host = headers.get(HOST).cloned();
        if let Some(client) = parts.extensions.get::<ClientAddr>() {
            let forwarded_for = match headers.get(&X_FORWARDED_FOR) {
                Some(earlier) => {
                    let mut joined = Vec::with_capacity(earlier.len() + 2 + client.ip.len());
                    joined.extend_from_slice(earlier.as_bytes());
                    joined.extend_from_slice(b", ");
                    joined.extend_from_slice(client.ip.as_bytes());
                    HeaderValue::from_bytes(&joined).ok()
                }
                None => Some(client.ip.clone()),
            };
            if let Some(value) = forwarded_for {
                headers.insert(X_FORWARDED_FOR.clone(), value);
            }
        }
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        if let Some(host) = &original_host {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        if self.http2 {
            // HTTP/2 carries the host as `:authority`, made from the URI's authority; a `Host`
            // beside it is a duplicate some servers refuse (nginx before 1.29 answers 400, see
            // hyperium/hyper#3298). With preserve_host the client's host becomes the authority
            // (the connector still dials the upstream).
            headers.remove(HOST);
            if self.preserve_host
                && let Some(host) = original_host.as_ref().and_then(as_authority)
            {
                let mut uri = std::mem::take(&mut parts.uri).into_parts();
                uri.authority = Some(host);
                parts.uri = Uri::from_parts(uri).map_err(|_| invalid_target())?;
            }
        } else if !self.preserve_host || original_host.is_none() {
            headers.insert(HOST, self.host.clone());
        }
        // The proxy speaks to the upstream in its own HTTP version, whatever the client used.
        parts.version = http::Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }
}

/// An HTTP/1.1 request asking to switch protocols: `Upgrade` and `Connection: upgrade`.
fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|option| option.trim().eq_ignore_ascii_case("upgrade"))
}

/// Puts back the two hop-by-hop headers an upgrade needs on the next hop.
fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(UPGRADE, protocol);
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Copies bytes both ways between the client's and the upstream's upgraded connections until
/// either side closes; `_open` counts the tunnel meanwhile (a graceful shutdown waits for it).
async fn tunnel(client_side: OnUpgrade, upstream_side: OnUpgrade, _open: OpenTunnel) {
    let (client, upstream) = match tokio::try_join!(client_side, upstream_side) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "protocol upgrade failed");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "upgraded connection closed"),
        Err(error) => tracing::debug!(%error, "upgraded connection ended with an error"),
    }
}

fn as_authority(host: &HeaderValue) -> Option<Authority> {
    Authority::try_from(host.as_bytes()).ok()
}

fn problem_body(json: Bytes) -> UpstreamBody {
    Either::Right(Full::new(json))
}

fn invalid_target() -> Problem {
    Problem::new(
        ProblemKind::InvalidTarget,
        "the request target cannot be joined to the upstream URL",
    )
}

/// The error and its causes on one line: hyper's top-level messages alone ("client error
/// (Connect)") do not say what went wrong.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(base: &str, preserve_host: bool) -> Target {
        let uri: Uri = base.parse().expect("uri");
        Target {
            scheme: Scheme::HTTP,
            authority: uri.authority().cloned().expect("authority"),
            host: HeaderValue::from_str(uri.authority().expect("authority").as_str())
                .expect("host"),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            preserve_host,
            http2: false,
        }
    }

    fn request() -> Request<()> {
        let mut request = Request::builder()
            .uri("/pay?x=1")
            .header("host", "public.example")
            .header("connection", "close, x-drop")
            .header("x-drop", "1")
            .header("x-forwarded-for", "10.0.0.1")
            .header("authorization", "Bearer t")
            .body(())
            .expect("request");
        request
            .extensions_mut()
            .insert(ClientAddr::new("192.0.2.7:5000".parse().expect("addr")));
        request
    }

    #[test]
    fn rewrites_the_target_and_sets_forwarding_headers() {
        let rewritten = target("http://127.0.0.1:3000/api/", false)
            .rewrite(request())
            .expect("rewrite");
        assert_eq!(rewritten.uri(), "/api/pay?x=1", "origin form over HTTP/1.1");
        let headers = rewritten.headers();
        assert_eq!(headers["host"], "127.0.0.1:3000");
        assert_eq!(headers["x-forwarded-host"], "public.example");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["authorization"], "Bearer t");
        assert!(!headers.contains_key("connection"));
        assert!(!headers.contains_key("x-drop"));
    }

    #[test]
    fn can_preserve_the_client_host() {
        let rewritten = target("http://127.0.0.1:3000", true)
            .rewrite(request())
            .expect("rewrite");
        assert_eq!(rewritten.uri(), "/pay?x=1");
        assert_eq!(rewritten.headers()["host"], "public.example");
    }

    #[test]
    fn over_http2_the_host_travels_as_the_authority_only() {
        let mut upstream = target("http://127.0.0.1:3000", false);
        upstream.http2 = true;
        let rewritten = upstream.rewrite(request()).expect("rewrite");
        assert!(!rewritten.headers().contains_key("host"));
        assert_eq!(rewritten.uri(), "http://127.0.0.1:3000/pay?x=1");

        let mut preserving = target("http://127.0.0.1:3000", true);
        preserving.http2 = true;
        let rewritten = preserving.rewrite(request()).expect("rewrite");
        assert!(!rewritten.headers().contains_key("host"));
        assert_eq!(rewritten.uri(), "http://public.example/pay?x=1");
    }

    #[test]
    fn an_upgrade_keeps_its_handshake_headers() {
        let mut upgrade = request();
        let headers = upgrade.headers_mut();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        let rewritten = target("http://127.0.0.1:3000", false)
            .rewrite(upgrade)
            .expect("rewrite");
        assert_eq!(rewritten.headers()["upgrade"], "websocket");
        assert_eq!(rewritten.headers()["connection"], "upgrade");
    }
}
