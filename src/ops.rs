//! Operator commands that talk to a VM's monitor: pause, resume, regs,
//! keys, stats, events, status.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use dvisor_monitor::control::{MonitorStatus, VcpuRegs};
use dvisor_monitor::{paths, ControlClient, ControlRequest};
use dvisor_api::protocol::{DeviceStats, Event, EventKind, KeyEvent};
use serde::Deserialize;

#[derive(Debug, Args)]
pub struct Target {
    /// Which VM (the name given to `dvisor run --name`).
    #[arg(long, value_name = "NAME", default_value = paths::DEFAULT_VM_NAME, global = true)]
    pub vm: String,
    /// The monitor's control socket [default: <runtime dir>/<vm>/monitor.sock].
    #[arg(long, value_name = "PATH", global = true)]
    pub control: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Target {
    pub fn connect(&self) -> anyhow::Result<ControlClient> {
        paths::check_vm_name(&self.vm).map_err(anyhow::Error::msg)?;
        let path = self.control.clone().unwrap_or_else(|| paths::control_socket(&self.vm));
        Ok(ControlClient::connect(&path)?)
    }
}

#[derive(Debug, Args)]
pub struct SimpleArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct RegsArgs {
    /// Only this vCPU [default: all].
    #[arg(long, value_name = "N")]
    pub vcpu: Option<u32>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
#[command(after_help = "\
TEXT is typed on the guest's PS/2 keyboard with a US layout; \\n is Enter, \
\\t Tab, \\b Backspace, \\e Escape, \\\\ a backslash. Keys go to the guest's \
foreground virtual terminal and /dev/input/event*, not to the serial console.

--raw takes key transitions NAME:press|release[:DELAY_MS], e.g. \
--raw 'leftshift:press a:press a:release:50 leftshift:release' (DELAY_MS is \
the wait before that transition).")]
pub struct KeysArgs {
    /// Text to type.
    #[arg(value_name = "TEXT", required_unless_present = "raw", conflicts_with = "raw")]
    pub text: Option<String>,
    /// Raw key transitions instead of text.
    #[arg(long, value_name = "EVENTS")]
    pub raw: Option<String>,
    /// How long each key is held down, in ms.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    pub hold_ms: u32,
    /// Pause between two keys, in ms.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    pub gap_ms: u32,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Event kinds to show, comma-separated: console, io, lifecycle, debug [default: all].
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Start with the N latest events the monitor kept.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub recent: usize,
    /// Exit after N events [default: follow until interrupted].
    #[arg(long, value_name = "N")]
    pub count: Option<usize>,
    #[command(flatten)]
    pub target: Target,
}

pub fn pause(a: SimpleArgs) -> anyhow::Result<i32> {
    #[derive(Deserialize, serde::Serialize)]
    struct Paused {
        already: bool,
        stop_ns: u64,
    }
    let r: Paused = a.target.connect()?.call(ControlRequest::Pause)?;
    if a.target.json {
        println!("{}", serde_json::to_string(&r)?);
    } else if r.already {
        println!("already paused");
    } else {
        println!("paused (the vCPUs stopped in {:.1} µs)", r.stop_ns as f64 / 1000.0);
    }
    Ok(0)
}

pub fn resume(a: SimpleArgs) -> anyhow::Result<i32> {
    #[derive(Deserialize, serde::Serialize)]
    struct Resumed {
        already: bool,
    }
    let r: Resumed = a.target.connect()?.call(ControlRequest::Resume)?;
    if a.target.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}", if r.already { "already running" } else { "resumed" });
    }
    Ok(0)
}

pub fn regs(a: RegsArgs) -> anyhow::Result<i32> {
    let all: Vec<VcpuRegs> = a.target.connect()?.call(ControlRequest::Regs { vcpu: a.vcpu })?;
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    for v in all {
        let (r, s) = (&v.regs, &v.sregs);
        println!("vCPU {}", v.vcpu);
        println!("  rip {:#018x}  rsp {:#018x}  rflags {:#x}", r.rip, r.rsp, r.rflags);
        println!("  rax {:#018x}  rbx {:#018x}  rcx {:#018x}  rdx {:#018x}", r.rax, r.rbx, r.rcx, r.rdx);
        println!("  rsi {:#018x}  rdi {:#018x}  rbp {:#018x}", r.rsi, r.rdi, r.rbp);
        println!("  r8  {:#018x}  r9  {:#018x}  r10 {:#018x}  r11 {:#018x}", r.r8, r.r9, r.r10, r.r11);
        println!("  r12 {:#018x}  r13 {:#018x}  r14 {:#018x}  r15 {:#018x}", r.r12, r.r13, r.r14, r.r15);
        println!("  cr0 {:#x}  cr3 {:#x}  cr4 {:#x}  efer {:#x}  cs {:#x} (cpl {})", s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.selector & 3);
    }
    Ok(0)
}

/// Turns the CLI's backslash escapes into the characters they name.
pub fn unescape(s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match it.next() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some('b') => '\x08',
            Some('e') => '\x1b',
            Some('\\') => '\\',
            Some(o) => anyhow::bail!("unknown escape \\{o} in the text: use \\n, \\t, \\b, \\e or \\\\"),
            None => anyhow::bail!("the text ends with a lone backslash: write \\\\ for one"),
        });
    }
    Ok(out)
}

fn parse_raw(s: &str) -> anyhow::Result<Vec<KeyEvent>> {
    s.split_whitespace()
        .map(|tok| {
            let mut parts = tok.split(':');
            let key = parts.next().unwrap_or_default().to_string();
            let press = match parts.next() {
                Some("press" | "down") => true,
                Some("release" | "up") => false,
                _ => anyhow::bail!("bad key transition {tok:?}: write NAME:press or NAME:release[:DELAY_MS]"),
            };
            let delay_ms = match parts.next() {
                Some(d) => d.parse().with_context(|| format!("bad delay in {tok:?}: milliseconds expected"))?,
                None => 0,
            };
            if parts.next().is_some() {
                anyhow::bail!("bad key transition {tok:?}: too many ':'");
            }
            Ok(KeyEvent { key, press, delay_ms })
        })
        .collect()
}

pub fn keys(a: KeysArgs) -> anyhow::Result<i32> {
    let (text, events) = match (&a.text, &a.raw) {
        (Some(t), _) => (Some(unescape(t)?), None),
        (None, Some(r)) => (None, Some(parse_raw(r)?)),
        (None, None) => anyhow::bail!("give TEXT or --raw"),
    };
    #[derive(Deserialize, serde::Serialize)]
    struct Typed {
        delivered: u32,
        elapsed_ms: u64,
    }
    let req = ControlRequest::Keys { text, events, hold_ms: Some(a.hold_ms), gap_ms: Some(a.gap_ms) };
    let r: Typed = a.target.connect()?.call(req)?;
    if a.target.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{} key transitions delivered in {} ms", r.delivered, r.elapsed_ms);
    }
    Ok(0)
}

pub fn stats(a: SimpleArgs) -> anyhow::Result<i32> {
    #[derive(Deserialize, serde::Serialize)]
    struct Stats {
        devices: Vec<DeviceStats>,
    }
    let s: Stats = a.target.connect()?.call(ControlRequest::Stats)?;
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    if s.devices.is_empty() {
        println!("no devices with I/O accounting (add --disk or --net to `dvisor run`)");
    }
    for d in s.devices {
        let t = &d.totals;
        match d.kind.as_str() {
            "virtio-net" => println!(
                "{:<6} {:<11} rx {} packets {} bytes, tx {} packets {} bytes, {} dropped, {} errors",
                d.name, d.kind, t.rx_packets, t.rx_bytes, t.tx_packets, t.tx_bytes, t.dropped, t.errors
            ),
            _ => println!(
                "{:<6} {:<11} read {} ops {} bytes, write {} ops {} bytes, {} flushes, {} errors",
                d.name, d.kind, t.read_ops, t.read_bytes, t.write_ops, t.write_bytes, t.flush_ops, t.errors
            ),
        }
    }
    Ok(0)
}

pub fn status(a: SimpleArgs) -> anyhow::Result<i32> {
    let s: MonitorStatus = a.target.connect()?.call(ControlRequest::Status)?;
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!("vm        {:?}, boot {}, {} vCPUs, {} MiB", s.vm.state, s.vm.boot, s.vm.vcpus, s.vm.mem_bytes >> 20);
    println!("monitor   pid {}, attached to {}", s.monitor_pid, s.api_socket);
    for d in &s.vm.devices {
        println!("device    {} ({})", d.name, d.kind);
    }
    Ok(0)
}

pub fn events(a: EventsArgs) -> anyhow::Result<i32> {
    let kinds = a
        .kinds
        .iter()
        .map(|k| {
            serde_json::from_value::<EventKind>(serde_json::Value::String(k.trim().to_string()))
                .map_err(|_| anyhow::anyhow!("unknown event kind {k:?}: use console, io, lifecycle or debug"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut c = a.target.connect()?;
    c.follow(kinds, a.recent)?;
    let mut seen = 0;
    while a.count.is_none_or(|n| seen < n) {
        let Some(ev) = c.next_event()? else { break };
        seen += 1;
        if a.target.json {
            println!("{}", serde_json::to_string(&ev)?);
        } else {
            println!("{}", describe(&ev));
        }
    }
    Ok(0)
}

fn describe(ev: &Event) -> String {
    let secs = |t: u64| format!("{:>12.6}", t as f64 / 1e9);
    match ev {
        Event::Console { t_ns, line } => format!("{} console   {line}", secs(*t_ns)),
        Event::Io { t_ns, device, records, lost } => {
            let bytes: u64 = records.iter().map(|r| r.bytes).sum();
            let lost = if *lost > 0 { format!(" ({lost} lost)") } else { String::new() };
            format!("{} io        {device}: {} ops, {bytes} bytes{lost}", secs(*t_ns), records.len())
        }
        Event::Lifecycle { t_ns, what, detail } => format!("{} lifecycle {what:?}: {detail}", secs(*t_ns)),
        Event::Debug { t_ns, vcpu, reason, rip, .. } => format!("{} debug     vCPU {vcpu} {reason:?} at {rip:#x}", secs(*t_ns)),
        Event::Progress { t_ns, what, done, total } => {
            format!("{} progress  {what}: {} of {} MiB", secs(*t_ns), done >> 20, total >> 20)
        }
        Event::Lost { count } => format!("{:>12} lost      {count} events (this client fell behind)", ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_raw_events_parse() {
        assert_eq!(unescape(r"echo hi\n").unwrap(), "echo hi\n");
        assert!(unescape(r"bad\q").is_err());
        assert!(unescape("trailing\\").is_err());
        let evs = parse_raw("leftshift:press a:press a:release:50 leftshift:up").unwrap();
        assert_eq!(evs.len(), 4);
        assert_eq!((evs[2].key.as_str(), evs[2].press, evs[2].delay_ms), ("a", false, 50));
        assert!(parse_raw("a:sideways").is_err());
        assert!(parse_raw("a:press:x").is_err());
    }
}
