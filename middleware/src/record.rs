//! The response a store keeps, and its compact binary encoding.
//!
//! Encoding, version 1 (all integers big-endian):
//!
//! ```text
//! u8  version = 1
//! u16 status
//! u16 header count, then per header: u16 name length, name, u32 value length, value
//! ... the body: every remaining byte
//! ```
//!
//! The version byte lets a later release change the layout while still reading records written
//! by this one, which matters because records outlive deploys by up to their TTL.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::headers::remove_hop_by_hop;

const VERSION_1: u8 = 1;

/// A response as stored for replay: status, end-to-end headers and the whole body.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// End-to-end headers; hop-by-hop headers are removed on construction.
    pub headers: HeaderMap,
    /// The complete body.
    pub body: Bytes,
}

/// Why stored bytes could not be read back as a [`StoredResponse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record was written by an encoding version this build does not know.
    #[error("unknown record encoding version {0}")]
    UnknownVersion(u8),
    /// The record ends before a length-prefixed field does.
    #[error("record is truncated")]
    Truncated,
    /// A field holds a value that cannot be a status code or header.
    #[error("record holds an invalid {0}")]
    Invalid(&'static str),
}

impl StoredResponse {
    /// Builds a stored response, dropping hop-by-hop headers.
    pub fn new(status: StatusCode, mut headers: HeaderMap, body: Bytes) -> Self {
        remove_hop_by_hop(&mut headers);
        Self {
            status,
            headers,
            body,
        }
    }

    /// Encodes into the versioned binary form stores persist.
    pub fn encode(&self) -> Bytes {
        let header_bytes: usize = self
            .headers
            .iter()
            .map(|(name, value)| 6 + name.as_str().len() + value.len())
            .sum();
        let mut out = BytesMut::with_capacity(5 + header_bytes + self.body.len());
        out.put_u8(VERSION_1);
        out.put_u16(self.status.as_u16());
        // `HeaderMap` has no practical way to exceed these limits (it caps at 32768 entries and
        // hyper caps header sizes far below 4 GiB), so saturating keeps encoding infallible.
        out.put_u16(u16::try_from(self.headers.len()).unwrap_or(u16::MAX));
        for (name, value) in self.headers.iter().take(usize::from(u16::MAX)) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Decodes bytes produced by [`StoredResponse::encode`]. Header values and the body share
    /// `bytes`' allocation rather than being copied.
    pub fn decode(mut bytes: Bytes) -> Result<Self, DecodeError> {
        fn take(bytes: &mut Bytes, len: usize) -> Result<Bytes, DecodeError> {
            if bytes.remaining() < len {
                return Err(DecodeError::Truncated);
            }
            Ok(bytes.split_to(len))
        }
        if bytes.remaining() < 5 {
            return Err(DecodeError::Truncated);
        }
        let version = bytes.get_u8();
        if version != VERSION_1 {
            return Err(DecodeError::UnknownVersion(version));
        }
        let status =
            StatusCode::from_u16(bytes.get_u16()).map_err(|_| DecodeError::Invalid("status"))?;
        let count = bytes.get_u16();
        // Every header takes at least 6 bytes: a corrupt count cannot make us over-allocate.
        let mut headers = HeaderMap::with_capacity(usize::from(count).min(bytes.remaining() / 6));
        for _ in 0..count {
            if bytes.remaining() < 2 {
                return Err(DecodeError::Truncated);
            }
            let name_len = usize::from(bytes.get_u16());
            let name = HeaderName::from_bytes(&take(&mut bytes, name_len)?)
                .map_err(|_| DecodeError::Invalid("header name"))?;
            if bytes.remaining() < 4 {
                return Err(DecodeError::Truncated);
            }
            let value_len = bytes.get_u32() as usize;
            let value = HeaderValue::from_maybe_shared(take(&mut bytes, value_len)?)
                .map_err(|_| DecodeError::Invalid("header value"))?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError::Invalid("header count"))?;
        }
        Ok(Self {
            status,
            headers,
            body: bytes,
        })
    }

    /// Turns the record into a response carrying `body`.
    pub fn into_response<B>(self, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let mut response = Response::new(body(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.append("x-bin", HeaderValue::from_bytes(b"\xff\x80").unwrap());
        StoredResponse::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(b"{\"id\":1}\0\xff"),
        )
    }

    #[test]
    fn round_trips_status_repeated_headers_and_binary_body() {
        let response = sample();
        assert_eq!(StoredResponse::decode(response.encode()).unwrap(), response);
    }

    #[test]
    fn drops_hop_by_hop_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("connection", HeaderValue::from_static("close"));
        let response = StoredResponse::new(StatusCode::OK, headers, Bytes::new());
        assert!(response.headers.is_empty());
    }

    #[test]
    fn refuses_unknown_versions_and_truncation() {
        let mut encoded = sample().encode().to_vec();
        assert_eq!(
            StoredResponse::decode(Bytes::from(encoded[..3].to_vec())),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            StoredResponse::decode(Bytes::from(encoded[..20].to_vec())),
            Err(DecodeError::Truncated)
        );
        encoded[0] = 9;
        assert_eq!(
            StoredResponse::decode(Bytes::from(encoded)),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = StoredResponse::decode(Bytes::from(raw));
        }

        #[test]
        fn decoding_mutated_records_never_panics(index in 0usize..64, byte in any::<u8>()) {
            let mut encoded = sample().encode().to_vec();
            let at = index % encoded.len();
            encoded[at] = byte;
            let _ = StoredResponse::decode(Bytes::from(encoded));
        }

        #[test]
        fn encoding_round_trips(
            status in 100u16..1000,
            body in proptest::collection::vec(any::<u8>(), 0..256),
            values in proptest::collection::vec("[ -~]{0,40}", 0..8),
        ) {
            let mut headers = HeaderMap::new();
            for (i, value) in values.iter().enumerate() {
                headers.append(
                    HeaderName::from_bytes(format!("x-h{}", i % 3).as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            let response = StoredResponse::new(StatusCode::from_u16(status).unwrap(), headers, Bytes::from(body));
            prop_assert_eq!(StoredResponse::decode(response.encode()).unwrap(), response);
        }
    }
}
