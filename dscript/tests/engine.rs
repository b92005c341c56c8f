//! Semantics of the language and the engine: values, units, statistics, time, limits,
//! error handling and the host registration API.

use dscript::replay::{self, ReplayItem, ReplayOptions};
use dscript::{Engine, EngineConfig, EngineError, ErrorMode, Host, Limits, RegisterError, Type, Value};

/// Replays `events` through `src`; returns the action lines and the run-time error messages.
fn run_with(src: &str, events: &str, config: EngineConfig) -> (Vec<String>, Vec<String>) {
    let out = dscript::check(src, &replay::default_host());
    let rendered = dscript::diag::render_all(&out.diagnostics, "t.ds", src, false);
    let compiled = out.compiled.unwrap_or_else(|| panic!("does not check:\n{rendered}"));
    let (mut actions, mut errors) = (Vec::new(), Vec::new());
    let opts = ReplayOptions { config, until: None };
    replay::replay(compiled, events.as_bytes(), opts, |item| match item {
        ReplayItem::Action(a) => actions.push(a.text()),
        ReplayItem::Error(e) => errors.push(format!("{}: {}", e.rule, e.message)),
    })
    .expect("replay runs");
    (actions, errors)
}

fn run(src: &str, events: &str) -> Vec<String> {
    let (actions, errors) = run_with(src, events, EngineConfig::default());
    assert!(errors.is_empty(), "unexpected run-time errors: {errors:?}");
    actions
}

/// Logs each expression once on a heartbeat at t=1s.
fn eval_all(exprs: &[&str]) -> Vec<String> {
    let body: String = exprs.iter().map(|e| format!("  log(str({e}))\n")).collect();
    run(&format!("on heartbeat {{\n{body}}}"), r#"{"t": "1s", "event": "heartbeat"}"#)
        .into_iter()
        .map(|l| l.trim_start_matches("[1s] log(\"").trim_end_matches("\")").to_string())
        .collect()
}

#[test]
fn arithmetic_and_units() {
    let got = eval_all(&[
        "7 / 2", "7 % 3", "7.0 / 2", "1 + 0.5", "1h30m", "90s", "5s + 500ms", "2 * 1.5s", "1GiB / 4", "1GiB / 512MiB",
        "64MiB * 1.5", "1s / 3", "-5s", "\"a\" + \"b\"", "[1, 2] + [3]", "3 in [1, 2, 3]", "\"pan\" in \"panic\"",
        "[1, 2, 3][-1]", "{b: 2, a: \"x\"}", "{b: 2, a: \"x\"}.b", "not 1 > 2 and true", "bytes(1KiB)", "seconds(1500ms)",
        "millis(2s)", "int(2.9)", "round(2.345, 2)", "abs(-3s)", "min(3, 4.5)", "max(1MiB, 2MiB)", "len(\"héllo\")",
        "range(2, 5)", "[1, 2] == [1, 2]",
    ]);
    let want = [
        "3", "1", "3.5", "1.5", "1h30m", "1m30s", "5.5s", "3s", "256MiB", "2.0", "96MiB", "333.333333ms", "-5s", "ab",
        "[1, 2, 3]", "true", "true", "3", r#"{a: \"x\", b: 2}"#, "2", "true", "1024", "1.5", "2000", "2", "2.35", "3s", "3.0",
        "2MiB", "5", "[2, 3, 4]", "true",
    ];
    assert_eq!(got, want);
}

#[test]
fn statistics_builtins() {
    let got = eval_all(&[
        "mean([1, 2, 3, 4])", "mean([1s, 2s])", "median([5, 1, 3])", "stddev([2, 4, 4, 4, 5, 5, 7, 9])",
        "percentile([1, 2, 3, 4, 5], 90)", "ewma([10.0, 20.0], 0.5)", "slope([1MiB, 2MiB, 3MiB])", "sum([1, 2, 3])",
        "last([1, 2])", "shewhart([1.0, 2.0, 3.0])", "shewhart([1.0, 2.0, 3.0], 1).upper",
        "round(ewma_limits([1.0, 2.0, 3.0], 0.5).upper, 4)", "pearson([1, 2, 3], [2, 4, 6])", "spearman([1, 2, 3], [1, 8, 27])",
        "pearson([1, 2, 3], [5, 5, 5])",
    ]);
    let want = [
        "2.5", "1.5s", "3.0", "2.138089935299395", "4.6", "15.0", "1MiB", "6", "2", "{center: 2.0, lower: -1.0, upper: 5.0}",
        "3.0", "3.7321", "1.0", "1.0", "0.0",
    ];
    assert_eq!(got, want);
}

#[test]
fn windows_keep_samples_per_rule_and_rate_uses_their_times() {
    let src = "every 1m {\n  window mem: size[3]\n  push(mem, mem_used())\n  if len(mem) == 3 {\n    log(str(len(mem)) + \" \" + str(mem[0]) + \" \" + str(rate(mem, 1h)))\n  }\n}\n\
               every 1m {\n  window mem: int[10m]\n  push(mem, 1)\n  if now() == 15m {\n    log(str(len(mem)))\n  }\n}";
    let events: String = (0..=15).map(|m| format!("{{\"t\": \"{m}m\", \"mem_used\": \"{}MiB\"}}\n", 100 + m)).collect();
    let got = run(src, &events);
    assert_eq!(got[0], "[3m] log(\"3 101MiB 60MiB\")");
    assert_eq!(got.len(), 14);
    // Samples at 5m..15m are within 10 minutes of 15m.
    assert_eq!(got[13], "[15m] log(\"11\")");
}

#[test]
fn timers_fire_in_time_order_before_events() {
    let src = "every 2s {\n  log(\"two\")\n}\nevery 3s {\n  log(\"three\")\n}\non crash {\n  log(\"crash \" + str(now()))\n}";
    let got = run(src, "{\"t\": \"6s\", \"event\": \"crash\", \"reason\": \"x\"}\n");
    assert_eq!(got, [
        "[2s] log(\"two\")", "[3s] log(\"three\")", "[4s] log(\"two\")", "[6s] log(\"two\")", "[6s] log(\"three\")",
        "[6s] log(\"crash 6s\")",
    ]);
}

#[test]
fn replay_queries_follow_event_fields() {
    let src = "every 1s {\n  log(str(mem_used()) + \" \" + str(cpu_load()) + \" \" + str(patch_applied(\"p\")) + \" \" + last_snapshot())\n}\non heartbeat {\n  snapshot(\"s1\")\n}";
    let events = "{\"t\": \"1s\", \"mem_used\": \"1GiB\", \"applied_patches\": [\"p\"]}\n{\"t\": \"1.5s\", \"event\": \"heartbeat\", \"cpu_load\": 1}\n{\"t\": \"2s\", \"mem_used\": 100}\n";
    assert_eq!(run(src, events), [
        "[1s] log(\"1GiB 0.0 true \")", "[1.5s] snapshot(\"s1\")", "[2s] log(\"100B 1.0 true s1\")",
    ]);
}

#[test]
fn runtime_error_disables_only_the_failing_rule() {
    let src = "let n = 0\non heartbeat {\n  log(str(10 / n))\n}\non heartbeat {\n  log(\"ok\")\n}";
    let events = "{\"t\": \"1s\", \"event\": \"heartbeat\"}\n{\"t\": \"2s\", \"event\": \"heartbeat\"}\n";
    let (actions, errors) = run_with(src, events, EngineConfig::default());
    assert_eq!(actions, ["[1s] log(\"ok\")", "[2s] log(\"ok\")"]);
    assert_eq!(errors, ["on heartbeat (line 2): division by zero"]);
    // Kept enabled, it fails each time; stopped, nothing runs after the first error.
    let keep = EngineConfig { on_error: ErrorMode::KeepRule, ..EngineConfig::default() };
    assert_eq!(run_with(src, events, keep).1.len(), 2);
    let out = dscript::check(src, &replay::default_host()).compiled.expect("checks");
    let stop = ReplayOptions { config: EngineConfig { on_error: ErrorMode::Stop, ..EngineConfig::default() }, until: None };
    let r = replay::replay(out, events.as_bytes(), stop, |_| {});
    assert!(matches!(r, Err(replay::ReplayError::Engine(EngineError::Stopped(_)))));
}

#[test]
fn limits_bound_every_firing() {
    let cases = [
        ("fn f(n: int) -> int {\n  return f(n + 1)\n}\non heartbeat {\n  log(str(f(0)))\n}", "recursion limit of 64 calls"),
        ("on heartbeat {\n  for i in range(90000) {\n    for j in range(90000) {\n      log(\"x\")\n    }\n  }\n}", "step budget"),
        // Building a list costs a step per element, so doubling hits the budget first.
        ("on heartbeat {\n  let xs = [1]\n  for i in range(40) {\n    xs = xs + xs\n  }\n}", "step budget"),
        ("on heartbeat {\n  let s = \"ab\"\n  for i in range(40) {\n    s = s + s\n  }\n}", "string longer than the limit"),
        ("on heartbeat {\n  let xs: list<float> = []\n  log(str(mean(xs)))\n}", "mean needs at least 1 value"),
        ("on heartbeat {\n  log(str([1, 2][5]))\n}", "index 5 is out of range"),
        ("on heartbeat {\n  log(str(9223372036854775807 + 1))\n}", "integer overflow"),
    ];
    for (src, want) in cases {
        let (actions, errors) = run_with(src, "{\"t\": \"1s\", \"event\": \"heartbeat\"}\n", EngineConfig::default());
        assert_eq!(errors.len(), 1, "{src}: {errors:?}");
        assert!(errors[0].contains(want), "{src}: {errors:?}");
        assert!(actions.len() <= 100_000);
    }
    let tight = EngineConfig { limits: Limits { max_steps: 10, ..Limits::default() }, ..EngineConfig::default() };
    let (_, errors) = run_with("on heartbeat {\n  for i in range(20) {\n    log(\"x\")\n  }\n}", "{\"event\": \"heartbeat\"}\n", tight);
    assert_eq!(errors, ["on heartbeat (line 1): step budget of 10 exhausted"]);
}

#[test]
fn runtime_errors_point_at_the_source() {
    let src = "let zero = 0\nevery 1s {\n  let x = 1\n  log(str(x / zero))\n}";
    let compiled = dscript::check(src, &replay::default_host()).compiled.expect("checks");
    let mut rendered = String::new();
    replay::replay(compiled, "{\"t\": \"1s\"}\n".as_bytes(), ReplayOptions::default(), |item| {
        if let ReplayItem::Error(e) = item {
            rendered = e.diagnostic().render("t.ds", src, false);
        }
    })
    .expect("replay");
    assert!(rendered.contains("run-time error in `every 1s (line 2)`: division by zero"), "{rendered}");
    assert!(rendered.contains("t.ds:4:11"), "{rendered}");
    assert!(rendered.contains("the rule is now disabled"), "{rendered}");
}

#[derive(Default)]
struct World {
    mem: i64,
    log: Vec<String>,
}

#[test]
fn host_api_registers_typed_functions_and_events() {
    let mut host = Host::<World>::new();
    host.query("mem", &[], Type::Size, |w, _| Ok(Value::Int(w.mem))).expect("register");
    host.action("note", &[("msg", Type::Str), ("at", Type::Duration)], |w, call| {
        w.log.push(format!("{} {}", call.display_args(), call.rule));
        Ok(())
    })
    .expect("register");
    host.event("tick", &[("n", Type::Int)]).expect("register");
    assert_eq!(host.query("mem", &[], Type::Int, |_, _| Ok(Value::Int(0))).err(), Some(RegisterError::Duplicate("mem".into())));
    assert_eq!(host.action("mean", &[], |_, _| Ok(())).err(), Some(RegisterError::Reserved("mean".into())));
    assert_eq!(host.action("every", &[], |_, _| Ok(())).err(), Some(RegisterError::Reserved("every".into())));
    assert_eq!(host.action("9x", &[], |_, _| Ok(())).err(), Some(RegisterError::BadName("9x".into())));

    let src = "on tick where event.n > 1 {\n  note(\"mem \" + str(mem()), now())\n}";
    let program = dscript::check(src, &host).compiled.expect("checks");
    // The checker only knows what was registered.
    assert!(dscript::check("every 1s {\n  restore(\"x\")\n}", &host).compiled.is_none());
    let mut world = World { mem: 1 << 30, log: Vec::new() };
    let mut engine = Engine::start(program, host, EngineConfig::default(), &mut world).expect("start");
    let tick = engine.event_id("tick").expect("event");
    engine.dispatch(&mut world, tick, 1_000_000_000, &[Value::Int(1)]).expect("dispatch");
    engine.dispatch(&mut world, tick, 2_000_000_000, &[Value::Int(2)]).expect("dispatch");
    assert_eq!(world.log, ["\"mem 1GiB\", 2s on tick (line 1)"]);
    // Wrong shapes from the embedder are refused, not trusted.
    assert!(matches!(engine.dispatch(&mut world, tick, 3, &[Value::str("x")]), Err(EngineError::FieldType { .. })));
    assert!(matches!(engine.dispatch(&mut world, tick, 3, &[]), Err(EngineError::FieldCount { .. })));
    assert!(matches!(engine.dispatch(&mut world, 99, 3, &[]), Err(EngineError::UnknownEvent(99))));
}

#[test]
fn a_policy_checked_against_another_host_does_not_start() {
    let program = dscript::check("every 1s {\n  log(\"x\")\n}", &replay::default_host()).compiled.expect("checks");
    let mut world = World::default();
    assert!(matches!(Engine::start(program, Host::<World>::new(), EngineConfig::default(), &mut world), Err(EngineError::HostMismatch)));
}

#[test]
fn malformed_events_are_reported_with_their_line() {
    let compiled = || dscript::check("on crash {\n  log(event.reason)\n}", &replay::default_host()).compiled.expect("checks");
    let cases = [
        ("{\"t\": \"1s\", \"event\": \"crash\"}\n", "line 1: event `crash` is missing field `reason`"),
        ("{\"t\": \"2s\"}\n{\"t\": \"1s\"}\n", "line 2: time goes backwards"),
        ("{\"event\": \"nope\"}\n", "line 1: unknown event `nope`"),
        ("not json\n", "line 1:"),
        ("{\"event\": \"crash\", \"reason\": 5}\n", "expected `string`, got 5"),
        ("{\"t\": \"5 parsecs\"}\n", "`t`: expected a duration"),
    ];
    for (events, want) in cases {
        let err = replay::replay(compiled(), events.as_bytes(), ReplayOptions::default(), |_| {}).expect_err(events);
        assert!(err.to_string().contains(want), "{events}: {err}");
    }
}

#[test]
fn json_actions_keep_types() {
    let compiled = dscript::check("on heartbeat {\n  alert(\"x\")\n}", &replay::default_host()).compiled.expect("checks");
    let mut lines = Vec::new();
    replay::replay(compiled, "{\"t_ms\": 1500, \"event\": \"heartbeat\"}\n".as_bytes(), ReplayOptions::default(), |i| {
        if let ReplayItem::Action(a) = i {
            lines.push(a.json());
        }
    })
    .expect("replay");
    assert_eq!(lines, [r#"{"action":"alert","args":["x"],"rule":"on heartbeat (line 1)","t":"1.5s","t_ms":1500}"#]);
}

#[test]
fn replay_is_deterministic() {
    let src = dscript::bench::policy(20);
    let events = dscript::bench::events(70_000);
    let once = || run(&src, &events);
    let first = once();
    assert!(!first.is_empty());
    assert_eq!(first, once());
}
