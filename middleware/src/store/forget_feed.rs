//! Forgets that reach every process sharing a store, for in-process caches of completed records.
//!
//! A completed record never changes until it expires or an operator forgets it on purpose
//! ([`IdempotencyStore::forget`](super::IdempotencyStore)). A process that caches completed
//! records to answer replays without a store round trip must drop a forgotten record at once,
//! whichever process forgot it: shared stores carry the news on the notification channel they
//! already have (PostgreSQL `NOTIFY`, Redis pub/sub; SQLite, which has none between processes, a
//! forget log read every 100 ms), and hand it to local caches through a [`ForgetFeed`].

use crate::scope::RecordKey;

/// What a [`ForgetFeed`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgetEvent {
    /// The record of this key was forgotten.
    Key(RecordKey),
    /// Events may have been missed (the store's listener reconnected, or the receiver lagged):
    /// treat every cached record as possibly forgotten.
    Unknown,
}

/// A receiver of [`ForgetEvent`]s. A lagged receiver (`RecvError::Lagged`) means the same as
/// [`ForgetEvent::Unknown`].
pub type ForgetFeed = tokio::sync::broadcast::Receiver<ForgetEvent>;
