//! Parsing and validation of the `Idempotency-Key` header value.
//!
//! The IETF draft (`draft-ietf-httpapi-idempotency-key-header`) defines the header as a
//! Structured Field *String* (`"..."`), while most APIs in the wild (Stripe, Adyen, PayPal) send a
//! bare token such as a UUID. Both forms are accepted; the quoted form is unquoted and unescaped
//! before use, so `"abc"` and `abc` name the same operation.

use std::borrow::Cow;

use http::HeaderValue;

/// Longest accepted key, in bytes, after unquoting.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key header value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The value (or the quoted string) is empty.
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the idempotency key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    /// The key holds a byte outside visible ASCII (`0x21..=0x7E`).
    #[error("the idempotency key must be visible ASCII (no spaces or control characters)")]
    NotVisibleAscii,
    /// A quoted value is not a valid Structured Field String.
    #[error("the idempotency key is a malformed quoted string")]
    MalformedQuotedString,
    /// The header appears more than once.
    #[error("the idempotency key header appears more than once")]
    Repeated,
}

/// Parses one key header value into the key's bytes.
///
/// Accepts a bare key (`8e03978e-40d5-43e8-bc93-6894a57f9324`) or an RFC 8941 sf-string
/// (`"8e03978e-..."`, with `\"` and `\\` escapes). The resulting key must be 1 to
/// [`MAX_KEY_LEN`] bytes of visible ASCII.
///
/// ```
/// use http::HeaderValue;
/// use tower_idempotency::key::{parse_key, KeyError};
///
/// assert_eq!(&*parse_key(&HeaderValue::from_static("abc-123")).unwrap(), b"abc-123");
/// assert_eq!(&*parse_key(&HeaderValue::from_static("\"abc-123\"")).unwrap(), b"abc-123");
/// assert_eq!(parse_key(&HeaderValue::from_static("")), Err(KeyError::Empty));
/// assert_eq!(parse_key(&HeaderValue::from_static("a b")), Err(KeyError::NotVisibleAscii));
/// ```
pub fn parse_key(value: &HeaderValue) -> Result<Cow<'_, [u8]>, KeyError> {
    parse_key_bytes(value.as_bytes())
}

/// [`parse_key`] over raw bytes.
pub fn parse_key_bytes(raw: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    let key = match raw {
        [b'"', inner @ .., b'"'] => unquote(inner)?,
        [b'"', ..] => return Err(KeyError::MalformedQuotedString),
        _ => Cow::Borrowed(raw),
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::NotVisibleAscii);
    }
    Ok(key)
}

/// Unescapes the inside of an sf-string: `\"` and `\\` are the only escapes, and a bare `"` may
/// not appear.
fn unquote(inner: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    if !inner.contains(&b'\\') {
        if inner.contains(&b'"') {
            return Err(KeyError::MalformedQuotedString);
        }
        return Ok(Cow::Borrowed(inner));
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return Err(KeyError::MalformedQuotedString),
            },
            b'"' => return Err(KeyError::MalformedQuotedString),
            other => out.push(other),
        }
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &[u8]) -> Result<Vec<u8>, KeyError> {
        parse_key_bytes(s).map(Cow::into_owned)
    }

    #[test]
    fn accepts_bare_and_quoted_keys() {
        assert_eq!(parse(b"k1").unwrap(), b"k1");
        assert_eq!(parse(b"\"k1\"").unwrap(), b"k1");
        assert_eq!(parse(br#""a\"b\\c""#).unwrap(), br#"a"b\c"#);
    }

    #[test]
    fn refuses_empty_keys() {
        assert_eq!(parse(b""), Err(KeyError::Empty));
        assert_eq!(parse(b"\"\""), Err(KeyError::Empty));
    }

    #[test]
    fn enforces_the_length_limit_after_unquoting() {
        let max = vec![b'a'; MAX_KEY_LEN];
        assert!(parse(&max).is_ok());
        let mut quoted = vec![b'"'];
        quoted.extend_from_slice(&max);
        quoted.push(b'"');
        assert!(
            parse(&quoted).is_ok(),
            "quotes do not count against the limit"
        );
        assert_eq!(parse(&vec![b'a'; MAX_KEY_LEN + 1]), Err(KeyError::TooLong));
    }

    #[test]
    fn refuses_invisible_and_non_ascii_bytes() {
        assert_eq!(parse(b"a b"), Err(KeyError::NotVisibleAscii));
        assert_eq!(parse(b"\"a b\""), Err(KeyError::NotVisibleAscii));
        assert_eq!(parse(b"a\tb"), Err(KeyError::NotVisibleAscii));
        assert_eq!(parse("ключ".as_bytes()), Err(KeyError::NotVisibleAscii));
    }

    #[test]
    fn refuses_malformed_quoted_strings() {
        assert_eq!(parse(b"\"abc"), Err(KeyError::MalformedQuotedString));
        assert_eq!(parse(b"\"a\"b\""), Err(KeyError::MalformedQuotedString));
        assert_eq!(parse(br#""a\nb""#), Err(KeyError::MalformedQuotedString));
        assert_eq!(parse(br#""ab\""#), Err(KeyError::MalformedQuotedString));
    }

    proptest! {
        #[test]
        fn never_panics_and_accepted_keys_are_valid(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(key) = parse_key_bytes(&raw) {
                prop_assert!(!key.is_empty() && key.len() <= MAX_KEY_LEN);
                prop_assert!(key.iter().all(|b| (0x21..=0x7e).contains(b)));
            }
        }

        #[test]
        fn quoting_a_valid_bare_key_names_the_same_key(key in "[!#-\\[\\]-~]{1,255}") {
            let quoted = format!("\"{key}\"");
            prop_assert_eq!(parse(key.as_bytes()).unwrap(), parse(quoted.as_bytes()).unwrap());
        }
    }
}
