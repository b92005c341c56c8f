//! `dvisor update`: ShadowReboot, through the VM's monitor
//! (docs/shadowreboot.md).
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dvisor_monitor::services::update::{UpdateReport, UpdateRequest, DEFAULT_READY};
use dvisor_monitor::ControlRequest;

use crate::ops::Target;

#[derive(Debug, Args)]
#[command(after_help = "\
A shadow VM of the same shape (vCPUs, memory, MAC addresses; no host link; \
blank stand-ins for the disks) boots the new kernel, initrd and command line \
beside the running VM, which keeps serving. Once a console line of the shadow \
matches --ready, the shadow is paused and snapshotted, and the running VM's \
VMM loads that state in place: same VMM process, sockets, monitor, tap, MAC \
and disk files. The running guest is paused only for that switch.

With no --kernel, --initrd, --cmdline or --image the update is a \
rejuvenation: a fresh boot of the same software (the remedy for software \
aging).

If the shadow does not become ready before --timeout, exits, or its kernel \
does not boot, the running VM is never paused: the command exits 1 with the \
reason and the shadow's console tail. If the switch itself fails, the VMM \
resumes the old guest as it was.

What carries over: the disks (the new guest mounts them itself after the \
switch: write what must survive with fsync) and the IP and MAC addresses. \
What does not: the old guest's memory, processes, TCP connections and \
process patches (docs/shadowreboot.md).")]
pub struct UpdateArgs {
    /// The new kernel (bzImage) [default: the running one].
    #[arg(long, value_name = "FILE", conflicts_with = "image")]
    pub kernel: Option<PathBuf>,
    /// The new initramfs [default: the running one unless --kernel is given].
    #[arg(long, value_name = "FILE", conflicts_with = "image")]
    pub initrd: Option<PathBuf>,
    /// The new kernel command line [default: the running one].
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// A guest image directory (`dvisor image path`): its kernel and initrd.
    #[arg(long, value_name = "DIR")]
    pub image: Option<PathBuf>,
    /// The shadow is ready when one of its console lines matches this
    /// regular expression.
    #[arg(long, value_name = "REGEX", default_value = DEFAULT_READY)]
    pub ready: String,
    /// Give up (leaving the running VM untouched) if the shadow is not ready
    /// by then: 300s, 90s, 2m, 1500ms.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub target: Target,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("bad duration {s:?}: expected a number with ms, s or m (300s, 2m, 1500ms)");
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(bad()),
    };
    if !(secs > 0.0 && secs < 86_400.0) {
        return Err(format!("duration {s:?} out of range (more than 0, less than a day)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn update(a: UpdateArgs) -> anyhow::Result<i32> {
    let abs = |p: &PathBuf| std::path::absolute(p).with_context(|| format!("{}", p.display()));
    let (kernel, initrd) = match &a.image {
        Some(dir) => {
            let img = dvisor_images::load_guest_image(dir).with_context(|| format!("--image {}", dir.display()))?;
            (Some(abs(&img.kernel)?), Some(abs(&img.initrd)?))
        }
        None => (a.kernel.as_ref().map(abs).transpose()?, a.initrd.as_ref().map(abs).transpose()?),
    };
    for (what, p) in [("--kernel", &kernel), ("--initrd", &initrd)] {
        if let Some(p) = p {
            if !p.is_file() {
                bail!("{what} {}: no such file", p.display());
            }
        }
    }
    if let Err(e) = regex::Regex::new(&a.ready) {
        bail!("--ready {:?}: not a regular expression: {e}", a.ready);
    }
    let req = UpdateRequest {
        kernel,
        initrd,
        cmdline: a.cmdline.clone(),
        ready: Some(a.ready.clone()),
        timeout_ms: a.timeout.as_millis() as u64,
    };
    let mut c = a.target.connect()?;
    if !a.target.json {
        eprintln!(
            "dvisor: {} {}: booting a shadow VM (up to {:?}); the VM keeps running until the switch",
            if req.kernel.is_none() && req.initrd.is_none() && req.cmdline.is_none() { "rejuvenating" } else { "updating" },
            a.target.vm,
            a.timeout
        );
    }
    let r: UpdateReport = match c.call(ControlRequest::Update(req)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dvisor: error: update of {} failed: {e}", a.target.vm);
            return Ok(1);
        }
    };
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!("{} of {} done: now boot {} running {}", r.kind, a.target.vm, r.boot, r.new_kernel);
    println!("  shadow start     {:>9.1} ms", r.shadow_start_ms);
    println!("  boot to ready    {:>9.1} ms  ({})", r.boot_to_ready_ms, r.ready_line);
    println!("  shadow snapshot  {:>9.1} ms", r.snapshot_ms);
    println!("  switch (pause)   {:>9.1} ms  (request {:.1} ms)", r.switch_ms, r.switch_call_ms);
    println!("  whole update     {:>9.1} ms", r.total_ms);
    if r.patches_dropped > 0 {
        println!("  note: {} process patches of the old guest are gone with it", r.patches_dropped);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("5h"));
        assert!(parse_duration("soon").is_err());
    }
}
