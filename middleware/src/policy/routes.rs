//! Which policy a request path gets: path patterns (`*` one segment, a final `**` the rest) and
//! the ordered routes matched against the normalised path, first match wins.

use std::sync::Arc;

use super::{Policy, PolicyError};

/// A path pattern: segments separated by `/`, where `*` matches exactly one segment and a final
/// `**` matches the rest of the path (zero or more segments).
///
/// ```
/// use tower_idempotency::PathPattern;
///
/// let pattern: PathPattern = "/payments/*/refunds".parse().unwrap();
/// assert!(pattern.matches("/payments/42/refunds"));
/// assert!(!pattern.matches("/payments/42/43/refunds"));
///
/// let prefix: PathPattern = "/payments/**".parse().unwrap();
/// assert!(prefix.matches("/payments"));
/// assert!(prefix.matches("/payments/42/refunds"));
/// assert!(!prefix.matches("/paymentsx"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
    rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
}

/// Why a path pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pattern: String,
    reason: &'static str,
}

impl std::str::FromStr for PathPattern {
    type Err = PatternError;

    fn from_str(pattern: &str) -> Result<Self, Self::Err> {
        let fail = |reason| PatternError {
            pattern: pattern.to_owned(),
            reason,
        };
        let Some(path) = pattern.strip_prefix('/') else {
            return Err(fail("must start with '/'"));
        };
        let mut parts: Vec<&str> = path.split('/').collect();
        let rest = parts.last() == Some(&"**");
        if rest {
            parts.pop();
        }
        // A trailing slash ("/a/") is the empty last segment, which keeps it distinct from "/a".
        if parts == [""] && !rest {
            parts.clear();
        }
        let segments = parts
            .into_iter()
            .map(|part| match part {
                "*" => Ok(Segment::Any),
                "**" => Err(fail("'**' is only allowed as the last segment")),
                _ if part.contains('*') => Err(fail("'*' must be a whole segment")),
                // Requests are matched by their normalised path, which has none of these.
                "." | ".." => Err(fail("dot segments never match a normalised path")),
                _ => match crate::path::normalize_escapes(part) {
                    Ok(literal) if matches!(&*literal, "." | "..") => {
                        Err(fail("dot segments never match a normalised path"))
                    }
                    Ok(literal) => Ok(Segment::Literal(literal.into_owned())),
                    Err(_) => Err(fail(
                        "invalid or ambiguous percent-escape (requests with one are refused)",
                    )),
                },
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source: pattern.to_owned(),
            segments,
            rest,
        })
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl PathPattern {
    /// Whether `path` (without query, normalised as by [`crate::path::normalize`]) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(path) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = path.split('/');
        if path.is_empty() {
            // "/" has no segments at all.
            parts.next();
        }
        for segment in &self.segments {
            match (segment, parts.next()) {
                (Segment::Any, Some(_)) => {}
                (Segment::Literal(literal), Some(part)) if literal == part => {}
                _ => return false,
            }
        }
        self.rest || parts.next().is_none()
    }
}

/// Per-route policies: the first pattern that matches the request's normalised path wins, else
/// the default.
#[derive(Debug, Clone)]
pub struct Routes {
    default: Arc<Policy>,
    routes: Vec<(PathPattern, Arc<Policy>)>,
    merge_slashes: bool,
}

impl Routes {
    /// Routes that apply `default` everywhere.
    pub fn new(default: Policy) -> Self {
        Self {
            default: Arc::new(default),
            routes: Vec::new(),
            merge_slashes: true,
        }
    }

    /// Whether normalising a request path merges repeated slashes (`//a` is `/a`) before routes
    /// are matched and the request is handed on. Default `true`, as the upstream then acts on the
    /// path the routes matched whether or not it merges slashes itself.
    #[must_use]
    pub fn merge_slashes(mut self, merge: bool) -> Self {
        self.merge_slashes = merge;
        self
    }

    /// See [`Routes::merge_slashes`].
    pub fn merges_slashes(&self) -> bool {
        self.merge_slashes
    }

    /// Adds a route after the existing ones.
    #[must_use]
    pub fn route(mut self, pattern: PathPattern, policy: Policy) -> Self {
        self.routes.push((pattern, Arc::new(policy)));
        self
    }

    /// The policy for `path`.
    pub fn policy_for(&self, path: &str) -> &Arc<Policy> {
        self.routes
            .iter()
            .find(|(pattern, _)| pattern.matches(path))
            .map_or(&self.default, |(_, policy)| policy)
    }

    /// The default policy.
    pub fn default_policy(&self) -> &Policy {
        &self.default
    }

    /// The routes in match order.
    pub fn iter(&self) -> impl Iterator<Item = (&PathPattern, &Policy)> {
        self.routes
            .iter()
            .map(|(pattern, policy)| (pattern, policy.as_ref()))
    }

    /// Validates the default and every route's policy.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.default.validate()?;
        self.routes
            .iter()
            .try_for_each(|(_, policy)| policy.validate())
    }
}

impl Default for Routes {
    fn default() -> Self {
        Self::new(Policy::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(source: &str) -> PathPattern {
        source.parse().unwrap()
    }

    #[test]
    fn single_star_matches_exactly_one_segment() {
        let p = pattern("/a/*/c");
        assert!(p.matches("/a/b/c"));
        assert!(!p.matches("/a/c"));
        assert!(!p.matches("/a/b/x/c"));
        assert!(!p.matches("/a/b/c/d"));
    }

    #[test]
    fn double_star_matches_the_rest_including_nothing() {
        let p = pattern("/a/**");
        assert!(p.matches("/a"));
        assert!(p.matches("/a/"));
        assert!(p.matches("/a/b/c"));
        assert!(!p.matches("/ab"));
        assert!(!p.matches("/"));
        assert!(pattern("/**").matches("/"));
        assert!(pattern("/**").matches("/anything/at/all"));
    }

    #[test]
    fn literals_match_exactly() {
        assert!(pattern("/").matches("/"));
        assert!(!pattern("/").matches("/a"));
        assert!(pattern("/a").matches("/a"));
        assert!(!pattern("/a").matches("/a/"));
        assert!(pattern("/a/").matches("/a/"));
    }

    #[test]
    fn pattern_literals_are_normalised_like_paths() {
        assert!(pattern("/pay%6dents/%3a").matches("/payments/%3A"));
        for bad in ["/a/../b", "/a/./b", "/a%2Fb/**", "/%2e%2E/x", "/a%zz"] {
            assert!(bad.parse::<PathPattern>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["a/b", "/a/**/b", "/a*", "/**x", ""] {
            assert!(bad.parse::<PathPattern>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn first_matching_route_wins() {
        let routes = Routes::new(Policy::default())
            .route(
                pattern("/payments/**"),
                Policy::default().with_required(true),
            )
            .route(pattern("/**"), Policy::default().with_enabled(false));
        assert!(routes.policy_for("/payments/1").required);
        assert!(!routes.policy_for("/feed").enabled);
    }
}
