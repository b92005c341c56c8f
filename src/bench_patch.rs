//! `dvisor bench patch`: the pause a live patch costs the guest, for patch
//! sizes 10 KiB to 100 KiB, beside the ptrace figures of the memory-
//! efficient dynamic update paper and beside a service restart measured
//! in the same run (what a user pays without live patching).
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

/// The paper's total stop time with ptrace, ms, at 10 and 100 KiB
/// (../shared/references/000_576479dea24ffac2.txt); in between it grows
/// about linearly, so it is interpolated for the other sizes.
const PAPER_10K_MS: f64 = 1.409;
const PAPER_100K_MS: f64 = 12.519;
/// The service beats every 100 ms; a generous wait for the next beat.
const BEAT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct PatchBenchArgs {
    #[arg(long)]
    pub json: bool,
    #[arg(long, hide = true)]
    pub here: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    kib: u64,
    pause_ms: f64,
    /// The pause's parts: stopping the vCPUs (with their registers), the
    /// safe-mode check, and letting them run again.
    attach_ms: f64,
    check_ms: f64,
    detach_ms: f64,
    write_patch_ms: f64,
    paper_ms: f64,
    ratio: f64,
}

fn paper_ms(kib: u64) -> f64 {
    PAPER_10K_MS + (PAPER_100K_MS - PAPER_10K_MS) * (kib as f64 - 10.0) / 90.0
}

/// A patch of get_message whose object carries `kib` KiB of code and data.
fn build_patch(dir: &Path, kib: u64) -> anyhow::Result<std::path::PathBuf> {
    let src = dir.join(format!("p{kib}.c"));
    let text = dvisor_monitor::patch::sized_patch_source(kib);
    std::fs::write(&src, text)?;
    let obj = dir.join(format!("p{kib}.o"));
    let st = Command::new("gcc")
        .args(["-c", "-O2", "-fpic", "-fno-asynchronous-unwind-tables", "-ffunction-sections", "-fdata-sections"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .context("running gcc")?;
    if !st.success() {
        bail!("gcc failed on {}", src.display());
    }
    Ok(obj)
}

fn json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(std::env::current_exe()?).args(args).arg("--json").output()?;
    if !out.status.success() {
        bail!("dvisor {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn patch(args: PatchBenchArgs) -> anyhow::Result<i32> {
    if let Some(code) = crate::bench::in_carrier_if_needed(args.here, 1536)? {
        return Ok(code);
    }
    let name = format!("benchpatch{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("dvisor-bench-patch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = dir.join("v2.cmd");
    std::fs::write(&cmd, "J get_message patched_get_message\n")?;
    let objs = (1..=10).map(|i| build_patch(&dir, i * 10)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut vm = crate::bench_vm::Vm::boot_monitored(&name)?;
    let result = (|| -> anyhow::Result<(Vec<Row>, Duration)> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while json(&["status", "--vm", &name]).is_err() {
            if Instant::now() > deadline {
                bail!("the monitor never answered");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut rows = Vec::new();
        for (i, obj) in objs.iter().enumerate() {
            let kib = (i as u64 + 1) * 10;
            let a = json(&[
                "patch", "apply", "--vm", &name, "--comm", "demo-service",
                "--object", obj.to_str().unwrap_or_default(), "--commands", cmd.to_str().unwrap_or_default(),
            ])?;
            let ms = |k: &str| a["timing"][k].as_f64().unwrap_or(0.0) / 1e3;
            let (pause_ms, write_patch_ms) = (ms("pause_us"), ms("write_patch_us"));
            let (attach_ms, check_ms, detach_ms) = (ms("attach_us"), ms("check_us"), ms("detach_us"));
            // A pause means nothing if the patch does not work: the
            // service must beat "v2" now, and "v1" again after the revert.
            vm.wait_line_within(BEAT, |l| l.contains("heartbeat ") && l.ends_with(" v2"))
                .with_context(|| format!("no v2 heartbeat after the {kib} KiB patch"))?;
            let id = a["id"].as_u64().unwrap_or(0).to_string();
            json(&["patch", "revert", "--vm", &name, &id])?;
            vm.wait_line_within(BEAT, |l| l.contains("heartbeat ") && l.ends_with(" v1"))
                .with_context(|| format!("no v1 heartbeat after reverting the {kib} KiB patch"))?;
            rows.push(Row {
                kib,
                pause_ms,
                attach_ms,
                check_ms,
                detach_ms,
                write_patch_ms,
                paper_ms: paper_ms(kib),
                ratio: paper_ms(kib) / pause_ms,
            });
        }
        // The baseline: restart the service and wait until it beats again.
        let restart = vm.time_command(
            "kill $(pidof demo-service); sleep 0.01; /usr/bin/demo-service &",
            "heartbeat 1 ",
        )?;
        Ok((rows, restart))
    })();
    vm.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let (rows, restart) = result?;
    if args.json {
        println!("{}", serde_json::json!({ "rows": rows, "restart_ms": restart.as_secs_f64() * 1e3 }));
        return Ok(0);
    }
    println!("live patch of the running demo service (get_message), pause window per patch size");
    println!(
        "{:>7} {:>9} {:>7} {:>7} {:>7} {:>15} {:>16} {:>8}",
        "size", "pause ms", "attach", "check", "detach", "write patch ms", "paper ptrace ms", "paper/us"
    );
    for r in &rows {
        println!(
            "{:>4} KiB {:>9.2} {:>7.2} {:>7.2} {:>7.2} {:>15.2} {:>16.3} {:>7.2}x",
            r.kib, r.pause_ms, r.attach_ms, r.check_ms, r.detach_ms, r.write_patch_ms, r.paper_ms, r.ratio
        );
    }
    let mut pauses: Vec<f64> = rows.iter().map(|r| r.pause_ms).collect();
    pauses.sort_by(f64::total_cmp);
    let median = pauses.get(pauses.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "baseline: restarting the service (kill to first heartbeat, timed from the host) {:.0} ms, {:.0}x the median pause ({median:.2} ms)",
        restart.as_secs_f64() * 1e3,
        restart.as_secs_f64() * 1e3 / median
    );
    println!("(write patch happens before the pause, while the guest runs; paper figures: ptrace on hardware, ours: inside the TCG carrier)");
    Ok(0)
}
