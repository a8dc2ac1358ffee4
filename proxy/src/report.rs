//! The effective configuration, as `idempotency-proxy check` prints it.

use std::fmt::Write;

use tower_idempotency::fingerprint::BodyFingerprint;
use tower_idempotency::{Anonymous, Mode, OnConflict, OnStoreError, Policy, ReplayCacheLimits};

use crate::config::{Config, ConfigError, ReaperConfig, StoreBackend, StoreConfig};

/// A human-readable summary of what the proxy will do: upstream, store (credentials hidden) and
/// the effective policy of every route, in match order.
pub fn describe(config: &Config) -> Result<String, ConfigError> {
    let routes = config.routes()?;
    let mut out = String::new();
    let _ = writeln!(out, "listen    http://{}", config.proxy.listen);
    let _ = writeln!(out, "upstream  {}", config.proxy.upstream);
    if let Some(admin) = &config.admin {
        let _ = writeln!(out, "admin     http://{}", admin.listen);
    }
    describe_store(&mut out, &config.store);
    let _ = writeln!(out);
    for (pattern, policy) in routes.iter() {
        let _ = writeln!(out, "route {pattern}");
        describe_policy(&mut out, policy);
    }
    let _ = writeln!(out, "every other path");
    describe_policy(&mut out, routes.default_policy());
    Ok(out)
}

/// The backend and where it is (passwords hidden), then the settings in effect: those of the
/// backend that the file sets, and the shared ones.
fn describe_store(out: &mut String, store: &StoreConfig) {
    let mut settings = Vec::new();
    let location = match &store.backend {
        StoreBackend::Memory => "in process".to_owned(),
        StoreBackend::Sqlite(sqlite) => {
            describe_reaper(&mut settings, &sqlite.reaper);
            redact(&sqlite.url)
        }
        StoreBackend::Postgres(postgres) => {
            let names = [("schema", &postgres.schema), ("table", &postgres.table)];
            for (name, value) in names {
                if let Some(value) = value {
                    settings.push(format!("{name} {value}"));
                }
            }
            if let Some(connections) = postgres.max_connections {
                settings.push(format!("max_connections {connections}"));
            }
            describe_reaper(&mut settings, &postgres.reaper);
            if !postgres.auto_migrate {
                settings.push("auto_migrate off".to_owned());
            }
            redact(&postgres.url)
        }
        StoreBackend::Redis(redis) => {
            if let Some(prefix) = &redis.prefix {
                settings.push(format!("prefix {prefix}"));
            }
            redact(&redis.url)
        }
        StoreBackend::RedisCluster(cluster) => {
            if let Some(prefix) = &cluster.prefix {
                settings.push(format!("prefix {prefix}"));
            }
            let urls: Vec<_> = cluster.urls.iter().map(|url| redact(url)).collect();
            urls.join(", ")
        }
    };
    let duration = |d| humantime::format_duration(d).to_string();
    settings.push(format!("timeout {}", duration(store.timeout)));
    settings.push(format!("poll_interval {}", duration(store.poll_interval)));
    let cache = store.replay_cache_limits();
    settings.push(if cache == ReplayCacheLimits::OFF {
        "replay cache off".to_owned()
    } else {
        format!(
            "replay cache {} records, {}",
            cache.max_entries, store.replay_cache_bytes
        )
    });
    let _ = writeln!(
        out,
        "store     {} ({location})",
        store.backend.kind().as_str()
    );
    let _ = writeln!(out, "          {}", settings.join(", "));
}

fn describe_reaper(settings: &mut Vec<String>, reaper: &ReaperConfig) {
    match reaper.interval {
        Some(interval) if interval.is_zero() => settings.push("reaper off".to_owned()),
        Some(interval) => settings.push(format!(
            "reaper every {}",
            humantime::format_duration(interval)
        )),
        None => {}
    }
    if let Some(batch) = reaper.batch {
        settings.push(format!("reaper_batch {batch}"));
    }
}

fn describe_policy(out: &mut String, policy: &Policy) {
    if !policy.enabled {
        let _ = writeln!(out, "  disabled: requests pass through untouched");
        return;
    }
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let duration = |d| humantime::format_duration(d).to_string();
    let rows = [
        (
            "methods",
            list(policy.methods.iter().map(ToString::to_string).collect()),
        ),
        (
            "key header",
            format!(
                "{} ({})",
                policy.header,
                if policy.required {
                    "required"
                } else {
                    "optional"
                }
            ),
        ),
        ("ttl", duration(policy.ttl)),
        ("lock_ttl", duration(policy.lock_ttl)),
        (
            "on_conflict",
            match policy.on_conflict {
                OnConflict::Wait => format!("wait up to {}", duration(policy.wait_timeout)),
                _ => "reject (409)".to_owned(),
            },
        ),
        (
            "on_store_error",
            match policy.on_store_error {
                OnStoreError::Forward => "forward (run unprotected)".to_owned(),
                _ => "reject (503)".to_owned(),
            },
        ),
        (
            "scope_headers",
            list(
                policy
                    .scope_headers
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
        ),
        ("scope_cookies", list(policy.scope_cookies.clone())),
        (
            "anonymous",
            match policy.anonymous {
                Anonymous::Reject => "reject (403)".to_owned(),
                _ => "share one scope".to_owned(),
            },
        ),
        (
            "fingerprint_headers",
            list(
                policy
                    .fingerprint_headers
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
        ),
        (
            "max_request_body",
            bytesize::ByteSize(policy.max_request_body as u64).to_string(),
        ),
        (
            "max_response_body",
            bytesize::ByteSize(policy.max_response_body as u64).to_string(),
        ),
        ("retry_after", duration(policy.retry_after)),
        ("body_read_timeout", duration(policy.body_read_timeout)),
        (
            "never_store",
            format!(
                "{} and every 5xx",
                list(
                    policy
                        .never_store
                        .iter()
                        .map(|status| status.as_str().to_owned())
                        .collect()
                )
            ),
        ),
        (
            "max_in_flight",
            match policy.max_in_flight_per_caller {
                0 => "unlimited".to_owned(),
                limit => format!("{limit} per caller"),
            },
        ),
        (
            "mode",
            match policy.mode {
                Mode::Observe => "observe (runs everything, counts what enforcing would do)",
                _ => "enforce",
            }
            .to_owned(),
        ),
        (
            "fingerprint",
            match &policy.fingerprint {
                BodyFingerprint::Json(ignore) if ignore.is_empty() => "json".to_owned(),
                BodyFingerprint::Json(ignore) => format!(
                    "json, ignoring {}",
                    list(ignore.iter().map(ToString::to_string).collect())
                ),
                _ => "bytes".to_owned(),
            },
        ),
        (
            "problem_type_base",
            policy
                .problem_type_base
                .clone()
                .unwrap_or_else(|| format!("{} (default)", tower_idempotency::problem::TYPE_BASE)),
        ),
        (
            "docs_url",
            policy.docs_url.clone().unwrap_or_else(|| "none".to_owned()),
        ),
        (
            "replay_drop_headers",
            list(
                policy
                    .replay_drop_headers
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
        ),
        ("expiry_header", policy.expiry_header.to_string()),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "  {name:<20} {value}");
    }
}

/// What `check` warns about: covered routes whose callers are told apart only by the built-in
/// default scope (`Authorization`), where callers authenticated by a session cookie would share
/// one scope and could be replayed each other's responses; and leases renewed more often than a
/// store call may take.
pub fn warnings(config: &Config) -> Vec<String> {
    let place = |route: Option<usize>| match route {
        Some(index) => format!("route {}", config.routes[index].path.0),
        None => "every other path".to_owned(),
    };
    let mut warnings: Vec<String> = config
        .default_scoped()
        .into_iter()
        .map(|route| {
            format!(
                "{}: callers are told apart only by the default scope_headers = \
                 [\"authorization\"]; callers authenticated otherwise (a session cookie...) share \
                 one scope and can be replayed each other's responses. Set scope_headers or \
                 scope_cookies explicitly",
                place(route)
            )
        })
        .collect();
    warnings.extend(slow_renewals(config).into_iter().map(|(route, lock_ttl)| {
        format!(
            "{}: the lease is renewed every lock_ttl / 3 = {} and each renewal may take up to \
             [store] timeout = {}: a store that slow lets the lease lapse while the request \
             runs (its result is then refused and a retry runs it again). Keep the store \
             timeout under lock_ttl / 3",
            place(route),
            humantime::format_duration(lock_ttl / 3),
            humantime::format_duration(config.store.timeout),
        )
    }));
    warnings
}

/// Enabled routes (`None`: the default policy) whose renewal period, `lock_ttl / 3`, is not
/// longer than the store timeout. Not refused: the lease stays fenced, only a retry may run
/// again; a short lease with a patient store can be a deliberate choice.
fn slow_renewals(config: &Config) -> Vec<(Option<usize>, std::time::Duration)> {
    let Ok(routes) = config.routes() else {
        return Vec::new();
    };
    let policies = routes
        .iter()
        .enumerate()
        .map(|(index, (_, policy))| (Some(index), policy))
        .chain([(None, routes.default_policy())]);
    policies
        .filter(|(_, policy)| policy.enabled && policy.lock_ttl / 3 <= config.store.timeout)
        .map(|(route, policy)| (route, policy.lock_ttl))
        .collect()
}

/// Hides the password of a `scheme://user:password@host` URL.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_where_a_renewal_may_take_longer_than_its_period() {
        let config = Config::parse(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\n\
             [store]\ntimeout = \"2s\"\n\n\
             [idempotency]\nlock_ttl = \"3s\"\nscope_headers = [\"authorization\"]\n\n\
             [[route]]\npath = \"/long/**\"\nlock_ttl = \"60s\"\n\n\
             [[route]]\npath = \"/off/**\"\nenabled = false\n",
            |_| None,
        )
        .expect("config");
        let warnings = warnings(&config);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0]
                .starts_with("every other path: the lease is renewed every lock_ttl / 3 = 1s")
                && warnings[0].contains("[store] timeout = 2s"),
            "{warnings:?}"
        );
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact("redis://:pw@cache"), "redis://:***@cache");
        assert_eq!(redact("sqlite://idempotency.db"), "sqlite://idempotency.db");
    }

    #[test]
    fn describes_the_store_with_the_settings_in_effect() {
        let describe_store = |section: &str| {
            let text = format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\n\
                 [store]\n{section}\n"
            );
            let config = Config::parse(&text, |_| None).expect("config");
            let out = describe(&config).expect("describe");
            let at = out.find("store ").expect("store line");
            out[at..].lines().take(2).collect::<Vec<_>>().join("\n")
        };
        assert_eq!(
            describe_store(
                "backend = \"postgres\"\nurl = \"postgres://app:pw@db/x\"\ntable = \"t\"\n\
                 reaper_interval = \"0s\"\nauto_migrate = false\n\
                 replay_cache_bytes = \"1MiB\"\nreplay_cache_entries = 10"
            ),
            "store     postgres (postgres://app:***@db/x)\n          table t, reaper off, \
             auto_migrate off, timeout 5s, poll_interval 1s, replay cache 10 records, 1.0 MiB"
        );
        assert_eq!(
            describe_store(
                "backend = \"redis-cluster\"\nurls = [\"redis://a\", \"redis://b\"]\nprefix = \"p\""
            ),
            "store     redis-cluster (redis://a, redis://b)\n          prefix p, timeout 5s, \
             poll_interval 1s, replay cache 10000 records, 16.0 MiB"
        );
        assert!(
            describe_store("").starts_with("store     memory (in process)\n"),
            "memory by default"
        );
    }
}
