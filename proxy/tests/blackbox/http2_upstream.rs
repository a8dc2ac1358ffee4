//! `upstream_http2 = true` against a real nginx speaking h2c: the host travels as `:authority`
//! only, never beside a `Host` header (nginx before 1.29 answers such requests with 400).

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::support::{Proxy, config_with_proxy, free_port};

/// An nginx process in a temp dir of its own, listening for h2c on a free port, answering every
/// request `201 created for $host`. Killed when dropped.
struct Nginx {
    url: String,
    child: Child,
    dir: tempfile::TempDir,
}

fn nginx_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")]);
    for dir in candidates {
        let binary = dir.join("nginx");
        if binary.is_file() {
            return binary;
        }
    }
    panic!(
        "nginx is not installed, and this test needs a real HTTP/2 upstream: run scripts/test \
         (it installs it) or `apt-get install -y nginx-light`"
    );
}

impl Nginx {
    fn start() -> Self {
        let binary = nginx_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\n\
             error_log {error} info;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log {access};\n  client_body_temp_path {temp}/body;\n  \
             proxy_temp_path {temp}/proxy;\n  fastcgi_temp_path {temp}/fastcgi;\n  \
             uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n  \
             server {{\n    listen 127.0.0.1:{port} http2;\n    \
             location / {{ default_type text/plain; return 201 \"created for $host\"; }}\n  }}\n}}\n",
            pid = path("nginx.pid"),
            error = path("error.log"),
            access = path("access.log"),
            temp = dir.path().display(),
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("write nginx.conf");
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(path("error.log"))
            .arg("-c")
            .arg(path("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()));
        let mut nginx = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        nginx.wait_until_listening(port);
        nginx
    }

    fn wait_until_listening(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    read(&self.dir.path().join("error.log"))
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not open port {port}: {}",
                read(&self.dir.path().join("error.log"))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn an_h2c_nginx_upstream_gets_the_authority_without_a_duplicate_host() {
    let nginx = Nginx::start();
    let proxy = Proxy::start(&config_with_proxy(
        &nginx.url,
        "upstream_http2 = true",
        MEMORY,
    ));
    let first = proxy
        .send(proxy.post("/payments", "nginx-h2").body("x"))
        .await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "nginx refuses a Host beside :authority: {first:?}"
    );
    assert_eq!(first.text(), "created for 127.0.0.1");
    let retry = proxy
        .send(proxy.post("/payments", "nginx-h2").body("x"))
        .await;
    assert!(retry.replayed(), "{retry:?}");
    let get = proxy
        .send(proxy.client.get(format!("{}/anything", proxy.base)))
        .await;
    assert_eq!(get.status, StatusCode::CREATED, "{get:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn over_h2c_preserve_host_makes_the_client_host_the_authority() {
    let nginx = Nginx::start();
    let proxy = Proxy::start(&config_with_proxy(
        &nginx.url,
        "upstream_http2 = true\npreserve_host = true",
        MEMORY,
    ));
    let reply = proxy
        .send(
            proxy
                .post("/payments", "nginx-host")
                .header("host", "public.example")
                .body("x"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    assert_eq!(reply.text(), "created for public.example");
}
