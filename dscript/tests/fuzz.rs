//! Bounded fuzzing of the lexer, parser, checker and interpreter: token soup, mutated valid
//! programs and pathological nesting must never panic and must always terminate.

use dscript::replay::{self, ReplayOptions};
use dscript::{EngineConfig, ErrorMode, Limits};

/// xorshift64*: deterministic, so a failure reproduces from its case number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const TOKENS: &[&str] = &[
    "let", "fn", "event", "every", "on", "where", "if", "else", "for", "in", "return", "window", "true", "false", "and",
    "or", "not", "(", ")", "{", "}", "[", "]", ",", ":", ";", ".", "->", "=", "+=", "-=", "+", "-", "*", "/", "%", "==",
    "!=", "<", "<=", ">", ">=", "\n", "\n", "\n", " ", "x", "y", "mem", "event", "crash", "heartbeat", "reason",
    "mem_used", "cpu_load", "mean", "push", "rate", "shewhart", "pearson", "len", "str", "range", "alert", "restore",
    "0", "1", "-1", "3", "9223372036854775807", "0.5", "1e308", "5s", "500ms", "1h30m", "64MiB", "1GiB", "\"a\"",
    "\"\\n\"", "\"", "#", "&&", "!", "é", "\u{0}", "int", "float", "size", "duration", "string", "list<int>", "window<float>",
];

fn token_soup(rng: &mut Rng) -> String {
    let n = rng.below(120);
    let mut s = String::new();
    for _ in 0..n {
        s.push_str(rng.pick(TOKENS));
        if rng.below(3) == 0 {
            s.push(' ');
        }
    }
    s
}

fn mutate(rng: &mut Rng, base: &str) -> String {
    let mut b: Vec<char> = base.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let len = b.len().max(1);
        let at = rng.below(len);
        match rng.below(5) {
            0 => {
                let end = (at + rng.below(12)).min(b.len());
                b.drain(at.min(b.len())..end);
            }
            1 => {
                let tok: Vec<char> = rng.pick(TOKENS).chars().collect();
                let at = at.min(b.len());
                b.splice(at..at, tok);
            }
            2 => {
                let end = (at + rng.below(30)).min(b.len());
                let piece: Vec<char> = b[at.min(end)..end].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, piece);
            }
            3 => b.truncate(at),
            _ => {
                if at < b.len() {
                    b[at] = rng.pick(TOKENS).chars().next().unwrap_or('x');
                }
            }
        }
    }
    b.into_iter().collect()
}

/// Events touching every default event and query, within 200ms so `every 1ms` stays cheap.
const EVENTS: &str = r#"{"t_ms": 1, "event": "heartbeat", "mem_used": "100MiB", "cpu_load": 0.5, "latency": "20ms", "guest_state": "running"}
{"t_ms": 20, "event": "crash", "reason": "kernel panic"}
{"t_ms": 40, "event": "io_window", "injected": 3, "disk_io": 7, "net_io": 9}
{"t_ms": 60, "event": "console", "line": "oops"}
{"t_ms": 80, "event": "update_available", "update": "k-1"}
{"t_ms": 100, "event": "operator_answer", "id": "k-1", "approved": true}
{"t_ms": 120, "event": "lifecycle", "state": "reboot", "applied_patches": ["p"]}
{"t_ms": 200, "event": "heartbeat", "mem_used": "120MiB"}
"#;

/// Checks, and when the program is valid, replays it under tight limits.
fn exercise(src: &str) {
    let out = dscript::check(src, &replay::default_host());
    for d in &out.diagnostics {
        let _ = d.render("fuzz.ds", src, false);
    }
    if let Some(compiled) = out.compiled {
        let limits = Limits { max_steps: 5_000, max_depth: 16, max_list: 1_000, max_string: 1_000 };
        let opts = ReplayOptions { config: EngineConfig { limits, on_error: ErrorMode::DisableRule }, until: None };
        let _ = replay::replay(compiled, EVENTS.as_bytes(), opts, |item| {
            if let replay::ReplayItem::Error(e) = item {
                let _ = e.diagnostic().render("fuzz.ds", src, false);
            }
        });
    }
}

fn corpus() -> Vec<String> {
    let mut out = Vec::new();
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
    if let Ok(dir) = std::fs::read_dir(golden) {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "ds") {
                out.extend(std::fs::read_to_string(e.path()).ok());
            }
        }
    }
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dscript.md")).unwrap_or_default();
    let mut block: Option<String> = None;
    for line in docs.lines() {
        match (&mut block, line.starts_with("```")) {
            (None, true) if line.starts_with("```dscript") => block = Some(String::new()),
            (Some(_), true) => out.extend(block.take()),
            (Some(b), false) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    out.push(dscript::bench::policy(20));
    out
}

#[test]
fn token_soup_never_panics() {
    let mut rng = Rng(0x5EED_0001);
    for _ in 0..10_000 {
        exercise(&token_soup(&mut rng));
    }
}

#[test]
fn mutated_programs_never_panic() {
    let corpus = corpus();
    assert!(corpus.len() > 20);
    let mut rng = Rng(0x5EED_0002);
    for _ in 0..10_000 {
        let base = &corpus[rng.below(corpus.len())];
        exercise(&mutate(&mut rng, base));
    }
}

#[test]
fn pathological_inputs_are_rejected_or_bounded() {
    let deep_parens = format!("let x = {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    let deep_not = format!("let x = {}true", "not ".repeat(100_000));
    let deep_neg = format!("let x = {}1", "-".repeat(100_000));
    let long_sum = format!("let x = 1{}", "+1".repeat(100_000));
    let long_field = format!("let x = {{a: 1}}{}", ".a".repeat(100_000));
    let deep_blocks = format!("every 1s {{\n{}{}\n}}", "if true {\n".repeat(10_000), "}\n".repeat(10_000));
    let deep_lists = format!("let x = {}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let compound = format!("let x = {}", "1s".repeat(10_000));
    for src in [deep_parens, deep_not, deep_neg, long_sum, long_field, deep_blocks, deep_lists, compound] {
        let out = dscript::check(&src, &replay::default_host());
        assert!(out.compiled.is_none(), "pathological input accepted: {}...", &src[..40.min(src.len())]);
    }
    // Bounded at run time: unbounded recursion, exponential lists and long loops.
    let runaway = [
        "fn f(n: int) -> int {\n  return f(n + 1)\n}\non heartbeat {\n  log(str(f(0)))\n}",
        "on heartbeat {\n  let xs = [1]\n  for i in range(100) {\n    xs = xs + xs\n  }\n}",
        "on heartbeat {\n  for i in range(50000) {\n    for j in range(50000) {\n      log(\"x\")\n    }\n  }\n}",
        "on heartbeat {\n  let s = \"ab\"\n  for i in range(64) {\n    s = s + s\n  }\n}",
        "every 1ms {\n  window w: float[100]\n  push(w, 1.0)\n  log(str(stddev(w)))\n}",
    ];
    for src in runaway {
        exercise(src);
    }
}
