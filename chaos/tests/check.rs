//! The `chaos` binary judging recorded histories (`--check`): exit 0 for a clean one, 1 and the
//! key's timeline for one with a defect.

use std::process::Command;

const SETTINGS: &str = r#""settings":{"store":"hand-built","seed":1,"duration_ms":10000,"rate":1,
    "lock_ttl_ms":2000,"upstream_timeout_ms":1000}"#;

fn check(history: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("history.json");
    std::fs::write(&path, history).expect("write history");
    let output = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .arg("--check")
        .arg(&path)
        .output()
        .expect("run chaos");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn execution(id: u64, proxy: usize, start: u64) -> String {
    format!(
        r#"{{"id":{id},"proxy":{proxy},"scope":"Bearer a","key":"k","body":"b","start":{start},
        "end":{},"lease_token":null,"attempt":null}}"#,
        start + 5
    )
}

fn answer(exec: u64, proxy: usize, at: u64, replayed: bool) -> String {
    format!(
        r#"{{"op":1,"scope":"Bearer a","key":"k","body":"b","proxy":{proxy},"sent":{},
        "received":{at},"outcome":{{"Status":{{"code":200,"replayed":{replayed},"exec":{exec}}}}}}}"#,
        at - 10
    )
}

#[test]
fn a_clean_history_passes() {
    let history = format!(
        r#"{{{SETTINGS},"attempts":[{},{}],"executions":[{}],"faults":[]}}"#,
        answer(1, 0, 120, false),
        answer(1, 2, 400, true),
        execution(1, 0, 100)
    );
    let (code, stdout) = check(&history);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
}

#[test]
fn a_second_execution_within_lock_ttl_fails_with_its_timeline() {
    let history = format!(
        r#"{{{SETTINGS},"attempts":[{}],"executions":[{},{}],
        "faults":[{{"kind":"KillProxy","target":0,"start":150,"end":600}}]}}"#,
        answer(2, 1, 1_000, false),
        execution(1, 0, 100),
        execution(2, 1, 900)
    );
    let (code, stdout) = check(&history);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("UNEXPLAINED DOUBLE EXECUTION"), "{stdout}");
    assert!(stdout.contains("execution 2 via proxy 1"), "{stdout}");
}
