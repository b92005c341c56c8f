//! `dvisor bench snapshot`: what snapshots cost and what restoring buys,
//! each beside its baseline measured in the same run on the same KVM:
//! - live snapshot pause and total time for each `--mem` size (the pause
//!   should not grow with memory), beside QEMU's own save (migration to a
//!   file) of the same guest;
//! - restore to the first heartbeat, lazy (userfaultfd) and eager, beside
//!   a cold boot of the same image and memory size, and beside QEMU
//!   restoring its saved file (`-incoming`);
//! - `dvisor clone` to the clone's first heartbeat.
//!
//! Every time is taken from outside, as a user sees it: from starting the
//! process to the heartbeat line on its console.
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

/// The guest's heartbeat period: every restore time includes a wait of up
/// to this long for the next beat, so it is the resolution of those rows.
const HEARTBEAT_MS: f64 = 100.0;
/// Goal: the pause at the largest size over the pause at the smallest
/// stays below this (it would be the memory ratio, e.g. 4, if the pause
/// copied all memory).
const PAUSE_RATIO_GOAL: f64 = 2.0;
/// Goal: a restore reaches its first heartbeat this many times sooner
/// than a cold boot.
const RESTORE_SPEEDUP_GOAL: f64 = 20.0;
/// QEMU caps migration at 128 MiB/s by default, a network setting that
/// would make its save to a local file look slower than it is: lifted.
const QEMU_MAX_BANDWIDTH: u64 = 100 << 30;
/// A VM that never reaches its first heartbeat is started again at most
/// this many times: under the carrier's nested KVM a guest now and then
/// hangs at boot or triple-faults (docs/carrier.md), which says nothing
/// about what is measured. Each retry is noted in the report.
const RETRIES: u32 = 2;
/// What the VMM logs (DVISOR_LOG=dvisor_vmm::vm=info) once a restore has
/// loaded memory and devices, before the vCPUs start.
const STDERR_MARK: &str = "restoring";

#[derive(Debug, Args)]
#[command(after_help = "\
Runs inside the carrier VM when this host has no hardware KVM (one run, \
everything side by side; under TCG compare the ratios, not the seconds).

For each --mem size: boots a guest (with its monitor), takes --runs live \
snapshots of it (`dvisor snapshot create`) and as many clones (`dvisor \
clone`, timed to the clone's first heartbeat), then restores each snapshot \
with `dvisor run --restore` lazily (userfaultfd) and eagerly \
(DVISOR_RESTORE_EAGER=1), interleaved with cold boots of the same image \
and size, each timed to its first heartbeat. Then QEMU microvm boots the \
same kernel and initramfs, saves itself --runs times through QMP \
`migrate exec:cat > FILE` (bandwidth cap lifted) and is restored with \
`-incoming 'exec:cat FILE'`, timed to its first heartbeat.

Goals printed with the results: the pause at the largest size is less \
than 2x the pause at the smallest (it does not grow with memory); a \
restore reaches its first heartbeat at least 20x sooner than a cold boot; \
D-Visor restores sooner than QEMU. The guest beats every 100 ms, so every \
time to a heartbeat includes up to 100 ms of waiting for the next beat.

A VM that never reaches its first heartbeat (under the carrier's nested \
KVM a guest now and then hangs at boot or triple-faults, docs/carrier.md) \
is started again, at most twice; the report lists every retry.

Snapshots and QEMU's files go to --dir (default /dev/shm: the carrier's \
own memory) and are deleted afterwards.")]
pub struct SnapshotBenchArgs {
    /// Snapshots, restores, cold boots, clones and QEMU saves per size.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Guest memory sizes in MiB, comma-separated.
    #[arg(long = "mem", value_name = "MIB,...", value_delimiter = ',', default_values_t = [256u64, 1024])]
    pub mems: Vec<u64>,
    /// vCPUs of every guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Where snapshots and QEMU's saved state go (inside the carrier when
    /// it is used).
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Skip QEMU's save and restore.
    #[arg(long)]
    pub no_qemu: bool,
    /// Give up on any one step (a boot, a snapshot, a restore) after this
    /// many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run here even without hardware KVM (used inside the carrier).
    #[arg(long, hide = true)]
    pub here: bool,
}

#[derive(Debug, Serialize)]
struct SnapRun {
    pause_ms: f64,
    total_ms: f64,
    /// `dvisor snapshot create` from start to exit, as a user waits.
    command_ms: f64,
    written_mib: f64,
    precopy_rounds: u64,
}

#[derive(Debug, Serialize)]
struct RestoreRun {
    to_heartbeat_s: f64,
    /// The VMM's own restore setup (memory, devices, vCPUs), from its log.
    vmm_restore_ms: Option<f64>,
    /// From the start of `dvisor run` to that log line: process start,
    /// reading the snapshot, building the VM. The rest, to the heartbeat,
    /// is the guest running on (and faulting in its memory).
    vmm_restored_s: Option<f64>,
    /// Whether memory really came in lazily (userfaultfd may be missing).
    lazy: Option<bool>,
}

#[derive(Debug, Serialize)]
struct QemuSave {
    /// QMP `migrate` to `completed`, as polled.
    command_ms: f64,
    /// QEMU's own figures from `query-migrate`.
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    file_mib: f64,
    /// QEMU's whole `query-migrate` answer, for the record.
    query_migrate: Value,
}

#[derive(Debug, Default, Serialize)]
struct QemuResult {
    boot_s: Option<f64>,
    saves: Vec<QemuSave>,
    restore_s: Vec<f64>,
    save_total_median_ms: Option<f64>,
    save_downtime_median_ms: Option<f64>,
    save_command_median_ms: Option<f64>,
    restore_median_s: Option<f64>,
    /// Why QEMU did not save or restore, in its own words.
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct MemResult {
    mem_mib: u64,
    snapshots: Vec<SnapRun>,
    pause_median_ms: f64,
    total_median_ms: f64,
    command_median_ms: f64,
    written_median_mib: f64,
    restore_lazy: Vec<RestoreRun>,
    restore_eager: Vec<RestoreRun>,
    cold_boot_s: Vec<f64>,
    clone_s: Vec<f64>,
    restore_lazy_median_s: f64,
    restore_eager_median_s: f64,
    cold_boot_median_s: f64,
    clone_median_s: f64,
    /// Cold boot / restore: how many times sooner the restore beats.
    speedup_lazy: f64,
    speedup_eager: f64,
    qemu: Option<QemuResult>,
    /// QEMU's restore / ours: above 1, ours is faster.
    qemu_over_lazy: Option<f64>,
    qemu_over_eager: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Goals {
    pause_ratio_max: f64,
    restore_speedup_min: f64,
    pause_ratio_met: Option<bool>,
    restore_speedup_met: bool,
    faster_than_qemu_met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    runs: u32,
    vcpus: u8,
    in_carrier: bool,
    dir: PathBuf,
    heartbeat_period_ms: f64,
    sizes: Vec<MemResult>,
    /// Median pause at the largest size / at the smallest.
    pause_ratio: Option<f64>,
    goals: Goals,
    /// VMs started again because they never reached a heartbeat, and why.
    retries: Vec<String>,
    /// VMs that did not stop on SIGTERM (or SIGKILL), with their threads.
    stop_problems: Vec<String>,
}

pub fn snapshot(args: SnapshotBenchArgs) -> anyhow::Result<i32> {
    if args.runs == 0 || args.mems.is_empty() || args.mems.contains(&0) {
        bail!("--runs and every --mem size must be at least 1");
    }
    let image = dvisor_images::current_guest_image()
        .or_else(|_| dvisor_images::build_guest_image(&Default::default()))
        .context("the benchmark boots the default guest image")?;
    let largest = *args.mems.iter().max().unwrap_or(&256);
    if !args.here && dvisor_images::carrier::needed() {
        // The monitors of the guests being snapshotted need the kernel
        // profile; built here, natively, it spares the TCG carrier minutes.
        if let Err(e) = dvisor_monitor::profile::KernelProfile::load_or_build(&image.vmlinux, &dvisor_images::cache_root()) {
            tracing::warn!("kernel profile of {}: {e}", image.vmlinux.display());
        }
    }
    // A guest and its clone run side by side, and the snapshots sit in the
    // carrier's tmpfs; guests touch only part of their memory (~100 MiB
    // here), so this leaves room. (A 3584 MiB carrier once never booted.)
    let carrier_mib = u32::try_from(largest + 2048).context("--mem is too large for the carrier")?;
    if let Some(code) = crate::bench::in_carrier_if_needed(args.here, carrier_mib)? {
        return Ok(code);
    }
    let qemu = if args.no_qemu {
        None
    } else {
        Some(
            which("qemu-system-x86_64")
                .context("qemu-system-x86_64 not found: run `apt-get install qemu-system-x86`, or pass --no-qemu")?,
        )
    };
    let scratch = Scratch::new(&args.dir)?;
    let bench = Bench {
        args: &args,
        image: &image,
        scratch: &scratch.0,
        timeout: Duration::from_secs(args.timeout),
        retries: RefCell::new(Vec::new()),
    };

    let mut sizes = Vec::new();
    for &mem in &args.mems {
        eprintln!("== {mem} MiB ==");
        let mut r = bench.dvisor_side(mem).with_context(|| format!("D-Visor at {mem} MiB"))?;
        if let Some(q) = &qemu {
            let qr = bench.qemu_side(q, mem).with_context(|| format!("QEMU at {mem} MiB"))?;
            r.qemu_over_lazy = qr.restore_median_s.map(|q| q / r.restore_lazy_median_s);
            r.qemu_over_eager = qr.restore_median_s.map(|q| q / r.restore_eager_median_s);
            r.qemu = Some(qr);
        }
        sizes.push(r);
    }

    let smallest = sizes.iter().min_by_key(|s| s.mem_mib);
    let biggest = sizes.iter().max_by_key(|s| s.mem_mib);
    let pause_ratio = match (smallest, biggest) {
        (Some(s), Some(b)) if b.mem_mib > s.mem_mib => Some(b.pause_median_ms / s.pause_median_ms),
        _ => None,
    };
    let faster: Vec<bool> = sizes.iter().filter_map(|s| s.qemu_over_lazy).map(|r| r > 1.0).collect();
    let goals = Goals {
        pause_ratio_max: PAUSE_RATIO_GOAL,
        restore_speedup_min: RESTORE_SPEEDUP_GOAL,
        pause_ratio_met: pause_ratio.map(|r| r < PAUSE_RATIO_GOAL),
        restore_speedup_met: sizes.iter().all(|s| s.speedup_lazy >= RESTORE_SPEEDUP_GOAL),
        faster_than_qemu_met: (!faster.is_empty()).then(|| faster.iter().all(|&f| f)),
    };
    let report = Report {
        bench: "snapshot-restore-clone",
        runs: args.runs,
        vcpus: args.vcpus,
        in_carrier: dvisor_images::carrier::in_carrier(),
        dir: args.dir.clone(),
        heartbeat_period_ms: HEARTBEAT_MS,
        sizes,
        pause_ratio,
        goals,
        retries: bench.retries.take(),
        stop_problems: std::mem::take(&mut *STOP_PROBLEMS.lock().unwrap_or_else(|p| p.into_inner())),
    };
    drop(scratch);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(0)
}

/// A private directory under --dir, removed with everything in it at the
/// end, also when the benchmark fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(under: &Path) -> anyhow::Result<Scratch> {
        let dir = std::path::absolute(under)?.join(format!("dvisor-bench-snapshot-{}", std::process::id()));
        // QEMU hands its exec: URI to /bin/sh: a plain path keeps it one word.
        if dir.to_string_lossy().chars().any(|c| c.is_whitespace() || "'\"\\$`;&|<>*?".contains(c)) {
            bail!(
                "--dir {}: use a path without spaces or shell characters (QEMU's exec: migration passes it to sh)",
                under.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {} (pick another --dir)", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Bench<'a> {
    args: &'a SnapshotBenchArgs,
    image: &'a dvisor_images::GuestImage,
    scratch: &'a Path,
    timeout: Duration,
    retries: RefCell<Vec<String>>,
}

impl Bench<'_> {
    fn dvisor(&self) -> Command {
        Command::new(std::env::current_exe().unwrap_or_else(|_| "dvisor".into()))
    }

    fn name(&self, what: &str) -> String {
        format!("bsnap{}-{what}", std::process::id())
    }

    /// `dvisor run` of the default image: the guest every row starts from.
    fn boot_cmd(&self, name: &str, mem: u64, monitor: bool) -> Command {
        let mut c = self.dvisor();
        c.args(["run", "--no-carrier", "--on-reboot=exit", "--name", name])
            .arg(format!("--vcpus={}", self.args.vcpus))
            .arg(format!("--mem={mem}"))
            .arg("--kernel")
            .arg(&self.image.kernel)
            .arg("--initrd")
            .arg(&self.image.initrd)
            .arg("--cmdline")
            .arg(dvisor_images::fast_beat_cmdline());
        if !monitor {
            c.arg("--no-monitor");
        }
        c
    }

    fn restore_cmd(&self, dir: &Path, name: &str, eager: bool) -> Command {
        let mut c = self.dvisor();
        c.args(["run", "--no-carrier", "--no-monitor", "--no-net", "--name", name, "--restore"]).arg(dir);
        // The VMM logs how the restore went (lazy or not, its own time).
        c.env("DVISOR_LOG", "dvisor_vmm::vm=info");
        if eager {
            c.env("DVISOR_RESTORE_EAGER", "1");
        } else {
            c.env_remove("DVISOR_RESTORE_EAGER");
        }
        c
    }

    /// Starts the VM `make(attempt)` gives and waits for its first
    /// heartbeat: the VM and the time from its start. A VM that does not
    /// get there is started again (RETRIES), and that is noted.
    fn to_heartbeat(&self, what: &str, mut make: impl FnMut(u32) -> Command) -> anyhow::Result<(Guest, Duration)> {
        let mut attempt = 0;
        loop {
            let mut g = Guest::start(make(attempt), what)?;
            match g.wait_heartbeat(self.timeout) {
                Ok(t) => return Ok((g, t)),
                Err(e) if attempt < RETRIES => {
                    g.stop();
                    eprintln!("dvisor: {e:#}\ndvisor: starting it again (retry {} of {RETRIES})", attempt + 1);
                    let first = format!("{e:#}").lines().next().unwrap_or_default().to_string();
                    self.retries.borrow_mut().push(first);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn dvisor_side(&self, mem: u64) -> anyhow::Result<MemResult> {
        let runs = self.args.runs as usize;
        let src_name = self.name(&format!("src{mem}"));
        let (mut src, _) =
            self.to_heartbeat(&format!("the {mem} MiB guest to snapshot"), |_| self.boot_cmd(&src_name, mem, true))?;
        self.wait_monitor(&src_name, &mut src)?;

        let mut snaps = Vec::new();
        let mut snapshots = Vec::new();
        for i in 0..runs {
            // A beat between snapshots: each one catches a guest that runs.
            src.next_heartbeat(self.timeout)?;
            let out = self.scratch.join(format!("snap{mem}-{i}"));
            let t = Instant::now();
            let r = self
                .cli_json(&["snapshot", "create", "--vm", &src_name, "--out", path_str(&out)?, "--json"], &src_name)?;
            let command_ms = t.elapsed().as_secs_f64() * 1e3;
            let num =
                |k: &str| r[k].as_u64().with_context(|| format!("`dvisor snapshot create --json` printed no {k}: {r}"));
            let run = SnapRun {
                pause_ms: num("pause_ns")? as f64 / 1e6,
                total_ms: num("total_ns")? as f64 / 1e6,
                command_ms,
                written_mib: num("bytes_written")? as f64 / (1 << 20) as f64,
                precopy_rounds: num("precopy_rounds")?,
            };
            eprintln!(
                "snapshot {}/{runs} at {mem} MiB: pause {:.2} ms, total {:.0} ms, {:.1} MiB, {} pre-copy round(s)",
                i + 1,
                run.pause_ms,
                run.total_ms,
                run.written_mib,
                run.precopy_rounds
            );
            snapshots.push(run);
            snaps.push(out);
        }

        let mut clone_s = Vec::new();
        for i in 0..runs {
            src.next_heartbeat(self.timeout)?;
            // A retry is a new clone: a name and a directory of its own.
            let dir = |attempt: u32| self.scratch.join(format!("clone{mem}-{i}-{attempt}"));
            let (mut clone, t) = self.to_heartbeat(&format!("clone {} of the {mem} MiB guest", i + 1), |attempt| {
                let mut c = self.dvisor();
                c.args(["clone", "--vm", &src_name, "--as", &self.name(&format!("clone{mem}-{i}-{attempt}")), "--dir"])
                    .arg(dir(attempt));
                c
            })?;
            clone.stop();
            for attempt in 0..=RETRIES {
                let _ = std::fs::remove_dir_all(dir(attempt));
            }
            eprintln!("clone {}/{runs} at {mem} MiB: first heartbeat after {:.3} s", i + 1, t.as_secs_f64());
            clone_s.push(t.as_secs_f64());
        }
        src.stop();

        let mut lazy = Vec::new();
        let mut eager = Vec::new();
        let mut cold = Vec::new();
        for (i, snap) in snaps.iter().enumerate() {
            let name = self.name(&format!("b{mem}"));
            let (mut g, c) =
                self.to_heartbeat(&format!("cold boot {} at {mem} MiB", i + 1), |_| self.boot_cmd(&name, mem, false))?;
            let c = c.as_secs_f64();
            g.stop();
            let l = self.restore_once(snap, mem, false)?;
            let e = self.restore_once(snap, mem, true)?;
            eprintln!(
                "run {}/{runs} at {mem} MiB: cold boot {c:.3} s, restore lazy {:.3} s, eager {:.3} s",
                i + 1,
                l.to_heartbeat_s,
                e.to_heartbeat_s
            );
            cold.push(c);
            lazy.push(l);
            eager.push(e);
            let _ = std::fs::remove_dir_all(snap);
        }

        let lazy_m = median(lazy.iter().map(|r| r.to_heartbeat_s).collect());
        let eager_m = median(eager.iter().map(|r| r.to_heartbeat_s).collect());
        let cold_m = median(cold.clone());
        Ok(MemResult {
            mem_mib: mem,
            pause_median_ms: median(snapshots.iter().map(|s| s.pause_ms).collect()),
            total_median_ms: median(snapshots.iter().map(|s| s.total_ms).collect()),
            command_median_ms: median(snapshots.iter().map(|s| s.command_ms).collect()),
            written_median_mib: median(snapshots.iter().map(|s| s.written_mib).collect()),
            snapshots,
            restore_lazy_median_s: lazy_m,
            restore_eager_median_s: eager_m,
            cold_boot_median_s: cold_m,
            clone_median_s: median(clone_s.clone()),
            speedup_lazy: cold_m / lazy_m,
            speedup_eager: cold_m / eager_m,
            restore_lazy: lazy,
            restore_eager: eager,
            cold_boot_s: cold,
            clone_s,
            qemu: None,
            qemu_over_lazy: None,
            qemu_over_eager: None,
        })
    }

    fn restore_once(&self, snap: &Path, mem: u64, eager: bool) -> anyhow::Result<RestoreRun> {
        let how = if eager { "eager" } else { "lazy" };
        let name = self.name(&format!("r{mem}"));
        let (mut g, t) = self
            .to_heartbeat(&format!("{how} restore of {}", snap.display()), |_| self.restore_cmd(snap, &name, eager))?;
        g.stop();
        let (vmm_restore_ms, lazy) = parse_restore_log(&g.stderr());
        let vmm_restored_s = g.stderr_mark().map(|at| at.duration_since(g.started).as_secs_f64());
        if !eager && lazy == Some(false) {
            eprintln!("dvisor: warning: the lazy restore loaded memory eagerly (no userfaultfd?): its row measures the eager path");
        }
        Ok(RestoreRun { to_heartbeat_s: t.as_secs_f64(), vmm_restore_ms, vmm_restored_s, lazy })
    }

    /// Waits until `dvisor status --vm NAME` answers: snapshots go through
    /// the monitor.
    fn wait_monitor(&self, name: &str, guest: &mut Guest) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let ok = self
                .dvisor()
                .args(["status", "--vm", name, "--json"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if let Some(st) = guest.exited() {
                bail!(
                    "{} exited ({st}) before its monitor answered; its stderr ends:\n{}",
                    guest.what,
                    guest.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the monitor of {name} did not answer `dvisor status` within {} s (see {}; raise --timeout)",
                    self.timeout.as_secs(),
                    dvisor_monitor::paths::vm_dir(name).join("monitor.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `dvisor ARGS` to the end (at most --timeout) and parses what
    /// it prints as JSON.
    fn cli_json(&self, args: &[&str], vm: &str) -> anyhow::Result<Value> {
        let mut c = self.dvisor();
        c.args(args);
        let (status, out, err) = run_bounded(c, self.timeout)?;
        if !status.success() {
            bail!(
                "`dvisor {}` failed ({status}): {}\n(the monitor's log: {})",
                args.join(" "),
                err.trim(),
                dvisor_monitor::paths::vm_dir(vm).join("monitor.log").display()
            );
        }
        serde_json::from_str(&out).with_context(|| format!("`dvisor {}` printed no JSON: {out}", args.join(" ")))
    }

    /// The same guest on QEMU microvm, as `dvisor bench boot` starts it.
    fn qemu_cmd(&self, qemu: &Path, mem: u64) -> Command {
        let mut c = Command::new(qemu);
        c.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-nodefaults", "-no-user-config"])
            .args(["-nographic", "-serial", "stdio", "-no-reboot"])
            .arg("-smp")
            .arg(self.args.vcpus.to_string())
            .arg("-m")
            .arg(mem.to_string())
            .arg("-kernel")
            .arg(&self.image.kernel)
            .arg("-initrd")
            .arg(&self.image.initrd)
            .arg("-append")
            .arg(dvisor_images::fast_beat_cmdline());
        c
    }

    fn qemu_side(&self, qemu: &Path, mem: u64) -> anyhow::Result<QemuResult> {
        let mut r = QemuResult::default();
        let mut sock = PathBuf::new();
        let (mut vm, boot) = self.to_heartbeat(&format!("QEMU microvm at {mem} MiB"), |attempt| {
            sock = self.scratch.join(format!("qmp{mem}-{attempt}.sock"));
            let mut c = self.qemu_cmd(qemu, mem);
            c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", sock.display()));
            c
        })?;
        r.boot_s = Some(boot.as_secs_f64());
        let mut qmp = Qmp::connect(&sock, self.timeout).context("QEMU's QMP socket")?;
        if let Err(e) = qmp.call("migrate-set-parameters", json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH }))? {
            eprintln!("dvisor: warning: QEMU kept its migration bandwidth cap ({e}): its save times include it");
        }
        let mut files = Vec::new();
        for i in 0..self.args.runs as usize {
            vm.next_heartbeat(self.timeout)?;
            let file = self.scratch.join(format!("qemu{mem}-{i}.state"));
            match self.qemu_save(&mut qmp, &file)? {
                Ok(s) => {
                    eprintln!(
                        "qemu save {}/{} at {mem} MiB: downtime {} ms, total {} ms, {:.1} MiB",
                        i + 1,
                        self.args.runs,
                        s.downtime_ms.map_or("?".into(), |v| format!("{v:.0}")),
                        s.total_ms.map_or("?".into(), |v| format!("{v:.0}")),
                        s.file_mib
                    );
                    r.saves.push(s);
                    files.push(file);
                }
                Err(why) => {
                    eprintln!("qemu refused to save at {mem} MiB: {why}");
                    r.error = Some(format!("save: {why}"));
                    break;
                }
            }
            // After a migration QEMU leaves the guest stopped
            // (postmigrate); it runs on for the next save.
            if let Err(e) = qmp.call("cont", json!({}))? {
                r.error = Some(format!("cont after a save: {e}"));
                break;
            }
        }
        vm.stop();
        for (i, file) in files.iter().enumerate() {
            let what = format!("QEMU restoring {}", file.display());
            match self.to_heartbeat(&what, |_| {
                let mut c = self.qemu_cmd(qemu, mem);
                c.arg("-incoming").arg(format!("exec:cat {}", file.display()));
                c
            }) {
                Ok((mut g, t)) => {
                    g.stop();
                    eprintln!(
                        "qemu restore {}/{} at {mem} MiB: first heartbeat after {:.3} s",
                        i + 1,
                        files.len(),
                        t.as_secs_f64()
                    );
                    r.restore_s.push(t.as_secs_f64());
                }
                Err(e) => {
                    // QEMU refusing its own file is a result, not a failure of
                    // the benchmark: reported in its words.
                    r.error = Some(format!("restore: {e:#}"));
                    eprintln!("qemu failed to restore at {mem} MiB: {e:#}");
                    break;
                }
            }
            let _ = std::fs::remove_file(file);
        }
        let some_median = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
        r.save_total_median_ms = some_median(r.saves.iter().filter_map(|s| s.total_ms).collect());
        r.save_downtime_median_ms = some_median(r.saves.iter().filter_map(|s| s.downtime_ms).collect());
        r.save_command_median_ms = some_median(r.saves.iter().map(|s| s.command_ms).collect());
        r.restore_median_s = some_median(r.restore_s.clone());
        Ok(r)
    }

    /// One QEMU save to `file`: Ok(Err(why)) when QEMU refuses or fails
    /// the migration (a result to report), Err for our own failures.
    fn qemu_save(&self, qmp: &mut Qmp, file: &Path) -> anyhow::Result<Result<QemuSave, String>> {
        let t = Instant::now();
        if let Err(e) = qmp.call("migrate", json!({ "uri": format!("exec:cat > {}", file.display()) }))? {
            return Ok(Err(e));
        }
        let deadline = t + self.timeout;
        let info = loop {
            let info = match qmp.call("query-migrate", json!({}))? {
                Ok(v) => v,
                Err(e) => return Ok(Err(format!("query-migrate: {e}"))),
            };
            match info["status"].as_str() {
                Some("completed") => break info,
                Some(s @ ("failed" | "cancelled")) => {
                    return Ok(Err(format!(
                        "migration {s}: {}",
                        info["error-desc"].as_str().unwrap_or("(no error-desc)")
                    )));
                }
                _ if Instant::now() > deadline => {
                    bail!("QEMU's save did not complete within {} s (raise --timeout): {info}", self.timeout.as_secs())
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let command_ms = t.elapsed().as_secs_f64() * 1e3;
        // QEMU 7.2 reports `completed` a moment before it fills in
        // total-time and downtime (both 0 until then): ask again.
        let mut info = info;
        for _ in 0..100 {
            if info["total-time"].as_u64().is_some_and(|v| v > 0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            info = match qmp.call("query-migrate", json!({}))? {
                Ok(v) => v,
                Err(e) => return Ok(Err(format!("query-migrate: {e}"))),
            };
        }
        let reported = info["total-time"].as_u64().is_some_and(|v| v > 0);
        // `completed` means QEMU wrote everything to cat's pipe; cat may
        // still be flushing, so the size is read when it stops growing.
        let mut size = 0;
        for _ in 0..100 {
            let now = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            if now == size && now > 0 {
                break;
            }
            size = now;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Ok(QemuSave {
            command_ms,
            total_ms: info["total-time"].as_f64().filter(|_| reported),
            downtime_ms: info["downtime"].as_f64().filter(|_| reported),
            file_mib: size as f64 / (1 << 20) as f64,
            query_migrate: info,
        }))
    }
}

/// A VM process (`dvisor run`, `dvisor clone`, QEMU) whose console lines
/// arrive stamped with the time they were read; stopped when dropped.
struct Guest {
    what: String,
    child: Child,
    started: Instant,
    lines: Receiver<(Instant, String)>,
    /// The last console lines, for errors.
    tail: Arc<Mutex<VecDeque<String>>>,
    stderr: Arc<Mutex<String>>,
    /// When stderr first said STDERR_MARK (the VMM's restore log line).
    mark: Arc<Mutex<Option<Instant>>>,
    stopped: bool,
}

impl Guest {
    fn start(mut cmd: Command, what: &str) -> anyhow::Result<Guest> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {what}: {cmd:?}"))?;
        let out = child.stdout.take().context("no stdout")?;
        let err = child.stderr.take().context("no stderr")?;
        let (tx, lines) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t2 = tail.clone();
        // Always drain the console so that the guest never blocks on it.
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let now = Instant::now();
                {
                    let mut t = t2.lock().unwrap_or_else(|p| p.into_inner());
                    t.push_back(l.clone());
                    if t.len() > 20 {
                        t.pop_front();
                    }
                }
                let _ = tx.send((now, l));
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e2 = stderr.clone();
        let mark = Arc::new(Mutex::new(None));
        let m2 = mark.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut r = err;
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = e2.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                let mut m = m2.lock().unwrap_or_else(|p| p.into_inner());
                if m.is_none() && s.contains(STDERR_MARK) {
                    *m = Some(now);
                }
                // Keep the end: that is where errors are.
                if s.len() > 64 << 10 {
                    let cut = s.len() - (32 << 10);
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
                    s.drain(..cut);
                }
            }
        });
        Ok(Guest { what: what.into(), child, started, lines, tail, stderr, mark, stopped: false })
    }

    /// Time from start to the first heartbeat on the console.
    fn wait_heartbeat(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let at = self.heartbeat_within(timeout)?;
        Ok(at.duration_since(self.started))
    }

    /// Waits for a heartbeat printed from now on.
    fn next_heartbeat(&mut self, timeout: Duration) -> anyhow::Result<()> {
        while self.lines.try_recv().is_ok() {}
        self.heartbeat_within(timeout).map(|_| ())
    }

    fn heartbeat_within(&mut self, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok((at, l)) if l.contains("heartbeat ") => return Ok(at),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {}
                // The console closed: the process is ending (checked below).
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(200)),
            }
            if let Some(st) = self.exited() {
                // Its last lines may still be in the channel.
                while let Ok((at, l)) = self.lines.recv_timeout(Duration::from_millis(100)) {
                    if l.contains("heartbeat ") {
                        return Ok(at);
                    }
                }
                bail!("{} exited ({st}) before a heartbeat; {}", self.what, self.evidence());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no heartbeat within {} s (raise --timeout); {}",
                    self.what,
                    timeout.as_secs(),
                    self.evidence()
                );
            }
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stderr_mark(&self) -> Option<Instant> {
        *self.mark.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn evidence(&self) -> String {
        let console =
            self.tail.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect::<Vec<_>>().join("\n");
        format!("its console ends:\n{console}\nits stderr ends:\n{}", self.stderr_tail())
    }

    /// SIGTERM (so that `dvisor run` stops its monitor too), SIGKILL after
    /// 10 s.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if self.exited().is_some() {
            return;
        }
        let pid = self.child.id();
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        if self.exits_within(Duration::from_secs(10)) {
            return;
        }
        let threads = thread_states(pid);
        let _ = self.child.kill();
        // Never wait for ever: a process stuck in the kernel (inside KVM)
        // cannot be reaped; it is reported and left behind.
        let gone = self.exits_within(Duration::from_secs(30));
        let note = format!(
            "{} (pid {pid}) did not exit within 10 s of SIGTERM{}; its threads then: {threads}",
            self.what,
            if gone { "" } else { ", nor within 30 s of SIGKILL (left behind)" }
        );
        eprintln!("dvisor: warning: {note}");
        STOP_PROBLEMS.lock().unwrap_or_else(|p| p.into_inner()).push(note);
    }

    fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// VMs that did not stop when told to, with their threads' states: a
/// result in itself (shown with the report), not a reason to stop.
static STOP_PROBLEMS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// "tid name state wchan" of each thread of `pid`, from /proc (the kernel
/// function a stuck thread sleeps in).
fn thread_states(pid: u32) -> String {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return "(gone)".into() };
    let mut out = Vec::new();
    for t in rd.flatten() {
        let p = t.path();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // "tid (comm) S ...": the name may hold spaces; the state follows
        // the last ')'.
        let name = stat.find('(').zip(stat.rfind(')')).map(|(a, b)| &stat[a + 1..b]).unwrap_or("?");
        let state = stat.rfind(')').and_then(|b| stat[b + 1..].split_whitespace().next()).unwrap_or("?");
        let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
        out.push(format!(
            "{} {name} {state} {}",
            t.file_name().to_string_lossy(),
            if wchan.is_empty() { "-" } else { &wchan }
        ));
    }
    out.join(", ")
}

/// A QMP connection: one command at a time, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        let mut q = Qmp { reader: BufReader::new(stream.try_clone()?), writer: stream };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            bail!("{} is not a QMP socket: it said {greeting}", path.display());
        }
        q.call("qmp_capabilities", json!({}))?.map_err(anyhow::Error::msg).context("qmp_capabilities")?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("reading from QMP")? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent something not JSON: {line}"))
    }

    /// Ok(Ok(return value)) or Ok(Err(QEMU's error description)).
    fn call(&mut self, cmd: &str, arguments: Value) -> anyhow::Result<Result<Value, String>> {
        let msg = json!({ "execute": cmd, "arguments": arguments });
        writeln!(self.writer, "{msg}").with_context(|| format!("sending QMP {cmd}"))?;
        loop {
            let v = self.read().with_context(|| format!("QMP {cmd}"))?;
            if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = v.get("error") {
                return Ok(Err(e["desc"].as_str().map(String::from).unwrap_or_else(|| e.to_string())));
            }
            // An asynchronous event (MIGRATION, STOP, RESUME...): skipped.
        }
    }
}

/// Runs `cmd` to the end with a time limit: (status, stdout, stderr).
fn run_bounded(mut cmd: Command, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {} s (raise --timeout)", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok((status, out.join().unwrap_or_default(), err.join().unwrap_or_default()))
}

/// From the VMM's log line "restoring ... lazy=B took_ms=N": its own
/// restore time and whether memory came in lazily.
fn parse_restore_log(stderr: &str) -> (Option<f64>, Option<bool>) {
    let Some(line) = stderr.lines().map(strip_ansi).find(|l| l.contains("restoring") && l.contains("took_ms=")) else {
        return (None, None);
    };
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(|v| v.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_string())
    };
    let took = field("took_ms=").and_then(|v| v.parse().ok());
    let lazy = field("lazy=").and_then(|v| v.parse().ok());
    (took, lazy)
}

/// The log may be coloured even into a pipe.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn print_table(r: &Report) {
    let n = r.runs;
    println!(
        "snapshot, restore and clone: {n} run(s) per size, {} vCPUs, snapshots in {}{}",
        r.vcpus,
        r.dir.display(),
        if r.in_carrier { "; inside the TCG carrier: compare the ratios, not the seconds" } else { "" }
    );
    let row = |label: &str, cells: Vec<String>| {
        print!("  {label:<44}");
        for c in cells {
            print!("{c:>14}");
        }
        println!();
    };
    let each = |f: &dyn Fn(&MemResult) -> Option<String>| -> Vec<String> {
        r.sizes.iter().map(|s| f(s).unwrap_or_else(|| "-".into())).collect()
    };
    let ms = |v: f64| format!("{v:.2} ms");
    let secs = |v: f64| format!("{v:.3} s");
    let times = |v: f64| format!("{v:.1}x");

    print!("  {:<44}", "median of the runs");
    for s in &r.sizes {
        print!("{:>14}", format!("{} MiB", s.mem_mib));
    }
    println!();
    println!("live snapshot");
    row("dvisor pause", each(&|s| Some(ms(s.pause_median_ms))));
    row("dvisor total", each(&|s| Some(ms(s.total_median_ms))));
    row("dvisor `snapshot create` command", each(&|s| Some(ms(s.command_median_ms))));
    row("dvisor memory written", each(&|s| Some(format!("{:.1} MiB", s.written_median_mib))));
    row("qemu save downtime (query-migrate)", each(&|s| q(s)?.save_downtime_median_ms.map(ms)));
    row("qemu save total (query-migrate)", each(&|s| q(s)?.save_total_median_ms.map(ms)));
    row("qemu save, migrate to completed", each(&|s| q(s)?.save_command_median_ms.map(ms)));
    row(
        "qemu saved file",
        each(&|s| {
            q(s).and_then(|q| (!q.saves.is_empty()).then(|| median(q.saves.iter().map(|x| x.file_mib).collect())))
                .map(|v| format!("{v:.1} MiB"))
        }),
    );
    if let Some(pr) = r.pause_ratio {
        let (lo, hi) = (
            r.sizes.iter().map(|s| s.mem_mib).min().unwrap_or(0),
            r.sizes.iter().map(|s| s.mem_mib).max().unwrap_or(0),
        );
        println!(
            "  pause {hi} MiB / {lo} MiB = {pr:.2}   goal < {PAUSE_RATIO_GOAL:.0}: the pause does not grow with memory (a pause copying all memory would give {:.0}): {}",
            hi as f64 / lo as f64,
            met(pr < PAUSE_RATIO_GOAL)
        );
    }
    println!("to the first heartbeat (each includes up to {HEARTBEAT_MS:.0} ms waiting for the next beat)");
    row("dvisor restore, lazy (userfaultfd)", each(&|s| Some(secs(s.restore_lazy_median_s))));
    row("  VMM's restore setup (memory, devices)", each(&|s| vmm_ms(&s.restore_lazy).map(ms)));
    row("  start to vCPUs about to run", each(&|s| restored_s(&s.restore_lazy).map(secs)));
    row("dvisor restore, eager", each(&|s| Some(secs(s.restore_eager_median_s))));
    row("  VMM's restore setup (memory, devices)", each(&|s| vmm_ms(&s.restore_eager).map(ms)));
    row("  start to vCPUs about to run", each(&|s| restored_s(&s.restore_eager).map(secs)));
    row("dvisor cold boot", each(&|s| Some(secs(s.cold_boot_median_s))));
    row("dvisor clone (`dvisor clone` to its beat)", each(&|s| Some(secs(s.clone_median_s))));
    row("qemu restore (-incoming exec:cat FILE)", each(&|s| q(s)?.restore_median_s.map(secs)));
    row("qemu cold boot (1 run)", each(&|s| q(s)?.boot_s.map(secs)));
    println!("ratios");
    row(
        &format!("cold boot / lazy restore (goal >= {RESTORE_SPEEDUP_GOAL:.0}x)"),
        each(&|s| Some(times(s.speedup_lazy))),
    );
    row(
        &format!("cold boot / eager restore (goal >= {RESTORE_SPEEDUP_GOAL:.0}x)"),
        each(&|s| Some(times(s.speedup_eager))),
    );
    row("qemu restore / dvisor lazy (goal > 1x)", each(&|s| s.qemu_over_lazy.map(times)));
    row("qemu restore / dvisor eager", each(&|s| s.qemu_over_eager.map(times)));
    row(
        "qemu save total / dvisor snapshot total",
        each(&|s| Some(times(q(s)?.save_total_median_ms? / s.total_median_ms))),
    );
    row("qemu downtime / dvisor pause", each(&|s| Some(times(q(s)?.save_downtime_median_ms? / s.pause_median_ms))));
    println!(
        "goals: restore >= {RESTORE_SPEEDUP_GOAL:.0}x sooner than a cold boot (lazy, every size): {}{}{}",
        met(r.goals.restore_speedup_met),
        r.goals.pause_ratio_met.map(|m| format!("; pause does not grow with memory: {}", met(m))).unwrap_or_default(),
        r.goals.faster_than_qemu_met.map(|m| format!("; restore faster than QEMU's: {}", met(m))).unwrap_or_default()
    );
    for p in &r.stop_problems {
        println!("note: {p}");
    }
    for why in &r.retries {
        println!("note: a VM was started again after: {why}");
    }
    for s in &r.sizes {
        if s.restore_lazy.iter().any(|x| x.lazy == Some(false)) {
            println!("note: at {} MiB the lazy restore fell back to eager loading (no userfaultfd here)", s.mem_mib);
        }
        if let Some(e) = s.qemu.as_ref().and_then(|q| q.error.as_ref()) {
            println!("qemu at {} MiB: {e}", s.mem_mib);
        }
    }
}

fn q(s: &MemResult) -> Option<&QemuResult> {
    s.qemu.as_ref()
}

fn restored_s(v: &[RestoreRun]) -> Option<f64> {
    let s: Vec<f64> = v.iter().filter_map(|r| r.vmm_restored_s).collect();
    (!s.is_empty()).then(|| median(s))
}

fn vmm_ms(v: &[RestoreRun]) -> Option<f64> {
    let ms: Vec<f64> = v.iter().filter_map(|r| r.vmm_restore_ms).collect();
    (!ms.is_empty()).then(|| median(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_log_is_read_plain_and_coloured() {
        let plain =
            "2025-01-01T00:00:00Z  INFO dvisor_vmm::vm: restoring dir=/dev/shm/x eager_bytes=0 lazy=true took_ms=12\n";
        assert_eq!(parse_restore_log(plain), (Some(12.0), Some(true)));
        let coloured = "\x1b[2m2025\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mdvisor_vmm::vm\x1b[0m\x1b[2m:\x1b[0m restoring \x1b[3mlazy\x1b[0m\x1b[2m=\x1b[0mfalse \x1b[3mtook_ms\x1b[0m\x1b[2m=\x1b[0m340\n";
        assert_eq!(parse_restore_log(coloured), (Some(340.0), Some(false)));
        assert_eq!(parse_restore_log("nothing here"), (None, None));
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
