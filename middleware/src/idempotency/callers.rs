//! How many keyed requests each caller has in progress in this process.
//!
//! Each request the layer works on holds its buffered body and, while it runs, a copy of its
//! response: without a bound, one caller sending many keys at once could hold gigabytes. The bound
//! is per caller scope, so one noisy caller does not crowd out the others; callers without
//! credentials share a scope but are counted per client address (`ClientIp`), so unrelated
//! anonymous users do not crowd each other out either.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex, PoisonError};

use crate::scope::{DigestHasher, Scope};

/// Counts per caller scope; scopes are digests (see [`DigestHasher`]).
type Counts = HashMap<Scope, usize, BuildHasherDefault<DigestHasher>>;

const SHARDS: usize = 16;

/// Requests in progress per caller scope. Entries exist only while a caller has requests in
/// progress, so memory is bounded by the requests themselves.
#[derive(Debug)]
pub(crate) struct Callers {
    shards: Box<[Mutex<Counts>]>,
}

impl Default for Callers {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// One request in progress; counted until dropped.
#[derive(Debug)]
pub(crate) struct CallerPermit {
    callers: Arc<Callers>,
    scope: Scope,
}

impl Callers {
    /// Counts a request of `scope` in, unless the caller already has `limit` in progress.
    pub(crate) fn admit(self: &Arc<Self>, scope: Scope, limit: usize) -> Option<CallerPermit> {
        let mut shard = self.shard(&scope);
        let count = shard.entry(scope).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                shard.remove(&scope);
            }
            return None;
        }
        *count += 1;
        Some(CallerPermit {
            callers: self.clone(),
            scope,
        })
    }

    fn shard(&self, scope: &Scope) -> std::sync::MutexGuard<'_, Counts> {
        // Scopes are sha256 digests: any byte spreads them evenly.
        let index = usize::from(scope.as_bytes()[0]) % SHARDS;
        // A count is one integer: a panic while holding the lock cannot leave it torn.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        (0..SHARDS)
            .map(|i| self.shards[i].lock().map_or(0, |shard| shard.len()))
            .sum()
    }
}

impl Drop for CallerPermit {
    fn drop(&mut self) {
        let mut shard = self.callers.shard(&self.scope);
        if let Some(count) = shard.get_mut(&self.scope) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&self.scope);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_held_to_its_limit_and_others_are_not() {
        let callers = Arc::new(Callers::default());
        let alice = Scope::from_bytes(b"alice");
        let first = callers.admit(alice, 2).expect("first");
        let second = callers.admit(alice, 2).expect("second");
        assert!(callers.admit(alice, 2).is_none());
        assert!(callers.admit(Scope::from_bytes(b"bob"), 2).is_some());
        drop(first);
        assert!(
            callers.admit(alice, 2).is_some(),
            "a finished request frees a place"
        );
        drop(second);
    }

    #[test]
    fn callers_with_nothing_in_progress_are_forgotten() {
        let callers = Arc::new(Callers::default());
        let permits: Vec<_> = (0..100u32)
            .filter_map(|i| callers.admit(Scope::from_bytes(&i.to_be_bytes()), 1))
            .collect();
        assert_eq!(callers.tracked(), 100);
        drop(permits);
        assert_eq!(callers.tracked(), 0);
        assert!(callers.admit(Scope::anonymous(), 0).is_none());
        assert_eq!(
            callers.tracked(),
            0,
            "a refused caller leaves nothing behind"
        );
    }
}
