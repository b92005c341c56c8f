//! What `dvisor policy check|replay|bench` do, as functions over writers, so the CLI stays a
//! thin argument parser and the behaviour is testable without the binary.
//!
//! Exit codes: 0 clean, 1 the policy has errors (found by the checker, or at run time
//! during a replay), 2 usage or input problems (missing file, malformed events).

use crate::diag::render_all;
use crate::engine::{EngineConfig, ErrorMode};
use crate::replay::{self, ReplayItem, ReplayOptions};
use crate::CheckOutput;
use std::io::{BufReader, Write};
use std::path::Path;

/// Output options shared by the commands.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    /// Colour diagnostics (when stderr is a terminal).
    pub color: bool,
    /// JSON lines on stdout instead of text.
    pub json: bool,
}

fn read_policy(path: &Path, err: &mut dyn Write) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) => {
            let _ = writeln!(err, "dvisor: cannot read policy {}: {e}", path.display());
            None
        }
    }
}

/// Checks the policy, printing diagnostics; `Some` when it may run.
fn check_source(path: &Path, src: &str, style: Style, err: &mut dyn Write) -> CheckOutput {
    let out = crate::check(src, &replay::default_host());
    let name = path.display().to_string();
    let _ = err.write_all(render_all(&out.diagnostics, &name, src, style.color).as_bytes());
    out
}

/// `dvisor policy check FILE`: diagnostics to `err`; 0 clean (warnings allowed), 1 errors, 2 unreadable.
pub fn check_file(path: &Path, style: Style, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let Some(src) = read_policy(path, err) else { return 2 };
    let checked = check_source(path, &src, style, err);
    let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = checked.diagnostics.len() - errors;
    if style.json {
        for d in &checked.diagnostics {
            let (line, col) = d.span.line_col(&src);
            let j = serde_json::json!({
                "severity": if d.is_error() { "error" } else { "warning" },
                "file": path.display().to_string(), "line": line, "column": col,
                "message": d.message, "help": d.help,
            });
            let _ = writeln!(out, "{j}");
        }
    }
    if errors > 0 {
        let _ = writeln!(err, "{}: {errors} error(s), {warnings} warning(s)", path.display());
        1
    } else {
        if !style.json {
            let _ = writeln!(out, "{}: ok ({warnings} warning(s))", path.display());
        }
        0
    }
}

/// Options for `dvisor policy replay`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayArgs {
    pub on_error: ErrorMode,
    pub until: Option<i64>,
    pub max_steps: Option<u64>,
}

/// `dvisor policy replay FILE --events EVENTS`: actions to `out`, errors and summary to `err`.
pub fn replay_file(path: &Path, events: &Path, args: ReplayArgs, style: Style, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let Some(src) = read_policy(path, err) else { return 2 };
    let checked = check_source(path, &src, style, err);
    let Some(compiled) = checked.compiled else {
        let _ = writeln!(err, "{}: not replaying a policy with errors", path.display());
        return 1;
    };
    let file = match std::fs::File::open(events) {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(err, "dvisor: cannot read events {}: {e}", events.display());
            return 2;
        }
    };
    let mut config = EngineConfig { on_error: args.on_error, ..EngineConfig::default() };
    if let Some(s) = args.max_steps {
        config.limits.max_steps = s;
    }
    let opts = ReplayOptions { config, until: args.until };
    let name = path.display().to_string();
    let mut runtime_errors = 0;
    let result = replay::replay(compiled, BufReader::new(file), opts, |item| match item {
        ReplayItem::Action(a) => {
            let _ = writeln!(out, "{}", if style.json { a.json() } else { a.text() });
        }
        ReplayItem::Error(e) => {
            runtime_errors += 1;
            let _ = err.write_all(e.diagnostic().render(&name, &src, style.color).as_bytes());
        }
    });
    let _ = out.flush();
    match result {
        Ok(s) => {
            let _ = writeln!(
                err,
                "replayed {} lines ({} events) to {}: {} action(s), {} run-time error(s){}",
                s.lines,
                s.events,
                crate::units::format_duration(s.end_time),
                s.actions,
                s.errors,
                if s.disabled_rules.is_empty() { String::new() } else { format!("; disabled: {}", s.disabled_rules.join(", ")) }
            );
            if runtime_errors > 0 {
                1
            } else {
                0
            }
        }
        Err(replay::ReplayError::Engine(e)) => {
            let _ = writeln!(err, "{}: {e}", path.display());
            1
        }
        Err(e) => {
            let _ = writeln!(err, "{}: {e}", events.display());
            2
        }
    }
}

/// `dvisor policy functions`: the built-ins, the replay host's functions and its events.
pub fn reference_text() -> String {
    let mut s = String::from("Built-in functions (T: element type; U: T, except float for int):\n");
    for (_, sig) in crate::BUILTINS {
        s.push_str(&format!("  {sig}\n"));
    }
    s.push_str("\nHost functions (the monitor's; replay records actions and answers queries from event fields):\n");
    for (sig, what) in replay::HOST_DOCS {
        s.push_str(&format!("  {sig:<44} {what}\n"));
    }
    s.push_str("\nEvents:\n");
    for (name, fields) in replay::default_events() {
        let f: Vec<String> = fields.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        s.push_str(&format!("  {name} {{{}}}\n", f.join(", ")));
    }
    s
}
