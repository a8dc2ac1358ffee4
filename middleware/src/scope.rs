//! Caller scopes and record keys.
//!
//! An idempotency key is only unique per caller: two customers may both send `Idempotency-Key: 1`.
//! The record key a store sees is therefore `sha256(scope || key)`, where the scope is a digest of
//! who the caller is (by default the configured credential headers, such as `Authorization`, and
//! credential cookies, such as a session cookie). A
//! caller can never replay another caller's response, and stores only ever see digests: neither
//! raw credentials nor raw keys are persisted.

use std::fmt;
use std::hash::Hasher;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::cookie;

/// The digest of who the caller is.
///
/// Build one with [`Scope::from_bytes`] (for example from an authenticated user id placed in the
/// request extensions by an auth layer) or let the layer derive it from the policy's scope headers
/// with [`Scope::from_headers`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope([u8; 32]);

impl Scope {
    /// The scope of a caller that presented none of the scope headers.
    pub fn anonymous() -> Self {
        Self::from_bytes(b"")
    }

    /// A scope from an opaque principal identifier (user id, tenant id, API key id...).
    pub fn from_bytes(principal: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"principal\0");
        hasher.update(principal);
        Self(hasher.finalize().into())
    }

    /// A scope from the values of `names` in `headers`. A missing header and an empty one differ,
    /// and every value of a repeated header counts, in order.
    pub fn from_headers(headers: &HeaderMap, names: &[HeaderName]) -> Self {
        Self::from_credentials(headers, names, &[])
    }

    /// A scope from the values of the headers `names` and of the cookies `cookies` (read from
    /// every `Cookie` header; other cookies do not count). A missing cookie and an empty one
    /// differ, as for headers. Without cookies this is [`Scope::from_headers`], digest for digest.
    pub fn from_credentials(headers: &HeaderMap, names: &[HeaderName], cookies: &[String]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"headers\0");
        for name in names {
            let values = headers.get_all(name).into_iter().map(|v| v.as_bytes());
            hash_values(&mut hasher, name.as_str().as_bytes(), values);
        }
        if !cookies.is_empty() {
            // Only when cookies are configured, so that header-only scopes keep their digests
            // (and records made before cookies existed stay reachable).
            hasher.update(b"cookies\0");
            for name in cookies {
                hash_values(&mut hasher, name.as_bytes(), cookie::values(headers, name));
            }
        }
        Self(hasher.finalize().into())
    }

    /// The key a client address is counted under for `max_in_flight_per_caller`; never equal to
    /// a caller's scope.
    pub(crate) fn of_client_ip(ip: IpAddr) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"client-ip\0");
        match ip {
            IpAddr::V4(v4) => hasher.update(v4.octets()),
            IpAddr::V6(v6) => hasher.update(v6.octets()),
        }
        Self(hasher.finalize().into())
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// One credential: its name, then each value length-prefixed, then a terminator, so that missing,
/// empty and repeated values all differ.
fn hash_values<'a>(hasher: &mut Sha256, name: &[u8], values: impl Iterator<Item = &'a [u8]>) {
    hasher.update(name);
    for value in values {
        hasher.update(b"\x01");
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value);
    }
    hasher.update(b"\x00");
}

/// Whether the request carries any of the headers `names` or the cookies `cookies`: a caller
/// without any is anonymous.
pub(crate) fn presents_credentials(
    headers: &HeaderMap,
    names: &[HeaderName],
    cookies: &[String],
) -> bool {
    names.iter().any(|name| headers.contains_key(name))
        || cookies
            .iter()
            .any(|name| cookie::values(headers, name).next().is_some())
}

/// The IP address of the client a request came from, read from the request extensions.
///
/// The layer counts callers without credentials (no scope header, no scope cookie) per client
/// address against `max_in_flight_per_caller`, so that unrelated anonymous users do not share one
/// limit. Their records still share one scope (see [`Policy::anonymous`](crate::Policy::anonymous)).
/// Without it, anonymous callers share one limit. The proxy inserts it for every request; an axum
/// app served with `into_make_service_with_connect_info::<SocketAddr>()` can insert it from
/// `ConnectInfo` in a middleware outside the layer:
///
/// ```ignore
/// let client_ip = axum::middleware::from_fn(
///     |ConnectInfo(addr): ConnectInfo<SocketAddr>, mut request: Request, next: Next| async move {
///         request.extensions_mut().insert(ClientIp(addr.ip()));
///         next.run(request).await
///     },
/// );
/// let app = router.layer(idempotency).layer(client_ip);
/// ```
///
/// Behind a load balancer every request comes from the balancer's address: insert the client's
/// address from a header the balancer sets and you trust instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell scopes apart in logs without printing the digest.
        write!(f, "Scope({}..)", hex::encode(&self.0[..4]))
    }
}

/// The key a store files a record under: `sha256(scope || idempotency key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey([u8; 32]);

impl RecordKey {
    /// Derives the record key of `key` sent by the caller `scope`.
    pub fn new(scope: &Scope, key: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(scope.as_bytes());
        hasher.update(key);
        Self(hasher.finalize().into())
    }

    /// A record key from its 32 bytes, as read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, as used in Redis key names and notification payloads.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the lowercase hex form produced by [`RecordKey::to_hex`].
    pub fn from_hex(hex_digits: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey({}..)", hex::encode(&self.0[..6]))
    }
}

/// A hasher for keys that are sha256 digests already ([`RecordKey`], [`Scope`]): their first
/// bytes are as good as any hash, and nobody can choose them, so SipHash's flooding defence buys
/// nothing.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(1) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn different_callers_get_different_record_keys_for_one_key() {
        let names = [http::header::AUTHORIZATION];
        let alice = Scope::from_headers(&headers(&[("authorization", "Bearer alice")]), &names);
        let bob = Scope::from_headers(&headers(&[("authorization", "Bearer bob")]), &names);
        assert_ne!(RecordKey::new(&alice, b"k"), RecordKey::new(&bob, b"k"));
        assert_eq!(RecordKey::new(&alice, b"k"), RecordKey::new(&alice, b"k"));
    }

    #[test]
    fn missing_and_empty_headers_are_different_scopes() {
        let names = [http::header::AUTHORIZATION];
        let missing = Scope::from_headers(&HeaderMap::new(), &names);
        let empty = Scope::from_headers(&headers(&[("authorization", "")]), &names);
        assert_ne!(missing, empty);
    }

    #[test]
    fn header_boundaries_are_unambiguous() {
        let names = [HeaderName::from_static("a"), HeaderName::from_static("b")];
        let one = Scope::from_headers(&headers(&[("a", "xy"), ("b", "z")]), &names);
        let two = Scope::from_headers(&headers(&[("a", "x"), ("b", "yz")]), &names);
        assert_ne!(one, two);
    }

    #[test]
    fn principal_scopes_never_collide_with_header_scopes() {
        assert_ne!(
            Scope::from_bytes(b""),
            Scope::from_headers(&HeaderMap::new(), &[])
        );
    }

    #[test]
    fn cookies_scope_by_their_named_values_only() {
        let names = [http::header::AUTHORIZATION];
        let cookies = ["session".to_owned()];
        let of = |pairs| Scope::from_credentials(&headers(pairs), &names, &cookies);
        let alice = of(&[("cookie", "session=alice; tracking=1")]);
        assert_eq!(
            alice,
            of(&[("cookie", "tracking=2"), ("cookie", "session=alice")])
        );
        assert_ne!(alice, of(&[("cookie", "session=bob; tracking=1")]));
        assert_ne!(
            of(&[("cookie", "session=")]),
            of(&[("cookie", "tracking=1")])
        );
        assert_eq!(
            Scope::from_credentials(&headers(&[("authorization", "a")]), &names, &[]),
            Scope::from_headers(&headers(&[("authorization", "a")]), &names),
            "without cookies the digest is the header scope's"
        );
    }

    #[test]
    fn credentials_are_presented_by_any_scope_header_or_cookie() {
        let names = [http::header::AUTHORIZATION];
        let cookies = ["session".to_owned()];
        let presents = |pairs| presents_credentials(&headers(pairs), &names, &cookies);
        assert!(presents(&[("authorization", "")]));
        assert!(presents(&[("cookie", "a=1; session=")]));
        assert!(!presents(&[("cookie", "a=1; sessionx=2")]));
        assert!(!presents(&[]));
    }

    #[test]
    fn record_key_hex_round_trips() {
        let key = RecordKey::new(&Scope::anonymous(), b"abc");
        assert_eq!(RecordKey::from_hex(&key.to_hex()), Some(key));
        assert_eq!(RecordKey::from_hex("zz"), None);
    }
}
