//! The connection that `LISTEN`s on the store's channel and hands every notification to the
//! [`CompletionNotifier`] (and forgets to the forget feed), with its health check and the
//! backoff that re-establishes it (see "Notifications" in the [`PostgresStore`] docs).
//!
//! [`PostgresStore`]: super::PostgresStore

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::oneshot;

use super::records;
use crate::scope::RecordKey;
use crate::store::{CompletionNotifier, ForgetSender};

/// First and longest wait before re-establishing a lost listener connection.
const LISTENER_MIN_BACKOFF: Duration = Duration::from_millis(100);
const LISTENER_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long an idle listener connection goes without a health check. A connection that died
/// without a FIN or RST (a failed-over server, a NAT that forgot it) would otherwise go
/// unnoticed for as long as the kernel's TCP timeout, with every notification lost meanwhile.
const LISTENER_HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// How long connecting the listener or its health check may take.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(10);

/// The notification channel of a table. A hash keeps it short and unambiguous (channel names
/// are identifiers, at most 63 bytes, and `a_b`.`c` must not collide with `a`.`b_c`).
pub(super) fn channel_name(schema: &str, table: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{schema}.{table}").as_bytes());
    format!("idempotency_{}", hex::encode(&digest[..8]))
}

/// A `LISTEN`ing connection on `channel`, in a one-connection pool of its own: a listener that
/// died is dropped with its pool and replaced by a new one, never waited for.
pub(super) async fn open_listener(
    options: &PgConnectOptions,
    channel: &str,
) -> Result<PgListener, sqlx::Error> {
    let connect = async {
        let options = options
            .clone()
            .application_name(&format!("tower-idempotency listener {channel}"));
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(LISTENER_TIMEOUT)
            .connect_with(options)
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        // Reconnecting is ours to do (see `listen`): `try_recv` then never awaits anything but
        // the socket, which keeps it safe to cancel.
        listener.eager_reconnect(false);
        listener.listen(channel).await?;
        Ok(listener)
    };
    tokio::time::timeout(LISTENER_TIMEOUT, connect)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// The listener task: hands every notification on `channel` to `notifier` until `stop` fires
/// (the store was dropped). Re-establishes a lost connection with exponential backoff, then
/// wakes every waiter, since notifications sent while it was down are lost.
pub(super) async fn listen(
    listener: PgListener,
    options: PgConnectOptions,
    channel: String,
    notifier: CompletionNotifier,
    forgets: ForgetSender,
    mut stop: oneshot::Receiver<()>,
) {
    let mut listener = Some(listener);
    let mut backoff = LISTENER_MIN_BACKOFF;
    loop {
        let Some(active) = listener.as_mut() else {
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(backoff) => {}
            }
            let reopened = tokio::select! {
                _ = &mut stop => return,
                reopened = open_listener(&options, &channel) => reopened,
            };
            match reopened {
                Ok(reopened) => {
                    tracing::info!(channel, "notification listener reconnected");
                    listener = Some(reopened);
                    backoff = LISTENER_MIN_BACKOFF;
                    notifier.notify_all();
                    forgets.unknown();
                }
                Err(error) => {
                    tracing::warn!(
                        channel, %error, retry_in = ?backoff,
                        "notification listener cannot reconnect"
                    );
                    backoff = (backoff * 2).min(LISTENER_MAX_BACKOFF);
                }
            }
            continue;
        };
        // Cancelling `try_recv` is safe here: with eager reconnection off it only awaits the
        // socket, whose reads sqlx makes cancel-safe.
        let received = tokio::select! {
            _ = &mut stop => return,
            received = active.try_recv() => Some(received),
            () = tokio::time::sleep(LISTENER_HEALTH_INTERVAL) => None,
        };
        let healthy = match received {
            Some(Ok(Some(notification))) => {
                deliver(&notifier, &forgets, notification.payload());
                true
            }
            Some(Ok(None)) => {
                tracing::warn!(channel, "notification listener lost its connection");
                false
            }
            Some(Err(error)) => {
                tracing::warn!(channel, %error, "notification listener failed");
                false
            }
            None => {
                let check = sqlx::query("SELECT 1").execute(&mut *active);
                match tokio::time::timeout(LISTENER_TIMEOUT, check).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(error)) => {
                        tracing::warn!(
                            channel, %error,
                            "notification listener failed its health check"
                        );
                        false
                    }
                    Err(_) => {
                        tracing::warn!(channel, "notification listener's health check timed out");
                        false
                    }
                }
            }
        };
        if !healthy {
            // Replaced by a fresh listener on the next turn, after a short wait; waiters are
            // woken once it is back (or right away by their own poll interval).
            listener = None;
            backoff = LISTENER_MIN_BACKOFF;
        }
    }
}

/// Wakes the subscribers of the key a notification names. A payload that is not a hex record
/// key (someone else's NOTIFY on our channel) is ignored.
fn deliver(notifier: &CompletionNotifier, forgets: &ForgetSender, payload: &str) {
    let (forgot, hex_key) = match payload.strip_prefix(records::FORGET_PREFIX) {
        Some(hex_key) => (true, hex_key),
        None => (false, payload),
    };
    let mut key = [0u8; 32];
    match hex::decode_to_slice(hex_key, &mut key) {
        Ok(()) => {
            let key = RecordKey::from_bytes(key);
            notifier.notify(&key);
            if forgot {
                forgets.forgot(&key);
            }
        }
        Err(_) => tracing::debug!(payload, "ignoring a notification that names no record key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql;

    #[test]
    fn channels_differ_per_table_and_fit_an_identifier() {
        let a = channel_name("a_b", "c");
        let b = channel_name("a", "b_c");
        assert_ne!(a, b);
        assert!(a.len() <= 63);
        assert!(sql::validate_identifier("channel", &a).is_ok());
    }

    #[test]
    fn notifications_with_foreign_payloads_are_ignored() {
        let (notifier, forgets) = (CompletionNotifier::new(), ForgetSender::default());
        let mut feed = forgets.feed();
        deliver(&notifier, &forgets, "not hex");
        deliver(&notifier, &forgets, "abcd");
        deliver(&notifier, &forgets, "forget:abcd");
        deliver(&notifier, &forgets, &"0".repeat(64));
        assert!(feed.try_recv().is_err(), "a completion is not a forget");
    }

    #[test]
    fn forget_notifications_reach_the_feed() {
        use crate::store::ForgetEvent;
        let (notifier, forgets) = (CompletionNotifier::new(), ForgetSender::default());
        let mut feed = forgets.feed();
        let key = RecordKey::from_bytes([7; 32]);
        deliver(&notifier, &forgets, &format!("forget:{}", key.to_hex()));
        assert_eq!(feed.try_recv().ok(), Some(ForgetEvent::Key(key)));
    }
}
