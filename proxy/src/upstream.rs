//! Forwarding to the upstream service: a pooled keep-alive hyper client, hop-by-hop header
//! removal both ways, `X-Forwarded-*`, and `502`/`504` problem answers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;
use tower_idempotency::headers::remove_hop_by_hop;
use tower_idempotency::lease::{Lease, remove_lease_headers};
use tower_idempotency::problem::{Problem, ProblemKind};
use tower_idempotency::{OutcomeUnknown, RequestBody};

use crate::config::ProxyConfig;
use crate::telemetry;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The body of a response from [`Upstream`]: the upstream's own, or a problem answer.
pub type UpstreamBody = Either<Incoming, Full<Bytes>>;

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

/// A service that forwards requests to the upstream.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, RequestBody<Incoming>>,
    target: Arc<Target>,
}

struct Target {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    /// Path prefix of the upstream URL without its trailing slash ("" for none).
    base_path: String,
    timeout: Duration,
    preserve_host: bool,
}

impl Upstream {
    /// A client for `upstream` with the pool and timeout settings of `config`.
    pub fn new(upstream: &Uri, config: &ProxyConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(config.upstream_http2)
            .build(connector);
        let authority = upstream
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("127.0.0.1"));
        let host = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            client,
            target: Arc::new(Target {
                scheme: upstream.scheme().cloned().unwrap_or(Scheme::HTTP),
                authority,
                host,
                base_path: upstream.path().trim_end_matches('/').to_owned(),
                timeout: config.upstream_timeout,
                preserve_host: config.preserve_host,
            }),
        }
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
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(request).await) })
    }
}

impl Upstream {
    async fn forward(self, request: Request<RequestBody<Incoming>>) -> Response<UpstreamBody> {
        let request = match self.target.rewrite(request) {
            Ok(request) => request,
            Err(problem) => return problem.into_response(problem_body),
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.target.timeout, self.client.request(request)).await;
        match outcome {
            Ok(Ok(mut response)) => {
                telemetry::upstream_call(started.elapsed(), response.status().as_u16());
                remove_hop_by_hop(response.headers_mut());
                response.map(Either::Left)
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
                let sent = !error.is_connect();
                mark_unknown(problem.into_response(problem_body), sent)
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
                // The upstream may still be working on it.
                mark_unknown(problem.into_response(problem_body), true)
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
        parts.uri = Uri::from_parts({
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(self.scheme.clone());
            uri.authority = Some(self.authority.clone());
            uri.path_and_query = Some(path_and_query);
            uri
        })
        .map_err(|_| invalid_target())?;

        let headers = &mut parts.headers;
        remove_hop_by_hop(headers);
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
        if !self.preserve_host || original_host.is_none() {
            headers.insert(HOST, self.host.clone());
        }
        // The proxy speaks to the upstream in its own HTTP version, whatever the client used.
        parts.version = http::Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }
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
            preserve_host,
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
        assert_eq!(rewritten.uri(), "http://127.0.0.1:3000/api/pay?x=1");
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
        assert_eq!(rewritten.uri(), "http://127.0.0.1:3000/pay?x=1");
        assert_eq!(rewritten.headers()["host"], "public.example");
    }
}
