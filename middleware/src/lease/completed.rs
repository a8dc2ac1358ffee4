//! The mark of a response whose record the handler already stored, in its own transaction.

use crate::scope::RecordKey;
use crate::store::{CompletionNotifier, LeaseToken};

/// In a response's extensions: the handler completed the record itself, in the same database
/// transaction as its effects (`PostgresStore::complete_in`). The layer then neither stores the
/// response a second time nor releases the lease: it settles the lease and wakes the key's
/// waiters in this process (those in other processes are woken by the store when the
/// transaction commits).
///
/// Made only by the stores' transactional completion, for the lease it completed; a mark for
/// another key or token (a response passed on from another request) is ignored.
#[derive(Debug, Clone)]
pub struct CompletedByHandler {
    key: RecordKey,
    token: LeaseToken,
    waiters: Option<CompletionNotifier>,
}

impl CompletedByHandler {
    /// Marks the completion of `key` under `token`; `waiters` are woken once the layer sees it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn new(
        key: RecordKey,
        token: LeaseToken,
        waiters: Option<CompletionNotifier>,
    ) -> Self {
        Self {
            key,
            token,
            waiters,
        }
    }

    /// Whether this marks the completion of the lease `token` of `key`.
    pub fn completes(&self, key: &RecordKey, token: LeaseToken) -> bool {
        self.key == *key && self.token == token
    }

    /// Wakes this process's waiters for the key. Called by the layer after the handler returned,
    /// hence after its commit; a wake-up for a transaction that did not commit is spurious, which
    /// waiters tolerate (they look at the store again).
    pub(crate) fn wake_waiters(&self) {
        if let Some(waiters) = &self.waiters {
            waiters.notify(&self.key);
        }
    }
}
