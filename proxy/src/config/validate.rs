//! Checks that the values of a parsed file work together, naming the first key that does not.

use http::Uri;
use tower_idempotency::canonical_json::JsonPointerError;
use tower_idempotency::fingerprint::BodyFingerprint;
use tower_idempotency::{Anonymous, Mode, OnConflict, OnStoreError, Policy, Routes};

use super::Config;
use super::errors::{KeyPath, Problem, problem};
use super::schema::*;
use super::store::*;

impl Config {
    pub(super) fn validate_problems(&self) -> Result<(), Problem> {
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

    pub(super) fn validate_store(&self) -> Result<(), Problem> {
        let store = &self.store;
        if store.timeout.is_zero() {
            return Err(problem(store_key("timeout"), "must be positive"));
        }
        if store.poll_interval.is_zero() {
            return Err(problem(store_key("poll_interval"), "must be positive"));
        }
        match &store.backend {
            StoreBackend::Memory => {}
            StoreBackend::Sqlite(sqlite) => {
                url_scheme(Backend::Sqlite, &sqlite.url, &["sqlite"])?;
                reaper_checked(&sqlite.reaper)?;
            }
            StoreBackend::Postgres(postgres) => {
                url_scheme(
                    Backend::Postgres,
                    &postgres.url,
                    &["postgres", "postgresql"],
                )?;
                postgres_checked(postgres)?;
                reaper_checked(&postgres.reaper)?;
            }
            StoreBackend::Redis(redis) => {
                url_scheme(
                    Backend::Redis,
                    &redis.url,
                    &["redis", "rediss", "redis+unix", "unix"],
                )?;
                prefix_checked(redis.prefix.as_deref())?;
            }
            StoreBackend::RedisCluster(cluster) => {
                if cluster.urls.is_empty() {
                    return Err(problem(
                        store_key("urls"),
                        "the redis-cluster backend needs urls",
                    ));
                }
                if let Some(url) = cluster.urls.iter().find(|url| !url.starts_with("redis")) {
                    return Err(problem(
                        store_key("urls"),
                        format!("{url:?} is not a redis:// url"),
                    ));
                }
                prefix_checked(cluster.prefix.as_deref())?;
            }
        }
        Ok(())
    }

    pub(super) fn upstream_uri(&self) -> Result<Uri, Problem> {
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

    pub(super) fn routes_checked(&self) -> Result<Routes, Problem> {
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
    if let Some(advertise) = fields.expiry_header {
        policy.expiry_header = advertise;
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

fn store_key(field: &str) -> KeyPath {
    KeyPath::of(&["store", field])
}

/// `url` is set and has one of `schemes`.
fn url_scheme(backend: Backend, url: &str, schemes: &[&str]) -> Result<(), Problem> {
    if url.is_empty() {
        return Err(problem(
            store_key("url"),
            format!("the {} backend needs a url", backend.as_str()),
        ));
    }
    if !schemes
        .iter()
        .any(|scheme| url.starts_with(&format!("{scheme}:")))
    {
        let schemes: Vec<_> = schemes.iter().map(|s| format!("{s}:")).collect();
        return Err(problem(
            store_key("url"),
            format!(
                "a {} url starts with {}",
                backend.as_str(),
                schemes.join(" or ")
            ),
        ));
    }
    Ok(())
}

/// The store's own checks of its names, so the file is refused for exactly what the store
/// refuses.
fn postgres_checked(postgres: &PostgresConfig) -> Result<(), Problem> {
    #[cfg(feature = "postgres")]
    for (field, name) in [("schema", &postgres.schema), ("table", &postgres.table)] {
        if let Some(name) = name
            && let Err(invalid) = tower_idempotency::store::validate_sql_identifier(field, name)
        {
            return Err(problem(store_key(field), invalid.to_string()));
        }
    }
    if postgres.max_connections == Some(0) {
        return Err(problem(store_key("max_connections"), "must be at least 1"));
    }
    Ok(())
}

fn reaper_checked(reaper: &ReaperConfig) -> Result<(), Problem> {
    if reaper.batch == Some(0) {
        return Err(problem(store_key("reaper_batch"), "must be at least 1"));
    }
    Ok(())
}

/// The Redis store's own check of its key prefix.
fn prefix_checked(prefix: Option<&str>) -> Result<(), Problem> {
    #[cfg(feature = "redis")]
    if let Some(prefix) = prefix
        && !tower_idempotency::store::is_valid_key_prefix(prefix)
    {
        return Err(problem(
            store_key("prefix"),
            "must be non-empty, without whitespace, control characters or braces",
        ));
    }
    #[cfg(not(feature = "redis"))]
    let _ = prefix;
    Ok(())
}
