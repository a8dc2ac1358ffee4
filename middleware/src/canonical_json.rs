//! Canonical JSON, for fingerprints that survive re-serialisation.
//!
//! Clients re-serialise a request between retries: keys come out in another order, whitespace
//! changes. Fingerprinting the canonical form makes `{"a":1,"b":2}` and `{ "b": 2, "a": 1 }` one
//! request. The canonical form:
//!
//! * object members sorted by key (compared as UTF-8 bytes after unescaping), no whitespace;
//! * strings re-escaped the one way `serde_json` writes them, so `"\u0041"` and `"A"` agree;
//! * numbers **as written**: `1`, `1.0` and `1e0` stay different, because an upstream may well
//!   tell them apart (a decimal amount, a version string parsed as a number);
//! * members named by [`JsonPointer`]s (per-attempt fields: timestamps, nonces, signatures) left
//!   out.
//!
//! A body that is not one valid JSON value, repeats a key within an object (parsers disagree on
//! which one wins, so two such bodies may mean different things to the upstream), or nests deeper
//! than [`MAX_DEPTH`] has no canonical form: the caller fingerprints its bytes instead.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Deepest nesting canonicalised; deeper documents are fingerprinted as bytes. Each level parses
/// its own text once more, so the bound also bounds the work per byte.
pub const MAX_DEPTH: usize = 64;

/// A JSON Pointer (RFC 6901), such as `/meta/request_id`, naming a member to leave out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    source: String,
    tokens: Vec<String>,
}

/// Why a JSON pointer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON pointer {pointer:?}: {reason}")]
pub struct JsonPointerError {
    pointer: String,
    reason: &'static str,
}

impl std::str::FromStr for JsonPointer {
    type Err = JsonPointerError;

    fn from_str(pointer: &str) -> Result<Self, Self::Err> {
        let fail = |reason| JsonPointerError {
            pointer: pointer.to_owned(),
            reason,
        };
        let Some(rest) = pointer.strip_prefix('/') else {
            return Err(fail(
                "must start with '/' (the whole document cannot be ignored)",
            ));
        };
        let tokens = rest
            .split('/')
            .map(|token| {
                // RFC 6901 section 4: '~1' is '/', '~0' is '~', and no other '~' escape exists.
                let mut out = String::with_capacity(token.len());
                let mut chars = token.chars();
                while let Some(c) = chars.next() {
                    if c != '~' {
                        out.push(c);
                        continue;
                    }
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return Err(fail("'~' must be followed by '0' or '1'")),
                    }
                }
                Ok(out)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source: pointer.to_owned(),
            tokens,
        })
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The canonical form of `body`, leaving out the members `ignore` names; `None` when the body has
/// none (see the module docs).
pub fn canonical(body: &[u8], ignore: &[JsonPointer]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let value: &RawValue = serde_json::from_str(text).ok()?;
    let mut writer = Writer {
        out: Vec::with_capacity(body.len()),
        path: Vec::new(),
        ignore,
    };
    writer.value(value).ok()?;
    Some(writer.out)
}

/// The document has no canonical form.
struct NoCanonicalForm;

impl From<serde_json::Error> for NoCanonicalForm {
    fn from(_: serde_json::Error) -> Self {
        Self
    }
}

struct Writer<'a> {
    out: Vec<u8>,
    /// The member names and array indices leading to the value being written.
    path: Vec<String>,
    ignore: &'a [JsonPointer],
}

impl Writer<'_> {
    fn value(&mut self, value: &RawValue) -> Result<(), NoCanonicalForm> {
        if self.path.len() > MAX_DEPTH {
            return Err(NoCanonicalForm);
        }
        let text = value.get();
        match text.as_bytes().first() {
            Some(b'{') => self.object(text),
            Some(b'[') => self.array(text),
            Some(b'"') => {
                let string: String = serde_json::from_str(text)?;
                serde_json::to_writer(&mut self.out, &string)?;
                Ok(())
            }
            // Numbers as written; `true`, `false` and `null` have one spelling.
            Some(_) => {
                self.out.extend_from_slice(text.as_bytes());
                Ok(())
            }
            None => Err(NoCanonicalForm),
        }
    }

    fn object(&mut self, text: &str) -> Result<(), NoCanonicalForm> {
        let Members(mut members) = serde_json::from_str(text)?;
        members.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        if members.windows(2).any(|pair| pair[0].0 == pair[1].0) {
            return Err(NoCanonicalForm);
        }
        self.out.push(b'{');
        let mut first = true;
        for (name, value) in members {
            self.path.push(name);
            if !self.ignored() {
                if !first {
                    self.out.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut self.out, self.path.last().expect("just pushed"))?;
                self.out.push(b':');
                self.value(value)?;
            }
            self.path.pop();
        }
        self.out.push(b'}');
        Ok(())
    }

    fn array(&mut self, text: &str) -> Result<(), NoCanonicalForm> {
        let items: Vec<&RawValue> = serde_json::from_str(text)?;
        self.out.push(b'[');
        let mut first = true;
        for (index, item) in items.into_iter().enumerate() {
            self.path.push(index.to_string());
            if !self.ignored() {
                if !first {
                    self.out.push(b',');
                }
                first = false;
                self.value(item)?;
            }
            self.path.pop();
        }
        self.out.push(b']');
        Ok(())
    }

    fn ignored(&self) -> bool {
        self.ignore
            .iter()
            .any(|pointer| pointer.tokens == self.path)
    }
}

/// An object's members in document order, duplicates kept (a map would hide them).
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for MembersVisitor<'a> {
            type Value = Members<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> Option<String> {
        canonical(text.as_bytes(), &[]).map(|bytes| String::from_utf8(bytes).unwrap())
    }

    fn pointers(list: &[&str]) -> Vec<JsonPointer> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn key_order_and_whitespace_do_not_count() {
        assert_eq!(canon(r#"{"a":1,"b":2}"#), canon("{ \"b\": 2,\n \"a\": 1 }"));
        assert_eq!(
            canon(r#" {"z": [1, {"y": true, "x": null}], "a": "s"} "#).as_deref(),
            Some(r#"{"a":"s","z":[1,{"x":null,"y":true}]}"#)
        );
    }

    #[test]
    fn numbers_stay_as_written_and_strings_are_unescaped() {
        assert_ne!(canon(r#"{"n":1}"#), canon(r#"{"n":1.0}"#));
        assert_ne!(canon(r#"{"n":1}"#), canon(r#"{"n":1e0}"#));
        assert_eq!(
            canon(r#"{"n":12345678901234567890123}"#).as_deref(),
            Some(r#"{"n":12345678901234567890123}"#)
        );
        assert_eq!(canon(r#"["\u0041\/"]"#), canon(r#"["A/"]"#));
        assert_eq!(canon(r#"{"\u0061":1}"#), canon(r#"{"a":1}"#));
    }

    #[test]
    fn bodies_without_a_canonical_form() {
        assert_eq!(canon("not json"), None);
        assert_eq!(canon(r#"{"a":1} {"b":2}"#), None, "two documents");
        assert_eq!(canon(r#"{"a":1,"a":2}"#), None, "a repeated key");
        assert_eq!(canonical(b"\xff", &[]), None, "not UTF-8");
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 2), "]".repeat(MAX_DEPTH + 2));
        assert_eq!(canon(&deep), None);
        let fine = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(canon(&fine).is_some());
    }

    #[test]
    fn ignored_members_are_left_out_wherever_they_are() {
        let ignore = pointers(&["/meta/request_id", "/timestamp", "/items/1", "/a~1b"]);
        let of = |text: &str| canonical(text.as_bytes(), &ignore).map(String::from_utf8);
        let first = of(r#"{"amount":10,"timestamp":1,"meta":{"request_id":"x","v":1},"a/b":0}"#);
        let retry = of(r#"{"meta":{"v":1,"request_id":"y"},"amount":10,"timestamp":2,"a/b":9}"#);
        assert_eq!(first, retry);
        assert_eq!(first.unwrap().unwrap(), r#"{"amount":10,"meta":{"v":1}}"#);
        assert_ne!(
            of(r#"{"amount":10,"meta":{"v":2}}"#),
            of(r#"{"amount":10,"meta":{"v":1}}"#),
            "members not named still count"
        );
        assert_eq!(
            of(r#"{"items":[1,2,3]}"#).unwrap().unwrap(),
            r#"{"items":[1,3]}"#
        );
    }

    #[test]
    fn pointers_are_parsed_per_rfc_6901() {
        let pointer: JsonPointer = "/a~1b/c~0d".parse().unwrap();
        assert_eq!(pointer.tokens, ["a/b", "c~d"]);
        assert!("a/b".parse::<JsonPointer>().is_err());
        assert!("".parse::<JsonPointer>().is_err());
        assert!("/a~2".parse::<JsonPointer>().is_err());
        assert_eq!(pointer.to_string(), "/a~1b/c~0d");
    }
}
