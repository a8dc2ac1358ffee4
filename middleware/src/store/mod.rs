//! The store contract and its backends.
//!
//! A store keeps one record per [`RecordKey`]. A record is either **in flight** (a request holds
//! a lease on it) or **completed** (it holds the response to replay). Every backend implements
//! [`IdempotencyStore`] and passes the same `conformance` suite (feature `conformance`).
//!
//! | backend | feature | shared by | waiters woken by | expiry |
//! |---|---|---|---|---|
//! | [`MemoryStore`] | `memory` | one process | in-process notify | sweeper task |
//! | `SqliteStore` | `sqlite` | one process | in-process notify | `expires_at` + reaper |
//! | `PostgresStore` | `postgres` | a fleet | `LISTEN`/`NOTIFY` | `expires_at` + reaper |
//! | `RedisStore` | `redis` | a fleet | pub/sub | key TTL |

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::BoxError;
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::{DecodeError, StoredResponse};
use crate::scope::RecordKey;

mod forget_feed;
mod notify;
mod records;
pub use forget_feed::{ForgetEvent, ForgetFeed};
pub use notify::{CompletionNotifier, Subscription};
#[allow(unused_imports)]
pub(crate) use records::{ForgetSender, system_time_of, unix_micros, unix_millis};
pub use records::{Forgotten, RecordInfo, RecordState};

#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "memory")]
pub use memory::{MemoryStore, MemoryStoreBuilder};

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use redis::{RedisStore, RedisStoreBuilder, is_valid_key_prefix};

#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use sql::REAPED_RECORDS_TOTAL;
#[cfg(feature = "postgres")]
pub use sql::{InvalidIdentifier, validate_identifier as validate_sql_identifier};

#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod batch;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use batch::STORE_BATCH_SIZE;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresStore, PostgresStoreBuilder};

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
mod sqlite_batch;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteStore, SqliteStoreBuilder};

/// The fencing token of a lease.
///
/// Stores compare tokens for equality, but their order carries a promise: a token issued for a
/// key is larger than every token issued for that key before it while the record exists (a
/// takeover gets a larger token than the lease it replaces), and larger than the tokens of the
/// key's earlier, since deleted, records too. Stores keep the second half with a counter that
/// outlives records (the memory store's process-wide counter, SQLite's counter row, a PostgreSQL
/// sequence) or a clock (Redis: the server's microsecond clock, so it holds unless that clock
/// steps back by more than the time between two records of one key). A stale holder therefore
/// cannot complete, renew or release a lease that was taken over or re-acquired after it lost its
/// own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseToken(pub u64);

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// No live record existed (or the previous holder's lease had expired): the caller now holds
    /// the lease and must run the request, then `complete` or `release`.
    Acquired {
        /// The fencing token to pass to `complete`, `renew`, `release` and `checkpoint`.
        token: LeaseToken,
        /// 1 for the first run of the request; `n` when this takes over the lapsed lease of the
        /// `n - 1`-th run of the same request (same fingerprint).
        attempt: u32,
        /// The last checkpoint an earlier run of the same request stored, if any.
        recovery_point: Option<Checkpoint>,
    },
    /// A completed record with the same fingerprint: replay it.
    Completed {
        /// The response the record holds.
        response: StoredResponse,
        /// How long the store still keeps the record, counted from when it answered, by its own
        /// clock (the database's or Redis's, not the caller's): a retry within this time replays;
        /// after it the key may run again. Never longer than what is left of the `ttl` given to
        /// `complete`.
        expires_in: Duration,
    },
    /// Another request with the same fingerprint holds a live lease.
    InFlight,
    /// A live record (in flight or completed) has a different fingerprint: the key was reused for
    /// a different request.
    Mismatch,
}

impl Begin {
    /// The stored response, when this is [`Begin::Completed`].
    pub fn completed(&self) -> Option<&StoredResponse> {
        match self {
            Self::Completed { response, .. } => Some(response),
            _ => None,
        }
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The token no longer holds the lease: it expired and was taken over, the record was
    /// completed or released, or it expired and was re-acquired.
    #[error("the lease is no longer held by this token")]
    LeaseLost,
    /// A stored record could not be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] DecodeError),
    /// The operation did not finish within the store timeout.
    #[error("store operation timed out after {0:?}")]
    Timeout(Duration),
    /// The backend failed: unreachable, refused, or returned an unexpected answer.
    #[error("store backend error: {0}")]
    Backend(#[source] BoxError),
    /// The store does not implement this operation (a third-party store that predates it).
    #[error("this store does not support {0}")]
    Unsupported(&'static str),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(error: impl Into<BoxError>) -> Self {
        Self::Backend(error.into())
    }
}

/// Storage for idempotency records, with leases and fencing.
///
/// # Contract
///
/// Every implementation must uphold the following; the `conformance` suite (feature
/// `conformance`) checks each point against a real instance of the backend.
///
/// * **Atomic begin.** Of any number of concurrent `begin` calls for one key, at most one returns
///   [`Begin::Acquired`] while its lease is live. The others see `InFlight` (same fingerprint) or
///   `Mismatch` (different fingerprint).
/// * **Lease expiry and takeover.** A lease not renewed for `lock_ttl` expires. The next `begin`
///   for the key acquires it, whatever that request's fingerprint, with a token larger than the
///   expired one (see [`LeaseToken`]).
/// * **Fencing.** `complete`, `renew` and `release` succeed only for the token of the current,
///   in-flight lease; any other token gets [`StoreError::LeaseLost`] and changes nothing. A lease
///   whose `lock_ttl` passed without a takeover *may* still be completed, renewed or released by
///   its holder (stores differ on how long they keep such a lease; callers must not rely on it).
/// * **Replay.** After `complete`, `begin` with the same fingerprint returns
///   [`Begin::Completed`] with the stored status, headers (all values, in order) and body, for
///   `ttl` after completion; with another fingerprint it returns `Mismatch`. After `ttl` the record
///   is gone and `begin` acquires afresh.
/// * **Attempts and recovery points.** A `begin` that takes over the lapsed lease of a request
///   with the same fingerprint returns `attempt` one more than that lease's, and the last
///   checkpoint stored under it (or under any earlier lease of the record); every other
///   acquisition (a free key, an expired completed record, a lapsed lease of another request)
///   returns attempt 1 and no recovery point. `checkpoint` replaces the record's recovery point
///   only for the token of the current, in-flight lease (else [`StoreError::LeaseLost`], nothing
///   changed), and never changes the lease's deadline. A recovery point lives as long as the
///   in-flight record holding it: `complete` and `release` drop it, and so does the removal of
///   a lapsed lease nobody took over (see each store for how long that is kept).
/// * **Release.** After `release`, the key is free: the next `begin` acquires.
/// * **Notification.** `complete` and `release` wake every [`Subscription`] of the key in this
///   process, and (for shared stores) those in every other process that has since called
///   [`watch`](IdempotencyStore::watch) on the key while it was in flight, usually within
///   milliseconds. A subscription is armed from the moment [`Subscription::notified`] returns, so
///   the sequence *arm, begin, await* never misses a completion that happens after `begin`.
///   Wake-ups may be spurious (a shared store's listener that reconnected wakes everyone, since
///   it may have missed messages): a waiter looks at the store again rather than assume.
/// * **Expiry is enforced on read**: an expired record is never replayed, whether or not a
///   background task has deleted it yet, and expired records do not accumulate without bound.
/// * **Independence.** Records of different keys never affect each other.
/// * **Inspect.** `inspect` returns the live record of a key (a lapsed lease or an expired
///   record is not live: `None`), with its fingerprint, its deadline, and either the lease's
///   token and attempt or the stored response; it changes nothing.
/// * **Forget.** `forget` deletes a live completed record (the next `begin` acquires afresh);
///   a live in-flight record only with `force`, which ends the lease: its holder then gets
///   [`StoreError::LeaseLost`] from `complete`, `renew`, `release` and `checkpoint`, and the
///   key's subscribers are woken. Without `force` an in-flight record is left as it is and
///   reported as [`Forgotten::InFlight`]. A deleted record is announced on every
///   [`forget_feed`](IdempotencyStore::forget_feed) of every process sharing the store.
///
/// # Implementing a store
///
/// Implement the five required methods with `#[async_trait]`; [`CompletionNotifier`] wakes the
/// subscribers of a store that notifies within one process. With the `conformance` feature (in
/// `[dev-dependencies]`), your tests run the contract suite on your store. Here, a store that
/// counts the leases it grants, around any other store:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
///
/// use async_trait::async_trait;
/// use tower_idempotency::fingerprint::Fingerprint;
/// use tower_idempotency::store::Subscription;
/// use tower_idempotency::{
///     Begin, Checkpoint, IdempotencyLayer, IdempotencyStore, LeaseToken, MemoryStore, RecordKey,
///     StoreError, StoredResponse,
/// };
///
/// struct Counting<S> {
///     inner: S,
///     leases: AtomicU64,
/// }
///
/// #[async_trait]
/// impl<S: IdempotencyStore> IdempotencyStore for Counting<S> {
///     async fn begin(
///         &self,
///         key: &RecordKey,
///         fingerprint: &Fingerprint,
///         lock_ttl: Duration,
///     ) -> Result<Begin, StoreError> {
///         let found = self.inner.begin(key, fingerprint, lock_ttl).await?;
///         if let Begin::Acquired { .. } = found {
///             self.leases.fetch_add(1, Ordering::Relaxed);
///         }
///         Ok(found)
///     }
///
///     async fn complete(
///         &self,
///         key: &RecordKey,
///         token: LeaseToken,
///         response: &StoredResponse,
///         ttl: Duration,
///     ) -> Result<(), StoreError> {
///         self.inner.complete(key, token, response, ttl).await
///     }
///
///     async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
///         self.inner.release(key, token).await
///     }
///
///     async fn renew(
///         &self,
///         key: &RecordKey,
///         token: LeaseToken,
///         lock_ttl: Duration,
///     ) -> Result<(), StoreError> {
///         self.inner.renew(key, token, lock_ttl).await
///     }
///
///     async fn checkpoint(
///         &self,
///         key: &RecordKey,
///         token: LeaseToken,
///         checkpoint: &Checkpoint,
///     ) -> Result<(), StoreError> {
///         self.inner.checkpoint(key, token, checkpoint).await
///     }
///
///     fn subscribe(&self, key: &RecordKey) -> Subscription {
///         self.inner.subscribe(key)
///     }
///
///     // Operators' inspect and forget (the defaults say "unsupported", which the suite refuses).
///     async fn inspect(
///         &self,
///         key: &RecordKey,
///     ) -> Result<Option<tower_idempotency::store::RecordInfo>, StoreError> {
///         self.inner.inspect(key).await
///     }
///
///     async fn forget(
///         &self,
///         key: &RecordKey,
///         force: bool,
///     ) -> Result<tower_idempotency::store::Forgotten, StoreError> {
///         self.inner.forget(key, force).await
///     }
///
///     fn forget_feed(&self) -> Option<tower_idempotency::store::ForgetFeed> {
///         self.inner.forget_feed()
///     }
///
///     // A shared store also implements `watch` (and `ping`); these have defaults.
///     async fn watch(&self, key: &RecordKey) -> Result<bool, StoreError> {
///         self.inner.watch(key).await
///     }
/// }
///
/// fn counting() -> Counting<MemoryStore> {
///     Counting { inner: MemoryStore::new(), leases: AtomicU64::new(0) }
/// }
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 4)] async fn main() {
/// let layer = IdempotencyLayer::new(counting());
/// # drop(layer);
/// // In your tests (`tests/conformance.rs`), one `#[tokio::test]` per check:
/// //     tower_idempotency::store_conformance_tests!(|| async { counting() });
/// // or every check in one test, as here:
/// # #[cfg(feature = "conformance")]
/// tower_idempotency::store_conformance_run_all!(|| async { counting() }).await;
/// # }
/// ```
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Looks up `key` and, if it is free, takes a lease on it for `lock_ttl`. One round trip.
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError>;

    /// Stores `response` for `ttl` if `token` still holds the lease, and wakes subscribers.
    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Stores `checkpoint` as the record's recovery point if `token` still holds the in-flight
    /// lease; the next takeover of the same request gets it in [`Begin::Acquired`].
    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError>;

    /// Gives the lease up without storing a response, so a retry runs again; wakes subscribers.
    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError>;

    /// Extends the lease to `lock_ttl` from now if `token` still holds it.
    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Registers interest in the next completion or release of `key`.
    fn subscribe(&self, key: &RecordKey) -> Subscription;

    /// Tells the store that a request of this process waits for the in-flight `key`: a shared
    /// store then publishes its completion or release to other processes (stores publish only for
    /// watched keys, so that requests nobody waits for cost no notification). Returns whether the
    /// key is still in flight; `false` means look again at once.
    ///
    /// The default, for stores that notify within one process, does nothing and returns `true`.
    async fn watch(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let _ = key;
        Ok(true)
    }

    /// Checks that the store can be reached (for readiness probes).
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The live record of `key`, for operators: state, deadline, lease or stored response.
    /// Changes nothing. The default says the store does not support it.
    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let _ = key;
        Err(StoreError::Unsupported("inspecting records"))
    }

    /// Deletes the live completed record of `key`, or (only with `force`) ends its in-flight
    /// lease; announces it on every [`forget_feed`](Self::forget_feed). See the contract above.
    /// The default says the store does not support it.
    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forgotten, StoreError> {
        let _ = (key, force);
        Err(StoreError::Unsupported("forgetting records"))
    }

    /// Records forgotten on purpose by any process sharing this store, as they happen, for
    /// in-process caches of completed records (see [`ForgetFeed`]). `None`, the default: this
    /// store cannot tell, and no cache may answer replays of its records.
    fn forget_feed(&self) -> Option<ForgetFeed> {
        None
    }
}

macro_rules! forward_store_impl {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: IdempotencyStore + ?Sized> IdempotencyStore for $ty {
            async fn begin(
                &self,
                key: &RecordKey,
                fingerprint: &Fingerprint,
                lock_ttl: Duration,
            ) -> Result<Begin, StoreError> {
                (**self).begin(key, fingerprint, lock_ttl).await
            }

            async fn complete(
                &self,
                key: &RecordKey,
                token: LeaseToken,
                response: &StoredResponse,
                ttl: Duration,
            ) -> Result<(), StoreError> {
                (**self).complete(key, token, response, ttl).await
            }

            async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
                (**self).release(key, token).await
            }

            async fn checkpoint(
                &self,
                key: &RecordKey,
                token: LeaseToken,
                checkpoint: &Checkpoint,
            ) -> Result<(), StoreError> {
                (**self).checkpoint(key, token, checkpoint).await
            }

            async fn renew(
                &self,
                key: &RecordKey,
                token: LeaseToken,
                lock_ttl: Duration,
            ) -> Result<(), StoreError> {
                (**self).renew(key, token, lock_ttl).await
            }

            fn subscribe(&self, key: &RecordKey) -> Subscription {
                (**self).subscribe(key)
            }

            async fn watch(&self, key: &RecordKey) -> Result<bool, StoreError> {
                (**self).watch(key).await
            }

            async fn ping(&self) -> Result<(), StoreError> {
                (**self).ping().await
            }

            fn forget_feed(&self) -> Option<ForgetFeed> {
                (**self).forget_feed()
            }

            async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
                (**self).inspect(key).await
            }

            async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forgotten, StoreError> {
                (**self).forget(key, force).await
            }
        }
    )*};
}

forward_store_impl!(Arc<S>, Box<S>);

/// Any store, chosen at run time (for example from configuration).
///
/// Use this rather than `Arc<dyn IdempotencyStore>` as the layer's store type: the compiler cannot
/// prove the futures of a service stack generic over `dyn IdempotencyStore + 'static` to be `Send`
/// (the trait object's lifetime is erased inside async blocks, a known limitation), while a plain
/// struct has no lifetime to erase.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_idempotency::store::DynStore;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let store = DynStore::new(MemoryStore::new());
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer); }
/// ```
#[derive(Clone)]
pub struct DynStore(Arc<dyn IdempotencyStore>);

impl DynStore {
    /// Wraps a store.
    pub fn new(store: impl IdempotencyStore) -> Self {
        Self(Arc::new(store))
    }
}

#[async_trait]
impl IdempotencyStore for DynStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        (*self.0).begin(key, fingerprint, lock_ttl).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        (*self.0).complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        (*self.0).release(key, token).await
    }

    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        (*self.0).checkpoint(key, token, checkpoint).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        (*self.0).renew(key, token, lock_ttl).await
    }

    fn subscribe(&self, key: &RecordKey) -> Subscription {
        (*self.0).subscribe(key)
    }

    async fn watch(&self, key: &RecordKey) -> Result<bool, StoreError> {
        (*self.0).watch(key).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        (*self.0).ping().await
    }

    fn forget_feed(&self) -> Option<ForgetFeed> {
        (*self.0).forget_feed()
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        (*self.0).inspect(key).await
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forgotten, StoreError> {
        (*self.0).forget(key, force).await
    }
}
