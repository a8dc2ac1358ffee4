//! Test fixtures: the real proxy binary, a real counting upstream, and helpers to reach them.

#![allow(
    dead_code,
    reason = "each test module uses a different part of the fixtures"
)]

pub mod raw;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

pub use test_fixtures::{eventually, free_port};
pub use upstream::Upstream;

/// The binary under test.
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_idempotency-proxy");

/// A running `idempotency-proxy` process, killed when dropped.
pub struct Proxy {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` of the proxy listener.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the admin listener, if configured.
    pub admin: Option<String>,
    /// Where the configuration and the process's stderr live.
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
}

/// A configuration in front of `upstream` on free ports, with the sections in `rest`.
pub fn config(upstream: &str, rest: &str) -> String {
    config_with_proxy(upstream, "", rest)
}

/// [`config`] with extra `[proxy]` settings.
pub fn config_with_proxy(upstream: &str, proxy: &str, rest: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{proxy}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{rest}\n"
    )
}

impl Proxy {
    /// Starts the proxy with `config` (TOML text) and waits until it listens.
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`Proxy::start`] with extra environment variables.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, config, env)
    }

    /// Starts the proxy with its files in `dir` (so a restarted proxy can reuse a SQLite file).
    pub fn start_in(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Self {
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let mut command = Command::new(PROXY_BIN);
        command
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env(
                "RUST_LOG",
                "info,tower_idempotency=debug,idempotency_proxy=debug",
            )
            .env_remove("IDEMPOTENCY_STORE_URL")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn idempotency-proxy");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut base = None;
        let mut admin = None;
        let wants_admin = config.contains("[admin]");
        let deadline = Instant::now() + Duration::from_secs(30);
        while base.is_none() || (wants_admin && admin.is_none()) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match received.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        base = Some(url.to_owned());
                    } else if let Some(url) = line.strip_prefix("admin listening on ") {
                        admin = Some(url.to_owned());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    panic!(
                        "the proxy did not start (exit status {status:?}); its stderr:\n{}",
                        read(&dir.path().join("stderr.log"))
                    );
                }
            }
        }
        Self {
            child: Some(child),
            base: base.expect("proxy address"),
            admin,
            dir,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
        }
    }

    /// A POST to `path` with an idempotency key.
    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .header("idempotency-key", key)
    }

    /// Sends and reads the whole reply.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        Reply::read(request.send().await.expect("request to the proxy")).await
    }

    /// GET on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        let admin = self.admin.as_ref().expect("admin listener configured");
        Reply::read(
            self.client
                .get(format!("{admin}{path}"))
                .send()
                .await
                .expect("admin request"),
        )
        .await
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read(&self.dir.path().join("stderr.log"))
    }

    /// Reads one metric sample (`name{labels}`) from `/metrics`, 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.admin_get("/metrics").await.text();
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A whole HTTP reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("reply body");
        Self {
            status,
            headers,
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|value| value == "true")
    }

    /// The problem `type` slug of a problem+json reply.
    pub fn problem(&self) -> String {
        assert_eq!(
            self.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap_or_default()),
            Some("application/problem+json"),
            "expected a problem answer, got {self:?}"
        );
        let json: serde_json::Value = serde_json::from_slice(&self.body).expect("problem json");
        assert_eq!(json["status"], self.status.as_u16(), "{json}");
        assert!(
            json["title"].is_string() && json["detail"].is_string(),
            "{json}"
        );
        json["type"]
            .as_str()
            .and_then(|t| t.rsplit('#').next())
            .unwrap_or_default()
            .to_owned()
    }
}
