//! The proxy's configuration: one TOML file.
//!
//! Parsing is strict: an unknown key, a value of the wrong type or a value that makes no sense is
//! an error at start-up that names the key and its line. [`Config::load`] parses, expands
//! `${VAR}` references in store URLs, applies the `IDEMPOTENCY_STORE_URL` override and calls
//! [`Config::validate`]. See `examples/proxy.toml` for every field with comments.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use http::{HeaderName, Method, StatusCode, Uri};
use serde::Deserialize;
use tower_idempotency::canonical_json::JsonPointerError;
use tower_idempotency::fingerprint::BodyFingerprint;
use tower_idempotency::{Anonymous, Mode, OnConflict, OnStoreError, PathPattern, Policy, Routes};

/// Overrides `[store] url` when set, so secrets need not live in the file.
pub const STORE_URL_ENV: &str = "IDEMPOTENCY_STORE_URL";
/// The environment variable that, when set and not empty, replaces `[admin] token`.
pub const ADMIN_TOKEN_ENV: &str = "IDEMPOTENCY_ADMIN_TOKEN";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The proxy listener and its upstream.
    pub proxy: ProxyConfig,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`); absent means none.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Where idempotency records live.
    #[serde(default)]
    pub store: StoreConfig,
    /// Defaults for every route.
    #[serde(default)]
    pub idempotency: PolicyConfig,
    /// Per-path overrides; the first route whose `path` matches wins.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

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
    /// take to finish and be stored before the proxy exits anyway.
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

/// Which store backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// In-process: fast, forgotten on restart, one proxy only.
    #[default]
    Memory,
    /// An embedded SQLite file: durable, one proxy process per file.
    Sqlite,
    /// PostgreSQL: shared by many proxies.
    Postgres,
    /// A standalone Redis server: shared by many proxies.
    Redis,
    /// A Redis Cluster: shared by many proxies.
    RedisCluster,
}

impl Backend {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::RedisCluster => "redis-cluster",
        }
    }
}

/// `[store]`: the backend and its connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `memory`, `sqlite`, `postgres`, `redis` or `redis-cluster`.
    #[serde(default)]
    pub backend: Backend,
    /// Connection URL for `sqlite` (`sqlite://file.db`), `postgres` (`postgres://...`) and
    /// `redis` (`redis://...`). `${VAR}` is replaced by the environment variable `VAR`, and the
    /// `IDEMPOTENCY_STORE_URL` variable, when set, replaces the whole value.
    #[serde(default)]
    pub url: Option<String>,
    /// Node URLs of a `redis-cluster` (any subset of the nodes; `${VAR}` expanded).
    #[serde(default)]
    pub urls: Vec<String>,
    /// Longest a single store call may take before it counts as a store error.
    #[serde(default = "defaults::store_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How often a request waiting on an in-flight key (`on_conflict = "wait"`) looks at the
    /// store without a notification; this is what finds a lease whose holder died.
    #[serde(default = "defaults::poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// `postgres`: schema of the records table.
    #[serde(default)]
    pub schema: Option<String>,
    /// `postgres`: name of the records table.
    #[serde(default)]
    pub table: Option<String>,
    /// `postgres`: size of the connection pool.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// `sqlite` and `postgres`: how often expired records are deleted (`0s` disables).
    #[serde(default, with = "humantime_serde")]
    pub reaper_interval: Option<Duration>,
    /// `sqlite` and `postgres`: rows deleted per reaper statement.
    #[serde(default)]
    pub reaper_batch: Option<u32>,
    /// `redis` and `redis-cluster`: prefix of every key the store writes.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `postgres`: apply the schema at start-up (as `idempotency-proxy migrate` does). Turn off
    /// when the proxy's database role may not change the schema.
    #[serde(default = "defaults::auto_migrate")]
    pub auto_migrate: bool,
    /// Most bytes (bodies, headers, bookkeeping) of completed records this process keeps to
    /// answer replays without a store call. `0`, the default, turns the replay cache off; set it
    /// together with `replay_cache_entries`. Only stores that report forgets to every process
    /// can use it: for the others the cache stays off (with a warning at start).
    #[serde(default)]
    pub replay_cache_bytes: ByteSize,
    /// Most completed records kept in the replay cache; `0`, the default, turns it off.
    #[serde(default)]
    pub replay_cache_entries: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            url: None,
            urls: Vec::new(),
            timeout: defaults::store_timeout(),
            poll_interval: defaults::poll_interval(),
            schema: None,
            table: None,
            max_connections: None,
            reaper_interval: None,
            reaper_batch: None,
            prefix: None,
            auto_migrate: true,
            replay_cache_bytes: ByteSize::b(0),
            replay_cache_entries: 0,
        }
    }
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
            fn overridden_by(&self, route: &RouteConfig) -> PolicyConfig {
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
    pub(super) fn store_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub(super) fn auto_migrate() -> bool {
        true
    }
    pub(super) fn merge_slashes() -> bool {
        true
    }
}

/// One step of a key path such as `route[1].ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySegment {
    /// A table key.
    Key(String),
    /// An index into an array (of tables).
    Index(usize),
}

/// A dotted key path, displayed as `route[1].ttl`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(pub Vec<KeySegment>);

impl KeyPath {
    fn of(segments: &[&str]) -> Self {
        Self(
            segments
                .iter()
                .map(|s| KeySegment::Key((*s).to_owned()))
                .collect(),
        )
    }

    fn route(index: usize, field: &str) -> Self {
        Self(vec![
            KeySegment::Key("route".to_owned()),
            KeySegment::Index(index),
            KeySegment::Key(field.to_owned()),
        ])
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                KeySegment::Key(key) if i == 0 => f.write_str(key)?,
                KeySegment::Key(key) => write!(f, ".{key}")?,
                KeySegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A configuration that cannot be used, with where it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key or value is wrong.
    #[error("{}", self.describe())]
    Invalid {
        /// The file, if the configuration came from one.
        file: Option<PathBuf>,
        /// The offending key, when known.
        key: Option<KeyPath>,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn describe(&self) -> String {
        let Self::Invalid {
            file,
            key,
            line,
            message,
        } = self
        else {
            return String::new();
        };
        let mut out = String::from("invalid configuration");
        if let Some(file) = file {
            out.push_str(&format!(" in {}", file.display()));
        }
        if let Some(line) = line {
            out.push_str(&format!(" at line {line}"));
        }
        if let Some(key) = key.as_ref().filter(|key| !key.0.is_empty()) {
            out.push_str(&format!(", key `{key}`"));
        }
        out.push_str(": ");
        out.push_str(message);
        out
    }

    /// The offending key, if known.
    pub fn key(&self) -> Option<&KeyPath> {
        match self {
            Self::Invalid { key, .. } => key.as_ref(),
            Self::Read { .. } => None,
        }
    }

    /// The 1-based line, if known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Invalid { line, .. } => *line,
            Self::Read { .. } => None,
        }
    }
}

/// A validation failure before its line is looked up.
#[derive(Debug)]
struct Problem {
    key: KeyPath,
    message: String,
}

fn problem(key: KeyPath, message: impl Into<String>) -> Problem {
    Problem {
        key,
        message: message.into(),
    }
}

impl Config {
    /// Reads, expands and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_file(path, &text)
    }

    /// Parses, expands and validates `text`, read from the file at `path` (which errors name).
    pub fn parse_file(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, |name| std::env::var(name).ok()).map_err(|error| match error {
            ConfigError::Invalid {
                key, line, message, ..
            } => ConfigError::Invalid {
                file: Some(path.to_owned()),
                key,
                line,
                message,
            },
            other => other,
        })
    }

    /// Parses, expands and validates configuration `text`, reading environment variables through
    /// `env` (so tests need not touch the process environment).
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let document = toml_edit::Document::parse(text).ok();
        let locate = |key: KeyPath, message: String| ConfigError::Invalid {
            file: None,
            line: document
                .as_ref()
                .and_then(|doc| span_of(doc, &key))
                .map(|span| line_of(text, span.start)),
            key: Some(key),
            message,
        };
        let mut config: Config = toml::from_str(text).map_err(|error| {
            let span = error.span();
            let key = span
                .clone()
                .and_then(|span| document.as_ref().map(|doc| key_at(doc, span.start)));
            ConfigError::Invalid {
                file: None,
                line: span.map(|span| line_of(text, span.start)),
                key,
                message: error.message().trim().to_owned(),
            }
        })?;
        config
            .expand_environment(&env)
            .map_err(|p| locate(p.key, p.message))?;
        config
            .validate_problems()
            .map_err(|p| locate(p.key, p.message))?;
        Ok(config)
    }

    fn expand_environment(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Problem> {
        if let Some(url) = &self.store.url {
            self.store.url =
                Some(expand(url, env).map_err(|m| problem(KeyPath::of(&["store", "url"]), m))?);
        }
        if let Some(url) = env(STORE_URL_ENV).filter(|url| !url.is_empty()) {
            self.store.url = Some(url);
        }
        if let Some(admin) = &mut self.admin {
            if let Some(token) = env(ADMIN_TOKEN_ENV).filter(|token| !token.is_empty()) {
                admin.token = Some(token);
            }
            if admin.token.as_deref() == Some("") {
                return Err(problem(
                    KeyPath::of(&["admin", "token"]),
                    "must not be empty (leave it out to serve the record endpoints to loopback \
                     peers only)",
                ));
            }
        }
        for (i, url) in self.store.urls.iter_mut().enumerate() {
            *url = expand(url, env).map_err(|m| {
                problem(
                    KeyPath(vec![
                        KeySegment::Key("store".into()),
                        KeySegment::Key("urls".into()),
                        KeySegment::Index(i),
                    ]),
                    m,
                )
            })?;
        }
        Ok(())
    }

    /// Checks that the values work together, naming the first key that does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_problems().map_err(|p| ConfigError::Invalid {
            file: None,
            key: Some(p.key),
            line: None,
            message: p.message,
        })
    }

    fn validate_problems(&self) -> Result<(), Problem> {
        let upstream = self.upstream_uri()?;
        if upstream.query().is_some() {
            return Err(problem(
                KeyPath::of(&["proxy", "upstream"]),
                "the upstream URL must not have a query",
            ));
        }
        for (key, value) in [
            ("upstream_timeout", self.proxy.upstream_timeout),
            ("upstream_body_timeout", self.proxy.upstream_body_timeout()),
            ("connect_timeout", self.proxy.connect_timeout),
            ("header_read_timeout", self.proxy.header_read_timeout),
        ] {
            if value.is_zero() {
                return Err(problem(KeyPath::of(&["proxy", key]), "must be positive"));
            }
        }
        if self.proxy.worker_threads == Some(0) {
            return Err(problem(
                KeyPath::of(&["proxy", "worker_threads"]),
                "must be at least 1",
            ));
        }
        if let Some(admin) = &self.admin
            && admin.listen == self.proxy.listen
            && admin.listen.port() != 0
        {
            return Err(problem(
                KeyPath::of(&["admin", "listen"]),
                "must differ from proxy.listen",
            ));
        }
        self.validate_store()?;
        self.routes_checked().map(|_| ())
    }

    fn validate_store(&self) -> Result<(), Problem> {
        let store = &self.store;
        let key = |field: &str| KeyPath::of(&["store", field]);
        let backend = store.backend;
        if store.timeout.is_zero() {
            return Err(problem(key("timeout"), "must be positive"));
        }
        if store.poll_interval.is_zero() {
            return Err(problem(key("poll_interval"), "must be positive"));
        }
        match (
            store.replay_cache_bytes.as_u64(),
            store.replay_cache_entries,
        ) {
            (0, 0) => {}
            (0, _) => {
                return Err(problem(
                    key("replay_cache_bytes"),
                    "must be positive when replay_cache_entries is set (both 0: no replay cache)",
                ));
            }
            (_, 0) => {
                return Err(problem(
                    key("replay_cache_entries"),
                    "must be positive when replay_cache_bytes is set (both 0: no replay cache)",
                ));
            }
            _ => {}
        }
        let url_scheme = |schemes: &[&str]| -> Result<(), Problem> {
            let Some(url) = store.url.as_deref().filter(|url| !url.is_empty()) else {
                return Err(problem(
                    key("url"),
                    format!("the {} backend needs a url", backend.as_str()),
                ));
            };
            if !schemes
                .iter()
                .any(|scheme| url.starts_with(&format!("{scheme}:")))
            {
                return Err(problem(
                    key("url"),
                    format!(
                        "a {} url starts with {}",
                        backend.as_str(),
                        schemes
                            .iter()
                            .map(|s| format!("{s}:"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                ));
            }
            Ok(())
        };
        match backend {
            Backend::Memory => {}
            Backend::Sqlite => url_scheme(&["sqlite"])?,
            Backend::Postgres => url_scheme(&["postgres", "postgresql"])?,
            Backend::Redis => url_scheme(&["redis", "rediss", "redis+unix", "unix"])?,
            Backend::RedisCluster => {
                if store.urls.is_empty() {
                    return Err(problem(key("urls"), "the redis-cluster backend needs urls"));
                }
                if let Some(url) = store.urls.iter().find(|url| !url.starts_with("redis")) {
                    return Err(problem(
                        key("urls"),
                        format!("{url:?} is not a redis:// url"),
                    ));
                }
            }
        }
        let applies = |field: &str, set: bool, backends: &[Backend]| -> Result<(), Problem> {
            if set && !backends.contains(&backend) {
                let names: Vec<_> = backends.iter().map(|b| b.as_str()).collect();
                return Err(problem(
                    key(field),
                    format!(
                        "only applies to the {} backend, not {}",
                        names.join(" and "),
                        backend.as_str()
                    ),
                ));
            }
            Ok(())
        };
        applies(
            "url",
            store.url.is_some(),
            &[Backend::Sqlite, Backend::Postgres, Backend::Redis],
        )?;
        applies("urls", !store.urls.is_empty(), &[Backend::RedisCluster])?;
        applies("schema", store.schema.is_some(), &[Backend::Postgres])?;
        applies("table", store.table.is_some(), &[Backend::Postgres])?;
        applies(
            "max_connections",
            store.max_connections.is_some(),
            &[Backend::Postgres],
        )?;
        applies(
            "reaper_interval",
            store.reaper_interval.is_some(),
            &[Backend::Sqlite, Backend::Postgres],
        )?;
        applies(
            "reaper_batch",
            store.reaper_batch.is_some(),
            &[Backend::Sqlite, Backend::Postgres],
        )?;
        applies(
            "prefix",
            store.prefix.is_some(),
            &[Backend::Redis, Backend::RedisCluster],
        )?;
        for (field, name) in [("schema", &store.schema), ("table", &store.table)] {
            if let Some(name) = name
                && !is_sql_identifier(name)
            {
                return Err(problem(
                    key(field),
                    format!(
                        "{name:?} must be a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
                    ),
                ));
            }
        }
        if store.max_connections == Some(0) {
            return Err(problem(key("max_connections"), "must be at least 1"));
        }
        if store.reaper_batch == Some(0) {
            return Err(problem(key("reaper_batch"), "must be at least 1"));
        }
        if let Some(prefix) = &store.prefix
            && (prefix.is_empty()
                || prefix
                    .chars()
                    .any(|c| c.is_whitespace() || c == '{' || c == '}'))
        {
            return Err(problem(
                key("prefix"),
                "must be non-empty without whitespace or braces",
            ));
        }
        Ok(())
    }

    /// The upstream base URL.
    pub fn upstream(&self) -> Uri {
        // Validated on load, so the fallback is never taken for a loaded configuration.
        self.upstream_uri().unwrap_or_default()
    }

    fn upstream_uri(&self) -> Result<Uri, Problem> {
        let key = KeyPath::of(&["proxy", "upstream"]);
        let uri: Uri = self
            .proxy
            .upstream
            .parse()
            .map_err(|error| problem(key.clone(), format!("not a URL: {error}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(problem(
                    key,
                    "https upstreams are not supported: a sidecar talks to its service over \
                     loopback or a private network; use http://",
                ));
            }
            _ => return Err(problem(key, "must be an http:// URL")),
        }
        if uri.authority().is_none() {
            return Err(problem(key, "must name a host, e.g. http://127.0.0.1:3000"));
        }
        Ok(uri)
    }

    /// The covered routes whose callers are told apart only by the built-in default
    /// (`scope_headers = ["authorization"]`, set nowhere in the file, and no `scope_cookies`):
    /// `None` for the default policy, else the route's index.
    pub fn default_scoped(&self) -> Vec<Option<usize>> {
        let relies = |fields: &PolicyConfig| {
            fields.enabled != Some(false)
                && fields.scope_headers.is_none()
                && fields.scope_cookies.as_ref().is_none_or(Vec::is_empty)
        };
        let mut found: Vec<_> = (0..self.routes.len())
            .filter(|&i| relies(&self.idempotency.overridden_by(&self.routes[i])))
            .map(Some)
            .collect();
        if relies(&self.idempotency) {
            found.push(None);
        }
        found
    }

    /// The effective per-route policies, validated.
    pub fn routes(&self) -> Result<Routes, ConfigError> {
        self.routes_checked().map_err(|p| ConfigError::Invalid {
            file: None,
            key: Some(p.key),
            line: None,
            message: p.message,
        })
    }

    fn routes_checked(&self) -> Result<Routes, Problem> {
        let default = policy_from(&self.idempotency)
            .map_err(|e| problem(KeyPath::of(&["idempotency", e.field]), e.reason))?;
        let mut routes = Routes::new(default).merge_slashes(self.proxy.merge_slashes);
        for (index, route) in self.routes.iter().enumerate() {
            let merged = self.idempotency.overridden_by(route);
            let policy = policy_from(&merged)
                .map_err(|e| problem(KeyPath::route(index, e.field), e.reason))?;
            routes = routes.route(route.path.0.clone(), policy);
        }
        Ok(routes)
    }
}

/// Builds a policy from configured fields over the built-in defaults, and validates it.
fn policy_from(fields: &PolicyConfig) -> Result<Policy, tower_idempotency::policy::PolicyError> {
    let mut policy = Policy::default();
    if let Some(enabled) = fields.enabled {
        policy.enabled = enabled;
    }
    if let Some(methods) = &fields.methods {
        policy.methods = methods.iter().map(|m| m.0.clone()).collect();
    }
    if let Some(required) = fields.required {
        policy.required = required;
    }
    if let Some(header) = &fields.header {
        policy.header = header.0.clone();
    }
    if let Some(ttl) = fields.ttl {
        policy.ttl = ttl;
    }
    if let Some(lock_ttl) = fields.lock_ttl {
        policy.lock_ttl = lock_ttl;
    }
    if let Some(on_conflict) = fields.on_conflict {
        policy.on_conflict = match on_conflict {
            OnConflictConfig::Reject => OnConflict::Reject,
            OnConflictConfig::Wait => OnConflict::Wait,
        };
    }
    if let Some(wait_timeout) = fields.wait_timeout {
        policy.wait_timeout = wait_timeout;
    }
    if let Some(on_store_error) = fields.on_store_error {
        policy.on_store_error = match on_store_error {
            OnStoreErrorConfig::Reject => OnStoreError::Reject,
            OnStoreErrorConfig::Forward => OnStoreError::Forward,
        };
    }
    if let Some(headers) = &fields.scope_headers {
        policy.scope_headers = headers.iter().map(|h| h.0.clone()).collect();
    }
    if let Some(cookies) = &fields.scope_cookies {
        policy.scope_cookies = cookies.clone();
    }
    if let Some(anonymous) = fields.anonymous {
        policy.anonymous = match anonymous {
            AnonymousConfig::Share => Anonymous::Share,
            AnonymousConfig::Reject => Anonymous::Reject,
        };
    }
    if let Some(headers) = &fields.fingerprint_headers {
        policy.fingerprint_headers = headers.iter().map(|h| h.0.clone()).collect();
    }
    if let Some(size) = fields.max_request_body {
        policy.max_request_body = usize::try_from(size.as_u64()).unwrap_or(usize::MAX);
    }
    if let Some(size) = fields.max_response_body {
        policy.max_response_body = usize::try_from(size.as_u64()).unwrap_or(usize::MAX);
    }
    if let Some(retry_after) = fields.retry_after {
        policy.retry_after = retry_after;
    }
    if let Some(limit) = fields.max_in_flight_per_caller {
        policy.max_in_flight_per_caller = limit;
    }
    if let Some(timeout) = fields.body_read_timeout {
        policy.body_read_timeout = timeout;
    }
    if let Some(statuses) = &fields.never_store {
        policy.never_store = statuses.iter().map(|status| status.0).collect();
    }
    if let Some(forward) = fields.forward_lease {
        policy.forward_lease = forward;
    }
    if let Some(mode) = fields.mode {
        policy.mode = match mode {
            ModeConfig::Enforce => Mode::Enforce,
            ModeConfig::Observe => Mode::Observe,
        };
    }
    policy.fingerprint = fingerprint_from(fields)?;
    if let Some(base) = &fields.problem_type_base {
        policy.problem_type_base = Some(base.clone());
    }
    if let Some(url) = &fields.docs_url {
        policy.docs_url = Some(url.clone());
    }
    if let Some(headers) = &fields.replay_drop_headers {
        policy.replay_drop_headers = headers.iter().map(|h| h.0.clone()).collect();
    }
    policy.validate()?;
    Ok(policy)
}

/// The body fingerprint: `fingerprint_ignore` pointers are parsed here, and only go with `json`.
fn fingerprint_from(
    fields: &PolicyConfig,
) -> Result<BodyFingerprint, tower_idempotency::policy::PolicyError> {
    let fail = |reason: String| tower_idempotency::policy::PolicyError {
        field: "fingerprint_ignore",
        reason,
    };
    let ignore = fields.fingerprint_ignore.as_deref().unwrap_or_default();
    match fields.fingerprint {
        Some(FingerprintConfig::Json) => ignore
            .iter()
            .map(|pointer| {
                pointer
                    .parse()
                    .map_err(|e: JsonPointerError| fail(e.to_string()))
            })
            .collect::<Result<_, _>>()
            .map(BodyFingerprint::Json),
        _ if !ignore.is_empty() => Err(fail(
            "only applies with fingerprint = \"json\" (a bytes fingerprint has no members)"
                .to_owned(),
        )),
        _ => Ok(BodyFingerprint::Bytes),
    }
}

fn is_sql_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        && name.len() <= 63
}

/// Replaces each `${NAME}` in `value` by the variable's value.
fn expand(value: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated ${ in value".to_owned());
        };
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "${{{name}}} is not a valid environment variable reference"
            ));
        }
        match env(name) {
            Some(value) => out.push_str(&value),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The span of the key (or, failing that, the value) at `path`.
fn span_of(document: &toml_edit::Document<&str>, path: &KeyPath) -> Option<Range<usize>> {
    let mut item = document.as_item();
    let mut span = None;
    for segment in &path.0 {
        match segment {
            KeySegment::Key(key) => {
                // A key that is not in the file (a missing required key) is reported at the
                // deepest table that is.
                let Some((found_key, found)) = item
                    .as_table_like()
                    .and_then(|table| table.get_key_value(key))
                else {
                    return span;
                };
                span = found_key.span().or_else(|| found.span()).or(span);
                item = found;
            }
            KeySegment::Index(index) => {
                let found = match item {
                    toml_edit::Item::ArrayOfTables(tables) => {
                        let table = tables.get(*index)?;
                        span = table.span().or(span);
                        return descend_table(table, &path.0, span);
                    }
                    toml_edit::Item::Value(toml_edit::Value::Array(array)) => array.get(*index)?,
                    _ => return span,
                };
                span = found.span().or(span);
                return span;
            }
        }
    }
    span
}

/// Finishes [`span_of`] inside one table of an array of tables.
fn descend_table(
    table: &toml_edit::Table,
    path: &[KeySegment],
    fallback: Option<Range<usize>>,
) -> Option<Range<usize>> {
    let after_index = path
        .iter()
        .position(|s| matches!(s, KeySegment::Index(_)))
        .map_or(&[][..], |i| &path[i + 1..]);
    match after_index.first() {
        Some(KeySegment::Key(key)) => table
            .get_key_value(key)
            .and_then(|(k, v)| k.span().or_else(|| v.span()))
            .or(fallback),
        _ => fallback,
    }
}

/// The deepest key whose key or value span contains `offset`.
fn key_at(document: &toml_edit::Document<&str>, offset: usize) -> KeyPath {
    fn walk(table: &dyn toml_edit::TableLike, offset: usize, path: &mut Vec<KeySegment>) -> bool {
        for (key, item) in table.iter() {
            let (key_span, item_span) = match table.get_key_value(key) {
                Some((k, v)) => (k.span(), v.span()),
                None => (None, None),
            };
            let hit = |span: Option<Range<usize>>| span.is_some_and(|s| s.contains(&offset));
            path.push(KeySegment::Key(key.to_owned()));
            match item {
                toml_edit::Item::Table(inner) => {
                    if walk(inner, offset, path) || hit(inner.span()) {
                        return true;
                    }
                }
                toml_edit::Item::ArrayOfTables(tables) => {
                    for (index, inner) in tables.iter().enumerate() {
                        path.push(KeySegment::Index(index));
                        if walk(inner, offset, path) || hit(inner.span()) {
                            return true;
                        }
                        path.pop();
                    }
                }
                toml_edit::Item::Value(toml_edit::Value::InlineTable(inner)) => {
                    if walk(inner, offset, path) || hit(item_span.clone()) {
                        return true;
                    }
                }
                _ => {
                    if hit(key_span) || hit(item_span) {
                        return true;
                    }
                }
            }
            path.pop();
        }
        false
    }
    let mut path = Vec::new();
    walk(document.as_table(), offset, &mut path);
    KeyPath(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[proxy]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:3000"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, |name| match name {
            "PGPASSWORD" => Some("s3cret".to_owned()),
            _ => None,
        })
    }

    fn error(text: &str) -> (Option<String>, Option<usize>, String) {
        match parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(error) => (
                error.key().map(ToString::to_string),
                error.line(),
                error.to_string(),
            ),
        }
    }

    #[test]
    fn the_design_example_parses_with_its_routes() {
        let config = parse(include_str!("../../examples/proxy.toml")).expect("example config");
        let routes = config.routes().expect("routes");
        assert!(routes.policy_for("/payments/1").required);
        assert_eq!(
            routes.policy_for("/payments/1").ttl,
            Duration::from_secs(48 * 3600)
        );
        assert!(!routes.policy_for("/feed/x").enabled);
        assert_eq!(config.store.backend, Backend::Sqlite);
    }

    #[test]
    fn a_minimal_file_uses_the_defaults() {
        let config = parse(MINIMAL).expect("minimal config");
        assert_eq!(config.store.backend, Backend::Memory);
        assert!(config.admin.is_none());
        assert_eq!(
            config.routes().expect("routes").default_policy(),
            &Policy::default()
        );
    }

    #[test]
    fn the_replay_cache_needs_both_bounds() {
        let config = parse(&format!(
            "{MINIMAL}\n[store]\nreplay_cache_bytes = \"64MiB\"\nreplay_cache_entries = 1000\n"
        ))
        .expect("both bounds");
        assert_eq!(config.store.replay_cache_bytes, ByteSize::mib(64));
        assert_eq!(config.store.replay_cache_entries, 1000);
        assert_eq!(
            parse(MINIMAL).expect("minimal").store.replay_cache_entries,
            0
        );
        let (key, _, message) = error(&format!(
            "{MINIMAL}\n[store]\nreplay_cache_entries = 1000\n"
        ));
        assert_eq!(
            key.as_deref(),
            Some("store.replay_cache_bytes"),
            "{message}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let (key, line, message) = error(&format!(
            "{MINIMAL}\n[idempotency]\nttl = \"1h\"\nlock_tll = \"5s\"\n"
        ));
        assert_eq!(line, Some(8), "{message}");
        assert!(message.contains("lock_tll"), "{message}");
        assert_eq!(key.as_deref(), Some("idempotency.lock_tll"), "{message}");
    }

    #[test]
    fn unknown_keys_in_routes_are_named() {
        let (key, line, message) = error(&format!(
            "{MINIMAL}\n[[route]]\npath = \"/a\"\n\n[[route]]\npath = \"/b\"\nrequird = true\n"
        ));
        assert_eq!(line, Some(11), "{message}");
        assert!(message.contains("requird"), "{message}");
        assert_eq!(key.as_deref(), Some("route[1].requird"), "{message}");
    }

    #[test]
    fn bad_values_are_named_with_their_line() {
        for (snippet, expected_key) in [
            ("[idempotency]\nttl = \"soon\"", "idempotency.ttl"),
            (
                "[idempotency]\nmax_request_body = \"lots\"",
                "idempotency.max_request_body",
            ),
            ("[idempotency]\nmethods = [\"post\"]", "idempotency.methods"),
            (
                "[idempotency]\non_conflict = \"retry\"",
                "idempotency.on_conflict",
            ),
            (
                "[idempotency]\nscope_headers = [\"bad header\"]",
                "idempotency.scope_headers",
            ),
            ("[store]\nbackend = \"mysql\"", "store.backend"),
            (
                "[idempotency]\nnever_store = [429, 1000]",
                "idempotency.never_store",
            ),
            ("[[route]]\npath = \"payments/**\"", "route[0].path"),
        ] {
            let (key, line, message) = error(&format!("{MINIMAL}\n{snippet}\n"));
            assert_eq!(key.as_deref(), Some(expected_key), "{message}");
            assert_eq!(line, Some(7), "{message}");
        }
    }

    #[test]
    fn inconsistent_values_are_named_with_their_line() {
        for (snippet, expected_key, line) in [
            (
                "[idempotency]\nlock_ttl = \"1ms\"",
                "idempotency.lock_ttl",
                7,
            ),
            (
                "[[route]]\npath = \"/a\"\nlock_ttl = \"1ms\"",
                "route[0].lock_ttl",
                8,
            ),
            // A missing key is reported at its table.
            ("[store]\nbackend = \"postgres\"", "store.url", 6),
            (
                "[store]\nbackend = \"sqlite\"\nurl = \"postgres://x\"",
                "store.url",
                8,
            ),
            (
                "[store]\nbackend = \"redis\"\nurl = \"redis://x\"\nschema = \"s\"",
                "store.schema",
                9,
            ),
            (
                "[store]\nbackend = \"postgres\"\nurl = \"postgres://x\"\ntable = \"drop table\"",
                "store.table",
                9,
            ),
            ("[store]\nbackend = \"redis-cluster\"", "store.urls", 6),
            (
                "[[route]]\npath = \"/a\"\nbody_read_timeout = \"0s\"",
                "route[0].body_read_timeout",
                8,
            ),
            // Issue 15's keys: pointers parsed at load, and only with a JSON fingerprint.
            (
                "[[route]]\npath = \"/a\"\nfingerprint_ignore = [\"/ts\"]",
                "route[0].fingerprint_ignore",
                8,
            ),
            (
                "[[route]]\npath = \"/a\"\nfingerprint = \"json\"\nfingerprint_ignore = [\"ts\"]",
                "route[0].fingerprint_ignore",
                9,
            ),
            (
                "[[route]]\npath = \"/a\"\nproblem_type_base = \"/errors\"",
                "route[0].problem_type_base",
                8,
            ),
            (
                "[[route]]\npath = \"/a\"\ndocs_url = \"https://x.example/<a>\"",
                "route[0].docs_url",
                8,
            ),
            (
                "[[route]]\npath = \"/a\"\nmode = \"shadow\"",
                "route[0].mode",
                8,
            ),
            (
                "[[route]]\npath = \"/a\"\nreplay_drop_headers = [\"bad header\"]",
                "route[0].replay_drop_headers",
                8,
            ),
        ] {
            let (key, got_line, message) = error(&format!("{MINIMAL}\n{snippet}\n"));
            assert_eq!(key.as_deref(), Some(expected_key), "{message}");
            assert_eq!(got_line, Some(line), "{message}");
        }
    }

    #[test]
    fn operator_keys_reach_the_route_policy() {
        let config = parse(&format!(
            "{MINIMAL}\n[idempotency]\nfingerprint = \"json\"\n\n[[route]]\npath = \"/a\"\n\
             mode = \"observe\"\nfingerprint_ignore = [\"/meta/ts\"]\n\
             problem_type_base = \"https://errors.example.com/p\"\n\
             docs_url = \"https://docs.example.com\"\nreplay_drop_headers = [\"Set-Cookie\"]\n"
        ))
        .expect("config");
        let routes = config.routes().expect("routes");
        let route = routes.policy_for("/a");
        assert_eq!(route.mode, Mode::Observe);
        assert_eq!(
            route.fingerprint,
            BodyFingerprint::Json(vec!["/meta/ts".parse().unwrap()])
        );
        assert_eq!(route.docs_url.as_deref(), Some("https://docs.example.com"));
        assert_eq!(route.replay_drop_headers, [http::header::SET_COOKIE]);
        let default = routes.default_policy();
        assert_eq!(default.mode, Mode::Enforce);
        assert_eq!(default.fingerprint, BodyFingerprint::Json(Vec::new()));
        assert_eq!(default.problem_type_base, None);
    }

    #[test]
    fn body_timeouts_and_never_store_have_defaults_and_overrides() {
        let config = parse(&format!(
            "{MINIMAL}upstream_timeout = \"7s\"\n\n[[route]]\npath = \"/a\"\nnever_store = [503]\nbody_read_timeout = \"2s\"\n"
        ))
        .expect("config");
        assert_eq!(
            config.proxy.upstream_body_timeout(),
            Duration::from_secs(7),
            "defaults to upstream_timeout"
        );
        let routes = config.routes().expect("routes");
        let route = routes.policy_for("/a");
        assert_eq!(route.never_store, vec![StatusCode::SERVICE_UNAVAILABLE]);
        assert_eq!(route.body_read_timeout, Duration::from_secs(2));
        let default = routes.policy_for("/b");
        assert_eq!(default.never_store, Policy::default().never_store);
        let (key, _, message) = error(&format!("{MINIMAL}upstream_body_timeout = \"0s\"\n"));
        assert_eq!(
            key.as_deref(),
            Some("proxy.upstream_body_timeout"),
            "{message}"
        );
    }

    #[test]
    fn the_admin_listener_defaults_to_loopback() {
        let config = parse(&format!("{MINIMAL}\n[admin]\n")).expect("config");
        let admin = config.admin.expect("admin section");
        assert!(admin.listen.ip().is_loopback());
        assert_eq!(admin.listen.port(), 9091);
    }

    #[test]
    fn upstream_must_be_plain_http() {
        let (key, line, message) =
            error("[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"https://api\"\n");
        assert_eq!(key.as_deref(), Some("proxy.upstream"));
        assert_eq!(line, Some(3));
        assert!(message.contains("https"), "{message}");
    }

    #[test]
    fn store_urls_expand_environment_variables() {
        let config = parse(&format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\nurl = \"postgres://app:${{PGPASSWORD}}@db/app\"\n"
        ))
        .expect("config");
        assert_eq!(
            config.store.url.as_deref(),
            Some("postgres://app:s3cret@db/app")
        );

        let (key, line, message) = error(&format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\nurl = \"postgres://${{MISSING}}@db\"\n"
        ));
        assert_eq!(key.as_deref(), Some("store.url"));
        assert_eq!(line, Some(8));
        assert!(message.contains("MISSING"), "{message}");
    }

    #[test]
    fn the_store_url_variable_overrides_the_file() {
        let config = Config::parse(
            &format!("{MINIMAL}\n[store]\nbackend = \"redis\"\nurl = \"redis://file\"\n"),
            |name| (name == STORE_URL_ENV).then(|| "redis://env".to_owned()),
        )
        .expect("config");
        assert_eq!(config.store.url.as_deref(), Some("redis://env"));
    }

    #[test]
    fn routes_inherit_the_defaults_and_override_fields() {
        let config = parse(&format!(
            "{MINIMAL}\n[idempotency]\nttl = \"1h\"\nmethods = [\"POST\"]\n\n[[route]]\npath = \"/a/*\"\nrequired = true\n"
        ))
        .expect("config");
        let routes = config.routes().expect("routes");
        let route = routes.policy_for("/a/1");
        assert!(route.required);
        assert_eq!(route.ttl, Duration::from_secs(3600));
        assert_eq!(route.methods, vec![Method::POST]);
        assert!(!routes.policy_for("/b").required);
    }

    #[test]
    fn caller_fields_are_read_and_checked() {
        let config = parse(&format!(
            "{MINIMAL}merge_slashes = false\n\n[idempotency]\nscope_cookies = [\"session\"]\n\n[[route]]\npath = \"/a\"\nanonymous = \"reject\"\n"
        ))
        .expect("config");
        let routes = config.routes().expect("routes");
        assert!(!routes.merges_slashes());
        assert_eq!(routes.policy_for("/a").anonymous, Anonymous::Reject);
        assert_eq!(routes.policy_for("/a").scope_cookies, ["session"]);
        assert_eq!(routes.policy_for("/b").anonymous, Anonymous::Share);
        assert!(config.default_scoped().is_empty());

        let (key, line, message) = error(&format!(
            "{MINIMAL}\n[[route]]\npath = \"/a\"\nscope_cookies = [\"a b\"]\n"
        ));
        assert_eq!(key.as_deref(), Some("route[0].scope_cookies"), "{message}");
        assert_eq!(line, Some(8), "{message}");
        let (key, _, message) = error(&format!("{MINIMAL}\n[idempotency]\nanonymous = \"deny\"\n"));
        assert_eq!(key.as_deref(), Some("idempotency.anonymous"), "{message}");
    }

    #[test]
    fn env_expansion_refuses_malformed_references() {
        let env = |_: &str| Some("x".to_owned());
        assert_eq!(expand("a${B}c", &env).as_deref(), Ok("axc"));
        assert!(expand("a${B", &env).is_err());
        assert!(expand("a${}", &env).is_err());
        assert!(expand("a${B-C}", &env).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const KEYS: [&str; 12] = [
            "listen",
            "upstream",
            "ttl",
            "lock_ttl",
            "methods",
            "backend",
            "url",
            "path",
            "max_request_body",
            "on_conflict",
            "scope_headers",
            "enabled",
        ];

        /// Values of every TOML type, including wrong ones for the key they land on.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
                Just("\"30s\"".to_owned()),
                Just("\"1MiB\"".to_owned()),
                Just("[\"POST\", 3]".to_owned()),
                Just("{ a = 1 }".to_owned()),
                Just("\"${UNSET}\"".to_owned()),
            ]
        }

        fn document() -> impl Strategy<Value = String> {
            let section = prop_oneof![
                Just("[proxy]"),
                Just("[admin]"),
                Just("[store]"),
                Just("[idempotency]"),
                Just("[[route]]"),
                Just("[other]"),
            ];
            let line = (0..KEYS.len(), value()).prop_map(|(k, v)| format!("{} = {v}", KEYS[k]));
            proptest::collection::vec((section, proptest::collection::vec(line, 0..4)), 0..6)
                .prop_map(|sections| {
                    sections
                        .into_iter()
                        .map(|(header, lines)| format!("{header}\n{}\n", lines.join("\n")))
                        .collect()
                })
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
                let _ = parse(&text);
            }

            #[test]
            fn arbitrary_documents_never_panic_and_errors_point_inside_the_text(text in document()) {
                if let Err(error) = parse(&text) {
                    let lines = text.lines().count().max(1);
                    prop_assert!(error.line().is_none_or(|line| line >= 1 && line <= lines + 1), "{error}");
                    prop_assert!(!error.to_string().is_empty());
                }
            }
        }
    }
}
