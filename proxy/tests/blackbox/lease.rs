//! `forward_lease`: the proxy hands the upstream its lease (token and attempt) so the upstream can
//! fence its own writes, and never lets a client forge either header.

use std::time::Duration;

use reqwest::StatusCode;

use crate::support::{Proxy, Upstream, config, eventually};

const FORGED_TOKEN: &str = "18446744073709551615";

/// Forged lease headers are removed on every route and every kind of request; a `forward_lease`
/// route replaces them with the proxy's own lease.
#[tokio::test(flavor = "multi_thread")]
async fn forged_lease_headers_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let forged = |request: reqwest::RequestBuilder| {
        request
            .header("idempotency-lease-token", FORGED_TOKEN)
            .header("idempotency-attempt", "7")
    };
    let lease_headers = || {
        let headers = upstream.last_headers();
        (
            headers
                .get("idempotency-lease-token")
                .map(|v| v.to_str().unwrap().to_owned()),
            headers
                .get("idempotency-attempt")
                .map(|v| v.to_str().unwrap().to_owned()),
        )
    };

    // Not forwarded (the default): a keyed request, a request without a key, a GET.
    let plain = Proxy::start(&config(&upstream.url, ""));
    for request in [
        plain.post("/headers", "plain-keyed"),
        plain.client.post(format!("{}/headers", plain.base)),
        plain.client.get(format!("{}/headers", plain.base)),
    ] {
        assert_eq!(plain.send(forged(request)).await.status, StatusCode::OK);
        assert_eq!(
            lease_headers(),
            (None, None),
            "forged headers were stripped"
        );
    }

    // Forwarded: the keyed request carries the proxy's lease, the others none.
    let forwarding = Proxy::start(&config(
        &upstream.url,
        "[[route]]\npath = \"/headers\"\nforward_lease = true\n",
    ));
    let reply = forwarding
        .send(forged(forwarding.post("/headers", "forwarded")))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let (token, attempt) = lease_headers();
    let token: u64 = token.expect("the lease token").parse().expect("a number");
    assert_ne!(token.to_string(), FORGED_TOKEN);
    assert_eq!(attempt.as_deref(), Some("1"), "the first run");
    for request in [
        forwarding
            .client
            .post(format!("{}/headers", forwarding.base)),
        forwarding
            .client
            .get(format!("{}/headers", forwarding.base)),
    ] {
        assert_eq!(
            forwarding.send(forged(request)).await.status,
            StatusCode::OK
        );
        assert_eq!(lease_headers(), (None, None), "no lease, no lease headers");
    }
}

/// A proxy killed with SIGKILL while the upstream runs: the takeover after `lock_ttl` reaches the
/// upstream with a larger token and attempt 2, so the upstream can refuse the dead holder's
/// writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_after_kill_9_forwards_a_larger_token_and_attempt_2() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let text = config(
        &upstream.url,
        &format!(
            "[store]\nbackend = \"sqlite\"\nurl = \"sqlite://{}\"\n\n\
             [idempotency]\nlock_ttl = \"1s\"\nforward_lease = true\n",
            dir.path().join("idempotency.db").display()
        ),
    );
    let mut doomed = Proxy::start(&text);
    let slow = doomed
        .post("/payments", "orphan")
        .header("x-delay-ms", "10000")
        .body("x")
        .send();
    let abandoned = tokio::spawn(slow);
    upstream.wait_until_reached("orphan").await;
    doomed.kill();
    let _ = abandoned.await;

    let survivor = Proxy::start(&text);
    eventually(
        Duration::from_secs(10),
        "a takeover after lock_ttl",
        async || {
            let retry = survivor
                .post("/payments", "orphan")
                .header("x-delay-ms", "0")
                .body("x");
            survivor.send(retry).await.status == StatusCode::CREATED
        },
    )
    .await;
    let leases = upstream.leases_of("orphan");
    assert_eq!(
        leases.len(),
        2,
        "the first run and the takeover: {leases:?}"
    );
    let ((Some(first), Some(1)), (Some(second), Some(2))) = (leases[0], leases[1]) else {
        panic!("expected attempts 1 then 2 with tokens, got {leases:?}");
    };
    assert!(second > first, "takeover token {second} after {first}");
}
