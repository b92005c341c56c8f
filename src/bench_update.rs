//! `dvisor bench update`: the gap a client sees, ShadowReboot against a
//! plain reboot of the same guest, in one run (docs/shadowreboot.md).
//!
//! A guest with the demo service on a tap; a client on the host asks the
//! service every 10 ms. For each memory size: a rejuvenation
//! (`dvisor update`) and a plain reboot (`reboot -f` typed at the guest's
//! shell, the VMM boots it again), each measured as the longest time
//! between two answered requests from just before it to the service's
//! answers after it.
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

/// The papers' cut of a reboot's downtime (ShadowReboot, VEE'13, on
/// VirtualBox; docs/shadowreboot.md).
const PAPER_CUT: &str = "91-98%";
const TAP: &str = "dvbench0";
const HOST_IP: &str = "10.0.2.1/24";
pub(crate) const GUEST_IP: &str = "10.0.2.15";

#[derive(Debug, Args)]
pub struct UpdateBenchArgs {
    /// Guest memory sizes in MiB, comma-separated.
    #[arg(long = "mem", value_name = "MIB,...", value_delimiter = ',', default_values_t = [256u64, 1024])]
    pub mem: Vec<u64>,
    /// vCPUs of the guest (and of its shadow).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Draw each method's answered requests over time into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run here even without hardware KVM (used inside the carrier).
    #[arg(long, hide = true)]
    pub here: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Method {
    mem_mib: u64,
    pub(crate) method: String,
    /// Longest time between two answered requests.
    pub(crate) gap_ms: f64,
    /// When the longest gap began, from the method's start.
    gap_at_ms: f64,
    answers: usize,
    failed_requests: usize,
    /// The update's own report (switch time etc.), for updates.
    pub(crate) report: Option<serde_json::Value>,
    /// Answer times from the method's start, for the plot.
    #[serde(skip)]
    times: Vec<f64>,
    span_ms: f64,
}

/// Answered-request times, from a client asking every 10 ms.
pub(crate) struct Client {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<(Vec<Instant>, usize)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    pub(crate) fn start() -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<(Vec<Instant>, usize)>> = Arc::default();
        let thread = {
            let (stop, log) = (stop.clone(), log.clone());
            std::thread::spawn(move || {
                let addr: std::net::SocketAddr = format!("{GUEST_IP}:8080").parse().expect("address");
                while !stop.load(Ordering::Acquire) {
                    let ok = ask(&addr);
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    if ok {
                        l.0.push(Instant::now());
                    } else {
                        l.1 += 1;
                    }
                    drop(l);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Client { stop, log, thread: Some(thread) }
    }

    /// Answers since `t` and failures since the last call.
    fn since(&self, t: Instant) -> (Vec<Instant>, usize) {
        let mut l = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let failed = std::mem::take(&mut l.1);
        (l.0.iter().copied().filter(|a| *a >= t).collect(), failed)
    }

    pub(crate) fn answered_after(&self, t: Instant) -> bool {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).0.last().is_some_and(|a| *a > t)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether the demo service answered within a second.
fn ask(addr: &std::net::SocketAddr) -> bool {
    fetch(addr, Duration::from_secs(1)).is_ok_and(|a| a.starts_with("counter="))
}

/// One request to the demo service at `addr`: its answer, each step
/// (connect, read) bounded by `limit`.
pub(crate) fn fetch(addr: &std::net::SocketAddr, limit: Duration) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(addr, limit)?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(b"GET\n")?;
    let mut a = String::new();
    s.read_to_string(&mut a)?;
    Ok(a)
}

fn sh(cmd: &str) -> anyhow::Result<()> {
    let st = Command::new("sh").args(["-c", cmd]).status()?;
    if !st.success() {
        bail!("`{cmd}` failed ({st})");
    }
    Ok(())
}

/// `dvisor ARGS --json`, parsed; an error carries the command's stderr.
pub(crate) fn json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(std::env::current_exe()?).args(args).arg("--json").output()?;
    if !out.status.success() {
        bail!("dvisor {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Measures `action` as the client sees it: from just before it until the
/// service has answered for a second after it; `log` gets what happened
/// when.
pub(crate) fn measure(
    client: &Client,
    mem_mib: u64,
    method: &str,
    log: &dyn Fn(&str),
    action: impl FnOnce() -> anyhow::Result<Option<serde_json::Value>>,
) -> anyhow::Result<Method> {
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let report = action()?;
    let done = Instant::now();
    let deadline = done + Duration::from_secs(300);
    while !client.answered_after(done) {
        if Instant::now() > deadline {
            bail!("{method}: the service did not answer again within 300 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(1));
    let end = Instant::now();
    let (answers, failed) = client.since(start);
    let mut points = vec![start];
    points.extend(answers.iter().copied());
    points.push(end);
    let mut gaps: Vec<(Duration, Duration)> = points.windows(2).map(|w| (w[1] - w[0], w[0] - start)).collect();
    gaps.sort_by_key(|g| std::cmp::Reverse(g.0));
    let (gap, gap_at) = gaps.first().copied().unwrap_or_default();
    let top: Vec<String> = gaps.iter().take(4).map(|(g, at)| format!("{:.0} ms at {:.1} s", g.as_secs_f64() * 1e3, at.as_secs_f64())).collect();
    log(&format!("{method}: longest gaps {}; the action took {:.1} s from {:.1} s", top.join(", "), (done - start).as_secs_f64() - 0.5, 0.5));
    if let Some(r) = &report {
        // Where each phase ended, on the same clock (the command's own
        // start and exit are not counted: a few ms).
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0) / 1e3;
        let ready = 0.5 + f("shadow_start_ms") + f("boot_to_ready_ms");
        let snap = ready + f("snapshot_ms");
        log(&format!(
            "{method}: shadow ready at {ready:.1} s, its snapshot and stop done at {snap:.1} s, switch request {:.1}-{:.1} s (pause {:.0} ms)",
            0.5 + f("total_ms") - f("switch_call_ms"),
            0.5 + f("total_ms"),
            r["switch_ms"].as_f64().unwrap_or(0.0)
        ));
    }
    Ok(Method {
        mem_mib,
        method: method.into(),
        gap_ms: gap.as_secs_f64() * 1e3,
        gap_at_ms: gap_at.as_secs_f64() * 1e3,
        answers: answers.len(),
        failed_requests: failed,
        report,
        times: answers.iter().map(|a| (*a - start).as_secs_f64() * 1e3).collect(),
        span_ms: (end - start).as_secs_f64() * 1e3,
    })
}

/// A network namespace of this process's own with a tap for the guest
/// (`--net tap=` [`guest_net`]): the tap and its address vanish with the
/// process. Call while single-threaded; needs root.
pub(crate) fn own_network() -> anyhow::Result<()> {
    // SAFETY: unshare affects this process (single-threaded here).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {} (a tap device for the guest needs root)", std::io::Error::last_os_error());
    }
    sh(&format!("ip link set lo up && ip tuntap add dev {TAP} mode tap && ip addr add {HOST_IP} dev {TAP} && ip link set {TAP} up"))
}

/// The `--net` and `--cmdline` arguments for a guest on [`own_network`]'s
/// tap at [`GUEST_IP`], with `cmdline` as the rest of its command line.
pub(crate) fn guest_net(cmdline: &str) -> [String; 4] {
    ["--net".into(), format!("tap={TAP}"), "--cmdline".into(), format!("{cmdline} dvisor.ip={GUEST_IP}/24")]
}

/// Waits until VM `name`'s monitor answers `dvisor status`.
pub(crate) fn wait_monitor(name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while json(&["status", "--vm", name]).is_err() {
        if Instant::now() > deadline {
            bail!("the monitor of {name} never answered");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Waits until VM `name`'s monitor answers and then the demo service
/// answers `client`.
pub(crate) fn wait_service(name: &str, client: &Client) -> anyhow::Result<()> {
    wait_monitor(name)?;
    let up = Instant::now();
    while !client.answered_after(up) {
        if up.elapsed() > Duration::from_secs(120) {
            bail!("the demo service never answered on {GUEST_IP}:8080");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `dvisor update --vm NAME --json`. Inside the carrier, whose nested KVM
/// now and then triple-faults a guest at boot (docs/carrier.md), a shadow
/// that died so is started again (the VM was never touched), at most
/// twice; `log` says so.
pub(crate) fn update_retrying(name: &str, log: &dyn Fn(&str)) -> anyhow::Result<serde_json::Value> {
    let mut tries = 0;
    loop {
        match json(&["update", "--vm", name]) {
            Err(e) if tries < 2 && dvisor_images::carrier::in_carrier() && e.to_string().contains("triple fault") => {
                tries += 1;
                log(&format!("the shadow triple-faulted inside the carrier; update again ({tries} of 2)"));
            }
            r => return r,
        }
    }
}

pub fn update(args: UpdateBenchArgs) -> anyhow::Result<i32> {
    if let Some(code) = crate::bench::in_carrier_if_needed(args.here, 3072)? {
        return Ok(code);
    }
    own_network()?;
    let mut results = Vec::new();
    for &mem in &args.mem {
        let name = format!("benchupd{}-{mem}", std::process::id());
        let net = guest_net(&dvisor_images::fast_beat_cmdline());
        let (vcpus, mem_s) = (args.vcpus.to_string(), mem.to_string());
        let mut extra = vec!["--vcpus", &vcpus, "--mem", &mem_s];
        extra.extend(net.iter().map(String::as_str));
        let mut vm = crate::bench_vm::Vm::boot_with(&name, &extra)?;
        let r = (|| -> anyhow::Result<()> {
            let client = Client::start();
            wait_service(&name, &client)?;
            progress(&format!("{mem} MiB: rejuvenation (dvisor update)"));
            results.push(measure(&client, mem, "update (rejuvenation)", &progress, || {
                Ok(Some(update_retrying(&name, &progress)?))
            })?);
            progress(&format!("{mem} MiB: plain reboot"));
            // The shell is the new guest's now: wait for its prompt.
            vm.type_line("")?;
            vm.wait_line(|l| l.contains("guest# "))?;
            results.push(measure(&client, mem, "plain reboot", &progress, || {
                vm.type_line("reboot -f")?;
                // Done once the new boot's init runs (the old guest may
                // answer for a moment after the command).
                vm.wait_line(|l| l.contains("dvisor-guest: init"))?;
                Ok(None)
            })?);
            Ok(())
        })();
        vm.stop();
        r?;
    }
    if let Some(p) = &args.plot {
        write_plot(p, &results).with_context(|| format!("writing {}", p.display()))?;
    }
    print_results(&args, &results)?;
    Ok(0)
}

fn progress(s: &str) {
    let _ = writeln!(std::io::stderr(), "dvisor bench update: {s}");
}

fn print_results(args: &UpdateBenchArgs, results: &[Method]) -> anyhow::Result<()> {
    let cut = |mem: u64| -> Option<f64> {
        let of = |m: &str| results.iter().find(|r| r.mem_mib == mem && r.method.starts_with(m)).map(|r| r.gap_ms);
        Some(100.0 * (1.0 - of("update")? / of("plain reboot")?))
    };
    if args.json {
        let cuts: Vec<serde_json::Value> =
            args.mem.iter().map(|m| serde_json::json!({ "mem_mib": m, "cut_percent": cut(*m) })).collect();
        println!("{}", serde_json::json!({ "methods": results, "cuts": cuts, "paper_cut": PAPER_CUT }));
        return Ok(());
    }
    println!("longest gap between answered requests (client every 10 ms), one guest per memory size");
    println!("{:>8}  {:<22} {:>10} {:>10} {:>8} {:>7} {:>10}", "memory", "method", "gap ms", "gap at ms", "answers", "failed", "switch ms");
    for r in results {
        let switch = r.report.as_ref().and_then(|v| v["switch_ms"].as_f64()).map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into());
        println!(
            "{:>4} MiB  {:<22} {:>10.1} {:>10.0} {:>8} {:>7} {:>10}",
            r.mem_mib, r.method, r.gap_ms, r.gap_at_ms, r.answers, r.failed_requests, switch
        );
    }
    for m in &args.mem {
        if let Some(c) = cut(*m) {
            println!("{m} MiB: ShadowReboot cuts the plain reboot's gap by {c:.1}% (papers: {PAPER_CUT}; goal: at least 99%)");
        }
    }
    Ok(())
}

/// One row per method: a tick at each answered request, so gaps show.
pub(crate) fn write_plot(path: &std::path::Path, results: &[Method]) -> std::io::Result<()> {
    let span = results.iter().map(|r| r.span_ms).fold(1.0, f64::max);
    let (left, width, row) = (260.0, 900.0, 40.0);
    let height = 60.0 + row * results.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\">answered requests over time (client every 10 ms); time axis {:.1} s</text>\n",
        left + width + 20.0,
        span / 1e3
    );
    for (i, r) in results.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        svg.push_str(&format!(
            "<text x=\"10\" y=\"{}\">{} MiB, {} (gap {:.0} ms)</text>\n",
            y + 20.0,
            r.mem_mib,
            r.method,
            r.gap_ms
        ));
        for t in &r.times {
            let x = left + width * t / span;
            svg.push_str(&format!("<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\n", y + 6.0, y + 28.0));
        }
    }
    svg.push_str("</svg>\n");
    let tmp = path.with_extension("svg.tmp");
    std::fs::write(&tmp, svg)?;
    std::fs::rename(&tmp, path)
}
