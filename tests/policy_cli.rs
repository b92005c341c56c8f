//! `dvisor policy check|replay|bench`: exit codes and output of the real binary.
use std::path::PathBuf;
use std::process::{Command, Output};

fn dvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dvisor")).args(args).env("NO_COLOR", "1").output().expect("run dvisor")
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dvisor-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const POLICY: &str = "on crash where event.reason == \"kernel panic\" {\n  restore(\"last-good\")\n}\n";
const EVENTS: &str = "{\"t\": \"12.5s\", \"event\": \"crash\", \"reason\": \"kernel panic\"}\n";

#[test]
fn check_exit_codes() {
    let good = scratch("good.ds", POLICY);
    let out = dvisor(&["policy", "check", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let bad = scratch("bad.ds", "every 5 {\n  snapshot(42)\n}\n");
    let out = dvisor(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("`every` needs a duration, found `int`") && err.contains("bad.ds:1:7"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");

    let out = dvisor(&["policy", "check", "/nonexistent/policy.ds"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/policy.ds"));
}

#[test]
fn replay_prints_actions() {
    let policy = scratch("replay.ds", POLICY);
    let events = scratch("replay.jsonl", EVENTS);
    let out = dvisor(&["policy", "replay", policy.to_str().unwrap(), "--events", events.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "[12.5s] restore(\"last-good\")\n");

    let out = dvisor(&["policy", "replay", policy.to_str().unwrap(), "--events", events.to_str().unwrap(), "--json"]);
    let line: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("json line");
    assert_eq!(line["action"], "restore");
    assert_eq!(line["t_ms"], 12500);

    let broken = scratch("broken.jsonl", "{\"t\": \"1s\", \"event\": \"crash\"}\n");
    let out = dvisor(&["policy", "replay", policy.to_str().unwrap(), "--events", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("line 1"));

    let failing = scratch("failing.ds", "let zero = 0\non crash {\n  log(str(1 / zero))\n}\n");
    let out = dvisor(&["policy", "replay", failing.to_str().unwrap(), "--events", events.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("division by zero"));
}

#[test]
fn bench_reports_rates() {
    let out = dvisor(&["policy", "bench", "--events", "2000", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("json report");
    assert_eq!(report["rules"], 20);
    assert!(report["replay_events_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
}
