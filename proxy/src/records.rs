//! Inspecting and forgetting records by the request that made them: `idempotency-proxy records`
//! and the admin listener's `/records/{key}` share this.

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use tower_idempotency::store::{DynStore, Forgotten, RecordInfo, RecordState};
use tower_idempotency::{IdempotencyLayer, Records, RecordsError, Routes};

use crate::config::Config;

/// A [`Records`] handle over `store` with the routes of `config`. Without a `path`, operations
/// use the default policy whatever path they name.
pub fn records(
    config: &Config,
    store: DynStore,
    path_given: bool,
) -> Result<Records<DynStore>, crate::config::ConfigError> {
    let routes = config.routes()?;
    let routes = if path_given {
        routes
    } else {
        Routes::new(routes.default_policy().clone())
    };
    Ok(IdempotencyLayer::new(store).routes(routes).records())
}

/// A record as JSON: never the body unless `with_body`.
pub fn record_json(key: &str, info: Option<&RecordInfo>, with_body: bool) -> Value {
    let Some(info) = info else {
        return json!({ "key": key, "state": "absent" });
    };
    let mut out = json!({
        "key": key,
        "fingerprint": hex(info.fingerprint.as_bytes()),
        "expires_at": rfc3339(info.expires_at),
    });
    match &info.state {
        RecordState::InFlight {
            token,
            attempt,
            checkpoint,
        } => {
            out["state"] = json!("in-flight");
            out["lease_token"] = json!(token.0);
            out["attempt"] = json!(attempt);
            out["checkpoint"] = json!(checkpoint);
        }
        RecordState::Completed {
            response,
            stored_bytes,
        } => {
            out["state"] = json!("completed");
            out["status"] = json!(response.status.as_u16());
            out["stored_bytes"] = json!(stored_bytes);
            out["body_bytes"] = json!(response.body.len());
            let headers: Vec<Value> = response
                .headers
                .iter()
                .map(|(name, value)| {
                    json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())])
                })
                .collect();
            out["headers"] = Value::Array(headers);
            if with_body {
                match std::str::from_utf8(&response.body) {
                    Ok(text) => out["body"] = json!(text),
                    Err(_) => out["body_hex"] = json!(hex(&response.body)),
                }
            }
        }
    }
    out
}

/// What a forget did, as JSON.
pub fn forgotten_json(key: &str, forgotten: Forgotten) -> Value {
    match forgotten {
        Forgotten::NotFound => json!({ "key": key, "forgotten": false, "found": "absent" }),
        Forgotten::Completed => json!({ "key": key, "forgotten": true, "found": "completed" }),
        Forgotten::LeaseEnded { token, attempt } => json!({
            "key": key, "forgotten": true, "found": "in-flight",
            "lease_ended": { "lease_token": token.0, "attempt": attempt },
        }),
        Forgotten::InFlight { token, attempt } => json!({
            "key": key, "forgotten": false, "found": "in-flight",
            "lease_token": token.0, "attempt": attempt,
            "hint": "the key is in flight; force ends its lease",
        }),
    }
}

/// Request headers from `Name: value` strings and `name=value` cookies, as a request would
/// carry them.
pub fn credentials(headers: &[String], cookies: &[String]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("--header {header:?}: expected `Name: value`"))?;
        let name = HeaderName::try_from(name.trim())
            .map_err(|_| format!("--header {header:?}: invalid header name"))?;
        let value = HeaderValue::try_from(value.trim())
            .map_err(|_| format!("--header {header:?}: invalid header value"))?;
        map.append(name, value);
    }
    if !cookies.is_empty() {
        for cookie in cookies {
            if !cookie.contains('=') {
                return Err(format!("--cookie {cookie:?}: expected `name=value`"));
            }
        }
        let value = HeaderValue::try_from(cookies.join("; "))
            .map_err(|_| "--cookie: invalid cookie value".to_owned())?;
        map.append(http::header::COOKIE, value);
    }
    Ok(map)
}

/// Whether an error is the caller's (a bad key or path) rather than the store's.
pub fn is_bad_input(error: &RecordsError) -> bool {
    !matches!(error, RecordsError::Store(_))
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
