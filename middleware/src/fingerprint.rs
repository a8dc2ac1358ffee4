//! Request fingerprints.
//!
//! A retry must be the *same* request: reusing a key for a different payload is a client bug that
//! would otherwise silently return the wrong response. The fingerprint is a sha256 over the
//! method, the path and query, the configured headers and the body, each length-prefixed so that
//! no two different requests can produce the same input.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

use crate::canonical_json::{self, JsonPointer};

/// How a request body takes part in its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BodyFingerprint {
    /// The bytes as sent (the default): any change, whitespace included, is another request.
    #[default]
    Bytes,
    /// The [canonical JSON](canonical_json) form, without the members the pointers name
    /// (per-attempt fields such as timestamps or nonces): `{"a":1,"b":2}` and `{ "b": 2, "a": 1 }`
    /// are one request. A body with no canonical form (not JSON, a repeated key) counts as bytes;
    /// as valid JSON never equals invalid JSON, the two cannot be confused.
    Json(Vec<JsonPointer>),
}

impl BodyFingerprint {
    /// The bytes of `body` that the fingerprint hashes.
    pub fn prepare<'a>(&self, body: &'a [u8]) -> Cow<'a, [u8]> {
        match self {
            Self::Bytes => Cow::Borrowed(body),
            Self::Json(ignore) => {
                canonical_json::canonical(body, ignore).map_or(Cow::Borrowed(body), Cow::Owned)
            }
        }
    }
}

/// The sha256 digest of what makes a request "the same request".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprints a request from its parts and its buffered body.
    ///
    /// `headers_to_include` lists the headers whose values take part (for example `content-type`
    /// when the same bytes mean different things in different encodings).
    pub fn of_request(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        headers_to_include: &[HeaderName],
        body: &[u8],
    ) -> Self {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(method.as_str().as_bytes());
        field(
            uri.path_and_query()
                .map_or(uri.path(), |pq| pq.as_str())
                .as_bytes(),
        );
        for name in headers_to_include {
            field(name.as_str().as_bytes());
            for value in headers.get_all(name) {
                field(value.as_bytes());
            }
        }
        field(body);
        Self(hasher.finalize().into())
    }

    /// A fingerprint from its 32 bytes, as read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({}..)", hex::encode(&self.0[..6]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn fingerprint(method: Method, uri: &str, body: &[u8]) -> Fingerprint {
        Fingerprint::of_request(&method, &uri.parse().unwrap(), &HeaderMap::new(), &[], body)
    }

    #[test]
    fn every_part_of_the_request_counts() {
        let base = fingerprint(Method::POST, "/pay?a=1", b"{}");
        assert_eq!(base, fingerprint(Method::POST, "/pay?a=1", b"{}"));
        assert_ne!(base, fingerprint(Method::PATCH, "/pay?a=1", b"{}"));
        assert_ne!(base, fingerprint(Method::POST, "/pay?a=2", b"{}"));
        assert_ne!(base, fingerprint(Method::POST, "/pays?a=1", b"{}"));
        assert_ne!(base, fingerprint(Method::POST, "/pay?a=1", b"{ }"));
    }

    #[test]
    fn json_bodies_can_be_compared_in_canonical_form() {
        let json = BodyFingerprint::Json(vec!["/nonce".parse().unwrap()]);
        let of = |body: &[u8]| fingerprint(Method::POST, "/pay", &json.prepare(body));
        assert_eq!(
            of(br#"{"a":1,"nonce":1}"#),
            of(br#"{ "nonce": 2, "a": 1 }"#)
        );
        assert_ne!(of(br#"{"a":1}"#), of(br#"{"a":2}"#));
        assert_eq!(
            of(b"not json"),
            fingerprint(Method::POST, "/pay", b"not json")
        );
        let bytes = BodyFingerprint::Bytes;
        assert_ne!(
            fingerprint(Method::POST, "/pay", &bytes.prepare(br#"{"a":1,"b":2}"#)),
            fingerprint(Method::POST, "/pay", &bytes.prepare(br#"{"b":2,"a":1}"#)),
        );
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        assert_ne!(
            fingerprint(Method::POST, "/ab", b"c"),
            fingerprint(Method::POST, "/a", b"bc")
        );
    }

    #[test]
    fn configured_headers_count_and_others_do_not() {
        let uri: Uri = "/x".parse().unwrap();
        let content_type = [http::header::CONTENT_TYPE];
        let mut json = HeaderMap::new();
        json.insert("content-type", HeaderValue::from_static("application/json"));
        json.insert("user-agent", HeaderValue::from_static("a"));
        let mut form = json.clone();
        form.insert(
            "content-type",
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let mut other_agent = json.clone();
        other_agent.insert("user-agent", HeaderValue::from_static("b"));

        let of = |headers: &HeaderMap| {
            Fingerprint::of_request(&Method::POST, &uri, headers, &content_type, b"")
        };
        assert_ne!(of(&json), of(&form));
        assert_eq!(of(&json), of(&other_agent));
    }
}
