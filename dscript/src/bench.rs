//! The replay benchmark: events per second through a generated many-rule policy with
//! statistics, measured next to the cost of only decoding the same events.

use crate::replay::{decode_line, ReplayOptions, Replayer};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    pub events: u64,
    pub rules: usize,
}

/// Rule templates; the policy takes the first `rules` of them, cycling if asked for more.
const RULES: &[&str] = &[
    "every 1s {\n  window mem: size[60]\n  push(mem, mem_used())\n  if len(mem) >= 10 and rate(mem, 1h) > 10GiB {\n    alert(\"memory leak\")\n  }\n}",
    "every 1s {\n  window lat: duration[120]\n  push(lat, latency())\n  if len(lat) > 30 {\n    let lim = shewhart(lat)\n    if last(lat) > lim.upper + 1s {\n      log(\"latency spike\")\n    }\n  }\n}",
    "every 5s {\n  window cpu: float[100]\n  push(cpu, cpu_load())\n  if len(cpu) > 10 and ewma(cpu, 0.3) > 0.99 {\n    alert(\"cpu saturated\")\n  }\n}",
    "every 10s {\n  window m: size[30]\n  push(m, mem_used())\n  if len(m) > 5 {\n    let l = ewma_limits(m, 0.2)\n    if last(m) > l.upper + 1GiB {\n      alert(\"memory jump\")\n    }\n  }\n}",
    "every 2s {\n  window lat: duration[5m]\n  push(lat, latency())\n  if len(lat) > 10 and percentile(lat, 99) > 2s {\n    alert(\"p99 latency\")\n  }\n}",
    "on io_window {\n  window inj: int[32]\n  window net: int[32]\n  push(inj, event.injected)\n  push(net, event.net_io)\n  if len(inj) >= 16 and pearson(inj, net) > 0.95 {\n    isolate(\"network\")\n  }\n}",
    "on io_window {\n  window inj: int[32]\n  window disk: int[32]\n  push(inj, event.injected)\n  push(disk, event.disk_io)\n  if len(inj) >= 16 and spearman(inj, disk) > 0.95 {\n    keep_evidence(\"disk-correlation\")\n  }\n}",
    "on heartbeat {\n  beats += 1\n}",
    "on heartbeat where mem_used() > 8GiB {\n  alert(\"memory above 8GiB\")\n}",
    "on heartbeat where cpu_load() > 0.999 {\n  hot += 1\n}",
    "on heartbeat {\n  window recent: float[8]\n  push(recent, cpu_load())\n  if len(recent) == 8 and mean(recent) > 2.0 {\n    alert(\"impossible load\")\n  }\n}",
    "on heartbeat where beats % 100000 == 0 {\n  log(\"heartbeats: \" + str(beats))\n}",
    "on heartbeat where too_big(mem_used()) {\n  alert(\"too big\")\n}",
    "on heartbeat where guest_state() == \"crashed\" {\n  restore(last_snapshot())\n}",
    "on heartbeat {\n  if mem_used() > peak {\n    peak = mem_used()\n  }\n}",
    "on crash {\n  restore(\"last-good\")\n}",
    "on operator_answer where event.approved {\n  shadow_reboot(event.id)\n}",
    "on update_available {\n  ask_operator(event.update, \"apply \" + event.update + \"?\")\n}",
    "every 1m {\n  snapshot(\"periodic\")\n}",
    "on lifecycle where event.state == \"reboot\" {\n  log(\"guest rebooted\")\n}",
];

/// The generated policy for `rules` rules.
pub fn policy(rules: usize) -> String {
    let mut src = String::from(
        "# Generated benchmark policy.\nlet beats = 0\nlet hot = 0\nlet peak = 0B\n\nfn too_big(m: size) -> bool {\n  return m > 16GiB\n}\n",
    );
    for i in 0..rules {
        src.push('\n');
        src.push_str(RULES[i % RULES.len()]);
        src.push('\n');
    }
    src
}

/// `n` JSON-line events, 1 ms apart: heartbeats carrying metrics, every 100th an `io_window`.
pub fn events(n: u64) -> String {
    let mut out = String::with_capacity(n as usize * 80);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..n {
        // xorshift: deterministic noise without a dependency.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mem = 512 * 1024 * 1024 + (i * 64) + (x % 4096);
        let cpu = (x % 1000) as f64 / 1000.0;
        if i % 100 == 99 {
            out.push_str(&format!(
                "{{\"t_ms\":{i},\"event\":\"io_window\",\"injected\":{},\"disk_io\":{},\"net_io\":{}}}\n",
                x % 7,
                (x >> 8) % 50,
                (x >> 16) % 50
            ));
        } else if i % 10 == 0 {
            out.push_str(&format!(
                "{{\"t_ms\":{i},\"event\":\"heartbeat\",\"mem_used\":{mem},\"cpu_load\":{cpu},\"latency\":\"{}ms\"}}\n",
                5 + x % 20
            ));
        } else {
            out.push_str(&format!("{{\"t_ms\":{i},\"event\":\"heartbeat\",\"mem_used\":{mem},\"cpu_load\":{cpu}}}\n"));
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub events: u64,
    pub rules: usize,
    pub statistics_rules: usize,
    /// Decoding the JSON lines only (no policy).
    pub decode_per_sec: f64,
    /// The whole replay: decoding plus the policy.
    pub replay_per_sec: f64,
    /// The policy alone on pre-decoded events.
    pub engine_per_sec: f64,
    pub actions: u64,
}

impl BenchReport {
    pub fn text(&self) -> String {
        format!(
            "{} events through a {}-rule policy ({} rules compute statistics), best of {ROUNDS} runs\n\
             decode only (baseline): {:>12.0} events/s\n\
             policy only (decoded):  {:>12.0} events/s\n\
             replay (decode+policy): {:>12.0} events/s  ({:.0}% of baseline)\n\
             actions taken: {}",
            self.events,
            self.rules,
            self.statistics_rules,
            self.decode_per_sec,
            self.engine_per_sec,
            self.replay_per_sec,
            100.0 * self.replay_per_sec / self.decode_per_sec.max(1.0),
            self.actions
        )
    }

    pub fn json(&self) -> String {
        serde_json::json!({
            "events": self.events,
            "rules": self.rules,
            "statistics_rules": self.statistics_rules,
            "decode_events_per_sec": self.decode_per_sec.round(),
            "engine_events_per_sec": self.engine_per_sec.round(),
            "replay_events_per_sec": self.replay_per_sec.round(),
            "actions": self.actions,
        })
        .to_string()
    }
}

/// How many times each phase runs; the best run counts (the others absorb noise from a shared machine).
const ROUNDS: usize = 3;

/// Rules among the first `rules` templates that compute statistics.
fn statistics_rules(rules: usize) -> usize {
    const STATS: [&str; 9] = ["rate(", "shewhart(", "ewma(", "ewma_limits(", "percentile(", "pearson(", "spearman(", "mean(", "stddev("];
    (0..rules).filter(|i| STATS.iter().any(|f| RULES[i % RULES.len()].contains(f))).count()
}

fn best_rate(n: u64, mut run: impl FnMut() -> Result<f64, String>) -> Result<f64, String> {
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        best = best.min(run()?);
    }
    Ok(n as f64 / best.max(1e-9))
}

/// Runs the benchmark; `Err` only if the generated policy fails to check or run (a bug).
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, String> {
    let src = policy(cfg.rules);
    let compile = || {
        let out = crate::check(&src, &crate::replay::default_host());
        out.compiled.ok_or_else(|| {
            format!("benchmark policy does not check:\n{}", crate::diag::render_all(&out.diagnostics, "bench.ds", &src, false))
        })
    };
    let replayer = || Replayer::new(compile()?, ReplayOptions::default()).map_err(|e| e.to_string());
    let text = events(cfg.events);
    let lines: Vec<&str> = text.lines().collect();

    let decode_per_sec = best_rate(cfg.events, || {
        let start = Instant::now();
        let mut fields = 0usize;
        for line in &lines {
            fields += decode_line(line).map(|r| r.fields.len()).unwrap_or(0);
        }
        std::hint::black_box(fields);
        Ok(start.elapsed().as_secs_f64())
    })?;

    let mut actions = 0u64;
    let engine_per_sec = best_rate(cfg.events, || {
        let decoded: Vec<_> = lines.iter().filter_map(|l| decode_line(l).ok()).collect();
        let mut r = replayer()?;
        actions = 0;
        let start = Instant::now();
        for raw in decoded {
            r.feed(raw)?;
            actions += r.world.actions.len() as u64;
            r.world.actions.clear();
        }
        Ok(start.elapsed().as_secs_f64())
    })?;

    let replay_per_sec = best_rate(cfg.events, || {
        let mut r = replayer()?;
        let start = Instant::now();
        for line in &lines {
            r.feed_line(line)?;
            r.world.actions.clear();
        }
        let elapsed = start.elapsed().as_secs_f64();
        if let Some(e) = r.engine.take_errors().first() {
            return Err(format!("benchmark policy failed at run time: {e}"));
        }
        Ok(elapsed)
    })?;
    Ok(BenchReport { events: cfg.events, rules: cfg.rules, statistics_rules: statistics_rules(cfg.rules), decode_per_sec, replay_per_sec, engine_per_sec, actions })
}
