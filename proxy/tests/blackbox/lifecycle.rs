//! Signals: SIGTERM waits for work whose client left; SIGHUP reloads the configuration file.

use std::time::Duration;

use reqwest::StatusCode;

use crate::support::{Proxy, Reply, Upstream, config, eventually};

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

/// Rewrites the running proxy's configuration file and sends SIGHUP.
fn reload_with(proxy: &Proxy, text: &str) {
    std::fs::write(proxy.dir.path().join("proxy.toml"), text).expect("rewrite the config");
    proxy.signal("HUP");
}

async fn reloads(proxy: &Proxy, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "idempotency_config_reloads_total{{result=\"{result}\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_waits_for_work_whose_client_left_and_stores_it() {
    let records = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::start().await;
    let text = config(
        &upstream.url,
        &format!(
            "[store]\nbackend = \"sqlite\"\nurl = \"sqlite://{}\"\n",
            records.path().join("idempotency.db").display()
        ),
    );
    let mut proxy = Proxy::start(&text);
    let request = proxy
        .post("/payments?ms=2000", "left-before-sigterm")
        .body("x")
        .send();
    let client = tokio::spawn(request);
    upstream.wait_until_reached("left-before-sigterm").await;
    // The client leaves (its connection closes), and the proxy has time to notice, so the work
    // moves to a task of its own that no connection waits for.
    client.abort();
    let _ = client.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", proxy.stderr());
    assert_eq!(
        upstream.runs_of("left-before-sigterm"),
        1,
        "the proxy waited for the upstream to finish; stderr:\n{}",
        proxy.stderr()
    );

    let restarted = Proxy::start(&text);
    let retry = restarted
        .send(
            restarted
                .post("/payments?ms=2000", "left-before-sigterm")
                .body("x"),
        )
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(
        retry.replayed(),
        "the result was stored before exit: {retry:?}"
    );
    assert_eq!(upstream.started_of("left-before-sigterm"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_keeps_a_request_in_flight_and_the_proxy_running() {
    let upstream = Upstream::start().await;
    let text = config(&upstream.url, MEMORY);
    let mut proxy = Proxy::start(&text);
    let request = proxy.post("/payments?ms=1000", "hup").body("x").send();
    let in_flight =
        tokio::spawn(async move { Reply::read(request.await.expect("in-flight request")).await });
    upstream.wait_until_reached("hup").await;
    reload_with(&proxy, &text);
    let reply = in_flight.await.expect("task");
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    eventually(
        Duration::from_secs(5),
        "the reload to be counted",
        async || reloads(&proxy, "ok").await == 1.0,
    )
    .await;
    let retry = proxy
        .send(proxy.post("/payments?ms=1000", "hup").body("x"))
        .await;
    assert!(retry.replayed(), "the records survive a reload: {retry:?}");
    assert_eq!(upstream.runs(), 1);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_route_now_required_and_reports_what_needs_a_restart() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, MEMORY));
    let unkeyed = || {
        proxy
            .client
            .post(format!("{}/payments", proxy.base))
            .body("x")
    };
    assert_eq!(proxy.send(unkeyed()).await.status, StatusCode::CREATED);

    reload_with(
        &proxy,
        &crate::support::config_with_proxy(
            &upstream.url,
            "upstream_timeout = \"7s\"",
            &format!("{MEMORY}\n[[route]]\npath = \"/payments\"\nrequired = true\n"),
        ),
    );
    eventually(
        Duration::from_secs(5),
        "the reload to be counted",
        async || reloads(&proxy, "ok").await == 1.0,
    )
    .await;
    let refused = proxy.send(unkeyed()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
    assert_eq!(refused.problem(), "missing-key");
    assert_eq!(upstream.runs(), 1);
    let stderr = proxy.stderr();
    assert!(
        stderr.contains("proxy.upstream_timeout") && stderr.contains("restart"),
        "a change only a restart applies is reported: {stderr}"
    );
    assert_eq!(reloads(&proxy, "failed").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_with_an_invalid_file_keeps_the_running_config_and_names_key_and_line() {
    let upstream = Upstream::start().await;
    let text = config(
        &upstream.url,
        &format!("{MEMORY}\n[[route]]\npath = \"/payments\"\nrequired = true\n"),
    );
    let proxy = Proxy::start(&text);
    let broken = format!("{text}\n[idempotency]\nttl = \"forever\"\n");
    let line = broken
        .lines()
        .position(|line| line.starts_with("ttl = "))
        .expect("ttl line")
        + 1;
    reload_with(&proxy, &broken);
    eventually(
        Duration::from_secs(5),
        "the failed reload to be counted",
        async || reloads(&proxy, "failed").await == 1.0,
    )
    .await;
    let stderr = proxy.stderr();
    for fragment in [format!("line {line}"), "key `idempotency.ttl`".to_owned()] {
        assert!(
            stderr.contains(&fragment),
            "{fragment:?} missing from: {stderr}"
        );
    }
    let refused = proxy
        .send(
            proxy
                .client
                .post(format!("{}/payments", proxy.base))
                .body("x"),
        )
        .await;
    assert_eq!(refused.problem(), "missing-key", "the running routes stay");
    let keyed = proxy
        .send(proxy.post("/payments", "still-up").body("x"))
        .await;
    assert_eq!(keyed.status, StatusCode::CREATED);
    assert_eq!(reloads(&proxy, "ok").await, 0.0);
}
