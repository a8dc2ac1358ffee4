//! Configuration errors and where they are: key paths (`route[1].ttl`), lines, spans.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// One step of a key path such as `route[1].ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySegment {
    /// A table key.
    Key(String),
    /// An index into an array (of tables).
    Index(usize),
}

/// A dotted key path, displayed as `route[1].ttl`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(pub Vec<KeySegment>);

impl KeyPath {
    pub(super) fn of(segments: &[&str]) -> Self {
        Self(
            segments
                .iter()
                .map(|s| KeySegment::Key((*s).to_owned()))
                .collect(),
        )
    }

    pub(super) fn route(index: usize, field: &str) -> Self {
        Self(vec![
            KeySegment::Key("route".to_owned()),
            KeySegment::Index(index),
            KeySegment::Key(field.to_owned()),
        ])
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                KeySegment::Key(key) if i == 0 => f.write_str(key)?,
                KeySegment::Key(key) => write!(f, ".{key}")?,
                KeySegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A configuration that cannot be used, with where it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key or value is wrong.
    #[error("{}", self.describe())]
    Invalid {
        /// The file, if the configuration came from one.
        file: Option<PathBuf>,
        /// The offending key, when known.
        key: Option<KeyPath>,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn describe(&self) -> String {
        let Self::Invalid {
            file,
            key,
            line,
            message,
        } = self
        else {
            return String::new();
        };
        let mut out = String::from("invalid configuration");
        if let Some(file) = file {
            out.push_str(&format!(" in {}", file.display()));
        }
        if let Some(line) = line {
            out.push_str(&format!(" at line {line}"));
        }
        if let Some(key) = key.as_ref().filter(|key| !key.0.is_empty()) {
            out.push_str(&format!(", key `{key}`"));
        }
        out.push_str(": ");
        out.push_str(message);
        out
    }

    /// The offending key, if known.
    pub fn key(&self) -> Option<&KeyPath> {
        match self {
            Self::Invalid { key, .. } => key.as_ref(),
            Self::Read { .. } => None,
        }
    }

    /// The 1-based line, if known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Invalid { line, .. } => *line,
            Self::Read { .. } => None,
        }
    }
}

/// A validation failure before its line is looked up.
#[derive(Debug)]
pub(super) struct Problem {
    pub(super) key: KeyPath,
    pub(super) message: String,
}

pub(super) fn problem(key: KeyPath, message: impl Into<String>) -> Problem {
    Problem {
        key,
        message: message.into(),
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The span of the key (or, failing that, the value) at `path`.
pub(super) fn span_of(
    document: &toml_edit::Document<&str>,
    path: &KeyPath,
) -> Option<Range<usize>> {
    let mut item = document.as_item();
    let mut span = None;
    for segment in &path.0 {
        match segment {
            KeySegment::Key(key) => {
                // A key that is not in the file (a missing required key) is reported at the
                // deepest table that is.
                let Some((found_key, found)) = item
                    .as_table_like()
                    .and_then(|table| table.get_key_value(key))
                else {
                    return span;
                };
                span = found_key.span().or_else(|| found.span()).or(span);
                item = found;
            }
            KeySegment::Index(index) => {
                let found = match item {
                    toml_edit::Item::ArrayOfTables(tables) => {
                        let table = tables.get(*index)?;
                        span = table.span().or(span);
                        return descend_table(table, &path.0, span);
                    }
                    toml_edit::Item::Value(toml_edit::Value::Array(array)) => array.get(*index)?,
                    _ => return span,
                };
                span = found.span().or(span);
                return span;
            }
        }
    }
    span
}

/// Finishes [`span_of`] inside one table of an array of tables.
pub(super) fn descend_table(
    table: &toml_edit::Table,
    path: &[KeySegment],
    fallback: Option<Range<usize>>,
) -> Option<Range<usize>> {
    let after_index = path
        .iter()
        .position(|s| matches!(s, KeySegment::Index(_)))
        .map_or(&[][..], |i| &path[i + 1..]);
    match after_index.first() {
        Some(KeySegment::Key(key)) => table
            .get_key_value(key)
            .and_then(|(k, v)| k.span().or_else(|| v.span()))
            .or(fallback),
        _ => fallback,
    }
}

/// The deepest key whose key or value span contains `offset`.
pub(super) fn key_at(document: &toml_edit::Document<&str>, offset: usize) -> KeyPath {
    fn walk(table: &dyn toml_edit::TableLike, offset: usize, path: &mut Vec<KeySegment>) -> bool {
        for (key, item) in table.iter() {
            let (key_span, item_span) = match table.get_key_value(key) {
                Some((k, v)) => (k.span(), v.span()),
                None => (None, None),
            };
            let hit = |span: Option<Range<usize>>| span.is_some_and(|s| s.contains(&offset));
            path.push(KeySegment::Key(key.to_owned()));
            match item {
                toml_edit::Item::Table(inner) => {
                    if walk(inner, offset, path) || hit(inner.span()) {
                        return true;
                    }
                }
                toml_edit::Item::ArrayOfTables(tables) => {
                    for (index, inner) in tables.iter().enumerate() {
                        path.push(KeySegment::Index(index));
                        if walk(inner, offset, path) || hit(inner.span()) {
                            return true;
                        }
                        path.pop();
                    }
                }
                toml_edit::Item::Value(toml_edit::Value::InlineTable(inner)) => {
                    if walk(inner, offset, path) || hit(item_span.clone()) {
                        return true;
                    }
                }
                _ => {
                    if hit(key_span) || hit(item_span) {
                        return true;
                    }
                }
            }
            path.pop();
        }
        false
    }
    let mut path = Vec::new();
    walk(document.as_table(), offset, &mut path);
    KeyPath(path)
}
