//! The nemesis: plays the seeded plan against the running proxies, store and upstream, and
//! records each fault as it really happened (from injection to healing, restarts included).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use test_fixtures::Fault;

use crate::clock::Clock;
use crate::history::{FaultEvent, FaultKind};
use crate::proxies::Proxy;
use crate::schedule::PlannedFault;
use crate::store::Store;
use crate::upstream::Recorder;

/// What the nemesis can reach.
#[derive(Clone)]
pub(crate) struct Targets {
    pub(crate) clock: Clock,
    pub(crate) proxies: Arc<Vec<Mutex<Proxy>>>,
    pub(crate) store: Arc<Mutex<Store>>,
    pub(crate) upstream: Recorder,
    /// Partitions drop the bytes they hold instead of delivering them when healed (the fault
    /// proxy's `Blackhole`): no TCP connection does that, but it shows what a client library
    /// makes of a stream with bytes missing.
    pub(crate) drop_bytes: bool,
}

/// Plays `plan`; returns the faults as they happened.
pub(crate) async fn run(targets: Targets, plan: Vec<PlannedFault>) -> Vec<FaultEvent> {
    let mut events = Vec::new();
    for fault in plan {
        let now = targets.clock.now();
        if fault.at > now {
            tokio::time::sleep(Duration::from_millis(fault.at - now)).await;
        }
        let start = targets.clock.now();
        inject(&targets, &fault).await;
        let end = targets.clock.now();
        eprintln!(
            "chaos: {:>6} ms  {} (target {}) for {} ms",
            start,
            fault.kind.name(),
            fault.target,
            end - start
        );
        events.push(FaultEvent {
            kind: fault.kind,
            target: match fault.kind {
                FaultKind::KillProxy | FaultKind::PauseProxy | FaultKind::KillStore => {
                    Some(fault.target)
                }
                _ => None,
            },
            start,
            end,
        });
    }
    events
}

/// Injects the fault, waits its length, heals it.
async fn inject(targets: &Targets, fault: &PlannedFault) {
    let length = Duration::from_millis(fault.length);
    let target = fault.target;
    match fault.kind {
        FaultKind::KillProxy => {
            let proxies = targets.proxies.clone();
            blocking(move || proxies[target].lock().expect("proxy").kill()).await;
            tokio::time::sleep(length).await;
            let proxies = targets.proxies.clone();
            blocking(move || {
                if let Err(error) = proxies[target].lock().expect("proxy").restart() {
                    eprintln!("chaos: proxy {target} did not restart: {error}");
                }
            })
            .await;
        }
        FaultKind::PauseProxy => {
            targets.proxies[target]
                .lock()
                .expect("proxy")
                .signal("STOP");
            tokio::time::sleep(length).await;
            targets.proxies[target]
                .lock()
                .expect("proxy")
                .signal("CONT");
        }
        FaultKind::KillStore => {
            let store = targets.store.clone();
            blocking(move || store.lock().expect("store").kill(target)).await;
            tokio::time::sleep(length).await;
            let store = targets.store.clone();
            blocking(move || store.lock().expect("store").restart(target)).await;
        }
        FaultKind::CutStore | FaultKind::PartitionStore | FaultKind::SlowStore => {
            let fault_now = match fault.kind {
                FaultKind::CutStore => Fault::Reset,
                FaultKind::PartitionStore if targets.drop_bytes => Fault::Blackhole,
                FaultKind::PartitionStore => Fault::Stall,
                _ => Fault::Latency(Duration::from_millis(fault.delay)),
            };
            targets.store.lock().expect("store").set_fault(fault_now);
            tokio::time::sleep(length).await;
            targets.store.lock().expect("store").set_fault(Fault::None);
        }
        FaultKind::SlowUpstream => {
            targets
                .upstream
                .delay_ms
                .store(fault.delay, Ordering::Relaxed);
            tokio::time::sleep(length).await;
            targets.upstream.delay_ms.store(0, Ordering::Relaxed);
        }
    }
}

async fn blocking(work: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(work)
        .await
        .expect("nemesis action");
}
