//! Fresh plans for the batch statements as the table grows.
//!
//! sqlx prepares each statement once per connection, and after five runs PostgreSQL keeps a
//! generic plan for it, made with the table's size and statistics at that moment. For the batch
//! statements (a join of the batch's arrays with the table) a plan made while the table was
//! small joins with a sequential scan of the whole table, and PostgreSQL keeps it until an
//! `ANALYZE` of the table invalidates it: with autovacuum off, for good; with it on, for up to a
//! minute after a fresh table starts filling. In `bench/run`, new-key throughput fell by two
//! thirds within a minute, each batch reading every row.
//!
//! The single-request statements do not need this: a lookup of one key by the primary key is
//! the cheapest plan at every size. Custom plans for every batch (`plan_cache_mode`, or unnamed
//! statements) would cost a planning per batch; measured, that took a fifth of the throughput
//! (and unnamed statements a round trip more, half of it).
//!
//! So the batch statements' text carries a plan generation (`/* plan N */`): a new generation is a
//! new text, which sqlx prepares anew and PostgreSQL plans anew with the table as it is now. A
//! generation starts each time the number of batches run doubles, from 64 on, and when a reaper
//! pass finds the table at least twice the size it had when a pass last started one (other
//! processes sharing the table fill it too): often while a new table fills, rarely once it is
//! steady. Statements of earlier generations leave sqlx's per-connection cache as it evicts
//! them (each generation leaves two per connection, a few dozen over a table's life).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// Batches run before the first generation that the batch count starts.
const FIRST_DOUBLING: u64 = 64;

/// The plan generation, shared by a store's batch statements.
#[derive(Debug, Default)]
pub(super) struct Replan {
    generation: AtomicU64,
    batches: AtomicU64,
    /// The table's size in bytes when [`Replan::table_is`] last started a generation.
    planned_for_bytes: AtomicU64,
}

impl Replan {
    /// Starts a new generation if the table, now `bytes` large, has at least doubled since the
    /// last one this started (the first time: if it holds anything).
    pub(super) fn table_is(&self, bytes: u64) {
        let planned = self.planned_for_bytes.load(Ordering::Relaxed);
        if bytes > planned && bytes >= planned.saturating_mul(2) {
            self.planned_for_bytes.store(bytes, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a batch, starting a generation when the count doubles; returns the generation.
    fn count_batch(&self) -> u64 {
        let batches = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        if batches >= FIRST_DOUBLING && batches.is_power_of_two() {
            self.generation.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.generation.load(Ordering::Relaxed)
        }
    }
}

/// A batch statement whose text names the current plan generation.
pub(super) struct Replanned {
    base: String,
    replan: Arc<Replan>,
    /// The text of the last generation used, so that a batch allocates none.
    current: Mutex<(u64, SqlStr)>,
}

impl Replanned {
    pub(super) fn new(base: String, replan: Arc<Replan>) -> Self {
        let first = Self::text(&base, 0);
        Self {
            base,
            replan,
            current: Mutex::new((0, first)),
        }
    }

    /// The statement to run for one batch.
    pub(super) fn next(&self) -> SqlStr {
        let generation = self.replan.count_batch();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 != generation {
            *current = (generation, Self::text(&self.base, generation));
        }
        current.1.clone()
    }

    fn text(base: &str, generation: u64) -> SqlStr {
        AssertSqlSafe(Arc::<str>::from(format!("{base} /* plan {generation} */"))).into_sql_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_changes_with_each_generation_and_only_then() {
        let replan = Arc::new(Replan::default());
        let statement = Replanned::new("SELECT 1".to_owned(), Arc::clone(&replan));
        let first = statement.next();
        assert_eq!(first.as_str(), "SELECT 1 /* plan 0 */");
        for _ in 2..FIRST_DOUBLING {
            assert_eq!(statement.next().as_str(), first.as_str());
        }
        assert_eq!(
            statement.next().as_str(),
            "SELECT 1 /* plan 1 */",
            "64th batch"
        );
        for _ in FIRST_DOUBLING + 1..2 * FIRST_DOUBLING {
            assert_eq!(statement.next().as_str(), "SELECT 1 /* plan 1 */");
        }
        assert_eq!(
            statement.next().as_str(),
            "SELECT 1 /* plan 2 */",
            "128th batch"
        );
        replan.table_is(8192);
        assert_eq!(
            statement.next().as_str(),
            "SELECT 1 /* plan 3 */",
            "a table found"
        );
        replan.table_is(12_288);
        assert_eq!(
            statement.next().as_str(),
            "SELECT 1 /* plan 3 */",
            "not yet doubled"
        );
        replan.table_is(16_384);
        assert_eq!(
            statement.next().as_str(),
            "SELECT 1 /* plan 4 */",
            "doubled"
        );
    }

    #[test]
    fn an_empty_table_starts_no_generation() {
        let replan = Replan::default();
        replan.table_is(0);
        assert_eq!(replan.generation.load(Ordering::Relaxed), 0);
    }
}
