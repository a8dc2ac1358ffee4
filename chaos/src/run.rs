//! One run against one store: start everything, play the fleet and the nemesis, collect the
//! history.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{Fleet, operation};
use crate::clock::Clock;
use crate::history::{History, Settings};
use crate::nemesis::{self, Targets};
use crate::proxies::{Proxy, Timings};
use crate::rng::Rng;
use crate::schedule::{self, COOLDOWN_MS};
use crate::store::{Store, StoreKind};
use crate::upstream::Upstream;

const PROXIES: usize = 3;

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) store: StoreKind,
    pub(crate) seed: u64,
    pub(crate) duration: Duration,
    pub(crate) rate: u64,
    pub(crate) proxy_binary: PathBuf,
    pub(crate) timings: Timings,
    /// See [`Targets::drop_bytes`].
    pub(crate) drop_bytes: bool,
}

/// Runs the plan and returns its history.
pub(crate) async fn run(plan: &Plan) -> Result<History, String> {
    let work = tempfile::tempdir().map_err(|error| format!("temp dir: {error}"))?;
    let store = Store::start(plan.store).await;
    let store_config = store.config();
    let nodes = store.nodes();
    let clock = Clock::start();
    let upstream = Upstream::start(clock, PROXIES).await;

    // The first proxy applies the PostgreSQL schema alone; the others start once it exists.
    let mut proxies = Vec::new();
    for (index, port) in upstream.ports.iter().copied().enumerate() {
        let (binary, dir, store_config, timings) = (
            plan.proxy_binary.clone(),
            work.path().to_owned(),
            store_config.clone(),
            plan.timings,
        );
        let proxy = tokio::task::spawn_blocking(move || {
            Proxy::start(&binary, &dir, index, port, &store_config, timings)
        })
        .await
        .map_err(|error| error.to_string())??;
        proxies.push(Mutex::new(proxy));
    }
    let ports: Vec<u16> = proxies
        .iter()
        .map(|proxy| proxy.lock().expect("proxy").port)
        .collect();
    let proxies = Arc::new(proxies);
    let store = Arc::new(Mutex::new(store));

    let duration = plan.duration.as_millis() as u64;
    let lock_ttl = plan.timings.lock_ttl.as_millis() as u64;
    let upstream_timeout = plan.timings.upstream_timeout.as_millis() as u64;
    // The clock started before the proxies did: the plan counts from now.
    let origin = clock.now();
    let mut faults = schedule::plan(
        plan.seed,
        duration,
        plan.store,
        nodes,
        lock_ttl,
        upstream_timeout,
    );
    for fault in &mut faults {
        fault.at += origin;
    }
    let nemesis = tokio::spawn(nemesis::run(
        Targets {
            clock,
            proxies: proxies.clone(),
            store: store.clone(),
            upstream: upstream.recorder.clone(),
            drop_bytes: plan.drop_bytes,
        },
        faults,
    ));
    let fleet = Fleet::new(clock, plan.seed, ports.clone());

    // Operations start at the rate, for the whole run but its cooldown.
    let sending = duration.saturating_sub(COOLDOWN_MS);
    let total = sending * plan.rate / 1000;
    let mut operations = Vec::new();
    for id in 0..total {
        let due = origin + id * 1000 / plan.rate.max(1);
        let now = clock.now();
        if due > now {
            tokio::time::sleep(Duration::from_millis(due - now)).await;
        }
        let fleet = fleet.clone();
        operations.push(tokio::spawn(async move {
            fleet.run(operation(fleet.seed, id)).await;
        }));
    }
    for operation in operations {
        let _ = operation.await;
    }
    let faults = nemesis.await.map_err(|error| error.to_string())?;

    // Every fault has healed: once the leases of crashed holders have expired, every key a
    // client was acknowledged for must replay. Ask once more for each.
    tokio::time::sleep(Duration::from_millis(lock_ttl + 500)).await;
    verify(&fleet).await;
    let ran = clock.now();
    // Let the upstream log what the last requests did.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let attempts = fleet.history.lock().expect("history").clone();
    drop(proxies);
    drop(store);
    Ok(History {
        settings: Settings {
            store: plan.store.to_string(),
            seed: plan.seed,
            duration_ms: ran - origin,
            rate: plan.rate,
            lock_ttl_ms: lock_ttl,
            upstream_timeout_ms: upstream_timeout,
        },
        attempts,
        executions: upstream.executions(),
        faults,
    })
}

/// Sends every acknowledged request once more, through a seeded proxy, 16 at a time.
async fn verify(fleet: &Fleet) {
    let acknowledged: Vec<(u64, String)> = {
        let history = fleet.history.lock().expect("history");
        let mut seen = std::collections::BTreeSet::new();
        history
            .iter()
            .filter(|attempt| attempt.acknowledged().is_some())
            .filter(|attempt| seen.insert((attempt.op, attempt.body.clone())))
            .map(|attempt| (attempt.op, attempt.body.clone()))
            .collect()
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for (index, (op, body)) in acknowledged.into_iter().enumerate() {
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        let fleet = fleet.clone();
        tasks.push(tokio::spawn(async move {
            let mut operation = operation(fleet.seed, op);
            let proxy = Rng::fork(fleet.seed, 4, index as u64).range(0, 3) as usize;
            // A retry of the same operation: the same op id, caller, key and body.
            operation.copies = 1;
            fleet.send_with_retries(&operation, &body, proxy, 12).await;
            drop(permit);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}
