//! Reading named cookies out of `Cookie` headers (RFC 6265 section 5.4), for caller scopes.

use http::HeaderMap;
use http::header::COOKIE;

/// The values of the cookie `name` in every `Cookie` header, in order (HTTP/2 clients may split
/// cookies over several headers). Names are case-sensitive; values are the raw bytes sent.
pub(crate) fn values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|header| header.as_bytes().split(|&b| b == b';'))
        .filter_map(move |pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            (trim(&pair[..eq]) == name.as_bytes()).then(|| trim(&pair[eq + 1..]))
        })
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = bytes.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(start), Some(end)) => &bytes[start..=end],
        _ => &[],
    }
}

/// Whether `name` is a valid cookie name (an RFC 9110 token).
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn finds_every_value_of_a_name_across_headers() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; session=x ;b"));
        headers.append(COOKIE, HeaderValue::from_static("session=;Session=y"));
        let found: Vec<_> = values(&headers, "session").collect();
        assert_eq!(found, [&b"x"[..], &b""[..]]);
        assert_eq!(values(&headers, "missing").count(), 0);
    }

    #[test]
    fn names_are_tokens() {
        assert!(is_valid_name("session_id"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("a=b"));
    }
}
