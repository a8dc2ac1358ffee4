//! The checker: a history in, a verdict out. It never looks at the proxy, only at what the
//! clients received and what the upstream executed, so it judges the system as its users would.
//!
//! * Every key (caller + `Idempotency-Key`) executed more than once is explained by a fault that
//!   GUARANTEES.md allows to cause it, or it is a defect. A rerun counts as explained only if it
//!   started at least `lock_ttl` (less [`LEASE_SLACK_MS`]) after the previous execution (no lease
//!   can expire sooner) and one of these happened between the two: a `kill -9` of the proxy that
//!   forwarded the previous execution, a pause of that proxy past `lock_ttl`, an outcome the
//!   proxy could not know (the upstream ran past `upstream_timeout` or the proxy went away before
//!   it answered), or a store fault (down, cut, partitioned, slowed).
//! * A rerun after some client was already acknowledged (2xx) for the key means the record of an
//!   acknowledged response was lost: explained only by a store fault while that record was being
//!   stored (the documented "store fails while storing a finished response" limit: the write
//!   never happened). The run's store is durable (Redis `appendfsync always`, PostgreSQL
//!   `synchronous_commit`), so a record once stored must survive a store restart.
//! * Every 2xx names the execution it came from. It must be an execution of the same caller
//!   (else: a replay across scopes), of the same key and body (else: a wrong replay); a fresh
//!   answer must come from the proxy the client asked; a replay must be of the latest execution
//!   of the key that had started by then (the one the store holds).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::history::{Attempt, Execution, FaultEvent, FaultKind, History, Millis, Outcome};

/// Slack for a fault recorded just before the execution it hit was logged (a request already in
/// the upstream's socket when its proxy was killed).
pub(crate) const MARGIN_MS: Millis = 250;
/// Slack for the gap between a lease being taken in the store and the upstream logging the
/// execution: a slowed store delays the lease's answer to the proxy by up to 400 ms, and a
/// loaded machine adds scheduling delay. A rerun sooner than `lock_ttl` minus this after the
/// previous execution is a defect whatever the faults.
pub(crate) const LEASE_SLACK_MS: Millis = 600;
/// How long after a fault healed its requests count as "recovery".
pub(crate) const RECOVERY_MS: Millis = 3_000;

/// One thing the checker found about one key.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Finding {
    pub(crate) scope: String,
    pub(crate) key: String,
    /// The execution concerned (the rerun, or the one a reply named).
    pub(crate) execution: Option<u64>,
    /// The fault that explains it; `None`: a defect.
    pub(crate) cause: Option<String>,
    pub(crate) detail: String,
    /// The key's attempts, executions and the faults around them (defects only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) timeline: Vec<String>,
}

/// Latency of the attempts sent in one phase of the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PhaseLatency {
    pub(crate) phase: &'static str,
    pub(crate) attempts: usize,
    /// Share of attempts that got a final answer (2xx or 422).
    pub(crate) final_share: f64,
    pub(crate) p50_ms: Millis,
    pub(crate) p90_ms: Millis,
    pub(crate) p99_ms: Millis,
    pub(crate) max_ms: Millis,
}

/// What the checker concludes about one run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verdict {
    pub(crate) store: String,
    pub(crate) seed: u64,
    pub(crate) duration_ms: Millis,
    pub(crate) rate: u64,
    pub(crate) operations: usize,
    pub(crate) requests: usize,
    pub(crate) keys: usize,
    pub(crate) executions: usize,
    /// Number of executions → number of keys executed that many times.
    pub(crate) executions_per_key: BTreeMap<usize, usize>,
    /// Answers by kind (`200`, `200 replayed`, `409`, `timeout`, ...).
    pub(crate) answers: BTreeMap<String, usize>,
    pub(crate) faults: BTreeMap<String, usize>,
    pub(crate) explained_double_executions: Vec<Finding>,
    pub(crate) unexplained_double_executions: Vec<Finding>,
    pub(crate) wrong_replays: Vec<Finding>,
    pub(crate) cross_scope_replays: Vec<Finding>,
    pub(crate) lost_records: Vec<Finding>,
    pub(crate) latency: Vec<PhaseLatency>,
}

impl Verdict {
    /// Lost records without a documented cause.
    pub(crate) fn unexplained_losses(&self) -> usize {
        self.lost_records
            .iter()
            .filter(|finding| finding.cause.is_none())
            .count()
    }

    /// Everything that makes the run fail.
    pub(crate) fn defects(&self) -> usize {
        self.unexplained_double_executions.len()
            + self.wrong_replays.len()
            + self.cross_scope_replays.len()
            + self.unexplained_losses()
    }

    pub(crate) fn passed(&self) -> bool {
        self.defects() == 0
    }
}

type KeyId = (String, String);

/// Judges a whole history.
pub(crate) fn check(history: &History) -> Verdict {
    let settings = &history.settings;
    let by_id: HashMap<u64, &Execution> = history.executions.iter().map(|e| (e.id, e)).collect();
    let mut by_key: BTreeMap<KeyId, Vec<&Execution>> = BTreeMap::new();
    for execution in &history.executions {
        by_key
            .entry((execution.scope.clone(), execution.key.clone()))
            .or_default()
            .push(execution);
    }
    for executions in by_key.values_mut() {
        executions.sort_by_key(|e| (e.start, e.id));
    }
    let mut keys: BTreeMap<KeyId, ()> = BTreeMap::new();
    for attempt in &history.attempts {
        keys.insert((attempt.scope.clone(), attempt.key.clone()), ());
    }

    let mut verdict = Verdict {
        store: settings.store.clone(),
        seed: settings.seed,
        duration_ms: settings.duration_ms,
        rate: settings.rate,
        operations: count_distinct(history.attempts.iter().map(|a| a.op)),
        requests: history.attempts.len(),
        keys: keys.len(),
        executions: history.executions.len(),
        executions_per_key: BTreeMap::new(),
        answers: BTreeMap::new(),
        faults: BTreeMap::new(),
        explained_double_executions: Vec::new(),
        unexplained_double_executions: Vec::new(),
        wrong_replays: Vec::new(),
        cross_scope_replays: Vec::new(),
        lost_records: Vec::new(),
        latency: latency_by_phase(&history.attempts, &history.faults),
    };
    for executions in by_key.values() {
        *verdict
            .executions_per_key
            .entry(executions.len())
            .or_default() += 1;
    }
    for attempt in &history.attempts {
        *verdict
            .answers
            .entry(answer_name(&attempt.outcome))
            .or_default() += 1;
    }
    for fault in &history.faults {
        *verdict
            .faults
            .entry(fault.kind.name().to_owned())
            .or_default() += 1;
    }

    check_replies(history, &by_id, &by_key, &mut verdict);
    check_reruns(history, &by_id, &by_key, &mut verdict);
    verdict
}

/// Every 2xx must name an execution of the same caller, key and body, from the right source.
fn check_replies(
    history: &History,
    by_id: &HashMap<u64, &Execution>,
    by_key: &BTreeMap<KeyId, Vec<&Execution>>,
    verdict: &mut Verdict,
) {
    for attempt in &history.attempts {
        if let Outcome::Status {
            code: 200..=299,
            exec: None,
            ..
        } = attempt.outcome
        {
            verdict.wrong_replays.push(Finding {
                scope: attempt.scope.clone(),
                key: attempt.key.clone(),
                execution: None,
                cause: None,
                detail: format!("op {} got a 2xx whose body names no execution", attempt.op),
                timeline: timeline(history, &attempt.scope, &attempt.key),
            });
        }
        let Some(id) = attempt.acknowledged() else {
            continue;
        };
        let finding = |detail: String| Finding {
            scope: attempt.scope.clone(),
            key: attempt.key.clone(),
            execution: Some(id),
            cause: None,
            detail,
            timeline: timeline(history, &attempt.scope, &attempt.key),
        };
        let Some(execution) = by_id.get(&id) else {
            verdict.wrong_replays.push(finding(format!(
                "op {} got a 2xx naming execution {id}, which the upstream never ran",
                attempt.op
            )));
            continue;
        };
        if execution.scope != attempt.scope {
            verdict.cross_scope_replays.push(finding(format!(
                "op {} ({}) got execution {id} of caller {}",
                attempt.op, attempt.scope, execution.scope
            )));
        } else if execution.key != attempt.key || execution.body != attempt.body {
            verdict.wrong_replays.push(finding(format!(
                "op {} (key {}, body {}) got execution {id} of key {}, body {}",
                attempt.op, attempt.key, attempt.body, execution.key, execution.body
            )));
        } else if !attempt.replayed() && execution.proxy != attempt.proxy {
            verdict.wrong_replays.push(finding(format!(
                "op {} got a fresh (not replayed) answer from proxy {} but execution {id} went \
                 through proxy {}",
                attempt.op, attempt.proxy, execution.proxy
            )));
        } else if attempt.replayed() {
            let key = (attempt.scope.clone(), attempt.key.clone());
            let latest = by_key
                .get(&key)
                .and_then(|executions| executions.iter().rfind(|e| e.start <= attempt.received));
            if let Some(latest) = latest.filter(|latest| latest.id != id) {
                verdict.wrong_replays.push(finding(format!(
                    "op {} at {} ms got a replay of execution {id}, but execution {} of the key \
                     had started after it (at {} ms): the store should hold that one",
                    attempt.op, attempt.received, latest.id, latest.start
                )));
            }
        }
    }
}

/// Every execution after a key's first is explained by a fault or is a defect.
fn check_reruns(
    history: &History,
    by_id: &HashMap<u64, &Execution>,
    by_key: &BTreeMap<KeyId, Vec<&Execution>>,
    verdict: &mut Verdict,
) {
    let settings = &history.settings;
    let mut acks: HashMap<KeyId, Vec<(&Attempt, u64)>> = HashMap::new();
    for attempt in &history.attempts {
        if let Some(id) = attempt.acknowledged() {
            acks.entry((attempt.scope.clone(), attempt.key.clone()))
                .or_default()
                .push((attempt, id));
        }
    }
    for (key, executions) in by_key {
        for index in 1..executions.len() {
            let (previous, rerun) = (executions[index - 1], executions[index]);
            let earlier: Vec<u64> = executions[..index].iter().map(|e| e.id).collect();
            let acknowledged = acks.get(key).and_then(|acks| {
                acks.iter()
                    .filter(|(attempt, id)| attempt.received < rerun.start && earlier.contains(id))
                    .min_by_key(|(attempt, _)| attempt.received)
            });
            let mut finding = Finding {
                scope: key.0.clone(),
                key: key.1.clone(),
                execution: Some(rerun.id),
                cause: None,
                detail: String::new(),
                timeline: Vec::new(),
            };
            if let Some((attempt, id)) = acknowledged {
                let stored = by_id[id];
                finding.detail = format!(
                    "op {} was answered with execution {id} at {} ms, yet execution {} ran at {} \
                     ms: the record was lost",
                    attempt.op, attempt.received, rerun.id, rerun.start
                );
                finding.cause = history
                    .faults
                    .iter()
                    .find(|f| f.kind.is_store() && f.overlaps(stored.start, attempt.received))
                    .map(|f| {
                        format!(
                            "{} {}..{} ms while the record was stored",
                            f.kind.name(),
                            f.start,
                            f.end
                        )
                    });
                if finding.cause.is_none() {
                    finding.timeline = timeline(history, &key.0, &key.1);
                }
                verdict.lost_records.push(finding);
                continue;
            }
            let gap = rerun.start.saturating_sub(previous.start);
            finding.detail = format!(
                "execution {} (proxy {}, {} ms) ran again as execution {} (proxy {}, {} ms), {gap} \
                 ms later",
                previous.id, previous.proxy, previous.start, rerun.id, rerun.proxy, rerun.start
            );
            if gap + LEASE_SLACK_MS < settings.lock_ttl_ms {
                finding.detail.push_str(&format!(
                    ": within lock_ttl ({} ms), while the first lease could not have expired",
                    settings.lock_ttl_ms
                ));
            } else {
                finding.cause = explain(history, previous, rerun);
            }
            if finding.cause.is_some() {
                verdict.explained_double_executions.push(finding);
            } else {
                finding.timeline = timeline(history, &key.0, &key.1);
                verdict.unexplained_double_executions.push(finding);
            }
        }
    }
}

/// The fault GUARANTEES.md allows to make `rerun` run after `previous`, if one happened.
fn explain(history: &History, previous: &Execution, rerun: &Execution) -> Option<String> {
    let settings = &history.settings;
    let (from, to) = (previous.start, rerun.start);
    let holder = Some(previous.proxy);
    let faults = &history.faults;
    if let Some(kill) = faults.iter().find(|f| {
        f.kind == FaultKind::KillProxy
            && f.target == holder
            && f.start + MARGIN_MS >= from
            && f.start <= to
    }) {
        return Some(format!(
            "its holder, proxy {}, was killed at {} ms",
            previous.proxy, kill.start
        ));
    }
    if let Some(pause) = faults.iter().find(|f| {
        f.kind == FaultKind::PauseProxy
            && f.target == holder
            && f.overlaps(from, to)
            && f.end - f.start > settings.lock_ttl_ms
    }) {
        return Some(format!(
            "its holder, proxy {}, was paused {}..{} ms, past lock_ttl",
            previous.proxy, pause.start, pause.end
        ));
    }
    match previous.end {
        None => {
            return Some(format!(
                "outcome unknown: proxy {} gave up on the upstream before it answered",
                previous.proxy
            ));
        }
        Some(end) if end - previous.start + MARGIN_MS >= settings.upstream_timeout_ms => {
            return Some(format!(
                "outcome unknown: the upstream took {} ms (upstream_timeout {} ms)",
                end - previous.start,
                settings.upstream_timeout_ms
            ));
        }
        Some(_) => {}
    }
    faults
        .iter()
        .find(|f| f.kind.is_store() && f.overlaps(from, to))
        .map(|f| format!("{} {}..{} ms", f.kind.name(), f.start, f.end))
}

/// The key's story, for a defect's report.
fn timeline(history: &History, scope: &str, key: &str) -> Vec<String> {
    let mut lines: Vec<(Millis, String)> = Vec::new();
    let (mut first, mut last) = (Millis::MAX, 0);
    for attempt in history
        .attempts
        .iter()
        .filter(|a| a.scope == scope && a.key == key)
    {
        first = first.min(attempt.sent);
        last = last.max(attempt.received);
        lines.push((
            attempt.sent,
            format!(
                "{:>7} ms  op {} -> proxy {} (body {}): {} at {} ms",
                attempt.sent,
                attempt.op,
                attempt.proxy,
                attempt.body,
                answer_name(&attempt.outcome),
                attempt.received
            ),
        ));
        if let Some(id) = attempt.acknowledged() {
            lines.last_mut().expect("pushed").1 += &format!(" naming execution {id}");
        }
    }
    for execution in history
        .executions
        .iter()
        .filter(|e| e.scope == scope && e.key == key)
    {
        first = first.min(execution.start);
        last = last.max(execution.end.unwrap_or(execution.start));
        lines.push((
            execution.start,
            format!(
                "{:>7} ms  execution {} via proxy {} (body {}) until {} token {:?} attempt {:?}",
                execution.start,
                execution.id,
                execution.proxy,
                execution.body,
                execution
                    .end
                    .map_or("cancelled".to_owned(), |end| format!("{end} ms")),
                execution.lease_token,
                execution.attempt
            ),
        ));
    }
    for fault in history
        .faults
        .iter()
        .filter(|f| f.overlaps(first.saturating_sub(5_000), last))
    {
        lines.push((
            fault.start,
            format!(
                "{:>7} ms  FAULT {} (target {:?}) until {} ms",
                fault.start,
                fault.kind.name(),
                fault.target,
                fault.end
            ),
        ));
    }
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

pub(crate) fn answer_name(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Status {
            code,
            replayed: true,
            ..
        } => format!("{code} replayed"),
        Outcome::Status { code, .. } => code.to_string(),
        Outcome::Timeout => "timeout".to_owned(),
        Outcome::Error(_) => "connection error".to_owned(),
    }
}

fn count_distinct(items: impl Iterator<Item = u64>) -> usize {
    let mut items: Vec<u64> = items.collect();
    items.sort_unstable();
    items.dedup();
    items.len()
}

/// `steady`, `fault` (sent while a fault was active) or `recovery` (within [`RECOVERY_MS`] after
/// one healed).
pub(crate) fn phase(at: Millis, faults: &[FaultEvent]) -> &'static str {
    if faults.iter().any(|f| f.start <= at && at <= f.end) {
        "fault"
    } else if faults
        .iter()
        .any(|f| f.end < at && at <= f.end + RECOVERY_MS)
    {
        "recovery"
    } else {
        "steady"
    }
}

fn latency_by_phase(attempts: &[Attempt], faults: &[FaultEvent]) -> Vec<PhaseLatency> {
    ["steady", "fault", "recovery"]
        .into_iter()
        .map(|name| {
            let in_phase: Vec<&Attempt> = attempts
                .iter()
                .filter(|a| phase(a.sent, faults) == name)
                .collect();
            let mut latencies: Vec<Millis> = in_phase
                .iter()
                .map(|a| a.received.saturating_sub(a.sent))
                .collect();
            latencies.sort_unstable();
            let finals = in_phase
                .iter()
                .filter(|a| {
                    matches!(a.outcome, Outcome::Status { code, .. } if (200..300).contains(&code) || code == 422)
                })
                .count();
            PhaseLatency {
                phase: name,
                attempts: in_phase.len(),
                final_share: if in_phase.is_empty() {
                    0.0
                } else {
                    finals as f64 / in_phase.len() as f64
                },
                p50_ms: percentile(&latencies, 50),
                p90_ms: percentile(&latencies, 90),
                p99_ms: percentile(&latencies, 99),
                max_ms: latencies.last().copied().unwrap_or(0),
            }
        })
        .collect()
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[Millis], percent: usize) -> Millis {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

#[cfg(test)]
mod tests;
