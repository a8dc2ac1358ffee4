//! The file's schema: one struct per table, with a doc comment per field.

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use http::{HeaderName, Method, StatusCode};
use serde::Deserialize;
use tower_idempotency::PathPattern;

/// `[proxy]`: where to listen and where to forward.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address to accept client connections on, e.g. `127.0.0.1:8080` (port 0 picks a free port;
    /// the chosen address is printed at start-up).
    pub listen: SocketAddr,
    /// Base URL of the upstream service, `http://host:port` with an optional path prefix.
    pub upstream: String,
    /// Longest wait for the upstream's response head before answering `504`.
    #[serde(default = "defaults::upstream_timeout", with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Longest silence between two parts of the upstream's response body; absent: the same as
    /// `upstream_timeout`. When it passes, a client that has no response head yet gets `504`,
    /// one that has is disconnected, and the key stays locked until `lock_ttl` (the outcome is
    /// unknown).
    #[serde(default, with = "humantime_serde")]
    pub upstream_body_timeout: Option<Duration>,
    /// Longest wait to open a connection to the upstream before answering `502`.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest time a client may take to send its request head; slower clients are disconnected.
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// On SIGTERM or SIGINT, how long in-flight requests (those whose client left included) may
    /// take to finish and be stored, and open upgraded connections (WebSocket tunnels) to close,
    /// before the proxy exits anyway.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long an idle upstream connection is kept in the pool.
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Most idle upstream connections kept in the pool.
    #[serde(default = "defaults::pool_max_idle")]
    pub pool_max_idle: usize,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) to the upstream instead of HTTP/1.1. The
    /// host then travels as `:authority` only, and upgrades (WebSocket) cannot pass.
    #[serde(default)]
    pub upstream_http2: bool,
    /// Forward the client's `Host` header instead of the upstream's authority (over HTTP/2, the
    /// client's host becomes `:authority`; the proxy still connects to `upstream`).
    #[serde(default)]
    pub preserve_host: bool,
    /// Merge repeated slashes (`//a` is `/a`) when normalising request paths, before routes are
    /// matched and the request is forwarded. Default `true`.
    #[serde(default = "defaults::merge_slashes")]
    pub merge_slashes: bool,
    /// Threads serving requests; absent: one per CPU core. A sidecar sharing its machine with the
    /// service it fronts often does better with fewer.
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl ProxyConfig {
    /// The effective `upstream_body_timeout`: as set, else `upstream_timeout`.
    pub fn upstream_body_timeout(&self) -> Duration {
        self.upstream_body_timeout.unwrap_or(self.upstream_timeout)
    }
}

/// `[admin]`: health, readiness and metrics, on a listener of their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener. Loopback by default: metrics are for the local scraper.
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
    /// The bearer token the record endpoints (`/records/{key}`) require in `Authorization`.
    /// Without one they answer loopback peers only. `IDEMPOTENCY_ADMIN_TOKEN` replaces it.
    #[serde(default)]
    pub token: Option<String>,
}

/// `reject` or `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflictConfig {
    /// `409` at once.
    Reject,
    /// Wait for the running request, then replay.
    Wait,
}

/// `enforce` or `observe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeConfig {
    /// Refuse, replay and lock.
    Enforce,
    /// Shadow rollout: run every request, count what enforcement would have done.
    Observe,
}

/// `bytes` or `json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FingerprintConfig {
    /// The body's bytes as sent.
    Bytes,
    /// The body's canonical JSON form (bytes when it is not JSON).
    Json,
}

/// `reject` or `forward`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreErrorConfig {
    /// `503`: never run unprotected.
    Reject,
    /// Run without protection.
    Forward,
}

/// `share` or `reject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousConfig {
    /// Anonymous callers share one scope.
    Share,
    /// `403` to keyed requests without credentials.
    Reject,
}

/// A header name, checked when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderNameValue(pub HeaderName);

impl<'de> Deserialize<'de> for HeaderNameValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        HeaderName::from_bytes(name.as_bytes())
            .map(Self)
            .map_err(|_| serde::de::Error::custom(format!("{name:?} is not a valid header name")))
    }
}

/// An HTTP method, checked when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodValue(pub Method);

impl<'de> Deserialize<'de> for MethodValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(serde::de::Error::custom(format!(
                "{name:?} is not an HTTP method: methods are case-sensitive, write e.g. \"{}\"",
                name.to_ascii_uppercase()
            )));
        }
        Method::from_bytes(name.as_bytes())
            .map(Self)
            .map_err(|_| serde::de::Error::custom(format!("{name:?} is not an HTTP method")))
    }
}

/// A response status, checked when the file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusValue(pub StatusCode);

impl<'de> Deserialize<'de> for StatusValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = u16::deserialize(deserializer)?;
        (100..=599)
            .contains(&code)
            .then(|| StatusCode::from_u16(code).ok())
            .flatten()
            .map(Self)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("{code} is not an HTTP status (100 to 599)"))
            })
    }
}

/// A path pattern, checked when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternValue(pub PathPattern);

impl<'de> Deserialize<'de> for PatternValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let pattern = String::deserialize(deserializer)?;
        pattern.parse().map(Self).map_err(serde::de::Error::custom)
    }
}

/// Declares the policy fields once for `[idempotency]` and for `[[route]]`: serde's `flatten`
/// cannot be combined with `deny_unknown_fields`, and unknown keys must be errors.
macro_rules! policy_fields {
    ($($(#[doc = $doc:literal])* $(#[serde($($serde:tt)*)])? $field:ident: $ty:ty,)*) => {
        /// `[idempotency]`: the policy every route starts from. Each field left out keeps the
        /// built-in default.
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct PolicyConfig {
            $(
                $(#[doc = $doc])*
                #[serde(default $(, $($serde)*)?)]
                pub $field: Option<$ty>,
            )*
        }

        /// `[[route]]`: a path pattern and the policy fields it overrides.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RouteConfig {
            /// Path pattern: `*` matches one segment, a final `**` the rest of the path.
            pub path: PatternValue,
            $(
                $(#[doc = $doc])*
                #[serde(default $(, $($serde)*)?)]
                pub $field: Option<$ty>,
            )*
        }

        impl PolicyConfig {
            /// `self` with every field `route` sets replaced by the route's value.
            pub(super) fn overridden_by(&self, route: &RouteConfig) -> PolicyConfig {
                PolicyConfig {
                    $($field: route.$field.clone().or_else(|| self.$field.clone()),)*
                }
            }
        }
    };
}

policy_fields! {
    /// `false` passes every request through untouched.
    enabled: bool,
    /// Methods covered (case-sensitive). Default `["POST", "PATCH"]`.
    methods: Vec<MethodValue>,
    /// `true` answers `400` to a covered request without a key.
    required: bool,
    /// The key header. Default `Idempotency-Key`.
    header: HeaderNameValue,
    /// How long a response is kept for replay. Default `24h`.
    #[serde(with = "humantime_serde")]
    ttl: Duration,
    /// Lease length; renewed every third of it while the upstream runs, and how long a crashed
    /// proxy blocks its keys. Default `30s`.
    #[serde(with = "humantime_serde")]
    lock_ttl: Duration,
    /// `reject` (`409`) or `wait` for an in-flight duplicate. Default `reject`.
    on_conflict: OnConflictConfig,
    /// How long `wait` waits before `409`. Default `10s`.
    #[serde(with = "humantime_serde")]
    wait_timeout: Duration,
    /// `reject` (`503`) or `forward` (run unprotected) when the store fails. Default `reject`.
    on_store_error: OnStoreErrorConfig,
    /// Headers that identify the caller; keys are scoped to them. Default `["authorization"]`.
    scope_headers: Vec<HeaderNameValue>,
    /// Cookies that identify the caller besides `scope_headers` (session cookies); keys are
    /// scoped to their values, other cookies are ignored. Default none.
    scope_cookies: Vec<String>,
    /// `share`: callers without a scope header or scope cookie share one scope; `reject`: their
    /// keyed requests get `403`. Default `share`.
    anonymous: AnonymousConfig,
    /// Headers that take part in the request fingerprint besides method, path, query and body.
    fingerprint_headers: Vec<HeaderNameValue>,
    /// Largest request body accepted on a covered request (`413` above). Default `1MiB`.
    max_request_body: ByteSize,
    /// Largest response kept for replay; larger ones are streamed and not stored. Default `8MiB`.
    max_response_body: ByteSize,
    /// `Retry-After` on `409`, `429` and `503`. Default `1s`.
    #[serde(with = "humantime_serde")]
    retry_after: Duration,
    /// Most keyed requests one caller (per `scope_headers` and `scope_cookies`; callers without
    /// either per client address) may have in progress in this proxy; more get `429`. `0`: no
    /// limit. Default `100`.
    max_in_flight_per_caller: usize,
    /// Longest time a covered request's body may take to arrive; slower ones get `408` and
    /// nothing runs. Default `30s`.
    #[serde(with = "humantime_serde")]
    body_read_timeout: Duration,
    /// Statuses delivered but never stored (the retry runs again), besides every `5xx`, which is
    /// never stored either. Default `[408, 425, 429]`.
    never_store: Vec<StatusValue>,
    /// `true` sends the upstream `Idempotency-Lease-Token` and `Idempotency-Attempt` with every
    /// request run under a lease, so it can fence its own writes. Default `false`.
    forward_lease: bool,
    /// `enforce`, or `observe` for a shadow rollout: every request runs, and what enforcement
    /// would have done (replay, `409`, `422`, `400`...) is counted and logged. Default `enforce`.
    mode: ModeConfig,
    /// `bytes` (the body as sent) or `json` (its canonical form: keys sorted, whitespace
    /// dropped; a body that is not JSON counts as bytes). Default `bytes`.
    fingerprint: FingerprintConfig,
    /// JSON pointers (`/meta/request_id`) of members left out of a `json` fingerprint.
    fingerprint_ignore: Vec<String>,
    /// Base of every problem `type` URI (`<base>#<slug>`); an absolute URI. Default the crate's
    /// docs.
    problem_type_base: String,
    /// When set, idempotency errors carry `Link: <docs_url>; rel="describedby"`.
    docs_url: String,
    /// Response headers never stored, hence never replayed (e.g. `set-cookie`). Default none.
    replay_drop_headers: Vec<HeaderNameValue>,
    /// `true` adds `Idempotency-TTL: <seconds>` to keyed responses that were stored (the first
    /// and every replay): how long the record is still kept, so a client knows how long it may
    /// retry. Default `true`.
    expiry_header: bool,
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub(super) fn upstream_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub(super) fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn pool_idle_timeout() -> Duration {
        Duration::from_secs(90)
    }
    pub(super) fn pool_max_idle() -> usize {
        256
    }
    pub(super) fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9091))
    }
    pub(super) fn merge_slashes() -> bool {
        true
    }
}
