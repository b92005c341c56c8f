//! Every `dscript` block in docs/dscript.md checks clean; every `example=NAME` block replays
//! its `events=NAME` block to exactly its `actions=NAME` block.

use dscript::replay::{self, ReplayItem, ReplayOptions};
use std::collections::BTreeMap;

struct Block {
    info: String,
    body: String,
    line: usize,
}

fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for (i, line) in md.lines().enumerate() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(info)) => current = Some(Block { info: info.trim().to_string(), body: String::new(), line: i + 1 }),
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some(b), None) => {
                b.body.push_str(line);
                b.body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// The value of `key=` in a fence's info string.
fn tag<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn docs() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dscript.md");
    std::fs::read_to_string(path).expect("docs/dscript.md is readable")
}

#[test]
fn every_dscript_block_checks_clean() {
    let host = replay::default_host();
    let md = docs();
    let mut n = 0;
    for b in blocks(&md).iter().filter(|b| b.info.split_whitespace().next() == Some("dscript")) {
        n += 1;
        let out = dscript::check(&b.body, &host);
        let rendered = dscript::diag::render_all(&out.diagnostics, "docs/dscript.md", &b.body, false);
        assert!(out.diagnostics.is_empty(), "block at docs/dscript.md:{} has diagnostics:\n{rendered}", b.line);
    }
    assert!(n >= 9, "expected many dscript blocks, found {n}");
}

#[test]
fn worked_examples_replay_to_their_actions() {
    let md = docs();
    let all = blocks(&md);
    let by = |key: &str| -> BTreeMap<String, &Block> {
        all.iter().filter_map(|b| tag(&b.info, key).map(|name| (name.to_string(), b))).collect()
    };
    let (programs, events, actions) = (by("example"), by("events"), by("actions"));
    let required = ["leak", "keylogger", "crash", "patch", "update"];
    for name in required {
        assert!(programs.contains_key(name), "docs lack the `{name}` example");
    }
    for (name, program) in &programs {
        let ev = events.get(name).unwrap_or_else(|| panic!("example {name} has no events block"));
        let want = actions.get(name).unwrap_or_else(|| panic!("example {name} has no actions block"));
        let compiled = dscript::check(&program.body, &replay::default_host()).compiled.expect("example checks");
        let mut got = String::new();
        let summary = replay::replay(compiled, ev.body.as_bytes(), ReplayOptions::default(), |item| match item {
            ReplayItem::Action(a) => {
                got.push_str(&a.text());
                got.push('\n');
            }
            ReplayItem::Error(e) => panic!("example {name} failed at run time: {e}"),
        })
        .unwrap_or_else(|e| panic!("example {name}: {e}"));
        assert_eq!(got, want.body, "example {name} (docs/dscript.md:{}) printed different actions", program.line);
        assert_eq!(summary.errors, 0);
    }
}
