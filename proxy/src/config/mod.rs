//! The proxy's configuration: one TOML file.
//!
//! Parsing is strict: an unknown key, a value of the wrong type or a value that makes no sense is
//! an error at start-up that names the key and its line. [`Config::load`] parses, expands
//! `${VAR}` references in store URLs, applies the `IDEMPOTENCY_STORE_URL` override and calls
//! [`Config::validate`]. See `examples/proxy.toml` for every field with comments.

use std::path::Path;

use http::Uri;
use serde::Deserialize;
use tower_idempotency::Routes;

/// Overrides `[store] url` when set, so secrets need not live in the file.
pub const STORE_URL_ENV: &str = "IDEMPOTENCY_STORE_URL";
/// The environment variable that, when set and not empty, replaces `[admin] token`.
pub const ADMIN_TOKEN_ENV: &str = "IDEMPOTENCY_ADMIN_TOKEN";

mod errors;
mod schema;
mod store;
#[cfg(test)]
mod tests;
mod validate;

pub use errors::{ConfigError, KeyPath, KeySegment};
pub use schema::*;
pub use store::*;

use errors::{Problem, key_at, line_of, problem, span_of};
use store::StoreTable;

/// The whole configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The proxy listener and its upstream.
    pub proxy: ProxyConfig,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`); absent means none.
    pub admin: Option<AdminConfig>,
    /// Where idempotency records live.
    pub store: StoreConfig,
    /// Defaults for every route.
    pub idempotency: PolicyConfig,
    /// Per-path overrides; the first route whose `path` matches wins.
    pub routes: Vec<RouteConfig>,
}

/// The file as serde reads it: [`Config`] with `[store]` not yet dispatched on its backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTables {
    proxy: ProxyConfig,
    #[serde(default)]
    admin: Option<AdminConfig>,
    #[serde(default)]
    store: StoreTable,
    #[serde(default)]
    idempotency: PolicyConfig,
    #[serde(default, rename = "route")]
    routes: Vec<RouteConfig>,
}

impl FileTables {
    /// Expands `${VAR}` in the store's URLs and applies the environment's overrides.
    fn expand_environment(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Problem> {
        self.store.expand_environment(env)?;
        if let Some(admin) = &mut self.admin {
            if let Some(token) = env(ADMIN_TOKEN_ENV).filter(|token| !token.is_empty()) {
                admin.token = Some(token);
            }
            if admin.token.as_deref() == Some("") {
                return Err(problem(
                    KeyPath::of(&["admin", "token"]),
                    "must not be empty (leave it out to serve the record endpoints to loopback \
                     peers only)",
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads, expands and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_file(path, &text)
    }
    /// Parses, expands and validates `text`, read from the file at `path` (which errors name).
    pub fn parse_file(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, |name| std::env::var(name).ok()).map_err(|error| match error {
            ConfigError::Invalid {
                key, line, message, ..
            } => ConfigError::Invalid {
                file: Some(path.to_owned()),
                key,
                line,
                message,
            },
            other => other,
        })
    }

    /// Parses, expands and validates configuration `text`, reading environment variables through
    /// `env` (so tests need not touch the process environment).
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let document = toml_edit::Document::parse(text).ok();
        let locate = |key: KeyPath, message: String| ConfigError::Invalid {
            file: None,
            line: document
                .as_ref()
                .and_then(|doc| span_of(doc, &key))
                .map(|span| line_of(text, span.start)),
            key: Some(key),
            message,
        };
        let mut file: FileTables = toml::from_str(text).map_err(|error| {
            let span = error.span();
            let key = span
                .clone()
                .and_then(|span| document.as_ref().map(|doc| key_at(doc, span.start)));
            ConfigError::Invalid {
                file: None,
                line: span.map(|span| line_of(text, span.start)),
                key,
                message: error.message().trim().to_owned(),
            }
        })?;
        file.expand_environment(&env)
            .map_err(|p| locate(p.key, p.message))?;
        let config = Config {
            store: file
                .store
                .into_config()
                .map_err(|p| locate(p.key, p.message))?,
            proxy: file.proxy,
            admin: file.admin,
            idempotency: file.idempotency,
            routes: file.routes,
        };
        config
            .validate_problems()
            .map_err(|p| locate(p.key, p.message))?;
        Ok(config)
    }

    /// Checks that the values work together, naming the first key that does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_problems().map_err(|p| ConfigError::Invalid {
            file: None,
            key: Some(p.key),
            line: None,
            message: p.message,
        })
    }

    /// The upstream base URL.
    pub fn upstream(&self) -> Uri {
        // Validated on load, so the fallback is never taken for a loaded configuration.
        self.upstream_uri().unwrap_or_default()
    }

    /// The covered routes whose callers are told apart only by the built-in default
    /// (`scope_headers = ["authorization"]`, set nowhere in the file, and no `scope_cookies`):
    /// `None` for the default policy, else the route's index.
    pub fn default_scoped(&self) -> Vec<Option<usize>> {
        let relies = |fields: &PolicyConfig| {
            fields.enabled != Some(false)
                && fields.scope_headers.is_none()
                && fields.scope_cookies.as_ref().is_none_or(Vec::is_empty)
        };
        let mut found: Vec<_> = (0..self.routes.len())
            .filter(|&i| relies(&self.idempotency.overridden_by(&self.routes[i])))
            .map(Some)
            .collect();
        if relies(&self.idempotency) {
            found.push(None);
        }
        found
    }

    /// The effective per-route policies, validated.
    pub fn routes(&self) -> Result<Routes, ConfigError> {
        self.routes_checked().map_err(|p| ConfigError::Invalid {
            file: None,
            key: Some(p.key),
            line: None,
            message: p.message,
        })
    }
}

/// Replaces each `${NAME}` in `value` by the variable's value.
pub(super) fn expand(value: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated ${ in value".to_owned());
        };
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "${{{name}}} is not a valid environment variable reference"
            ));
        }
        match env(name) {
            Some(value) => out.push_str(&value),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
