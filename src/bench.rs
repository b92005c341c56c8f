//! `dvisor bench boot`: time to the first heartbeat, D-Visor against QEMU
//! microvm booting the same kernel and initramfs on the same KVM, runs
//! interleaved so that both see the same machine.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Boot time to the first heartbeat: D-Visor vs QEMU microvm.
    Boot(BootBenchArgs),
    /// Support API: pause/resume round trip and guest-memory read
    /// throughput, each beside its baseline.
    Api(crate::bench_api::ApiBenchArgs),
    /// VMI: process-list walk vs the guest's own ps, and page-table
    /// translations per second with and without the cache.
    Vmi(crate::bench_vmi::VmiBenchArgs),
    /// Live patch: pause window for patch sizes 10-100 KiB beside the
    /// paper's ptrace figures and a service restart.
    Patch(crate::bench_patch::PatchBenchArgs),
    /// Snapshots: pause and total time per memory size, restore (lazy and
    /// eager) and clone to the first heartbeat, beside a cold boot and
    /// QEMU's own save/restore.
    Snapshot(crate::bench_snapshot::SnapshotBenchArgs),
    /// ShadowReboot: the longest gap a client sees during `dvisor update`
    /// beside a plain reboot of the same guest, per memory size.
    Update(crate::bench_update::UpdateBenchArgs),
}

#[derive(Debug, Args)]
pub struct BootBenchArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// vCPUs for both VMMs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Guest memory in MiB for both VMMs.
    #[arg(long = "mem", value_name = "MIB", default_value_t = 256)]
    pub mem_mib: u64,
    /// Give up on a boot after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run here even without hardware KVM (used inside the carrier).
    #[arg(long, hide = true)]
    pub here: bool,
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<i32> {
    match cmd {
        BenchCmd::Boot(args) => boot(args),
        BenchCmd::Api(args) => crate::bench_api::api(args),
        BenchCmd::Vmi(args) => crate::bench_vmi::vmi(args),
        BenchCmd::Patch(args) => crate::bench_patch::patch(args),
        BenchCmd::Snapshot(args) => crate::bench_snapshot::snapshot(args),
        BenchCmd::Update(args) => crate::bench_update::update(args),
    }
}

/// Without hardware KVM (and not already in the carrier, nor told
/// `--here`), runs this same `dvisor bench ...` command line, plus
/// `--here`, inside the carrier and returns its exit status; otherwise
/// `None`: benchmark here. The arguments are forwarded as given (the
/// carrier keeps the working directory), so they cannot drift from clap.
pub fn in_carrier_if_needed(here: bool, mem_mib: u32) -> anyhow::Result<Option<i32>> {
    if here || !dvisor_images::carrier::needed() {
        return Ok(None);
    }
    eprintln!("dvisor: no hardware virtualization here; benchmarking inside the carrier VM");
    let mut cmd = vec![std::env::current_exe()?.display().to_string()];
    cmd.extend(std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()));
    cmd.push("--here".into());
    let opts = dvisor_images::carrier::CarrierOptions { mem_mib, ..Default::default() };
    Ok(Some(dvisor_images::carrier::run(&cmd, &opts)?))
}

fn boot(args: BootBenchArgs) -> anyhow::Result<i32> {
    let image = dvisor_images::current_guest_image()
        .or_else(|_| dvisor_images::build_guest_image(&Default::default()))
        .context("the benchmark boots the default guest image")?;
    if let Some(code) = in_carrier_if_needed(args.here, (args.mem_mib as u32).saturating_add(1024))? {
        return Ok(code);
    }
    let in_carrier = dvisor_images::carrier::in_carrier();
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found: run `apt-get install qemu-system-x86`")?;
    let timeout = Duration::from_secs(args.timeout);
    let mut dvisor_times = Vec::new();
    let mut qemu_times = Vec::new();
    for i in 0..args.runs {
        let d = time_to_heartbeat(dvisor_cmd(&args, &image), timeout).context("dvisor boot")?;
        let q = time_to_heartbeat(qemu_cmd(&qemu, &args, &image), timeout).context("QEMU boot")?;
        eprintln!(
            "run {}/{}: dvisor {:.3} s, qemu {:.3} s",
            i + 1,
            args.runs,
            d.as_secs_f64(),
            q.as_secs_f64()
        );
        dvisor_times.push(d.as_secs_f64());
        qemu_times.push(q.as_secs_f64());
    }
    let (dm, qm) = (median(&mut dvisor_times), median(&mut qemu_times));
    let ratio = dm / qm;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "boot-to-first-heartbeat",
                "runs": args.runs, "vcpus": args.vcpus, "mem_mib": args.mem_mib,
                "in_carrier": in_carrier,
                "dvisor_s": dvisor_times, "qemu_microvm_s": qemu_times,
                "dvisor_median_s": dm, "qemu_median_s": qm, "ratio": ratio,
            })
        );
    } else {
        println!("boot to first heartbeat ({} runs, {} vCPUs, {} MiB{})", args.runs, args.vcpus, args.mem_mib,
            if in_carrier { ", inside the TCG carrier: compare the ratio, not the seconds" } else { "" });
        println!("  dvisor        median {dm:.3} s   runs {}", fmt_runs(&dvisor_times));
        println!("  qemu microvm  median {qm:.3} s   runs {}", fmt_runs(&qemu_times));
        println!("  ratio dvisor/qemu = {ratio:.2} (goal <= 0.80)");
    }
    Ok(0)
}

fn fmt_runs(v: &[f64]) -> String {
    v.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>().join(" ")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn dvisor_cmd(args: &BootBenchArgs, image: &dvisor_images::GuestImage) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap_or_else(|_| "dvisor".into()));
    c.arg("run")
        .arg("--no-carrier")
        .arg(format!("--vcpus={}", args.vcpus))
        .arg(format!("--mem={}", args.mem_mib))
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&image.initrd)
        .arg("--on-reboot=exit")
        .arg("--cmdline")
        .arg(dvisor_images::fast_beat_cmdline());
    c
}

fn qemu_cmd(qemu: &Path, args: &BootBenchArgs, image: &dvisor_images::GuestImage) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-serial", "stdio", "-no-reboot"])
        .arg("-smp")
        .arg(args.vcpus.to_string())
        .arg("-m")
        .arg(args.mem_mib.to_string())
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(dvisor_images::fast_beat_cmdline());
    c
}

/// Starts `cmd` and returns the time until its console prints a heartbeat.
fn time_to_heartbeat(mut cmd: Command, timeout: Duration) -> anyhow::Result<Duration> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("heartbeat ") {
                let _ = tx.send(start.elapsed());
                return;
            }
        }
    });
    let result = rx.recv_timeout(timeout);
    kill(&mut child);
    match result {
        Ok(t) => Ok(t),
        Err(_) => bail!("no heartbeat within {} s", timeout.as_secs()),
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
