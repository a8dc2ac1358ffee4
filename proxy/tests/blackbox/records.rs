//! Inspecting and forgetting keys: `idempotency-proxy records` and the admin listener's
//! `/records/{key}`, against a running proxy and the store they share (Redis; SQLite for the
//! forget that must reach the proxy's replay cache from another process).

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use test_fixtures::{eventually, redis_url, require_redis, unique};

use crate::support::{PROXY_BIN, Proxy, Upstream, config};

fn redis_section() -> String {
    require_redis(&redis_url());
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\n",
        redis_url(),
        unique("records")
    )
}

/// Runs `idempotency-proxy records ARGS` with the running proxy's configuration.
fn records_cli(proxy: &Proxy, args: &[&str]) -> (i32, Value, String) {
    let output = Command::new(PROXY_BIN)
        .arg("records")
        .args(args)
        .arg("--config")
        .arg(proxy.dir.path().join("proxy.toml"))
        .env_remove("IDEMPOTENCY_STORE_URL")
        .output()
        .expect("run idempotency-proxy records");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (output.status.code().unwrap_or(-1), json, stderr)
}

fn alice(proxy: &Proxy, key: &str) -> reqwest::RequestBuilder {
    proxy
        .post("/payments", key)
        .header("authorization", "Bearer alice")
        .body("10 EUR")
}

#[tokio::test(flavor = "multi_thread")]
async fn records_cli_shows_and_forgets_a_key_by_the_callers_credentials() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, &redis_section()));
    let first = proxy.send(alice(&proxy, "order-1")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let who = [
        "--header",
        "Authorization: Bearer alice",
        "--path",
        "/payments",
    ];
    let (code, shown, stderr) = records_cli(
        &proxy,
        &[&["show", "--key", "\"order-1\""][..], &who[..]].concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(shown["state"], "completed", "{shown}");
    assert_eq!(shown["status"], 201);
    assert!(shown["stored_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(
        shown["expires_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z')),
        "{shown}"
    );
    assert!(
        shown.get("body").is_none(),
        "never the body without --body: {shown}"
    );

    let (_, with_body, _) = records_cli(
        &proxy,
        &[&["show", "--key", "order-1", "--body"][..], &who[..]].concat(),
    );
    assert_eq!(with_body["body"], first.text());

    let (code, other, _) = records_cli(
        &proxy,
        &[
            "show",
            "--key",
            "order-1",
            "--header",
            "Authorization: Bearer mallory",
        ],
    );
    assert_eq!(
        (code, &other["state"]),
        (0, &Value::from("absent")),
        "another caller's scope"
    );

    let (code, forgot, stderr) = records_cli(
        &proxy,
        &[&["forget", "--key", "order-1"][..], &who[..]].concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(forgot["forgotten"], true, "{forgot}");
    assert_eq!(forgot["found"], "completed");
    let again = proxy.send(alice(&proxy, "order-1")).await;
    assert!(!again.replayed(), "a forgotten key runs again");
    assert_eq!(upstream.runs_of("order-1"), 2);

    let (code, _, stderr) = records_cli(&proxy, &["show", "--key", "a b"]);
    assert_eq!(code, 2, "an invalid key is the caller's error: {stderr}");
    assert!(stderr.contains("invalid idempotency key"), "{stderr}");
}

/// The embedded SQLite store has no notification channel between processes: the CLI's forget
/// reaches the running proxy's replay cache through the store's forget log, which the proxy
/// reads every 100 ms. Before it did, the proxy went on replaying the forgotten record from its
/// cache until the record's `ttl`.
#[tokio::test(flavor = "multi_thread")]
async fn a_cli_forget_reaches_the_replay_cache_of_a_proxy_on_sqlite() {
    let records = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(
        &upstream.url,
        &format!(
            "[store]\nbackend = \"sqlite\"\nurl = \"sqlite://{}\"\n\
             replay_cache_entries = 100\nreplay_cache_bytes = \"1MiB\"\n",
            records.path().join("idempotency.db").display()
        ),
    ));
    proxy.send(alice(&proxy, "cached-1")).await;
    let cached = proxy.send(alice(&proxy, "cached-1")).await;
    assert!(cached.replayed(), "{cached:?}");

    let who = [
        "--header",
        "Authorization: Bearer alice",
        "--path",
        "/payments",
    ];
    let (code, forgot, stderr) = records_cli(
        &proxy,
        &[&["forget", "--key", "cached-1"][..], &who[..]].concat(),
    );
    assert_eq!(
        (code, &forgot["found"]),
        (0, &Value::from("completed")),
        "{stderr}"
    );
    eventually(
        Duration::from_secs(2),
        "the proxy to hear of the forget",
        async || !proxy.send(alice(&proxy, "cached-1")).await.replayed(),
    )
    .await;
    assert_eq!(
        upstream.runs_of("cached-1"),
        2,
        "the forgotten key ran once more, then replays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn records_cli_ends_a_stuck_lease_only_with_force() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, &redis_section()));
    let slow = alice(&proxy, "stuck").header("x-delay-ms", "3000").send();
    let slow = tokio::spawn(slow);
    let who = [
        "--header",
        "Authorization: Bearer alice",
        "--path",
        "/payments",
    ];
    upstream.wait_until_reached("stuck").await;

    let (_, shown, _) = records_cli(
        &proxy,
        &[&["show", "--key", "stuck"][..], &who[..]].concat(),
    );
    assert_eq!(shown["state"], "in-flight", "{shown}");
    assert_eq!(shown["attempt"], 1);
    let token = shown["lease_token"].as_u64().expect("a lease token");

    let (code, kept, _) = records_cli(
        &proxy,
        &[&["forget", "--key", "stuck"][..], &who[..]].concat(),
    );
    assert_eq!(
        (code, &kept["forgotten"]),
        (0, &Value::from(false)),
        "{kept}"
    );
    let (code, ended, _) = records_cli(
        &proxy,
        &[&["forget", "--key", "stuck", "--force"][..], &who[..]].concat(),
    );
    assert_eq!(code, 0);
    assert_eq!(ended["lease_ended"]["lease_token"], token, "{ended}");
    let _ = slow.await;
    // The ended lease's holder could not store its response: the key is free.
    let (_, after, _) = records_cli(
        &proxy,
        &[&["show", "--key", "stuck"][..], &who[..]].concat(),
    );
    assert_eq!(after["state"], "absent", "{after}");
}

async fn admin(
    proxy: &Proxy,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> crate::support::Reply {
    let mut request = proxy.client.request(
        method,
        format!("{}{path}", proxy.admin.as_ref().expect("admin")),
    );
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    crate::support::Reply::read(request.send().await.expect("admin request")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_records_require_the_token_and_take_the_callers_scope_headers() {
    let upstream = Upstream::start().await;
    // Lines before `[store]` belong to the `[admin]` section the fixture writes.
    let rest = format!("token = \"from-file\"\n{}", redis_section());
    let proxy = Proxy::start_with_env(
        &config(&upstream.url, &rest),
        &[("IDEMPOTENCY_ADMIN_TOKEN", "s3cret")],
    );
    proxy.send(alice(&proxy, "order-9")).await;
    let path = "/records/order-9?path=/payments";
    let scope = ("x-idempotency-scope-authorization", "Bearer alice");

    let refused = admin(&proxy, reqwest::Method::GET, path, &[scope]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(
        refused.headers["content-type"]
            .to_str()
            .unwrap()
            .contains("problem+json")
    );
    let wrong = admin(
        &proxy,
        reqwest::Method::GET,
        path,
        &[("authorization", "Bearer from-file"), scope],
    )
    .await;
    assert_eq!(
        wrong.status,
        StatusCode::UNAUTHORIZED,
        "the environment replaces the file's token"
    );

    let token = ("authorization", "Bearer s3cret");
    let shown = admin(&proxy, reqwest::Method::GET, path, &[token, scope]).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.text());
    let json: Value = serde_json::from_slice(&shown.body).expect("json");
    assert_eq!(
        (json["state"].as_str(), json["status"].as_u64()),
        (Some("completed"), Some(201))
    );
    assert!(json.get("body").is_none());

    let unscoped = admin(&proxy, reqwest::Method::GET, path, &[token]).await;
    assert_eq!(
        unscoped.status,
        StatusCode::NOT_FOUND,
        "the token is not the caller's scope"
    );

    let forgot = admin(&proxy, reqwest::Method::DELETE, path, &[token, scope]).await;
    assert_eq!(forgot.status, StatusCode::OK, "{}", forgot.text());
    let gone = admin(&proxy, reqwest::Method::GET, path, &[token, scope]).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert!(
        !proxy.send(alice(&proxy, "order-9")).await.replayed(),
        "runs again"
    );

    let bad = admin(&proxy, reqwest::Method::GET, "/records/a%20b", &[token]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.problem(), "invalid-key");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_records_without_a_token_answer_loopback_with_the_callers_own_headers() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, &redis_section()));
    let slow = tokio::spawn(alice(&proxy, "stuck-9").header("x-delay-ms", "3000").send());
    upstream.wait_until_reached("stuck-9").await;
    let path = "/records/stuck-9?path=/payments";
    let scope = ("authorization", "Bearer alice");
    let in_flight = admin(&proxy, reqwest::Method::DELETE, path, &[scope]).await;
    assert_eq!(
        in_flight.status,
        StatusCode::CONFLICT,
        "{}",
        in_flight.text()
    );
    let forced = admin(
        &proxy,
        reqwest::Method::DELETE,
        &format!("{path}&force=true"),
        &[scope],
    )
    .await;
    assert_eq!(forced.status, StatusCode::OK, "{}", forced.text());
    let json: Value = serde_json::from_slice(&forced.body).expect("json");
    assert_eq!(json["found"], "in-flight");
    let _ = slow.await;
}
