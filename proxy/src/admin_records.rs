//! `GET` and `DELETE /records/{key}` on the admin listener: inspect and forget the record of
//! one idempotency key, for operators.
//!
//! The caller whose key it is is named by the credentials the original request carried, sent as
//! `X-Idempotency-Scope-<Header>` headers (`X-Idempotency-Scope-Authorization: Bearer alice`,
//! `X-Idempotency-Scope-Cookie: session=v`): with an admin token, the request's own
//! `Authorization` is that token. Without a token the endpoints answer loopback peers only, and
//! the request's own headers count as well. `?path=/payments` picks the route policy (default:
//! the default policy); `?body=true` includes the stored body; `DELETE ?force=true` ends an
//! in-flight lease.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tower_idempotency::problem::{Problem, ProblemKind};
use tower_idempotency::store::{DynStore, Forgotten};
use tower_idempotency::{Records, RecordsError};

use crate::records::{forgotten_json, record_json};

/// The prefix of the headers that carry the caller's credentials.
pub const SCOPE_HEADER_PREFIX: &str = "x-idempotency-scope-";

/// What the record endpoints need.
#[derive(Clone)]
pub struct RecordsState {
    /// Inspects and forgets, with the proxy's routes.
    pub records: Records<DynStore>,
    /// The bearer token required, if any.
    pub token: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct Params {
    path: Option<String>,
    #[serde(default)]
    body: bool,
    #[serde(default)]
    force: bool,
}

pub(crate) async fn show(
    State(state): State<RecordsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = admit(&state, peer, &headers) {
        return refused;
    }
    let credentials = credentials(&state, &headers);
    let path = params.path.as_deref().unwrap_or("/");
    match state.records.inspect(path, &credentials, &key).await {
        Ok(Some(info)) => json(StatusCode::OK, record_json(&key, Some(&info), params.body)),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "no live record has this key in this scope",
        ),
        Err(error) => records_error(error),
    }
}

pub(crate) async fn forget(
    State(state): State<RecordsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = admit(&state, peer, &headers) {
        return refused;
    }
    let credentials = credentials(&state, &headers);
    let path = params.path.as_deref().unwrap_or("/");
    match state
        .records
        .forget(path, &credentials, &key, params.force)
        .await
    {
        Ok(Forgotten::NotFound) => problem(
            StatusCode::NOT_FOUND,
            "no live record has this key in this scope",
        ),
        Ok(Forgotten::InFlight { .. }) => problem(
            StatusCode::CONFLICT,
            "the key is in flight; `?force=true` ends its lease",
        ),
        Ok(forgotten) => json(StatusCode::OK, forgotten_json(&key, forgotten)),
        Err(error) => records_error(error),
    }
}

/// With a token: the bearer token, from anywhere. Without: loopback peers only.
#[allow(clippy::result_large_err)]
fn admit(state: &RecordsState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Response> {
    match &state.token {
        Some(token) => {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "));
            if presented.is_some_and(|presented| constant_time_eq(presented, token)) {
                Ok(())
            } else {
                let mut refused = problem(
                    StatusCode::UNAUTHORIZED,
                    "the record endpoints require `Authorization: Bearer <[admin] token>`",
                );
                refused
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
                Err(refused)
            }
        }
        None if peer.ip().is_loopback() => Ok(()),
        None => Err(problem(
            StatusCode::FORBIDDEN,
            "without an `[admin] token` the record endpoints answer loopback peers only",
        )),
    }
}

/// The headers the original request carried: every `X-Idempotency-Scope-<Name>` as `<Name>`,
/// and without a token the request's own headers as well.
fn credentials(state: &RecordsState, headers: &HeaderMap) -> HeaderMap {
    let mut credentials = if state.token.is_none() {
        headers.clone()
    } else {
        HeaderMap::new()
    };
    for (name, value) in headers {
        if let Some(original) = name.as_str().strip_prefix(SCOPE_HEADER_PREFIX)
            && let Ok(original) = HeaderName::try_from(original)
        {
            credentials.append(original, value.clone());
        }
    }
    credentials
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn records_error(error: RecordsError) -> Response {
    let kind = match error {
        RecordsError::Store(_) => ProblemKind::StoreUnavailable,
        _ => ProblemKind::InvalidKey,
    };
    Problem::new(kind, error.to_string()).into_response(axum::body::Body::from)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{value:#}\n"),
    )
        .into_response()
}

/// An RFC 9457 problem without a type of its own (`about:blank`): the status says it all.
fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or_default(),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}
