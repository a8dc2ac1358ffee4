//! The verdict as a table for people and as JSON for tools.

use std::fmt::Write;

use crate::checker::{Finding, Verdict};

/// The whole report of one run.
pub(crate) fn table(verdict: &Verdict) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== chaos run: store {}, seed {}, {} s at {} operations/s: {}",
        verdict.store,
        verdict.seed,
        verdict.duration_ms / 1000,
        verdict.rate,
        if verdict.passed() { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(
        out,
        "operations {}  requests {}  keys {}  executions {}",
        verdict.operations, verdict.requests, verdict.keys, verdict.executions
    );
    let per_key: Vec<String> = verdict
        .executions_per_key
        .iter()
        .map(|(executions, keys)| format!("{keys} keys x{executions}"))
        .collect();
    let _ = writeln!(out, "executions per key: {}", per_key.join(", "));
    let _ = writeln!(out, "faults: {}", counts(&verdict.faults));
    let _ = writeln!(out, "answers: {}", counts(&verdict.answers));
    let _ = writeln!(
        out,
        "double executions: {} explained, {} unexplained | wrong replays {} | cross-scope replays \
         {} | lost records {} ({} unexplained)",
        verdict.explained_double_executions.len(),
        verdict.unexplained_double_executions.len(),
        verdict.wrong_replays.len(),
        verdict.cross_scope_replays.len(),
        verdict.lost_records.len(),
        verdict.unexplained_losses()
    );
    let _ = writeln!(
        out,
        "{:<9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "phase", "attempts", "final", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for phase in &verdict.latency {
        let _ = writeln!(
            out,
            "{:<9} {:>8} {:>6.1}% {:>7} {:>7} {:>7} {:>7}",
            phase.phase,
            phase.attempts,
            phase.final_share * 100.0,
            phase.p50_ms,
            phase.p90_ms,
            phase.p99_ms,
            phase.max_ms
        );
    }
    const SHOWN: usize = 8;
    for finding in verdict.explained_double_executions.iter().take(SHOWN) {
        let _ = writeln!(out, "  explained: {}", one_line(finding));
    }
    let more = verdict
        .explained_double_executions
        .len()
        .saturating_sub(SHOWN);
    if more > 0 {
        let causes = explained_by_cause(verdict);
        let _ = writeln!(out, "  ... {more} more; by cause: {}", counts(&causes));
    }
    for finding in &verdict.lost_records {
        if finding.cause.is_some() {
            let _ = writeln!(out, "  explained loss: {}", one_line(finding));
        }
    }
    let defects = verdict
        .unexplained_double_executions
        .iter()
        .map(|f| ("UNEXPLAINED DOUBLE EXECUTION", f))
        .chain(verdict.wrong_replays.iter().map(|f| ("WRONG REPLAY", f)))
        .chain(
            verdict
                .cross_scope_replays
                .iter()
                .map(|f| ("CROSS-SCOPE REPLAY", f)),
        )
        .chain(
            verdict
                .lost_records
                .iter()
                .filter(|f| f.cause.is_none())
                .map(|f| ("LOST RECORD", f)),
        );
    for (what, finding) in defects {
        let _ = writeln!(out, "  {what}: {}", one_line(finding));
        for line in &finding.timeline {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}

/// One Markdown row per run, for GUARANTEES.md.
pub(crate) fn summary(verdicts: &[Verdict]) -> String {
    let mut out = String::from(
        "| store | seconds | ops/s | operations | requests | executions | faults | double executions explained | unexplained | wrong replays | lost records (unexplained) | p99 ms steady / fault / recovery |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for verdict in verdicts {
        let p99: Vec<String> = verdict
            .latency
            .iter()
            .map(|phase| phase.p99_ms.to_string())
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} |",
            verdict.store,
            verdict.duration_ms / 1000,
            verdict.rate,
            verdict.operations,
            verdict.requests,
            verdict.executions,
            verdict.faults.values().sum::<usize>(),
            verdict.explained_double_executions.len(),
            verdict.unexplained_double_executions.len(),
            verdict.wrong_replays.len() + verdict.cross_scope_replays.len(),
            verdict.lost_records.len(),
            verdict.unexplained_losses(),
            p99.join(" / ")
        );
    }
    out
}

/// Explained double executions counted by the kind of their cause.
pub(crate) fn explained_by_cause(verdict: &Verdict) -> std::collections::BTreeMap<String, usize> {
    let mut causes = std::collections::BTreeMap::new();
    for finding in &verdict.explained_double_executions {
        let cause = finding.cause.as_deref().unwrap_or_default();
        let kind = if cause.contains("killed") {
            "holder killed"
        } else if cause.contains("paused") {
            "holder paused"
        } else if cause.contains("outcome unknown") {
            "upstream outcome unknown"
        } else {
            "store fault"
        };
        *causes.entry(kind.to_owned()).or_insert(0) += 1;
    }
    causes
}

fn counts(map: &std::collections::BTreeMap<String, usize>) -> String {
    let parts: Vec<String> = map.iter().map(|(name, n)| format!("{name} {n}")).collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

fn one_line(finding: &Finding) -> String {
    format!(
        "[{} / {}] {}{}",
        finding.scope,
        finding.key,
        finding.detail,
        finding
            .cause
            .as_ref()
            .map(|cause| format!(" <- {cause}"))
            .unwrap_or_default()
    )
}
