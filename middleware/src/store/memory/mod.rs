//! The in-process store.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{
    Begin, CompletionNotifier, ForgetFeed, ForgetSender, Forgotten, IdempotencyStore, LeaseToken,
    RecordInfo, RecordState, StoreError, Subscription, system_time_of,
};
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::StoredResponse;
use crate::scope::{DigestHasher, RecordKey};

const SHARDS: usize = 64;
/// Expired records removed inline per write, so a busy shard never needs a long sweep.
const INLINE_PURGE_BUDGET: usize = 8;
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// An in-process store: fast, and gone when the process exits.
///
/// Right for tests, development and a single instance that can afford to forget its records on
/// restart. Records live in 64 independently locked shards, so concurrent requests rarely contend;
/// responses are kept in their compact encoded form.
///
/// Expired records are removed by a background sweeper (started when the store is created inside
/// a tokio runtime; it stops when the last clone of the store is dropped) and a few at a time by
/// every write, so memory stays bounded by what is live.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// # drop(layer); }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    notifier: CompletionNotifier,
    forgets: ForgetSender,
    // One counter for every key keeps tokens increasing per key even across a record's deletion.
    next_token: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    records: HashMap<RecordKey, Record, BuildHasherDefault<DigestHasher>>,
    // Deadlines to revisit. Every record has one entry of its own (`Record::queued`), no later
    // than its deadline: when it comes due, the record is removed if its deadline has passed,
    // and otherwise queued again at that deadline. So a record whose deadline moves later (a
    // renewal; completion, whose `ttl` is usually the longer) pushes nothing on the request
    // path. Entries of records since removed or replaced (`queued` differs) are stale and are
    // dropped when they come due: the heap holds about one entry per record plus the records
    // removed within the last lease.
    deadlines: BinaryHeap<Reverse<(Instant, RecordKey)>>,
}

#[derive(Debug)]
struct Record {
    fingerprint: Fingerprint,
    state: State,
    /// When this record's entry in `Shard::deadlines` comes due: never later than its deadline.
    queued: Instant,
}

#[derive(Debug)]
enum State {
    InFlight {
        token: u64,
        lease_until: Instant,
        /// A lapsed lease is kept this long (twice the lease, like Redis) so that its takeover
        /// still counts the attempt and finds the recovery point.
        keep_until: Instant,
        attempt: u32,
        recovery_point: Option<Checkpoint>,
    },
    Completed {
        response: Bytes,
        expires_at: Instant,
    },
}

impl State {
    /// When a record in this state may be removed.
    fn deadline(&self) -> Instant {
        match *self {
            Self::InFlight { keep_until, .. } => keep_until,
            Self::Completed { expires_at, .. } => expires_at,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Configures a [`MemoryStore`]; from [`MemoryStore::builder`]. The other stores' builders
/// `connect`; this one has nothing to connect to, so it `build`s.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `.build()`"]
pub struct MemoryStoreBuilder {
    sweep_interval: Duration,
}

impl MemoryStoreBuilder {
    /// How often the sweeper removes expired records (default 1 s). Expired records are never
    /// replayed whatever this is; it bounds how long they take memory.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// An empty store. Inside a tokio runtime this also starts the expiry sweeper.
    pub fn build(self) -> MemoryStore {
        MemoryStore::with_sweep_interval(self.sweep_interval)
    }
}

impl MemoryStore {
    /// An empty store with every default. Inside a tokio runtime this also starts the expiry
    /// sweeper.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, to set the sweep interval.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }

    fn with_sweep_interval(interval: Duration) -> Self {
        let store = Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                notifier: CompletionNotifier::new(),
                forgets: ForgetSender::default(),
                next_token: AtomicU64::new(1),
            }),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&store.inner), interval));
        }
        store
    }

    /// Removes every expired record now; returns how many were removed.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        self.inner
            .shards
            .iter()
            .map(|shard| lock(shard).purge(now, usize::MAX))
            .sum()
    }

    /// The number of records held, live or awaiting removal.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|shard| lock(shard).records.len())
            .sum()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, Shard> {
        lock(&self.inner.shards[usize::from(key.as_bytes()[31]) % SHARDS])
    }

    /// Applies `change` to the in-flight record of `key` held by `token`.
    fn with_lease<T>(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        change: impl FnOnce(&mut Shard, Instant) -> T,
    ) -> Result<T, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.records.get(key) {
            Some(Record {
                state: State::InFlight { token: held, .. },
                ..
            }) if *held == token.0 => Ok(change(&mut shard, now)),
            _ => Err(StoreError::LeaseLost),
        }
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Every change to a shard is a single map or heap operation: a panic cannot leave it torn.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shard {
    /// Puts the record of `key`, taking over the entry of the record it replaces when that one
    /// comes due no later than the new deadline.
    fn set(&mut self, key: RecordKey, fingerprint: Fingerprint, state: State) {
        let deadline = state.deadline();
        let queued = match self.records.get(&key) {
            Some(earlier) if earlier.queued <= deadline => earlier.queued,
            _ => {
                self.deadlines.push(Reverse((deadline, key)));
                deadline
            }
        };
        let record = Record {
            fingerprint,
            state,
            queued,
        };
        self.records.insert(key, record);
    }

    fn purge(&mut self, now: Instant, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget {
            match self.deadlines.peek() {
                Some(Reverse((deadline, _))) if *deadline <= now => {}
                _ => break,
            }
            let Some(Reverse((due, key))) = self.deadlines.pop() else {
                break;
            };
            let Some(record) = self.records.get_mut(&key) else {
                continue; // Removed since: a stale entry.
            };
            if record.queued != due {
                continue; // Replaced, or queued again earlier: a stale entry.
            }
            let deadline = record.state.deadline();
            if deadline <= now {
                self.records.remove(&key);
                removed += 1;
            } else {
                record.queued = deadline;
                self.deadlines.push(Reverse((deadline, key)));
            }
        }
        removed
    }
}

async fn sweep(store: Weak<Inner>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = store.upgrade() else { return };
        MemoryStore { inner }.purge_expired();
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let (mut attempt, mut recovery_point) = (1, None);
        if let Some(record) = shard.records.get_mut(key) {
            match &mut record.state {
                State::InFlight { lease_until, .. } if *lease_until > now => {
                    return Ok(if record.fingerprint == *fingerprint {
                        Begin::InFlight
                    } else {
                        Begin::Mismatch
                    });
                }
                State::Completed {
                    response,
                    expires_at,
                } if *expires_at > now => {
                    if record.fingerprint != *fingerprint {
                        return Ok(Begin::Mismatch);
                    }
                    let (response, expires_in) = (response.clone(), *expires_at - now);
                    drop(shard);
                    return Ok(Begin::Completed {
                        response: StoredResponse::decode(response)?,
                        expires_in,
                    });
                }
                // A lapsed lease of the same request: this is its next attempt, and resumes where
                // it got to.
                State::InFlight {
                    attempt: previous,
                    recovery_point: point,
                    ..
                } if record.fingerprint == *fingerprint => {
                    attempt = previous.saturating_add(1);
                    recovery_point = point.take();
                }
                // Expired record, or another request's lapsed lease: taken over below.
                _ => {}
            }
        }
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        shard.purge(now, INLINE_PURGE_BUDGET);
        shard.set(
            *key,
            *fingerprint,
            State::InFlight {
                token,
                lease_until: now + lock_ttl,
                keep_until: now + lock_ttl.saturating_mul(2),
                attempt,
                recovery_point: recovery_point.clone(),
            },
        );
        Ok(Begin::Acquired {
            token: LeaseToken(token),
            attempt,
            recovery_point,
        })
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let encoded = response.encode();
        self.with_lease(key, token, |shard, now| {
            let fingerprint = shard.records[key].fingerprint;
            shard.set(
                *key,
                fingerprint,
                State::Completed {
                    response: encoded,
                    expires_at: now + ttl,
                },
            );
        })?;
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        self.with_lease(key, token, |shard, _| {
            if let Some(Record {
                state: State::InFlight { recovery_point, .. },
                ..
            }) = shard.records.get_mut(key)
            {
                *recovery_point = Some(checkpoint.clone());
            }
        })
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.with_lease(key, token, |shard, _| shard.records.remove(key))?;
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.with_lease(key, token, |shard, now| {
            let lease_until = now + lock_ttl;
            let keep_until = now + lock_ttl.saturating_mul(2);
            let Some(record) = shard.records.get_mut(key) else {
                return;
            };
            if let State::InFlight {
                lease_until: at,
                keep_until: keep,
                ..
            } = &mut record.state
            {
                *at = lease_until;
                *keep = keep_until;
            }
            // A shorter lease than before (a late outcome's last stretch) comes due earlier.
            if keep_until < record.queued {
                record.queued = keep_until;
                shard.deadlines.push(Reverse((keep_until, *key)));
            }
        })
    }

    fn subscribe(&self, key: &RecordKey) -> Subscription {
        self.inner.notifier.subscribe(key)
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let now = Instant::now();
        let shard = self.shard(key);
        let Some(record) = shard.records.get(key) else {
            return Ok(None);
        };
        match &record.state {
            State::InFlight {
                token,
                lease_until,
                attempt,
                recovery_point,
                ..
            } if *lease_until > now => Ok(Some(RecordInfo::new(
                record.fingerprint,
                system_time_of(*lease_until),
                RecordState::InFlight {
                    token: LeaseToken(*token),
                    attempt: *attempt,
                    checkpoint: recovery_point.as_ref().map(|p| p.name().to_owned()),
                },
            ))),
            State::Completed {
                response,
                expires_at,
            } if *expires_at > now => {
                let (fingerprint, response, expires_at) =
                    (record.fingerprint, response.clone(), *expires_at);
                drop(shard);
                RecordInfo::completed(fingerprint, system_time_of(expires_at), response).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forgotten, StoreError> {
        let now = Instant::now();
        let forgotten = {
            let mut shard = self.shard(key);
            let found = match shard.records.get(key).map(|record| &record.state) {
                Some(State::InFlight {
                    token,
                    lease_until,
                    attempt,
                    ..
                }) if *lease_until > now => {
                    let (token, attempt) = (LeaseToken(*token), *attempt);
                    if force {
                        Forgotten::LeaseEnded { token, attempt }
                    } else {
                        Forgotten::InFlight { token, attempt }
                    }
                }
                Some(State::Completed { expires_at, .. }) if *expires_at > now => {
                    Forgotten::Completed
                }
                _ => Forgotten::NotFound,
            };
            if found.deleted() {
                shard.records.remove(key);
            }
            found
        };
        if forgotten.deleted() {
            self.inner.notifier.notify(key);
            self.inner.forgets.forgot(key);
        }
        Ok(forgotten)
    }

    fn forget_feed(&self) -> Option<ForgetFeed> {
        Some(self.inner.forgets.feed())
    }
}

#[cfg(test)]
mod tests;
