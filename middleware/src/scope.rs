//! Caller scopes and record keys.
//!
//! An idempotency key is only unique per caller: two customers may both send `Idempotency-Key: 1`.
//! The record key a store sees is therefore `sha256(scope || key)`, where the scope is a digest of
//! who the caller is (by default the configured credential headers, such as `Authorization`). A
//! caller can never replay another caller's response, and stores only ever see digests: neither
//! raw credentials nor raw keys are persisted.

use std::fmt;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

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
        let mut hasher = Sha256::new();
        hasher.update(b"headers\0");
        for name in names {
            hasher.update(name.as_str().as_bytes());
            for value in headers.get_all(name) {
                hasher.update(b"\x01");
                hasher.update((value.len() as u64).to_be_bytes());
                hasher.update(value.as_bytes());
            }
            hasher.update(b"\x00");
        }
        Self(hasher.finalize().into())
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

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
    fn record_key_hex_round_trips() {
        let key = RecordKey::new(&Scope::anonymous(), b"abc");
        assert_eq!(RecordKey::from_hex(&key.to_hex()), Some(key));
        assert_eq!(RecordKey::from_hex("zz"), None);
    }
}
