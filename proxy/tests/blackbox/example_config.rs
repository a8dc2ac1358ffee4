//! The shipped example configuration (`examples/proxy.toml`, what the README runs) parses, and
//! `idempotency-proxy check` describes it. Kept out of the proxy's unit tests because the file is
//! outside the published package.

use std::time::Duration;

use idempotency_proxy::config::{Config, ReaperConfig, SqliteConfig, StoreBackend};
use idempotency_proxy::report::describe;

const EXAMPLE: &str = include_str!("../../../examples/proxy.toml");

fn parse(text: &str) -> Config {
    Config::parse(text, |_| None).expect("example config")
}

#[test]
fn the_design_example_parses_with_its_routes() {
    let config = parse(EXAMPLE);
    let routes = config.routes().expect("routes");
    assert!(routes.policy_for("/payments/1").required);
    assert_eq!(
        routes.policy_for("/payments/1").ttl,
        Duration::from_secs(48 * 3600)
    );
    assert!(!routes.policy_for("/feed/x").enabled);
    assert_eq!(
        config.store.backend,
        StoreBackend::Sqlite(SqliteConfig {
            url: "sqlite://idempotency.db".to_owned(),
            reaper: ReaperConfig::default(),
        })
    );
}

#[test]
fn describes_every_route_in_match_order() {
    let config = parse(EXAMPLE);
    let text = describe(&config).expect("describe");
    let payments = text.find("route /payments/**").expect("payments route");
    let feed = text.find("route /feed/**").expect("feed route");
    assert!(payments < feed);
    assert!(text.contains("disabled"));
    assert!(text.contains("2days"), "{text}");
    assert!(
        text.contains("never_store          408, 425, 429 and every 5xx"),
        "{text}"
    );
    for line in [
        "mode                 enforce",
        "fingerprint          json, ignoring /meta/sent_at",
        "docs_url             https://docs.example.com/payments/retries",
        "replay_drop_headers  set-cookie",
        "expiry_header        true",
        "problem_type_base    https://docs.rs/",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}
