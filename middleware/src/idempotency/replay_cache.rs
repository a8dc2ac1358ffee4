//! Completed records kept in process, so that a replay needs no store round trip.
//!
//! A completed record never changes until it expires or is forgotten on purpose, so a copy can
//! answer replays as well as the store would. A record is cached when a replay of it is read
//! from the store: the keys that are replayed once are the ones replayed again (a client's retry
//! loop, a fleet's retries), and a new key pays one look-up that misses, nothing more (caching
//! every completed record cost the memory store's new keys a tenth of their throughput, for
//! replays most records never get). The copy
//!
//! * never outlives the record: each entry expires at an instant taken *before* the `begin`
//!   call that read it, plus the time the store said the record had left, so it dies no later
//!   than the record;
//! * is dropped when any process forgets the record: the store's [`ForgetFeed`] is drained
//!   before every look-up, [`ForgetEvent::Unknown`] or a lagged feed clears everything, and a
//!   record read while a forget event arrived is not cached at all;
//! * exists only for stores that have a feed: without one ([`IdempotencyStore::forget_feed`]
//!   returns `None`) the cache stays off.
//!
//! The cache is bounded by entries and by bytes (body, headers and bookkeeping); the oldest
//! entries go first.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::TryRecvError;

use crate::fingerprint::Fingerprint;
use crate::record::StoredResponse;
use crate::scope::{DigestHasher, RecordKey};
use crate::store::{ForgetEvent, ForgetFeed, IdempotencyStore};

/// Bounds of the in-process replay cache ([`IdempotencyLayer::replay_cache`]); the
/// [`Default`] is [`ReplayCacheLimits::DEFAULT`].
///
/// [`IdempotencyLayer::replay_cache`]: super::IdempotencyLayer::replay_cache
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayCacheLimits {
    /// Most records kept; 0 turns the cache off.
    pub max_entries: usize,
    /// Most bytes kept (bodies, headers, bookkeeping); 0 turns the cache off.
    pub max_bytes: usize,
}

impl ReplayCacheLimits {
    /// What a layer starts with: the 10,000 records most recently replayed from the store, 16 MiB
    /// at most.
    /// Enough for the retries that follow a lost response; small beside a process's other
    /// buffers.
    pub const DEFAULT: Self = Self {
        max_entries: 10_000,
        max_bytes: 16 << 20,
    };
    /// No cache: every replay asks the store.
    pub const OFF: Self = Self {
        max_entries: 0,
        max_bytes: 0,
    };
}

impl Default for ReplayCacheLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Bookkeeping counted per entry on top of its headers and body.
const ENTRY_OVERHEAD: usize = 160;

/// What a look-up found.
pub(crate) enum Cached {
    /// The same request completed: replay this; the record is kept at least `expires_in` more.
    Replay {
        response: StoredResponse,
        expires_in: Duration,
    },
    /// The key was completed for a different request.
    Mismatch,
}

/// A moment in the feed's history, taken before a `begin` call: the record it reads is cached only
/// if no forget arrived since.
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    forgets_seen: u64,
    taken: Instant,
}

pub(crate) struct ReplayCache {
    limits: ReplayCacheLimits,
    state: Mutex<State>,
}

struct State {
    /// `None` once the store's feed closed: nothing can be cached safely any more.
    feed: Option<ForgetFeed>,
    /// Forget events received so far (any key).
    forgets_seen: u64,
    entries: HashMap<RecordKey, Entry, BuildHasherDefault<DigestHasher>>,
    /// Keys in the order they were filled, with the fill's sequence number (stale pairs, whose
    /// entry was replaced or dropped, are skipped).
    order: VecDeque<(RecordKey, u64)>,
    next_seq: u64,
    bytes: usize,
}

struct Entry {
    fingerprint: Fingerprint,
    response: StoredResponse,
    expires: Instant,
    size: usize,
    seq: u64,
}

impl ReplayCache {
    /// A cache for `store`, or `None` when the limits turn it off or the store cannot report
    /// forgets.
    pub(crate) fn new<St: IdempotencyStore>(store: &St, limits: ReplayCacheLimits) -> Option<Self> {
        if limits.max_entries == 0 || limits.max_bytes == 0 {
            return None;
        }
        let feed = store.forget_feed()?;
        Some(Self {
            limits,
            state: Mutex::new(State {
                feed: Some(feed),
                forgets_seen: 0,
                entries: HashMap::default(),
                order: VecDeque::new(),
                next_seq: 0,
                bytes: 0,
            }),
        })
    }

    /// The completed record of `key`, if cached and unexpired; otherwise the [`Mark`] to
    /// [`fill`](Self::fill) with what the `begin` call made next reads (one lock for both).
    pub(crate) fn get(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Result<Cached, Mark> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.apply_forgets();
        let now = Instant::now();
        let mark = Mark {
            forgets_seen: state.forgets_seen,
            taken: now,
        };
        let Some(entry) = state.entries.get(key) else {
            return Err(mark);
        };
        if now >= entry.expires {
            state.remove(key);
            return Err(mark);
        }
        Ok(if entry.fingerprint == *fingerprint {
            Cached::Replay {
                response: entry.response.clone(),
                expires_in: entry.expires - now,
            }
        } else {
            Cached::Mismatch
        })
    }

    /// To be taken just before the `begin` call whose record [`fill`](Self::fill) caches.
    pub(crate) fn mark(&self) -> Mark {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.apply_forgets();
        Mark {
            forgets_seen: state.forgets_seen,
            taken: Instant::now(),
        }
    }

    /// Caches a completed record for `lifetime` from `mark`, unless a forget arrived since `mark`
    /// (it may concern this record: skipping is always safe). `lifetime` is the time the store
    /// said the record has left, in a `begin` call started after `mark`: measured after `mark`
    /// was taken, so the entry never outlives the record.
    pub(crate) fn fill(
        &self,
        mark: Mark,
        key: RecordKey,
        fingerprint: Fingerprint,
        response: &StoredResponse,
        lifetime: Duration,
    ) {
        let Some(expires) = mark.taken.checked_add(lifetime) else {
            return;
        };
        self.insert(mark.forgets_seen, key, fingerprint, response, expires);
    }

    fn insert(
        &self,
        forgets_seen: u64,
        key: RecordKey,
        fingerprint: Fingerprint,
        response: &StoredResponse,
        expires: Instant,
    ) {
        let size = ENTRY_OVERHEAD + response.body.len() + header_bytes(response);
        if size > self.limits.max_bytes {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.apply_forgets();
        if state.feed.is_none() || state.forgets_seen != forgets_seen {
            return;
        }
        state.remove(&key);
        while state.entries.len() >= self.limits.max_entries
            || state.bytes + size > self.limits.max_bytes
        {
            if !state.evict_oldest() {
                break;
            }
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.bytes += size;
        state.order.push_back((key, seq));
        state.entries.insert(
            key,
            Entry {
                fingerprint,
                response: response.clone(),
                expires,
                size,
                seq,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }
}

impl State {
    /// Applies every forget the feed has delivered.
    fn apply_forgets(&mut self) {
        loop {
            let Some(feed) = self.feed.as_mut() else {
                return;
            };
            match feed.try_recv() {
                Ok(ForgetEvent::Key(key)) => {
                    self.forgets_seen += 1;
                    self.remove(&key);
                }
                Ok(ForgetEvent::Unknown) | Err(TryRecvError::Lagged(_)) => {
                    self.forgets_seen += 1;
                    self.clear();
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Closed) => {
                    // No more news of forgets: stop caching for good.
                    self.feed = None;
                    self.forgets_seen += 1;
                    self.clear();
                    return;
                }
            }
        }
    }

    fn remove(&mut self, key: &RecordKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes -= entry.size;
        }
        // Stale pairs in `order` are skipped on eviction; compact when they pile up.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order
                .retain(|(key, seq)| entries.get(key).is_some_and(|entry| entry.seq == *seq));
        }
    }

    fn evict_oldest(&mut self) -> bool {
        while let Some((key, seq)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|entry| entry.seq == seq) {
                self.remove(&key);
                return true;
            }
        }
        false
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

fn header_bytes(response: &StoredResponse) -> usize {
    response
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use tokio::sync::broadcast;

    use super::*;

    fn key(n: u8) -> RecordKey {
        RecordKey::from_bytes([n; 32])
    }

    fn response(body: &'static str) -> StoredResponse {
        StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), Bytes::from(body))
    }

    fn cache(limits: ReplayCacheLimits) -> (ReplayCache, broadcast::Sender<ForgetEvent>) {
        let (sender, feed) = broadcast::channel(4);
        let cache = ReplayCache {
            limits,
            state: Mutex::new(State {
                feed: Some(feed),
                forgets_seen: 0,
                entries: HashMap::default(),
                order: VecDeque::new(),
                next_seq: 0,
                bytes: 0,
            }),
        };
        (cache, sender)
    }

    const ROOMY: ReplayCacheLimits = ReplayCacheLimits {
        max_entries: 100,
        max_bytes: 1 << 20,
    };
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn replays_the_same_request_and_refuses_another() {
        let (cache, _feed) = cache(ROOMY);
        let (same, other) = (
            Fingerprint::from_bytes([1; 32]),
            Fingerprint::from_bytes([2; 32]),
        );
        cache.fill(cache.mark(), key(1), same, &response("ok"), HOUR);
        assert!(
            matches!(cache.get(&key(1), &same), Ok(Cached::Replay { response, .. }) if response.body == "ok")
        );
        assert!(matches!(cache.get(&key(1), &other), Ok(Cached::Mismatch)));
        assert!(cache.get(&key(2), &same).is_err());
    }

    #[test]
    fn an_expired_record_is_never_replayed() {
        let (cache, _feed) = cache(ROOMY);
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        cache.fill(
            cache.mark(),
            key(1),
            fingerprint,
            &response("ok"),
            Duration::ZERO,
        );
        assert!(cache.get(&key(1), &fingerprint).is_err());
        assert_eq!(cache.len(), 0, "dropped when found expired");
    }

    #[test]
    fn a_forget_during_complete_keeps_the_record_out() {
        let (cache, feed) = cache(ROOMY);
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        let mark = cache.mark();
        feed.send(ForgetEvent::Key(key(9))).expect("send");
        cache.fill(mark, key(1), fingerprint, &response("ok"), HOUR);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_lagged_feed_clears_everything() {
        let (cache, feed) = cache(ROOMY);
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        cache.fill(cache.mark(), key(1), fingerprint, &response("ok"), HOUR);
        for n in 0..10 {
            feed.send(ForgetEvent::Key(key(100 + n))).expect("send");
        }
        assert!(cache.get(&key(1), &fingerprint).is_err());
    }

    #[test]
    fn a_closed_feed_turns_the_cache_off() {
        let (cache, feed) = cache(ROOMY);
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        drop(feed);
        cache.fill(cache.mark(), key(1), fingerprint, &response("ok"), HOUR);
        assert!(cache.get(&key(1), &fingerprint).is_err());
    }

    #[test]
    fn bounded_by_entries_and_bytes_oldest_first() {
        let (cache, _feed) = cache(ReplayCacheLimits {
            max_entries: 2,
            max_bytes: 3 * (ENTRY_OVERHEAD + 2),
        });
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        for n in 1..=3 {
            cache.fill(cache.mark(), key(n), fingerprint, &response("ok"), HOUR);
        }
        assert!(cache.get(&key(1), &fingerprint).is_err(), "the oldest goes");
        assert!(cache.get(&key(3), &fingerprint).is_ok());
        let big = StoredResponse::new(StatusCode::OK, HeaderMap::new(), vec![b'x'; 500].into());
        cache.fill(cache.mark(), key(4), fingerprint, &big, HOUR);
        assert!(
            cache.get(&key(4), &fingerprint).is_err(),
            "too large to cache"
        );
        cache.fill(cache.mark(), key(5), fingerprint, &response("ok"), HOUR);
        assert_eq!(cache.len(), 2);
    }
}
