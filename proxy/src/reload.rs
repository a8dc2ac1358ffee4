//! Reloading the configuration file on SIGHUP.
//!
//! What a reload applies: `[idempotency]` and every `[[route]]`, for requests that arrive
//! afterwards (requests already admitted keep the policy they started with). Everything else
//! (`[proxy]`, `[admin]`, `[store]`) is fixed while the proxy runs: listeners, the store's
//! connections, the upstream client and its timeouts are built once at start-up. A reload that
//! changes one of those keys logs it as needing a restart and keeps the running value.

use std::path::{Path, PathBuf};

use tower_idempotency::Routes;

use crate::config::{Config, ConfigError};

/// Top-level tables a reload applies; every other one needs a restart.
const RELOADABLE: [&str; 2] = ["idempotency", "route"];

/// The configuration file a running proxy was started from.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
    /// The tables only a restart applies, as the running proxy read them.
    running: toml::Table,
}

/// What a successful reload brought.
#[derive(Debug)]
pub struct Reloaded {
    /// The new default policy and routes, to apply now.
    pub routes: Routes,
    /// Keys whose new value needs a restart (`proxy.listen`, `store`...), not applied.
    pub needs_restart: Vec<String>,
}

impl ConfigFile {
    /// Reads and validates the file at `path`, remembering it for later reloads.
    pub fn load(path: &Path) -> Result<(Config, Self), ConfigError> {
        let text = read(path)?;
        let config = Config::parse_file(path, &text)?;
        let file = Self {
            path: path.to_owned(),
            running: restart_only(&text),
        };
        Ok((config, file))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again. An invalid file is an error naming the key and line, and changes
    /// nothing.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let text = read(&self.path)?;
        let config = Config::parse_file(&self.path, &text)?;
        let routes = config.routes()?;
        Ok(Reloaded {
            routes,
            needs_restart: changed_keys(&self.running, &restart_only(&text)),
        })
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The file's tables that a reload does not apply. Called on text that already parsed.
fn restart_only(text: &str) -> toml::Table {
    let mut table: toml::Table = text.parse().unwrap_or_default();
    table.retain(|key, _| !RELOADABLE.contains(&key));
    table
}

/// Keys (`proxy.listen`) or whole tables (`admin`) that differ between the two files.
fn changed_keys(running: &toml::Table, reloaded: &toml::Table) -> Vec<String> {
    let mut changed = Vec::new();
    let tables = running
        .keys()
        .chain(reloaded.keys().filter(|key| !running.contains_key(*key)));
    for table in tables {
        match (running.get(table), reloaded.get(table)) {
            (Some(toml::Value::Table(old)), Some(toml::Value::Table(new))) => {
                let keys = old
                    .keys()
                    .chain(new.keys().filter(|key| !old.contains_key(*key)));
                for key in keys {
                    if old.get(key) != new.get(key) {
                        changed.push(format!("{table}.{key}"));
                    }
                }
            }
            (old, new) if old != new => changed.push(table.clone()),
            _ => {}
        }
    }
    changed.sort();
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_outside_the_policies_need_a_restart() {
        let running = restart_only(
            "[proxy]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[idempotency]\nttl = \"1h\"\n",
        );
        let reloaded = restart_only(
            "[proxy]\nlisten = \"127.0.0.1:2\"\nupstream = \"http://a\"\nupstream_timeout = \"1s\"\n\
             [admin]\n[idempotency]\nttl = \"2h\"\n[[route]]\npath = \"/a\"\n",
        );
        assert_eq!(
            changed_keys(&running, &reloaded),
            ["admin", "proxy.listen", "proxy.upstream_timeout"]
        );
        assert!(changed_keys(&running, &running).is_empty());
    }
}
