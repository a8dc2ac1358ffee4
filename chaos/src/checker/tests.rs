//! Hand-built histories with known verdicts.

use super::*;
use crate::history::Settings;

const A: &str = "Bearer a";
const B: &str = "Bearer b";

fn history() -> History {
    History {
        settings: Settings {
            store: "test".to_owned(),
            seed: 1,
            duration_ms: 60_000,
            rate: 1,
            lock_ttl_ms: 2_000,
            upstream_timeout_ms: 1_000,
        },
        attempts: Vec::new(),
        executions: Vec::new(),
        faults: Vec::new(),
    }
}

fn execution(id: u64, proxy: usize, scope: &str, key: &str, start: Millis) -> Execution {
    Execution {
        id,
        proxy,
        scope: scope.to_owned(),
        key: key.to_owned(),
        body: format!("body-{key}"),
        start,
        end: Some(start + 5),
        lease_token: None,
        attempt: None,
    }
}

fn answer(op: u64, proxy: usize, scope: &str, key: &str, at: Millis, outcome: Outcome) -> Attempt {
    Attempt {
        op,
        scope: scope.to_owned(),
        key: key.to_owned(),
        body: format!("body-{key}"),
        proxy,
        sent: at.saturating_sub(10),
        received: at,
        outcome,
    }
}

fn ok(exec: u64, replayed: bool) -> Outcome {
    Outcome::Status {
        code: 200,
        replayed,
        exec: Some(exec),
    }
}

fn fault(kind: FaultKind, target: Option<usize>, start: Millis, end: Millis) -> FaultEvent {
    FaultEvent {
        kind,
        target,
        start,
        end,
    }
}

#[test]
fn one_execution_replayed_to_every_retry_passes() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.attempts.push(answer(1, 0, A, "k", 110, ok(1, false)));
    h.attempts.push(answer(1, 2, A, "k", 300, ok(1, true)));
    h.attempts.push(answer(2, 1, A, "k", 50, Outcome::Timeout));
    let verdict = check(&h);
    assert!(verdict.passed(), "{verdict:#?}");
    assert_eq!(verdict.keys, 1);
    assert_eq!(verdict.requests, 3);
    assert_eq!(verdict.operations, 2);
    assert_eq!(verdict.executions_per_key, BTreeMap::from([(1, 1)]));
}

#[test]
fn a_rerun_within_lock_ttl_fails_the_run_even_with_a_fault() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.executions.push(execution(2, 1, A, "k", 900));
    h.faults
        .push(fault(FaultKind::KillProxy, Some(0), 150, 400));
    let verdict = check(&h);
    assert!(!verdict.passed());
    assert_eq!(verdict.unexplained_double_executions.len(), 1);
    let finding = &verdict.unexplained_double_executions[0];
    assert_eq!(finding.execution, Some(2));
    assert!(finding.detail.contains("within lock_ttl"), "{finding:?}");
    assert!(!finding.timeline.is_empty());
}

#[test]
fn a_rerun_after_lock_ttl_without_a_fault_fails_the_run() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.executions.push(execution(2, 1, A, "k", 5_000));
    // A fault of another proxy explains nothing.
    h.faults
        .push(fault(FaultKind::KillProxy, Some(2), 150, 400));
    let verdict = check(&h);
    assert_eq!(
        verdict.unexplained_double_executions.len(),
        1,
        "{verdict:#?}"
    );
    assert!(!verdict.passed());
}

#[test]
fn a_rerun_after_its_holder_was_killed_is_explained() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.executions.push(execution(2, 1, A, "k", 2_500));
    h.faults
        .push(fault(FaultKind::KillProxy, Some(0), 103, 600));
    h.attempts.push(answer(1, 1, A, "k", 2_600, ok(2, false)));
    let verdict = check(&h);
    assert!(verdict.passed(), "{verdict:#?}");
    let cause = verdict.explained_double_executions[0].cause.as_deref();
    assert!(cause.unwrap().contains("killed"), "{cause:?}");
}

#[test]
fn a_rerun_after_a_pause_past_lock_ttl_is_explained() {
    let mut h = history();
    h.executions.push(execution(1, 2, A, "k", 100));
    h.executions.push(execution(2, 0, A, "k", 2_400));
    h.faults
        .push(fault(FaultKind::PauseProxy, Some(2), 50, 3_000));
    // The paused proxy delivers its own (fenced) result late: not a replay, so allowed.
    h.attempts.push(answer(1, 2, A, "k", 3_010, ok(1, false)));
    h.attempts.push(answer(2, 0, A, "k", 2_410, ok(2, false)));
    h.attempts.push(answer(3, 1, A, "k", 4_000, ok(2, true)));
    let verdict = check(&h);
    assert!(verdict.passed(), "{verdict:#?}");
    assert_eq!(verdict.explained_double_executions.len(), 1);
}

#[test]
fn a_rerun_after_an_unknown_upstream_outcome_is_explained() {
    let mut h = history();
    let mut slow = execution(1, 0, A, "k", 100);
    slow.end = None;
    h.executions.push(slow);
    h.executions.push(execution(2, 0, A, "k", 2_300));
    h.attempts.push(answer(
        1,
        0,
        A,
        "k",
        1_100,
        Outcome::Status {
            code: 504,
            replayed: false,
            exec: None,
        },
    ));
    let verdict = check(&h);
    assert!(verdict.passed(), "{verdict:#?}");
    assert!(
        verdict.explained_double_executions[0]
            .cause
            .as_deref()
            .unwrap()
            .contains("outcome unknown")
    );
}

#[test]
fn a_replay_of_another_callers_response_fails_the_run() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.attempts.push(answer(1, 0, A, "k", 110, ok(1, false)));
    h.attempts.push(answer(2, 1, B, "k", 400, ok(1, true)));
    let verdict = check(&h);
    assert_eq!(verdict.cross_scope_replays.len(), 1, "{verdict:#?}");
    assert!(!verdict.passed());
}

#[test]
fn a_replay_of_a_fenced_execution_fails_the_run() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.executions.push(execution(2, 1, A, "k", 2_500));
    h.faults
        .push(fault(FaultKind::PauseProxy, Some(0), 120, 3_000));
    h.attempts.push(answer(1, 0, A, "k", 3_100, ok(1, true)));
    let verdict = check(&h);
    assert_eq!(verdict.wrong_replays.len(), 1, "{verdict:#?}");
    assert!(!verdict.passed());
}

#[test]
fn an_answer_for_another_body_or_an_unknown_execution_fails_the_run() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    let mut other_body = answer(1, 0, A, "k", 300, ok(1, true));
    other_body.body = "another body".to_owned();
    h.attempts.push(other_body);
    h.attempts.push(answer(2, 0, A, "k", 400, ok(99, true)));
    let verdict = check(&h);
    assert_eq!(verdict.wrong_replays.len(), 2, "{verdict:#?}");
}

#[test]
fn a_fresh_answer_through_another_proxy_fails_the_run() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.attempts.push(answer(1, 1, A, "k", 110, ok(1, false)));
    assert_eq!(check(&h).wrong_replays.len(), 1);
}

#[test]
fn a_rerun_after_an_acknowledged_response_is_a_lost_record() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.executions.push(execution(2, 1, A, "k", 5_000));
    h.attempts.push(answer(1, 0, A, "k", 110, ok(1, false)));
    h.attempts.push(answer(2, 1, A, "k", 5_010, ok(2, false)));
    // A proxy kill explains a rerun, but not the loss of an acknowledged record.
    h.faults
        .push(fault(FaultKind::KillProxy, Some(0), 200, 500));
    let verdict = check(&h);
    assert_eq!(verdict.lost_records.len(), 1, "{verdict:#?}");
    assert_eq!(verdict.unexplained_losses(), 1);
    assert!(!verdict.passed());

    // A store outage while the record was being stored is the documented limit.
    h.faults.push(fault(FaultKind::CutStore, None, 90, 1_000));
    let verdict = check(&h);
    assert_eq!(verdict.lost_records.len(), 1);
    assert_eq!(verdict.unexplained_losses(), 0);
    assert!(verdict.passed(), "{verdict:#?}");
}

#[test]
fn the_same_key_of_two_callers_is_two_keys() {
    let mut h = history();
    h.executions.push(execution(1, 0, A, "k", 100));
    h.executions.push(execution(2, 1, B, "k", 150));
    h.attempts.push(answer(1, 0, A, "k", 110, ok(1, false)));
    h.attempts.push(answer(2, 1, B, "k", 160, ok(2, false)));
    let verdict = check(&h);
    assert!(verdict.passed(), "{verdict:#?}");
    assert_eq!(verdict.keys, 2);
    assert_eq!(verdict.executions_per_key, BTreeMap::from([(1, 2)]));
}

#[test]
fn attempts_are_sorted_into_phases() {
    let faults = [fault(FaultKind::SlowStore, None, 1_000, 2_000)];
    assert_eq!(phase(500, &faults), "steady");
    assert_eq!(phase(1_500, &faults), "fault");
    assert_eq!(phase(2_000 + RECOVERY_MS, &faults), "recovery");
    assert_eq!(phase(2_001 + RECOVERY_MS, &faults), "steady");
    assert_eq!(percentile(&[1, 2, 3, 4], 50), 2);
    assert_eq!(percentile(&[1, 2, 3, 4], 99), 4);
    assert_eq!(percentile(&[], 99), 0);
}
