//! The proxies under test: the real `idempotency-proxy` binary, three processes on fixed ports
//! (so a client retries the same address across a restart), each with an upstream port of its own.

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The timings every proxy runs with; the checker judges against them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    pub(crate) lock_ttl: Duration,
    pub(crate) upstream_timeout: Duration,
    pub(crate) store_timeout: Duration,
}

/// One proxy process and how to start it again.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Proxy {
    /// Writes its configuration into `dir` (a file per proxy) and starts it.
    pub(crate) fn start(
        binary: &Path,
        dir: &Path,
        index: usize,
        upstream_port: u16,
        store: &str,
        timings: Timings,
    ) -> Result<Self, String> {
        let port = test_fixtures::free_port();
        let config = dir.join(format!("proxy-{index}.toml"));
        let ms = |duration: Duration| format!("{}ms", duration.as_millis());
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"http://127.0.0.1:{upstream_port}\"\n\
             upstream_timeout = \"{}\"\nconnect_timeout = \"1s\"\nshutdown_timeout = \"1s\"\n\n\
             [store]\n{store}timeout = \"{}\"\npoll_interval = \"200ms\"\n\n\
             [idempotency]\nmethods = [\"POST\"]\nttl = \"1h\"\nlock_ttl = \"{}\"\n\
             on_conflict = \"reject\"\non_store_error = \"reject\"\nretry_after = \"1s\"\n\
             max_in_flight_per_caller = 0\n",
            ms(timings.upstream_timeout),
            ms(timings.store_timeout),
            ms(timings.lock_ttl),
        );
        std::fs::write(&config, text).map_err(|error| format!("write {config:?}: {error}"))?;
        let mut proxy = Self {
            port,
            binary: binary.to_owned(),
            config,
            log: dir.join(format!("proxy-{index}.log")),
            child: None,
        };
        proxy.restart()?;
        Ok(proxy)
    }

    /// Starts the process (again) and waits until it listens.
    pub(crate) fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|error| format!("open {:?}: {error}", self.log))?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .env_remove("IDEMPOTENCY_STORE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|error| format!("run {:?}: {error}", self.binary))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "the proxy exited with {status} at start; its log {:?}:\n{}",
                    self.log,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("the proxy did not listen on port {}", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `kill -9`, as a crash or an OOM kill would.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `SIGSTOP` or `SIGCONT`.
    pub(crate) fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}
