//! A test-only barrier: the crash tests stop the app at a named step of the handler, then kill or
//! freeze the process there.
//!
//! With `PAYMENTS_PAUSE_AT=<step>` and `PAYMENTS_PAUSE_DIR=<dir>`, the handler reaching `<step>`
//! creates the file `<dir>/<step>` and waits until `<dir>/<step>.go` exists. Without them (any
//! real deployment) [`pause`] returns at once.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Where the handler stops, read once from the environment.
fn barrier() -> Option<&'static (String, PathBuf)> {
    static BARRIER: OnceLock<Option<(String, PathBuf)>> = OnceLock::new();
    BARRIER
        .get_or_init(|| {
            let step = std::env::var("PAYMENTS_PAUSE_AT").ok()?;
            let dir = std::env::var("PAYMENTS_PAUSE_DIR").ok()?;
            Some((step, PathBuf::from(dir)))
        })
        .as_ref()
}

/// Waits at `step` if the environment says so (see the module docs).
pub(crate) async fn pause(step: &str) {
    let Some((at, dir)) = barrier() else { return };
    if at != step {
        return;
    }
    tracing::info!(step, "pausing at the test barrier");
    if let Err(error) = std::fs::write(dir.join(step), b"") {
        tracing::error!(%error, "cannot signal the test barrier");
    }
    let go = dir.join(format!("{step}.go"));
    while !go.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
