//! Parsing and validation, each error named by key and line.

use std::time::Duration;

use http::{Method, StatusCode};
use tower_idempotency::fingerprint::BodyFingerprint;
use tower_idempotency::{Anonymous, Mode, Policy, ReplayCacheLimits};

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
fn a_minimal_file_uses_the_defaults() {
    let config = parse(MINIMAL).expect("minimal config");
    assert_eq!(config.store.backend, StoreBackend::Memory);
    assert!(config.admin.is_none());
    assert_eq!(
        config.routes().expect("routes").default_policy(),
        &Policy::default()
    );
}

#[test]
fn the_replay_cache_is_on_by_default_and_either_bound_at_zero_turns_it_off() {
    let limits = |store: &str| {
        parse(&format!("{MINIMAL}\n[store]\n{store}\n"))
            .expect("valid")
            .store
            .replay_cache_limits()
    };
    assert_eq!(limits(""), ReplayCacheLimits::DEFAULT);
    assert_eq!(
        limits("replay_cache_bytes = \"64MiB\"\nreplay_cache_entries = 1000"),
        ReplayCacheLimits {
            max_entries: 1000,
            max_bytes: 64 << 20
        }
    );
    assert_eq!(
        limits("replay_cache_entries = 1000").max_bytes,
        ReplayCacheLimits::DEFAULT.max_bytes
    );
    assert_eq!(limits("replay_cache_entries = 0"), ReplayCacheLimits::OFF);
    assert_eq!(limits("replay_cache_bytes = 0"), ReplayCacheLimits::OFF);
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
    assert_eq!(store_url(&config), "postgres://app:s3cret@db/app");

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
    assert_eq!(store_url(&config), "redis://env");
}

fn store_url(config: &Config) -> &str {
    match &config.store.backend {
        StoreBackend::Sqlite(SqliteConfig { url, .. })
        | StoreBackend::Postgres(PostgresConfig { url, .. })
        | StoreBackend::Redis(RedisConfig { url, .. }) => url,
        other => panic!("{other:?} has no url"),
    }
}

#[test]
fn each_backend_parses_with_its_own_keys() {
    let reaper = "reaper_interval = \"1m\"\nreaper_batch = 50\n";
    let reaper_config = ReaperConfig {
        interval: Some(Duration::from_secs(60)),
        batch: Some(50),
    };
    for (section, expected) in [
        ("backend = \"memory\"\n".to_owned(), StoreBackend::Memory),
        (
            format!("backend = \"sqlite\"\nurl = \"sqlite://x.db\"\n{reaper}"),
            StoreBackend::Sqlite(SqliteConfig {
                url: "sqlite://x.db".to_owned(),
                reaper: reaper_config.clone(),
            }),
        ),
        (
            format!(
                "backend = \"postgres\"\nurl = \"postgres://db/app\"\nschema = \"s\"\n\
                 table = \"t\"\nmax_connections = 3\nauto_migrate = false\n{reaper}"
            ),
            StoreBackend::Postgres(PostgresConfig {
                url: "postgres://db/app".to_owned(),
                schema: Some("s".to_owned()),
                table: Some("t".to_owned()),
                max_connections: Some(3),
                reaper: reaper_config.clone(),
                auto_migrate: false,
            }),
        ),
        (
            "backend = \"redis\"\nurl = \"rediss://cache\"\nprefix = \"p\"\n".to_owned(),
            StoreBackend::Redis(RedisConfig {
                url: "rediss://cache".to_owned(),
                prefix: Some("p".to_owned()),
            }),
        ),
        (
            "backend = \"redis-cluster\"\nurls = [\"redis://a\", \"redis://b\"]\n\
             prefix = \"p\"\n"
                .to_owned(),
            StoreBackend::RedisCluster(RedisClusterConfig {
                urls: vec!["redis://a".to_owned(), "redis://b".to_owned()],
                prefix: Some("p".to_owned()),
            }),
        ),
    ] {
        let text = format!("{MINIMAL}\n[store]\n{section}timeout = \"2s\"\n");
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.store.backend, expected);
        assert_eq!(
            config.store.timeout,
            Duration::from_secs(2),
            "shared keys too"
        );
    }
    let postgres = parse(&format!(
        "{MINIMAL}\n[store]\nbackend = \"postgres\"\nurl = \"postgres://db\"\n"
    ))
    .expect("config");
    assert!(
        matches!(&postgres.store.backend, StoreBackend::Postgres(p) if p.auto_migrate),
        "auto_migrate defaults to true"
    );
}

#[test]
fn a_key_of_another_backend_is_named_with_its_line() {
    for (section, expected_key, line, message_has) in [
        (
            "backend = \"postgres\"\nurl = \"postgres://db\"\nprefix = \"p\"",
            "store.prefix",
            9,
            "only applies to the redis and redis-cluster backends, not postgres",
        ),
        (
            "backend = \"redis\"\nurl = \"redis://x\"\nschema = \"s\"",
            "store.schema",
            9,
            "only applies to the postgres backend, not redis",
        ),
        (
            "backend = \"redis-cluster\"\nurl = \"redis://x\"",
            "store.url",
            8,
            "only applies to the sqlite, postgres and redis backends, not redis-cluster",
        ),
        (
            "backend = \"redis\"\nurls = [\"redis://x\"]",
            "store.urls",
            8,
            "only applies to the redis-cluster backend, not redis",
        ),
        (
            "reaper_batch = 10",
            "store.reaper_batch",
            7,
            "only applies to the sqlite and postgres backends, not memory",
        ),
        (
            "backend = \"sqlite\"\nurl = \"sqlite://x\"\nauto_migrate = false",
            "store.auto_migrate",
            9,
            "not sqlite",
        ),
        // The key's own line, wherever `backend` is.
        (
            "max_connections = 4\nurl = \"sqlite://x\"\nbackend = \"sqlite\"",
            "store.max_connections",
            7,
            "only applies to the postgres backend, not sqlite",
        ),
    ] {
        let (key, got_line, message) = error(&format!("{MINIMAL}\n[store]\n{section}\n"));
        assert_eq!(key.as_deref(), Some(expected_key), "{message}");
        assert_eq!(got_line, Some(line), "{message}");
        assert!(message.contains(message_has), "{message}");
    }
}

#[test]
fn an_unknown_backend_names_the_allowed_ones() {
    let (key, line, message) = error(&format!("{MINIMAL}\n[store]\nbackend = \"mysql\"\n"));
    assert_eq!(key.as_deref(), Some("store.backend"), "{message}");
    assert_eq!(line, Some(7), "{message}");
    for name in [
        "mysql",
        "memory",
        "sqlite",
        "postgres",
        "redis",
        "redis-cluster",
    ] {
        assert!(
            message.contains(&format!("`{name}`")),
            "{name} in {message}"
        );
    }
}

#[test]
fn the_store_url_variable_needs_a_backend_with_a_url() {
    let env = |name: &str| (name == STORE_URL_ENV).then(|| "postgres://env".to_owned());
    let config = Config::parse(
        &format!("{MINIMAL}\n[store]\nbackend = \"postgres\"\n"),
        env,
    )
    .expect("the url from the environment alone");
    assert_eq!(store_url(&config), "postgres://env");
    let error = Config::parse(&format!("{MINIMAL}\n[store]\nbackend = \"memory\"\n"), env)
        .expect_err("memory takes no url");
    assert_eq!(
        error.key().map(ToString::to_string).as_deref(),
        Some("store.url")
    );
    assert!(error.to_string().contains(STORE_URL_ENV), "{error}");
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
        proptest::collection::vec((section, proptest::collection::vec(line, 0..4)), 0..6).prop_map(
            |sections| {
                sections
                    .into_iter()
                    .map(|(header, lines)| format!("{header}\n{}\n", lines.join("\n")))
                    .collect()
            },
        )
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
