//! What an operator sees of one record, and what forgetting it did: the answers of
//! [`IdempotencyStore::inspect`](super::IdempotencyStore::inspect) and
//! [`IdempotencyStore::forget`](super::IdempotencyStore::forget).

use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use super::{ForgetEvent, ForgetFeed, LeaseToken};
use crate::fingerprint::Fingerprint;
use crate::record::StoredResponse;
use crate::scope::RecordKey;

/// A live record, as [`IdempotencyStore::inspect`](super::IdempotencyStore::inspect) found it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RecordInfo {
    /// The fingerprint of the request that holds or held the key.
    pub fingerprint: Fingerprint,
    /// When the record stops being live, on the store's clock: the end of the lease while in
    /// flight, the end of the replay window once completed.
    pub expires_at: SystemTime,
    /// In flight or completed, with what each holds.
    pub state: RecordState,
}

/// The two states of a live record.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordState {
    /// A request holds a lease on the key.
    InFlight {
        /// The lease's fencing token.
        token: LeaseToken,
        /// Which run of the request holds it (1 for the first).
        attempt: u32,
        /// The name of the last checkpoint stored under the lease, if any.
        checkpoint: Option<String>,
    },
    /// The response replayed to retries.
    Completed {
        /// The stored response, body included.
        response: StoredResponse,
        /// The size of the stored response in its encoded form, in bytes.
        stored_bytes: usize,
    },
}

impl RecordInfo {
    /// A record read from a store. `pub(crate)`: only stores make these.
    pub(crate) fn new(
        fingerprint: Fingerprint,
        expires_at: SystemTime,
        state: RecordState,
    ) -> Self {
        Self {
            fingerprint,
            expires_at,
            state,
        }
    }

    /// A completed record holding `encoded` (a [`StoredResponse::encode`] form).
    pub(crate) fn completed(
        fingerprint: Fingerprint,
        expires_at: SystemTime,
        encoded: bytes::Bytes,
    ) -> Result<Self, super::StoreError> {
        let stored_bytes = encoded.len();
        let response = StoredResponse::decode(encoded)?;
        Ok(Self::new(
            fingerprint,
            expires_at,
            RecordState::Completed {
                response,
                stored_bytes,
            },
        ))
    }
}

/// What [`IdempotencyStore::forget`](super::IdempotencyStore::forget) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    /// No live record had the key: nothing changed.
    NotFound,
    /// The completed record was deleted: the next request with the key runs again.
    Completed,
    /// The in-flight lease was ended (`force`): its holder can no longer complete, renew,
    /// release or checkpoint it, and the next request with the key runs again.
    LeaseEnded {
        /// The token of the lease that was ended.
        token: LeaseToken,
        /// The run of the request that held it.
        attempt: u32,
    },
    /// The key is in flight and `force` was not given: nothing changed.
    InFlight {
        /// The token of the lease that holds the key.
        token: LeaseToken,
        /// The run of the request that holds it.
        attempt: u32,
    },
}

impl Forgotten {
    /// Whether a record was deleted.
    pub fn deleted(&self) -> bool {
        matches!(self, Self::Completed | Self::LeaseEnded { .. })
    }
}

/// How many forget events a slow feed receiver may fall behind before it lags (and must treat
/// every cached record as possibly forgotten).
const FEED_CAPACITY: usize = 1024;

/// The sending half of a store's [`ForgetFeed`]s.
#[derive(Debug, Clone)]
pub(crate) struct ForgetSender(broadcast::Sender<ForgetEvent>);

impl Default for ForgetSender {
    fn default() -> Self {
        Self(broadcast::channel(FEED_CAPACITY).0)
    }
}

impl ForgetSender {
    /// Tells every feed that `key` was forgotten.
    pub(crate) fn forgot(&self, key: &RecordKey) {
        // No receiver is not an error: no cache listens.
        let _ = self.0.send(ForgetEvent::Key(*key));
    }

    /// Tells every feed that forgets may have been missed.
    #[cfg_attr(
        not(any(feature = "postgres", feature = "redis", feature = "sqlite")),
        allow(dead_code)
    )]
    pub(crate) fn unknown(&self) {
        let _ = self.0.send(ForgetEvent::Unknown);
    }

    /// Whether any feed listens (a replay cache): otherwise there is no one to tell.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn is_heard(&self) -> bool {
        self.0.receiver_count() > 0
    }

    /// A new feed, receiving what is sent from now on.
    pub(crate) fn feed(&self) -> ForgetFeed {
        self.0.subscribe()
    }
}

/// `SystemTime::now() + (deadline - now)` for a deadline on tokio's monotonic clock.
#[cfg_attr(not(feature = "memory"), allow(dead_code))]
pub(crate) fn system_time_of(deadline: tokio::time::Instant) -> SystemTime {
    let now = tokio::time::Instant::now();
    SystemTime::now() + deadline.saturating_duration_since(now)
}

/// A Unix timestamp in milliseconds (SQLite's clock) as a `SystemTime`.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn unix_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A Unix timestamp in microseconds (Redis' `TIME`) as a `SystemTime`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn unix_micros(us: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(us)
}
