//! Header names the layer uses and hop-by-hop header handling.

use http::{HeaderMap, HeaderName, header};

/// The default key header, `Idempotency-Key`.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Set to `true` on a response that was replayed from the store rather than produced now.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// On a keyed response that was stored (the first one and every replay), how many more whole
/// seconds the record is kept: a retry within that time replays, a later one may run again.
/// Delta seconds, like `Retry-After`, so a client's clock does not matter; it counts down on
/// replays. The name is the one proposed in the IETF httpapi draft's discussion
/// (ietf-wg-httpapi/idempotency#49, following #35). Turned off by [`Policy::expiry_header`](crate::Policy::expiry_header).
pub static IDEMPOTENCY_TTL: HeaderName = HeaderName::from_static("idempotency-ttl");

/// The value of [`IDEMPOTENCY_TTL`] for a record kept `left` more: whole seconds, rounded down,
/// so the client is never told a time the record does not reach.
pub(crate) fn ttl_value(left: std::time::Duration) -> http::HeaderValue {
    http::HeaderValue::from(left.as_secs())
}

/// Headers that describe one connection rather than the message (RFC 9110 section 7.6.1), plus the
/// obsolete `Proxy-Connection`. A proxy must not forward them, and a stored response must not
/// replay them onto another connection.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Authorization`, `Proxy-Authenticate` and
/// `Proxy-Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than nine map lookups.
    let carries_any = headers
        .keys()
        .any(|name| *name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !carries_any {
        return;
    }
    // Headers listed by `Connection` go first, while we can still read it.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn leaves_end_to_end_headers_alone() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("x-connection", HeaderValue::from_static("keep"));
        let before = headers.clone();
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn removes_hop_by_hop_headers_and_those_connection_names() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Session-Trace"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("x-session-trace", "1"),
            ("x-other", "1"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "application/json"),
            ("authorization", "Bearer t"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type", "authorization"]);
    }
}
