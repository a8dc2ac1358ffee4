//! What a run records: the client's attempts, the upstream's executions and the nemesis's faults,
//! all on one clock (milliseconds since the run started, from the chaos process's monotonic
//! clock), so the checker can order them.

use serde::{Deserialize, Serialize};

/// Milliseconds since the run started.
pub(crate) type Millis = u64;

/// One execution of a request by the upstream: the side effect the proxy exists to deduplicate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Execution {
    /// Returned to the client in the response body (`{"exec": id}`), so a reply names its source.
    pub(crate) id: u64,
    /// Which proxy forwarded it (each proxy has an upstream port of its own).
    pub(crate) proxy: usize,
    /// The `Authorization` value (the caller the key belongs to).
    pub(crate) scope: String,
    pub(crate) key: String,
    pub(crate) body: String,
    /// When the upstream received it.
    pub(crate) start: Millis,
    /// When the upstream sent its response; `None` when the proxy went away first (it gave up
    /// on the upstream, or it was killed): the outcome is unknown to the proxy.
    pub(crate) end: Option<Millis>,
    /// `Idempotency-Lease-Token`, when the proxy sends it (`forward_lease = true`).
    pub(crate) lease_token: Option<String>,
    /// `Idempotency-Attempt`, when the proxy sends it.
    pub(crate) attempt: Option<String>,
}

/// What one attempt of a client got back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// An HTTP answer; `exec` is the execution a 2xx body names.
    Status {
        code: u16,
        replayed: bool,
        exec: Option<u64>,
    },
    /// No answer within the client's timeout.
    Timeout,
    /// Connection refused or reset, or a body that could not be read.
    Error(String),
}

/// One HTTP attempt of the client fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Attempt {
    /// The operation (one logical request, retried until it gets a final answer).
    pub(crate) op: u64,
    pub(crate) scope: String,
    pub(crate) key: String,
    pub(crate) body: String,
    /// The proxy it was sent to.
    pub(crate) proxy: usize,
    pub(crate) sent: Millis,
    pub(crate) received: Millis,
    pub(crate) outcome: Outcome,
}

impl Attempt {
    /// The execution a successful answer names.
    pub(crate) fn acknowledged(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Status {
                code: 200..=299,
                exec,
                ..
            } => exec,
            _ => None,
        }
    }

    pub(crate) fn replayed(&self) -> bool {
        matches!(self.outcome, Outcome::Status { replayed: true, .. })
    }
}

/// The nemesis's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum FaultKind {
    /// `kill -9` of a proxy, restarted afterwards.
    KillProxy,
    /// `SIGSTOP` of a proxy for longer than `lock_ttl`, then `SIGCONT`.
    PauseProxy,
    /// `kill -9` of the store (a Redis Cluster node), restarted on its data.
    KillStore,
    /// Every store connection reset, new ones refused.
    CutStore,
    /// Store connections open, every byte held until the partition heals (then delivered, as
    /// TCP would after retransmitting).
    PartitionStore,
    /// Every chunk to and from the store delayed.
    SlowStore,
    /// The upstream answers later than `upstream_timeout`.
    SlowUpstream,
}

impl FaultKind {
    pub(crate) const ALL: [FaultKind; 7] = [
        FaultKind::KillProxy,
        FaultKind::PauseProxy,
        FaultKind::KillStore,
        FaultKind::CutStore,
        FaultKind::PartitionStore,
        FaultKind::SlowStore,
        FaultKind::SlowUpstream,
    ];

    /// Faults of the store or its connection, which every proxy shares.
    pub(crate) fn is_store(self) -> bool {
        matches!(
            self,
            FaultKind::KillStore
                | FaultKind::CutStore
                | FaultKind::PartitionStore
                | FaultKind::SlowStore
        )
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::KillProxy => "kill -9 proxy",
            FaultKind::PauseProxy => "SIGSTOP proxy",
            FaultKind::KillStore => "kill -9 store",
            FaultKind::CutStore => "store connection cut",
            FaultKind::PartitionStore => "store partitioned",
            FaultKind::SlowStore => "store slowed",
            FaultKind::SlowUpstream => "upstream past upstream_timeout",
        }
    }
}

/// A fault as it happened: from its injection to its healing (a restart included).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FaultEvent {
    pub(crate) kind: FaultKind,
    /// The proxy or store node it hit, if it hit one.
    pub(crate) target: Option<usize>,
    pub(crate) start: Millis,
    pub(crate) end: Millis,
}

impl FaultEvent {
    pub(crate) fn overlaps(&self, from: Millis, to: Millis) -> bool {
        self.start <= to && from <= self.end
    }
}

/// The settings the checker needs to judge a history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Settings {
    pub(crate) store: String,
    pub(crate) seed: u64,
    pub(crate) duration_ms: Millis,
    pub(crate) rate: u64,
    pub(crate) lock_ttl_ms: Millis,
    pub(crate) upstream_timeout_ms: Millis,
}

/// A whole run's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct History {
    pub(crate) settings: Settings,
    pub(crate) attempts: Vec<Attempt>,
    pub(crate) executions: Vec<Execution>,
    pub(crate) faults: Vec<FaultEvent>,
}
