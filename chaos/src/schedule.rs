//! The nemesis's plan, fixed by the seed before the run starts: the same seed gives the same
//! faults at the same times against the same targets.

use crate::history::{FaultKind, Millis};
use crate::rng::Rng;
use crate::store::StoreKind;

/// Quiet time at the start, so the run has a steady phase to compare against.
pub(crate) const WARMUP_MS: Millis = 4_000;
/// Quiet time at the end, so every operation can finish and every lease expire.
pub(crate) const COOLDOWN_MS: Millis = 6_000;

/// One planned fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlannedFault {
    pub(crate) at: Millis,
    pub(crate) kind: FaultKind,
    /// The proxy, or the store node, it hits.
    pub(crate) target: usize,
    /// How long the fault lasts before it is healed.
    pub(crate) length: Millis,
    /// The delay of a slowdown (store latency per chunk, upstream delay); else 0.
    pub(crate) delay: Millis,
}

/// The plan for a run of `duration` ms. Kinds come round in a seeded order, so a run with at
/// least as many faults as kinds injects every kind.
pub(crate) fn plan(
    seed: u64,
    duration: Millis,
    store: StoreKind,
    store_nodes: usize,
    lock_ttl: Millis,
    upstream_timeout: Millis,
) -> Vec<PlannedFault> {
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|kind| store.has_fault_proxy() || !kind.is_store() || *kind == FaultKind::KillStore)
        .collect();
    let mut rng = Rng::fork(seed, 2, 0);
    let mut order = kinds.clone();
    let mut faults = Vec::new();
    let mut at = WARMUP_MS;
    let mut index = 0;
    loop {
        if index % kinds.len() == 0 {
            shuffle(&mut order, &mut rng);
        }
        let kind = order[index % kinds.len()];
        let (length, delay) = match kind {
            FaultKind::KillProxy => (rng.range(300, 1_500), 0),
            FaultKind::PauseProxy => (lock_ttl + rng.range(500, 1_500), 0),
            FaultKind::KillStore => (rng.range(500, 2_500), 0),
            FaultKind::CutStore => (rng.range(500, 2_500), 0),
            FaultKind::PartitionStore => (rng.range(1_000, 3_000), 0),
            FaultKind::SlowStore => (rng.range(2_000, 4_000), rng.range(50, 400)),
            FaultKind::SlowUpstream => (
                rng.range(1_000, 3_000),
                upstream_timeout + rng.range(300, 800),
            ),
        };
        if at + length + COOLDOWN_MS > duration {
            break;
        }
        let target = match kind {
            FaultKind::KillStore => rng.range(0, store_nodes as u64) as usize,
            _ => rng.range(0, 3) as usize,
        };
        faults.push(PlannedFault {
            at,
            kind,
            target,
            length,
            delay,
        });
        at += length + rng.range(2_500, 5_000);
        index += 1;
    }
    faults
}

fn shuffle(items: &mut [FaultKind], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.range(0, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan_and_every_kind_comes_round() {
        let a = plan(42, 120_000, StoreKind::Postgres, 1, 2_000, 1_000);
        assert_eq!(a, plan(42, 120_000, StoreKind::Postgres, 1, 2_000, 1_000));
        assert_ne!(a, plan(43, 120_000, StoreKind::Postgres, 1, 2_000, 1_000));
        for kind in FaultKind::ALL {
            assert!(a.iter().any(|f| f.kind == kind), "{kind:?} missing");
        }
        assert!(a.iter().all(|f| f.at + f.length + COOLDOWN_MS <= 120_000));
    }

    #[test]
    fn a_cluster_gets_no_connection_faults() {
        let plan = plan(1, 120_000, StoreKind::RedisCluster, 3, 2_000, 1_000);
        assert!(
            plan.iter()
                .all(|f| !f.kind.is_store() || f.kind == FaultKind::KillStore)
        );
        assert!(plan.iter().any(|f| f.kind == FaultKind::KillStore));
    }
}
