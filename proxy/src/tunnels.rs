//! Upgraded connections (WebSocket tunnels) open now.
//!
//! Once a connection switches protocols, hyper hands its socket over and no longer counts it
//! among the connections a graceful shutdown drains: the proxy counts the tunnels itself, so
//! that SIGTERM gives them the same `shutdown_timeout` as requests in flight before the process
//! exits and cuts them.

use std::sync::Arc;

use tokio::sync::watch;

/// The tunnels open now; a clone counts the same ones.
#[derive(Clone)]
pub struct Tunnels {
    open: Arc<watch::Sender<usize>>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self {
            open: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Tunnels {
    /// Counts one more tunnel until the returned guard is dropped.
    pub fn open(&self) -> OpenTunnel {
        self.open.send_modify(|open| *open += 1);
        OpenTunnel {
            tunnels: self.clone(),
        }
    }

    /// How many are open.
    pub fn count(&self) -> usize {
        *self.open.borrow()
    }

    /// Returns once none is open.
    pub async fn closed(&self) {
        let mut open = self.open.subscribe();
        // The sender lives in `self`, so the wait ends only when the count reaches zero.
        let _ = open.wait_for(|open| *open == 0).await;
    }
}

/// One open tunnel, counted until dropped.
pub struct OpenTunnel {
    tunnels: Tunnels,
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.tunnels.open.send_modify(|open| *open -= 1);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn closed_waits_for_the_last_tunnel() {
        let tunnels = Tunnels::default();
        tokio::time::timeout(Duration::from_millis(10), tunnels.closed())
            .await
            .expect("none open: returns at once");
        let first = tunnels.open();
        let second = tunnels.open();
        assert_eq!(tunnels.count(), 2);
        drop(first);
        let waiting = tokio::time::timeout(Duration::from_millis(50), tunnels.closed()).await;
        assert!(waiting.is_err(), "one is still open");
        let closed = tokio::spawn({
            let tunnels = tunnels.clone();
            async move { tunnels.closed().await }
        });
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), closed)
            .await
            .expect("returns once the last one closed")
            .expect("task");
        assert_eq!(tunnels.count(), 0);
    }
}
