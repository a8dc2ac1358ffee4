//! The proxy's pool of upstream connections.

use std::time::Duration;

use reqwest::StatusCode;

use crate::support::raw::{RawUpstream, Step, write};
use crate::support::{Proxy, config};

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

/// An upstream that answers with keep-alive, then closes the connection anyway (as servers do
/// when their keep-alive timeout passes): the pooled connection is dead, and the next request,
/// which certainly was not sent on it, goes on a new one instead of failing.
#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_the_upstream_closed_is_not_reused() {
    let upstream = RawUpstream::start(|_| {
        vec![
            write("HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"),
            Step::Pause(Duration::from_millis(50)),
            Step::Close,
        ]
    })
    .await;
    let proxy = Proxy::start(&config(&upstream.url, MEMORY));
    for n in 0..4 {
        let key = format!("closed-{n}");
        let reply = proxy.send(proxy.post("/payments", &key).body("x")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "request {n}: {reply:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let unkeyed = proxy
            .send(reqwest::Client::new().get(format!("{}/status", proxy.base)))
            .await;
        assert_eq!(
            unkeyed.status,
            StatusCode::CREATED,
            "request {n}: {unkeyed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(upstream.requests(), 8, "each request ran exactly once");
}
