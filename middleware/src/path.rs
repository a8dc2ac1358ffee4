//! The path the layer acts on: the request path normalised per RFC 3986 section 6.
//!
//! Routes are matched against it, it is fingerprinted, and it is what the inner service (the
//! upstream, behind the proxy) receives. Were the layer to match the raw bytes, `/%70ayments` or
//! `/feed/../payments` would reach `/payments` at the upstream while the layer applied another
//! route's policy (or none).
//!
//! Normalised: percent-encoded unreserved characters are decoded (`%70` is `p`, `%2E` is `.`),
//! other percent-escapes are uppercased (`%3a` is `%3A`), dot segments are removed (`/a/./b/../c`
//! is `/a/c`), and, when merging is on, repeated slashes become one (`//a` is `/a`).
//!
//! Refused, because servers disagree on what they mean: an encoded slash (`%2F`), a backslash
//! (raw or `%5C`), `%00`, a malformed percent-escape, and dot segments that climb above the root
//! (`/../a`).
//!
//! In axum, `Router::layer` runs a layer after routing: to have the router route the normalised
//! path, wrap the whole router instead (`IdempotencyLayer::layer(router)`, or `ServiceBuilder`).
//!
//! ```
//! use tower_idempotency::path::{PathError, normalize};
//!
//! assert_eq!(normalize("/feed/../%70ayments", true).unwrap(), "/payments");
//! assert_eq!(normalize("/a//b/%7e%3a", true).unwrap(), "/a/b/~%3A");
//! assert_eq!(normalize("/a//b", false).unwrap(), "/a//b");
//! assert_eq!(normalize("/a%2Fb", true), Err(PathError::EncodedSlash));
//! assert_eq!(normalize("/../a", true), Err(PathError::AboveRoot));
//! ```

use std::borrow::Cow;

use http::Uri;
use http::uri::PathAndQuery;

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// `%2F`: one segment to some servers, two to others.
    #[error("it contains an encoded slash (%2F)")]
    EncodedSlash,
    /// `\` or `%5C`: a separator to some servers, a character to others.
    #[error("it contains a backslash (\\ or %5C)")]
    Backslash,
    /// `%00`: truncates the path in some servers.
    #[error("it contains an encoded NUL (%00)")]
    EncodedNul,
    /// `%` not followed by two hex digits.
    #[error("it contains a malformed percent-escape")]
    InvalidEscape,
    /// More `..` segments than there are segments to remove.
    #[error("its dot segments climb above the root")]
    AboveRoot,
}

/// The normalised form of `path` (a path starting with `/`; anything else, such as `*`, is
/// returned as it is), borrowed when it already is normal.
pub fn normalize(path: &str, merge_slashes: bool) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || is_normal(path, merge_slashes) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = normalize_escapes(path)?;
    let normal = remove_dot_segments(&decoded, merge_slashes)?;
    if normal == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normal))
    }
}

/// `uri` with its path normalised, or `None` if it already is (the common case, which costs no
/// allocation). The query is kept as sent.
pub fn normalize_uri(uri: &Uri, merge_slashes: bool) -> Result<Option<Uri>, PathError> {
    let Cow::Owned(path) = normalize(uri.path(), merge_slashes)? else {
        return Ok(None);
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    // Built from a valid path by decoding unreserved characters and dropping segments: still
    // valid, so the fallbacks below are never taken.
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| PathError::InvalidEscape)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError::InvalidEscape)
}

/// The common case, checked without allocating: no escape, no backslash, no dot segment, and no
/// empty segment to merge.
fn is_normal(path: &str, merge_slashes: bool) -> bool {
    if path.bytes().any(|b| b == b'%' || b == b'\\') {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if matches!(segment, "." | "..") || (merge_slashes && segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// Decodes percent-encoded unreserved characters and uppercases the other escapes; refuses the
/// ambiguous ones. Does not touch segments.
pub(crate) fn normalize_escapes(text: &str) -> Result<Cow<'_, str>, PathError> {
    if !text.bytes().any(|b| b == b'%' || b == b'\\') {
        return Ok(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let hex = |at: usize| {
                    bytes
                        .get(at)
                        .and_then(|b| char::from(*b).to_digit(16))
                        .ok_or(PathError::InvalidEscape)
                };
                let byte = (hex(i + 1)? * 16 + hex(i + 2)?) as u8;
                match byte {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0 => return Err(PathError::EncodedNul),
                    b if is_unreserved(b) => out.push(b),
                    b => out.extend_from_slice(format!("%{b:02X}").as_bytes()),
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was decoded; every other byte was copied from valid UTF-8.
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| PathError::InvalidEscape)
}

/// RFC 3986 section 5.2.4 on a path starting with `/`, refusing to climb above the root.
fn remove_dot_segments(path: &str, merge_slashes: bool) -> Result<String, PathError> {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                out.pop().ok_or(PathError::AboveRoot)?;
            }
            "" if merge_slashes && i != last => {}
            _ => out.push(segment),
        }
        // A final dot segment leaves the directory it named: "/a/." is "/a/".
        if i == last && matches!(segment, "." | "..") {
            out.push("");
        }
    }
    let mut normal = String::with_capacity(path.len());
    for segment in &out {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Ok(normal)
}

/// RFC 3986 section 2.3.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str, merge: bool) -> String {
        normalize(path, merge)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/payments", "/a/b/", "/a.b/.well-known/x", "/a%3Ab"] {
            assert!(
                matches!(normalize(path, true), Ok(Cow::Borrowed(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_uppercased() {
        assert_eq!(ok("/%70ayments", true), "/payments");
        assert_eq!(ok("/%41%7a%2d%2E%5f%7E", true), "/Az-._~");
        assert_eq!(ok("/a%3ab%20c%25", true), "/a%3Ab%20c%25");
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/feed/../payments", true), "/payments");
        assert_eq!(ok("/feed/%2e%2E/payments", true), "/payments");
        assert_eq!(ok("/a/./b/../c", true), "/a/c");
        assert_eq!(ok("/a/.", true), "/a/");
        assert_eq!(ok("/a/b/..", true), "/a/");
        assert_eq!(ok("/a/..", true), "/");
        assert_eq!(ok("/.", true), "/");
        assert_eq!(ok("/a/...", true), "/a/...");
    }

    #[test]
    fn slashes_are_merged_only_when_asked() {
        assert_eq!(ok("//payments", true), "/payments");
        assert_eq!(ok("/a//b///", true), "/a/b/");
        assert_eq!(ok("//", true), "/");
        assert_eq!(ok("/a//b", false), "/a//b");
        assert_eq!(ok("/a//../b", false), "/a/b");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (path, error) in [
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2f", PathError::EncodedSlash),
            ("/a%5Cb", PathError::Backslash),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::EncodedNul),
            ("/a%zz", PathError::InvalidEscape),
            ("/a%2", PathError::InvalidEscape),
            ("/a%", PathError::InvalidEscape),
            ("/..", PathError::AboveRoot),
            ("/a/../../b", PathError::AboveRoot),
            ("/%2e%2e/b", PathError::AboveRoot),
        ] {
            assert_eq!(normalize(path, true), Err(error), "{path}");
        }
    }

    #[test]
    fn other_targets_are_left_alone() {
        assert_eq!(ok("*", true), "*");
        assert_eq!(ok("", true), "");
    }

    #[test]
    fn the_query_is_kept_as_sent() {
        let uri: Uri = "http://h/a/../%70?x=%2F&y=..".parse().unwrap();
        let normal = normalize_uri(&uri, true).unwrap().unwrap();
        assert_eq!(normal, "http://h/p?x=%2F&y=..");
        assert!(
            normalize_uri(&"/p?x=1".parse().unwrap(), true)
                .unwrap()
                .is_none()
        );
    }
}
