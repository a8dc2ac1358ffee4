//! What operators ask for (issue 15): observe mode, JSON fingerprints, problem docs, headers kept
//! out of replays. The real proxy binary in front of a real counting upstream (memory store).

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;

use crate::support::{Proxy, Upstream, config, free_port};

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

async fn start(rest: &str) -> (Upstream, Proxy) {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, &format!("{MEMORY}\n{rest}")));
    (upstream, proxy)
}

fn problem_type(reply: &crate::support::Reply) -> String {
    let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("problem json");
    json["type"].as_str().expect("type").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_fingerprint_replays_reserialised_json_and_ignores_listed_members() {
    let (upstream, proxy) = start(
        "[[route]]\npath = \"/payments\"\nfingerprint = \"json\"\n\
         fingerprint_ignore = [\"/meta/sent_at\"]\n",
    )
    .await;
    let first = proxy
        .send(
            proxy
                .post("/payments", "j")
                .body(r#"{"amount":10,"currency":"EUR","meta":{"sent_at":1,"id":"a"}}"#),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Keys reordered, whitespace added, the ignored timestamp changed: the same request.
    let retry = proxy
        .send(proxy.post("/payments", "j").body(
            "{ \"meta\": {\"id\": \"a\", \"sent_at\": 2},\n  \"currency\": \"EUR\", \"amount\": 10 }",
        ))
        .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    // Another amount is another request.
    let changed = proxy
        .send(
            proxy
                .post("/payments", "j")
                .body(r#"{"amount":11,"currency":"EUR","meta":{"sent_at":1,"id":"a"}}"#),
        )
        .await;
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(changed.problem(), "key-reused");
    assert_eq!(upstream.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bytes_fingerprint_still_tells_reordered_json_apart() {
    let (_upstream, proxy) = start("").await;
    let first = proxy
        .send(proxy.post("/payments", "b").body(r#"{"a":1,"b":2}"#))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let reordered = proxy
        .send(proxy.post("/payments", "b").body(r#"{"b":2,"a":1}"#))
        .await;
    assert_eq!(reordered.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread")]
async fn problems_point_at_the_routes_docs_and_the_default_docs_elsewhere() {
    let (_upstream, proxy) = start(
        "[idempotency]\nrequired = true\ndocs_url = \"https://docs.example.com/default\"\n\n\
         [[route]]\npath = \"/payments\"\nproblem_type_base = \"https://errors.example.com/idem\"\n\
         docs_url = \"https://docs.example.com/payments\"\n",
    )
    .await;
    let first = proxy.send(proxy.post("/payments", "p").body("1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(first.headers.get("link").is_none(), "only errors link docs");
    let reused = proxy.send(proxy.post("/payments", "p").body("2")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem_type(&reused),
        "https://errors.example.com/idem#key-reused"
    );
    assert_eq!(
        reused.headers["link"],
        "<https://docs.example.com/payments>; rel=\"describedby\""
    );
    // Another path: the default policy's docs and the built-in type base.
    let missing = proxy
        .send(
            proxy
                .client
                .post(format!("{}/payments/1", proxy.base))
                .body("1"),
        )
        .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        problem_type(&missing),
        tower_idempotency::problem::ProblemKind::MissingKey.type_uri()
    );
    assert_eq!(
        missing.headers["link"],
        "<https://docs.example.com/default>; rel=\"describedby\""
    );
    // An ambiguous path has no route: the default policy's docs.
    let ambiguous = proxy.send(proxy.post("/payments%2Fx", "a").body("1")).await;
    assert_eq!(ambiguous.status, StatusCode::BAD_REQUEST);
    assert_eq!(ambiguous.problem(), "invalid-target");
    assert_eq!(
        ambiguous.headers["link"],
        "<https://docs.example.com/default>; rel=\"describedby\""
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxys_upstream_problems_follow_the_routes_docs() {
    // Nothing listens there: every forwarded request is a 502.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let proxy = Proxy::start(&config(
        &nowhere,
        &format!(
            "{MEMORY}\n[[route]]\npath = \"/payments\"\n\
             problem_type_base = \"https://errors.example.com/idem\"\n\
             docs_url = \"https://docs.example.com/payments\"\n"
        ),
    ));
    let keyed = proxy.send(proxy.post("/payments", "u").body("1")).await;
    assert_eq!(keyed.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        problem_type(&keyed),
        "https://errors.example.com/idem#upstream-unavailable"
    );
    assert_eq!(
        keyed.headers["link"],
        "<https://docs.example.com/payments>; rel=\"describedby\""
    );
    // An uncovered method on the same route too.
    let get = proxy
        .send(proxy.client.get(format!("{}/payments", proxy.base)))
        .await;
    assert_eq!(get.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        problem_type(&get),
        "https://errors.example.com/idem#upstream-unavailable"
    );
    // Elsewhere the defaults: no link.
    let other = proxy.send(proxy.post("/other", "u").body("1")).await;
    assert_eq!(other.status, StatusCode::BAD_GATEWAY);
    assert!(other.headers.get("link").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_headers_reach_the_first_response_but_never_a_replay() {
    let (upstream, proxy) = start("[idempotency]\nreplay_drop_headers = [\"x-charge-id\"]\n").await;
    let first = proxy.send(proxy.post("/payments", "d").body("1")).await;
    assert_eq!(first.headers["x-charge-id"], "1");
    let retry = proxy.send(proxy.post("/payments", "d").body("1")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert!(retry.headers.get("x-charge-id").is_none(), "{retry:?}");
    assert_eq!(upstream.runs(), 1);
}

/// The seconds `Idempotency-TTL` gives, if present.
fn kept_for(reply: &crate::support::Reply) -> Option<u64> {
    let value = reply.headers.get("idempotency-ttl")?;
    Some(
        value
            .to_str()
            .expect("ascii")
            .parse()
            .expect("whole seconds"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_responses_tell_the_client_how_long_the_key_is_kept_unless_turned_off() {
    let (upstream, proxy) = start(
        "[idempotency]\nttl = \"1h\"\n\n[[route]]\npath = \"/payments/quiet\"\nexpiry_header = false\n",
    )
    .await;
    let first = proxy.send(proxy.post("/payments", "k").body("1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        kept_for(&first),
        Some(3599),
        "an hour less the time storing took"
    );
    let retry = proxy.send(proxy.post("/payments", "k").body("1")).await;
    assert!(retry.replayed());
    let left = kept_for(&retry).expect("a replay says how long it is kept");
    assert!((3590..=3599).contains(&left), "{left}");

    let quiet = proxy
        .send(proxy.post("/payments/quiet", "q").body("1"))
        .await;
    let quiet_retry = proxy
        .send(proxy.post("/payments/quiet", "q").body("1"))
        .await;
    assert!(quiet_retry.replayed());
    assert_eq!((kept_for(&quiet), kept_for(&quiet_retry)), (None, None));
    assert_eq!(upstream.runs(), 2);
}

async fn outcome_count(proxy: &Proxy, outcome: &str) -> f64 {
    proxy
        .metric(&format!(
            "idempotency_requests_total{{outcome=\"{outcome}\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_mode_runs_everything_counts_what_enforcing_would_do_and_keeps_the_record() {
    let upstream = Upstream::start().await;
    let observing = |mode: &str| {
        config(
            &upstream.url,
            &format!(
                "{MEMORY}\n[[route]]\npath = \"/payments\"\nrequired = true\nmode = \"{mode}\"\n"
            ),
        )
    };
    let proxy = Proxy::start(&observing("observe"));
    let first = proxy.send(proxy.post("/payments", "o").body("1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "charge 1 for anonymous: 1");

    // Would be a replay: runs again, is not a replay, and does not overwrite the record.
    let retry = proxy.send(proxy.post("/payments", "o").body("1")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "charge 2 for anonymous: 1");
    // Would be a 422, a 400 (no key), a 400 (invalid key): each runs.
    let reused = proxy.send(proxy.post("/payments", "o").body("2")).await;
    assert_eq!(reused.status, StatusCode::CREATED);
    let unkeyed = proxy
        .send(
            proxy
                .client
                .post(format!("{}/payments", proxy.base))
                .body("3"),
        )
        .await;
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    let invalid = proxy.send(proxy.post("/payments", "").body("4")).await;
    assert_eq!(invalid.status, StatusCode::CREATED);
    // Would be a 409: the duplicate of a running request runs alongside it.
    let proxy = Arc::new(proxy);
    let slow = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy
                .send(proxy.post("/payments?ms=600", "c").body("x"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let duplicate = proxy
        .send(proxy.post("/payments?ms=600", "c").body("x"))
        .await;
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert_eq!(slow.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(upstream.runs(), 7);

    for (outcome, count) in [
        ("executed", 2.0),
        ("observed_would_replay", 1.0),
        ("observed_would_mismatch", 1.0),
        ("observed_would_missing_key", 1.0),
        ("observed_would_invalid_key", 1.0),
        ("observed_would_conflict", 1.0),
        ("replayed", 0.0),
    ] {
        assert_eq!(outcome_count(&proxy, outcome).await, count, "{outcome}");
    }
    assert!(
        proxy.stderr().contains("observed_would_replay"),
        "logged too"
    );

    // Switched to enforcing, the retry replays the first response: observing kept the record.
    std::fs::write(proxy.dir.path().join("proxy.toml"), observing("enforce")).expect("rewrite");
    proxy.signal("HUP");
    let mut replay = None;
    for _ in 0..100 {
        let reply = proxy.send(proxy.post("/payments", "o").body("1")).await;
        if reply.replayed() {
            replay = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replay = replay.expect("replayed once enforcing");
    assert_eq!(replay.body, first.body);
}
