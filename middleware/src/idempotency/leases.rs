//! Counting the leases not yet settled, so that a server shutting down can wait for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The leases a layer holds that are not settled yet: requests running under a lease, including
/// those whose client left (they finish on a task of their own) and responses still streaming to
/// the store.
///
/// A server shutting down waits for [`idle`](Self::idle) after its connections have drained, so
/// that work the clients no longer wait for is still stored before the process exits.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// let leases = layer.leases_in_flight();
/// // ... serve, then on shutdown:
/// let _ = tokio::time::timeout(Duration::from_secs(30), leases.idle()).await;
/// assert_eq!(leases.count(), 0);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct LeasesInFlight {
    inner: Arc<Counter>,
}

#[derive(Debug, Default)]
struct Counter {
    count: AtomicUsize,
    settled_all: Notify,
}

impl LeasesInFlight {
    /// How many leases are held and not yet settled.
    pub fn count(&self) -> usize {
        self.inner.count.load(Ordering::Acquire)
    }

    /// Resolves once no lease is held. New leases may be taken afterwards: stop accepting
    /// requests first.
    pub async fn idle(&self) {
        loop {
            let settled = self.inner.settled_all.notified();
            let mut settled = std::pin::pin!(settled);
            // Registered before looking, so a settlement between the look and the wait counts.
            settled.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            settled.await;
        }
    }

    pub(crate) fn acquired(&self) {
        self.inner.count.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn settled(&self) {
        if self.inner.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.settled_all.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn idle_waits_for_the_last_settlement() {
        let leases = LeasesInFlight::default();
        leases.acquired();
        leases.acquired();
        let waiting = tokio::spawn({
            let leases = leases.clone();
            async move { leases.idle().await }
        });
        tokio::task::yield_now().await;
        leases.settled();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one lease is still held");
        leases.settled();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("idle after the last settlement")
            .expect("task");
        assert_eq!(leases.count(), 0);
    }
}
