//! `dvisor demo [STEP]`: the product's story on the default image, told
//! step by step with the evidence of each, on a VM the demo starts and
//! always stops (docs/demo.md).
//!
//! Every step drives the real commands (`dvisor patch`, `snapshot`,
//! `clone`, `update`) as a user would from a second terminal, and checks
//! what a user would look at: the guest's console, `dvisor ps`, the
//! service's TCP answer. A check that does not hold fails the step.
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::bench_update::{self, json, Client};
use crate::bench_vm::Vm;

#[derive(Debug, Args)]
#[command(after_help = "\
The demo boots the default guest image (inside the carrier VM on hosts \
without hardware virtualization), with its network on a tap in a network \
namespace of its own (so it needs root, as `scripts/setup.sh` does), runs \
the step(s), and stops every VM it started, also when a step fails.

Exit status: 0 every step held; 1 a step failed (its reason is printed); \
2 bad usage (an unknown or planned step).")]
pub struct DemoArgs {
    /// Run only this step (`--list` names them) [default: every available
    /// step, in order, on one VM].
    pub step: Option<String>,
    /// List the steps, available and planned, and exit.
    #[arg(long)]
    pub list: bool,
    /// Where the update step writes its picture [default: ./dvisor-demo].
    #[arg(long, value_name = "DIR", default_value = "dvisor-demo")]
    pub out: PathBuf,
    /// Run here even without hardware KVM (used inside the carrier).
    #[arg(long, hide = true)]
    pub here: bool,
}

struct Step {
    name: &'static str,
    what: &'static str,
    /// None: planned, not available yet (the issue that brings it).
    run: Option<fn(&mut Demo) -> anyhow::Result<()>>,
    planned_by: &'static str,
}

const STEPS: &[Step] = &[
    Step { name: "patch", what: "live-patch the running service: heartbeat v1 -> v2, same pid, no restart; then revert", run: Some(patch), planned_by: "" },
    Step { name: "kernel-patch", what: "live-patch a guest kernel function: a /proc file's text changes", run: None, planned_by: "kernel live patching" },
    Step { name: "snapshot", what: "snapshot the running VM and start a clone that carries on from it", run: Some(snapshot), planned_by: "" },
    Step { name: "update", what: "ShadowReboot: a fresh boot of the guest; the gap a client sees beside a plain reboot's (SVG)", run: Some(update), planned_by: "" },
    Step { name: "keylogger", what: "inject keystrokes and catch a keylogger by correlating the guest's I/O", run: None, planned_by: "active I/O correlation" },
    Step { name: "policy", what: "a D-Script policy rejuvenates a leaking service", run: None, planned_by: "D-Script driving a live VM" },
];

/// The VM the steps act on, and what they share.
struct Demo {
    vm: Vm,
    name: String,
    client: Client,
    out: PathBuf,
    image: dvisor_images::GuestImage,
}

pub fn demo(args: DemoArgs) -> anyhow::Result<i32> {
    if args.list {
        for s in STEPS {
            match s.run {
                Some(_) => println!("{:<13} {}", s.name, s.what),
                None => println!("{:<13} planned ({}): {}", s.name, s.planned_by, s.what),
            }
        }
        return Ok(0);
    }
    let steps: Vec<&Step> = match &args.step {
        None => STEPS.iter().filter(|s| s.run.is_some()).collect(),
        Some(name) => match STEPS.iter().find(|s| s.name == name) {
            Some(s) if s.run.is_some() => vec![s],
            Some(s) => {
                eprintln!("dvisor demo: step {name} is planned, not available yet (it needs {}); `dvisor demo --list` shows the steps", s.planned_by);
                return Ok(2);
            }
            None => {
                let names: Vec<&str> = STEPS.iter().map(|s| s.name).collect();
                eprintln!("dvisor demo: no step {name:?}; the steps are {}", names.join(", "));
                return Ok(2);
            }
        },
    };
    let image = dvisor_images::current_guest_image()
        .or_else(|_| {
            eprintln!("dvisor demo: building the default guest image first (`dvisor image build`)");
            dvisor_images::build_guest_image(&Default::default())
        })
        .context("the demo runs on the default guest image")?;
    // Room for the guest, a clone or a shadow beside it, and the carrier.
    if let Some(code) = crate::bench::in_carrier_if_needed(args.here, 2048)? {
        return Ok(code);
    }
    bench_update::own_network()?;
    let name = format!("demo{}", std::process::id());
    say(&format!(
        "Booting the default guest as VM {name}: a Debian cloud kernel and a demo service that prints \
         `heartbeat N v1` once a second and answers on {}:8080.",
        bench_update::GUEST_IP
    ));
    let mut extra = vec!["--vcpus", "1"];
    let net = bench_update::guest_net(dvisor_images::DEFAULT_CMDLINE);
    extra.extend(net.iter().map(String::as_str));
    let vm = Vm::boot_with(&name, &extra).context("booting the demo VM")?;
    let client = Client::start();
    bench_update::wait_service(&name, &client)?;
    let mut demo = Demo { vm, name, client, out: std::path::absolute(&args.out)?, image };
    for (i, s) in steps.iter().enumerate() {
        println!();
        say(&format!("== step {}/{}: {} — {}", i + 1, steps.len(), s.name, s.what));
        let run = s.run.expect("only available steps are chosen");
        if let Err(e) = run(&mut demo) {
            demo.vm.stop();
            eprintln!("dvisor demo: the guest's console ended with:");
            for l in demo.vm.tail() {
                eprintln!("  | {l}");
            }
            eprintln!("dvisor demo: step {} failed: {e:#}", s.name);
            return Ok(1);
        }
    }
    demo.vm.stop();
    println!();
    say("Done: every step held, and the demo's VMs are stopped.");
    Ok(0)
}

fn say(s: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

fn evidence(s: &str) {
    say(&format!("   evidence: {s}"));
}

/// "heartbeat <counter> <message>" on the console.
fn heartbeat(line: &str) -> Option<(u64, String)> {
    let rest = &line[line.find("heartbeat ")? + "heartbeat ".len()..];
    let mut it = rest.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.to_string()))
}

impl Demo {
    /// The next heartbeat the console prints.
    fn next_beat(&mut self) -> anyhow::Result<(u64, String)> {
        let l = self.vm.wait_line_within(Duration::from_secs(60), |l| heartbeat(l).is_some()).context("waiting for a heartbeat")?;
        Ok(heartbeat(&l).expect("matched"))
    }

    /// The next heartbeat whose message is `msg`, within a minute.
    fn beat_saying(&mut self, msg: &str) -> anyhow::Result<u64> {
        let l = self
            .vm
            .wait_line_within(Duration::from_secs(60), |l| heartbeat(l).is_some_and(|h| h.1 == msg))
            .with_context(|| format!("no heartbeat said {msg} within a minute"))?;
        Ok(heartbeat(&l).expect("matched").0)
    }

    fn service_pid(&self, vm: &str) -> anyhow::Result<u64> {
        let ps = json(&["ps", "--vm", vm])?;
        let procs = ps.as_array().context("dvisor ps --json gave no list")?;
        let p: Vec<u64> = procs.iter().filter(|p| p["comm"] == "demo-service").filter_map(|p| p["pid"].as_u64()).collect();
        match p[..] {
            [pid] => Ok(pid),
            _ => bail!("`dvisor ps --vm {vm}` lists {} demo-service processes, not one", p.len()),
        }
    }

    /// The service's answer on its TCP port.
    fn ask(&self) -> anyhow::Result<String> {
        let addr = format!("{}:8080", bench_update::GUEST_IP);
        let a = bench_update::fetch(&addr.parse()?, Duration::from_secs(5)).with_context(|| format!("asking the service at {addr}"))?;
        Ok(a.trim().to_string())
    }

    fn sample(&self, file: &str) -> anyhow::Result<String> {
        let p = self.image.patches_dir.join(file);
        if !p.exists() {
            bail!("{} is missing: rebuild the image (`dvisor image build`)", p.display());
        }
        Ok(p.display().to_string())
    }
}

fn patch(d: &mut Demo) -> anyhow::Result<()> {
    let pid = d.service_pid(&d.name)?;
    let (n0, msg) = d.next_beat()?;
    if msg != "v1" {
        bail!("the service says {msg} before the patch, not v1");
    }
    say(&format!("The demo service runs as pid {pid} (from `dvisor ps`, read from outside the guest) and says v1."));
    evidence(&format!("console: heartbeat {n0} v1; TCP answer: {}", d.ask()?));
    say("Patching its get_message() to return \"v2\" from outside the VM: the monitor writes the new code into the \
         process and a jump over the old function's start, pausing the guest only for the jump.");
    let (object, commands) = (d.sample("v2.o")?, d.sample("v2.cmd")?);
    let p = json(&["patch", "apply", "--vm", &d.name, "--pid", &pid.to_string(), "--object", &object, "--commands", &commands])?;
    let id = p["id"].as_u64().context("patch apply gave no id")?;
    let pause_us = p["timing"]["pause_us"].as_u64().unwrap_or(0);
    let n1 = d.beat_saying("v2")?;
    let pid1 = d.service_pid(&d.name)?;
    if pid1 != pid {
        bail!("the service's pid changed from {pid} to {pid1}: it restarted");
    }
    if n1 <= n0 {
        bail!("the heartbeat counter went from {n0} back to {n1}: the service restarted");
    }
    evidence(&format!(
        "patch {id} applied, guest paused {pause_us} µs; console: heartbeat {n1} v2, same pid {pid}, counter went on from {n0}"
    ));
    say("Reverting: the original bytes go back and the service says v1 again.");
    json(&["patch", "revert", "--vm", &d.name, &id.to_string()])?;
    let n2 = d.beat_saying("v1")?;
    evidence(&format!("patch {id} reverted; console: heartbeat {n2} v1, still pid {}", d.service_pid(&d.name)?));
    Ok(())
}

fn snapshot(d: &mut Demo) -> anyhow::Result<()> {
    let dir = d.out.join(format!("snapshot-{}", d.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = (|| -> anyhow::Result<()> {
        say("Taking a live snapshot: memory is copied while the guest runs; the guest pauses only for the last pages and the devices.");
        let snap = dir.join("live");
        let (n0, _) = d.next_beat()?;
        let s = json(&["snapshot", "create", "--vm", &d.name, "--out", &snap.display().to_string()])?;
        evidence(&format!(
            "{} written, {:.1} MiB, guest paused {:.1} ms, total {:.0} ms; the service beat on (heartbeat {} after {n0})",
            snap.display(),
            s["bytes_written"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            s["pause_ns"].as_f64().unwrap_or(0.0) / 1e6,
            s["total_ns"].as_f64().unwrap_or(0.0) / 1e6,
            d.next_beat()?.0
        ));
        say("Cloning: a second VM starts from a live snapshot and carries on where the original was, with no boot.");
        let twin = format!("{}-clone", d.name);
        let (at, _) = d.next_beat()?;
        let clone_dir = dir.join("clone");
        let mut clone = Vm::start(&["clone", "--vm", &d.name, "--as", &twin, "--dir", &clone_dir.display().to_string()])?;
        let first = clone.wait_line_within(Duration::from_secs(120), |l| heartbeat(l).is_some() || l.contains("dvisor-guest: init"))?;
        let Some((n, _)) = heartbeat(&first) else { bail!("the clone booted from scratch ({first:?}) instead of carrying on") };
        if n < at {
            bail!("the clone's first heartbeat is {n}, before the original's {at} at the clone point");
        }
        bench_update::wait_monitor(&twin)?;
        let twin_pid = d.service_pid(&twin)?;
        let pid = d.service_pid(&d.name)?;
        if twin_pid != pid {
            bail!("the clone's service is pid {twin_pid}, the original's {pid}");
        }
        let (later, _) = d.next_beat()?;
        evidence(&format!(
            "the clone {twin} printed heartbeat {n} (the original was at {at}), its service is the same pid {pid}; the original beats on (heartbeat {later})"
        ));
        clone.stop();
        say(&format!("The clone is stopped; {} is removed.", dir.display()));
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn update(d: &mut Demo) -> anyhow::Result<()> {
    say("ShadowReboot: a shadow VM boots the guest afresh beside the running one; when its service is ready, \
         the running VM pauses, takes the shadow's state in place (same VMM, tap, MAC, disks) and resumes. \
         A client asks the service every 10 ms throughout; then a plain reboot, for comparison.");
    std::fs::create_dir_all(&d.out).with_context(|| format!("creating {}", d.out.display()))?;
    let boot_id = |d: &mut Demo, tag: &str| -> anyhow::Result<String> {
        d.vm.type_line(&format!("echo {tag}=$(cat /proc/sys/kernel/random/boot_id)"))?;
        let l = d.vm.wait_line_within(Duration::from_secs(60), |l| l.starts_with(&format!("{tag}=")))?;
        Ok(l[tag.len() + 1..].trim().to_string())
    };
    let before = boot_id(d, "BOOT1")?;
    let log = |s: &str| say(&format!("   {s}"));
    let name = d.name.clone();
    let upd = bench_update::measure(&d.client, 256, "update", &log, || Ok(Some(bench_update::update_retrying(&name, &log)?)))?;
    // The serial shell is the new boot's now: wait for its prompt.
    d.vm.type_line("")?;
    d.vm.wait_line(|l| l.contains("guest# "))?;
    let after = boot_id(d, "BOOT2")?;
    if before.len() != 36 || before == after {
        bail!("the guest's boot id did not change ({before:?} -> {after:?}): no fresh boot");
    }
    let (n, msg) = d.next_beat()?;
    let report = upd.report.clone().unwrap_or_default();
    evidence(&format!(
        "new boot id {after} (was {before}); heartbeat {n} {msg} from the fresh service; the guest was paused {:.0} ms for the switch; \
         the client's longest gap was {:.0} ms",
        report["switch_ms"].as_f64().unwrap_or(0.0),
        upd.gap_ms
    ));
    say("A plain reboot of the same guest (`reboot -f` at its shell), measured the same way:");
    let vm = &mut d.vm;
    let plain = bench_update::measure(&d.client, 256, "plain reboot", &log, || {
        vm.type_line("reboot -f")?;
        vm.wait_line(|l| l.contains("dvisor-guest: init"))?;
        Ok(None)
    })?;
    d.vm.type_line("")?;
    d.vm.wait_line(|l| l.contains("guest# "))?;
    let svg = d.out.join("update-gap.svg");
    let (u, p) = (upd.gap_ms, plain.gap_ms);
    bench_update::write_plot(&svg, &[upd, plain]).with_context(|| format!("writing {}", svg.display()))?;
    evidence(&format!(
        "the client's longest gap: {u:.0} ms with ShadowReboot, {p:.0} ms with a plain reboot ({:.1}% shorter); picture: {}",
        100.0 * (1.0 - u / p),
        svg.display()
    ));
    Ok(())
}
