//! Error answers as `application/problem+json` (RFC 9457).
//!
//! Every answer the layer (and the proxy) produces itself carries a stable `type` URI naming its
//! kind, so clients can branch on it instead of parsing `detail`. The URIs point at the sections
//! below.
//!
//! # missing-key
//! `400`: the route requires an idempotency key and the request has none.
//!
//! # invalid-key
//! `400`: the key is empty, longer than 255 bytes, not visible ASCII, a malformed quoted string,
//! or the header is repeated.
//!
//! # invalid-body
//! `400`: the request body could not be read.
//!
//! # body-too-large
//! `413`: the request body is larger than the route's `max_request_body`. Nothing was stored and
//! nothing was forwarded.
//!
//! # body-read-timeout
//! `408`: the request body did not arrive within the route's `body_read_timeout`. Nothing ran
//! and the key is free: send the request again.
//!
//! # key-reused
//! `422`: the key was already used for a different request (method, path, query, body or
//! fingerprinted headers differ). Use a new key for a new operation.
//!
//! # in-flight
//! `409`: a request with this key is still running. Retry after `Retry-After` seconds.
//!
//! # too-many-in-flight
//! `429`: this caller already has as many keyed requests in progress as the route allows
//! (`max_in_flight_per_caller`). Retry after `Retry-After` seconds.
//!
//! # store-unavailable
//! `503`: the idempotency store failed, and the route prefers refusing to running a request twice.
//! Retry after `Retry-After` seconds.
//!
//! # credentials-required
//! `403`: the route refuses keyed requests from callers without credentials
//! (`anonymous = "reject"`) and this one presented none of its scope headers or scope cookies.
//! Nothing ran. Send the request authenticated.
//!
//! # invalid-target
//! `400`: the request path is ambiguous (an encoded slash `%2F`, a backslash or `%5C`, `%00`, a
//! malformed percent-escape, or `..` segments climbing above the root; see [`crate::path`]), or
//! (proxy) the request target cannot be forwarded to the upstream. Nothing ran.
//!
//! # upstream-unavailable
//! `502` (proxy): the upstream refused the connection or failed before answering. Also (proxy and
//! layer) a response body that failed before the response head was sent: the operation may have
//! run, so the key stays locked until `lock_ttl`.
//!
//! # upstream-timeout
//! `504` (proxy): the upstream did not answer within the proxy's upstream timeout. Also (proxy
//! and layer) a response body that stalled past its idle timeout (`upstream_body_timeout`, a
//! [`BodyTimeout`](crate::BodyTimeout) error) before the response head was sent: the key stays
//! locked until `lock_ttl`.
//!
//! # outcome-pending
//! `504`: the upstream (or handler) did not answer in time and may still be running the
//! operation. Its result is awaited for up to `lock_ttl` (the `Retry-After`): if it arrives, it
//! is stored and a retry with the same key replays it (the operation ran once); if not, a retry
//! after `Retry-After` runs the request again. A retry sent earlier gets `409` `in-flight`, or
//! waits for the result with `on_conflict = "wait"`. See [`LateOutcome`](crate::LateOutcome).
//!
//! # upgrade-not-allowed
//! `400`: the request asks to switch protocols (`Upgrade`, e.g. WebSocket) with a method the
//! route covers; a protocol switch can be neither stored nor replayed. Open upgraded connections
//! with a method the route does not cover (usually `GET`). Nothing was forwarded.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Where the `type` URIs point.
pub const TYPE_BASE: &str = "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/";

/// The kinds of error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// `400`, see [the module docs](self#missing-key).
    MissingKey,
    /// `400`, see [the module docs](self#invalid-key).
    InvalidKey,
    /// `400`, see [the module docs](self#invalid-body).
    InvalidBody,
    /// `413`, see [the module docs](self#body-too-large).
    BodyTooLarge,
    /// `408`, see [the module docs](self#body-read-timeout).
    BodyReadTimeout,
    /// `422`, see [the module docs](self#key-reused).
    KeyReused,
    /// `409`, see [the module docs](self#in-flight).
    InFlight,
    /// `429`, see [the module docs](self#too-many-in-flight).
    TooManyInFlight,
    /// `503`, see [the module docs](self#store-unavailable).
    StoreUnavailable,
    /// `403`, see [the module docs](self#credentials-required).
    CredentialsRequired,
    /// `400`, see [the module docs](self#invalid-target).
    InvalidTarget,
    /// `502`, see [the module docs](self#upstream-unavailable).
    UpstreamUnavailable,
    /// `504`, see [the module docs](self#upstream-timeout).
    UpstreamTimeout,
    /// `400`, see [the module docs](self#upgrade-not-allowed).
    UpgradeNotAllowed,
    /// `504`, see [the module docs](self#outcome-pending).
    OutcomePending,
}

impl ProblemKind {
    /// The slug at the end of the `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::InvalidKey => "invalid-key",
            Self::InvalidBody => "invalid-body",
            Self::BodyTooLarge => "body-too-large",
            Self::BodyReadTimeout => "body-read-timeout",
            Self::KeyReused => "key-reused",
            Self::InFlight => "in-flight",
            Self::TooManyInFlight => "too-many-in-flight",
            Self::StoreUnavailable => "store-unavailable",
            Self::CredentialsRequired => "credentials-required",
            Self::InvalidTarget => "invalid-target",
            Self::UpstreamUnavailable => "upstream-unavailable",
            Self::UpstreamTimeout => "upstream-timeout",
            Self::UpgradeNotAllowed => "upgrade-not-allowed",
            Self::OutcomePending => "outcome-pending",
        }
    }

    /// The HTTP status of this kind.
    pub fn status(self) -> StatusCode {
        match self {
            Self::MissingKey
            | Self::InvalidKey
            | Self::InvalidBody
            | Self::InvalidTarget
            | Self::UpgradeNotAllowed => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyReadTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::CredentialsRequired => StatusCode::FORBIDDEN,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight => StatusCode::CONFLICT,
            Self::TooManyInFlight => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout | Self::OutcomePending => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The short, fixed summary.
    pub fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency key required",
            Self::InvalidKey => "Invalid idempotency key",
            Self::InvalidBody => "Request body could not be read",
            Self::BodyTooLarge => "Request body too large",
            Self::BodyReadTimeout => "Request body timed out",
            Self::KeyReused => "Idempotency key reused for a different request",
            Self::InFlight => "Request with this idempotency key is in progress",
            Self::TooManyInFlight => "Too many requests in progress",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::CredentialsRequired => "Caller credentials required",
            Self::InvalidTarget => "Request target cannot be forwarded",
            Self::UpstreamUnavailable => "Upstream unavailable",
            Self::UpstreamTimeout => "Upstream timed out",
            Self::UpgradeNotAllowed => "Protocol upgrade not allowed on a covered method",
            Self::OutcomePending => "Outcome pending: the result is still awaited",
        }
    }

    /// The `type` URI.
    pub fn type_uri(self) -> String {
        self.type_uri_under(TYPE_BASE)
    }

    /// The `type` URI under another base (a route's `problem_type_base`): `<base>#<slug>`.
    pub fn type_uri_under(self, base: &str) -> String {
        format!("{base}#{}", self.slug())
    }
}

/// Where a route's problem answers point: the base of their `type` URIs and the operator's docs,
/// linked with `Link: <docs_url>; rel="describedby"`. The default points at this crate's docs and
/// links nothing.
///
/// The idempotency layer puts the route's `ProblemDocs` in the request extensions when either
/// is set, so an inner service (the proxy's upstream client) can document its own problem
/// answers the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProblemDocs {
    type_base: Option<std::sync::Arc<str>>,
    docs_url: Option<std::sync::Arc<str>>,
}

impl ProblemDocs {
    /// Docs with these settings (`None` keeps the default).
    pub fn new(type_base: Option<&str>, docs_url: Option<&str>) -> Self {
        Self {
            type_base: type_base.map(Into::into),
            docs_url: docs_url.map(Into::into),
        }
    }

    /// Whether both settings are the defaults.
    pub fn is_default(&self) -> bool {
        self.type_base.is_none() && self.docs_url.is_none()
    }
}

/// Checks that `value` is an absolute URI usable in a `type` member and a `Link` header.
pub(crate) fn check_absolute_uri(value: &str) -> Result<(), String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|error| format!("{value:?} is not a URI: {error}"))?;
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(format!(
            "{value:?} must be an absolute URI (scheme and host, e.g. https://docs.example.com/errors)"
        ));
    }
    if value.contains(['<', '>', '"', ' ']) {
        return Err(format!(
            "{value:?} must not contain '<', '>', '\"' or spaces"
        ));
    }
    Ok(())
}

/// A problem answer under construction.
#[derive(Debug, Clone)]
pub struct Problem {
    kind: ProblemKind,
    detail: String,
    retry_after: Option<Duration>,
    docs: ProblemDocs,
}

impl Problem {
    /// A problem of `kind` explained by `detail`.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
            docs: ProblemDocs::default(),
        }
    }

    /// Points the `type` URI and the `Link` header where `docs` say.
    #[must_use]
    pub fn documented(mut self, docs: &ProblemDocs) -> Self {
        self.docs = docs.clone();
        self
    }

    /// Adds a `Retry-After` header (whole seconds, at least 1).
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The kind.
    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// The JSON document.
    pub fn body(&self) -> Bytes {
        let document = serde_json::json!({
            "type": self.kind.type_uri_under(self.docs.type_base.as_deref().unwrap_or(TYPE_BASE)),
            "title": self.kind.title(),
            "status": self.kind.status().as_u16(),
            "detail": self.detail,
        });
        Bytes::from(document.to_string())
    }

    /// The response, with a body built by `body`.
    pub fn into_response<B>(self, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let mut response = Response::new(body(self.body()));
        *response.status_mut() = self.kind.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(docs_url) = &self.docs.docs_url
            && let Ok(link) = HeaderValue::try_from(format!("<{docs_url}>; rel=\"describedby\""))
        {
            headers.insert(header::LINK, link);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc_9457_members_and_retry_after() {
        let response = Problem::new(ProblemKind::InFlight, "key \"k\" is running")
            .retry_after(Duration::from_millis(1500))
            .into_response(|body| body);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["type"], format!("{TYPE_BASE}#in-flight"));
        assert_eq!(json["status"], 409);
        assert_eq!(json["title"], ProblemKind::InFlight.title());
        assert_eq!(json["detail"], "key \"k\" is running");
        assert!(response.headers().get(header::LINK).is_none());
    }

    #[test]
    fn documented_problems_point_at_the_operator_docs() {
        let docs = ProblemDocs::new(
            Some("https://errors.example.com/idem"),
            Some("https://docs.example.com/retries"),
        );
        let response = Problem::new(ProblemKind::KeyReused, "x")
            .documented(&docs)
            .into_response(|body| body);
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["type"], "https://errors.example.com/idem#key-reused");
        assert_eq!(
            response.headers()[header::LINK],
            "<https://docs.example.com/retries>; rel=\"describedby\""
        );
        assert!(check_absolute_uri("/relative").is_err());
        assert!(check_absolute_uri("https://ok.example/x").is_ok());
    }
}
