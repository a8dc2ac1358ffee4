//! In-process fan-out of "this key completed" notifications to waiting requests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::scope::RecordKey;

/// Wakes the [`Subscription`]s of a key when it completes or is released.
///
/// Each store owns one. The memory and SQLite stores call [`notify`](Self::notify) themselves;
/// shared stores call it from their one listener connection (Postgres `LISTEN`, Redis `SUBSCRIBE`)
/// for completions published by any process, so a process holds one listener whatever the number
/// of waiters.
#[derive(Debug, Default, Clone)]
pub struct CompletionNotifier {
    inner: Arc<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    waiting: Mutex<HashMap<RecordKey, Arc<Notify>>>,
    // Lets `notify` skip the lock when nobody waits, which is the common case.
    subscriptions: AtomicUsize,
}

impl CompletionNotifier {
    /// A notifier with no subscriptions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers interest in `key`.
    pub fn subscribe(&self, key: &RecordKey) -> Subscription {
        let mut waiting = self.inner.lock();
        let notify = waiting.entry(*key).or_default().clone();
        self.inner.subscriptions.fetch_add(1, Ordering::SeqCst);
        Subscription {
            notify: Some(notify),
            registration: Some((self.clone(), *key)),
        }
    }

    /// Wakes every current subscription of `key`.
    pub fn notify(&self, key: &RecordKey) {
        if self.inner.subscriptions.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(notify) = self.inner.lock().get(key) {
            notify.notify_waiters();
        }
    }

    /// Wakes every subscription of every key: used when a listener reconnects and may have missed
    /// notifications, so waiters look again instead of sleeping until their poll interval.
    pub fn notify_all(&self) {
        for notify in self.inner.lock().values() {
            notify.notify_waiters();
        }
    }

    /// How many keys have at least one subscription.
    pub fn waiting_keys(&self) -> usize {
        self.inner.lock().len()
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RecordKey, Arc<Notify>>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Interest in the next completion or release of one key.
///
/// Call [`notified`](Self::notified) *before* looking at the store, then await the returned
/// future: a notification sent after `notified` returned is never missed.
#[derive(Debug)]
pub struct Subscription {
    notify: Option<Arc<Notify>>,
    registration: Option<(CompletionNotifier, RecordKey)>,
}

impl Subscription {
    /// A subscription that is never notified, for stores that cannot notify: waiters then rely on
    /// the layer's polling fallback alone.
    pub fn never() -> Self {
        Self {
            notify: None,
            registration: None,
        }
    }

    /// Arms the subscription and returns a future that resolves on the next notification.
    pub fn notified(&self) -> impl Future<Output = ()> + Send + 'static {
        // `notify_waiters` wakes every `OwnedNotified` created before it, polled or not, so
        // creating it here is what arms the subscription.
        let armed = self.notify.clone().map(Notify::notified_owned);
        async move {
            match armed {
                Some(notified) => notified.await,
                None => std::future::pending().await,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let (Some(notify), Some((notifier, key))) = (self.notify.take(), self.registration.take())
        else {
            return;
        };
        let mut waiting = notifier.inner.lock();
        notifier.inner.subscriptions.fetch_sub(1, Ordering::SeqCst);
        // Clones are only made under this lock, so the count is exact: the map's handle and ours.
        if Arc::strong_count(&notify) == 2 {
            waiting.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Scope;
    use std::time::Duration;

    fn key(name: &[u8]) -> RecordKey {
        RecordKey::new(&Scope::anonymous(), name)
    }

    #[tokio::test]
    async fn a_notification_after_arming_is_not_missed() {
        let notifier = CompletionNotifier::new();
        let subscription = notifier.subscribe(&key(b"a"));
        let armed = subscription.notified();
        notifier.notify(&key(b"a"));
        tokio::time::timeout(Duration::from_secs(5), armed)
            .await
            .expect("armed subscription missed the notification");
    }

    #[tokio::test]
    async fn other_keys_do_not_wake_a_subscription() {
        let notifier = CompletionNotifier::new();
        let subscription = notifier.subscribe(&key(b"a"));
        let armed = subscription.notified();
        notifier.notify(&key(b"b"));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), armed)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn dropping_the_last_subscription_forgets_the_key() {
        let notifier = CompletionNotifier::new();
        let first = notifier.subscribe(&key(b"a"));
        let second = notifier.subscribe(&key(b"a"));
        assert_eq!(notifier.waiting_keys(), 1);
        drop(first);
        assert_eq!(notifier.waiting_keys(), 1);
        drop(second);
        assert_eq!(notifier.waiting_keys(), 0);
    }

    #[tokio::test]
    async fn notify_all_wakes_every_key() {
        let notifier = CompletionNotifier::new();
        let a = notifier.subscribe(&key(b"a"));
        let b = notifier.subscribe(&key(b"b"));
        let (armed_a, armed_b) = (a.notified(), b.notified());
        notifier.notify_all();
        tokio::time::timeout(Duration::from_secs(5), async {
            armed_a.await;
            armed_b.await;
        })
        .await
        .expect("notify_all must wake every subscription");
    }
}
