//! `dvisor run`: boot a guest on D-Visor, directly on hardware KVM or
//! inside the carrier VM.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use clap::{Args, ValueEnum};
use dvisor_images::carrier::{self, relay};
use dvisor_monitor::paths;
use dvisor_vmm::devices::virtio::net::DEFAULT_MAC;
use dvisor_vmm::{DiskConfig, NetConfig, OnReboot, RunOutcome, VmConfig, VmmError};

/// Exit status when the guest rebooted and `--on-reboot exit` was given.
pub const EXIT_GUEST_REBOOT: i32 = 3;
/// Exit status when the guest crashed or KVM failed.
pub const EXIT_GUEST_FAILED: i32 = 1;
/// Exit status for configuration errors (bad kernel, bad flags).
pub const EXIT_CONFIG: i32 = 2;

const DEFAULT_VCPUS: u8 = 2;
const DEFAULT_MEM_MIB: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RebootAction {
    /// Boot the guest again.
    Restart,
    /// Exit with status 3.
    Exit,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Exit status: 0 guest powered off; 1 guest crashed (triple fault, KVM error; \
the reason and vCPU registers are printed); 2 bad configuration (missing or \
corrupt kernel, bad flags); 3 guest rebooted with --on-reboot exit; 128+N \
stopped by signal N (Ctrl-C: 130).

The console is the guest's COM1. Typed input goes to the guest; Ctrl-C stops \
the VM.

The VMM serves the support API on a UNIX socket (--api) and starts the \
D-System Monitor as a second process (unless --no-monitor); `dvisor pause`, \
`regs`, `keys`, `stats`, `events` and `status` talk to that monitor. Sockets \
live in <runtime dir>/<name>/ where the runtime dir is $DVISOR_RUNTIME_DIR, \
else $XDG_RUNTIME_DIR/dvisor, else /tmp/dvisor-<uid>. When the VM runs in the \
carrier VM, its sockets live in the carrier, and `dvisor run` relays the \
monitor's control socket to <runtime dir>/<name>/monitor.sock on this host \
(docs/carrier.md), so those commands work from another terminal; the \
support API itself stays in the carrier.")]
pub struct RunArgs {
    /// Continue the guest saved in snapshot DIR instead of booting (see
    /// `dvisor snapshot --help`). The VM's shape, kernel and disks come
    /// from the snapshot; --name, --net and --api may differ.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["vcpus", "mem_mib", "kernel", "initrd", "cmdline", "disk"])]
    pub restore: Option<PathBuf>,
    /// With --restore: leave the restored VM paused (`dvisor resume` runs it).
    #[arg(long, requires = "restore")]
    pub paused: bool,
    /// With --restore: give the VM no network even if the snapshot had
    /// some (its interfaces stay, with no link to the host).
    #[arg(long, requires = "restore", conflicts_with = "net")]
    pub no_net: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = DEFAULT_VCPUS)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long = "mem", value_name = "MIB", default_value_t = DEFAULT_MEM_MIB)]
    pub mem_mib: u64,
    /// Kernel bzImage [default: the built guest image's kernel].
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initramfs [default: the built guest image's, unless --kernel is given].
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = dvisor_images::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Raw disk image served as virtio-blk (/dev/vda, /dev/vdb, ... in
    /// order); append ",readonly" to refuse guest writes. Repeatable.
    #[arg(long, value_name = "FILE[,readonly]", value_parser = parse_disk)]
    pub disk: Vec<DiskConfig>,
    /// Network interface served as virtio-net (eth0, eth1, ... in order),
    /// backed by an existing host tap device: tap=NAME[,mac=XX:XX:XX:XX:XX:XX]
    /// (see scripts/tap-up.sh), or `none[,mac=...]` for an interface with
    /// no host link. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub net: Vec<NetConfig>,
    /// Name of this VM: its sockets live in <runtime dir>/<name>/.
    #[arg(long, value_name = "NAME", default_value = paths::DEFAULT_VM_NAME)]
    pub name: String,
    /// Serve the support API here [default: <runtime dir>/<name>/api.sock].
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Do not start the monitor process (start one later with `dvisor monitor`).
    #[arg(long)]
    pub no_monitor: bool,
    /// What to do when the guest reboots.
    #[arg(long, value_enum, default_value = "restart")]
    pub on_reboot: RebootAction,
    /// Never use the carrier VM: fail if this host has no hardware KVM.
    #[arg(long)]
    pub no_carrier: bool,
    /// Carrier VM memory in MiB (when the carrier is used).
    #[arg(long, value_name = "MIB", default_value_t = 0, hide_default_value = true)]
    pub carrier_mem: u32,
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if let Err(e) = paths::check_vm_name(&args.name) {
        eprintln!("dvisor: error: --name: {e}");
        return Ok(EXIT_CONFIG);
    }
    // The sockets' directory (here, or the relayed one when the VM runs in
    // the carrier): this user's, 0700, before anything listens in it.
    if args.api.is_none() || carrier::needed() {
        if let Err(e) = paths::prepare_vm_dir(&args.name) {
            eprintln!("dvisor: error: {e}");
            return Ok(EXIT_CONFIG);
        }
    }
    if let Some(dir) = &args.restore {
        return run_restore(dir, &args);
    }
    let (kernel, initrd) = match resolve_image(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dvisor: error: {e:#}");
            return Ok(EXIT_CONFIG);
        }
    };
    let config = VmConfig {
        name: args.name.clone(),
        kernel,
        initrd,
        cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        on_reboot: match args.on_reboot {
            RebootAction::Restart => OnReboot::Restart,
            RebootAction::Exit => OnReboot::Exit,
        },
        disks: args.disk.clone(),
        nets: args.net.clone(),
        api_socket: Some(args.api.clone().unwrap_or_else(|| paths::api_socket(&args.name))),
    };
    // Configuration errors are the same everywhere: report them here
    // rather than after a carrier boot.
    if let Err(e) = config.validate() {
        eprintln!("dvisor: error: {e}");
        return Ok(EXIT_CONFIG);
    }
    banner(&args);
    if carrier::needed() {
        if args.no_carrier {
            eprintln!(
                "dvisor: error: this host has no hardware virtualization (no vmx/svm CPU flag, \
                 or /dev/kvm is the PVM software hypervisor) and --no-carrier was given; \
                 drop --no-carrier to run inside the carrier VM"
            );
            return Ok(EXIT_CONFIG);
        }
        eprintln!("dvisor: no hardware virtualization on this host; running inside the carrier VM (QEMU TCG with emulated SVM)");
        return run_in_carrier(&config, &args);
    }
    run_direct(&config, &args)
}

/// `dvisor run --restore DIR`: the snapshot is checked here, before any
/// VM (or carrier) starts; a bad one exits with status 2.
fn run_restore(dir: &std::path::Path, args: &RunArgs) -> anyhow::Result<i32> {
    let dir = absolute(dir);
    let chain = match dvisor_vmm::snapshot::format::chain(&dir) {
        Ok(c) => c,
        Err(e) => return Ok(crate::snapshot_cmd::refuse(&e)),
    };
    let Some(last) = chain.last() else { return Ok(EXIT_CONFIG) };
    let saved = &last.state.config;
    for (index, d) in saved.disks.iter().enumerate() {
        if let Err(e) = dvisor_vmm::snapshot::restore::check_disk(index, d, &d.config.path) {
            return Ok(crate::snapshot_cmd::refuse(&e));
        }
    }
    let nets = if args.no_net {
        // Same interfaces, no host link: a clone must never share a tap.
        saved.nets.iter().map(|n| NetConfig { tap: String::new(), mac: n.mac }).collect()
    } else if args.net.is_empty() {
        saved.nets.clone()
    } else if args.net.len() == saved.nets.len() {
        // New taps, the guest's own MAC addresses.
        args.net.iter().zip(&saved.nets).map(|(n, s)| NetConfig { tap: n.tap.clone(), mac: s.mac }).collect()
    } else {
        eprintln!(
            "dvisor: error: the snapshot's VM has {} network interface(s); give as many --net (or --no-net)",
            saved.nets.len()
        );
        return Ok(EXIT_CONFIG);
    };
    let config = VmConfig {
        name: args.name.clone(),
        kernel: saved.kernel.clone(),
        initrd: saved.initrd.clone(),
        cmdline: saved.cmdline.clone(),
        vcpus: saved.vcpus,
        mem_mib: saved.mem_mib,
        on_reboot: match args.on_reboot {
            RebootAction::Restart => OnReboot::Restart,
            RebootAction::Exit => OnReboot::Exit,
        },
        disks: saved.disks.iter().map(|d| d.config.clone()).collect(),
        nets,
        api_socket: Some(args.api.clone().unwrap_or_else(|| paths::api_socket(&args.name))),
    };
    banner(args);
    if !carrier::needed() {
        // Refused here, before the monitor or anything else starts.
        if let Err(e) = dvisor_vmm::snapshot::restore::check_host_cpu(&last.state) {
            return Ok(crate::snapshot_cmd::refuse(&e));
        }
    } else {
        if args.no_carrier {
            eprintln!("dvisor: error: this host has no hardware virtualization and --no-carrier was given");
            return Ok(EXIT_CONFIG);
        }
        eprintln!("dvisor: no hardware virtualization on this host; running inside the carrier VM (QEMU TCG with emulated SVM)");
        return run_in_carrier(&config, args);
    }
    run_direct(&config, args)
}

/// What to do from a second terminal, printed once when the console is a
/// person's terminal: not when stdout is a pipe or file, and not by the
/// `dvisor run` inside the carrier (its caller printed it).
fn banner(args: &RunArgs) {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || carrier::in_carrier() {
        return;
    }
    let vm = if args.name == paths::DEFAULT_VM_NAME { String::new() } else { format!(" --vm {}", args.name) };
    let mut lines = vec![
        format!("dvisor: VM {} starting; its console follows (type into the guest's shell; Ctrl-C stops the VM).", args.name),
        "From another terminal:".to_string(),
    ];
    if args.no_monitor {
        lines.push(format!("  dvisor monitor{vm}           start the monitor, which the commands below need"));
    }
    lines.push(format!("  dvisor status{vm}            the VM and its monitor"));
    lines.push(format!("  dvisor ps{vm}                the guest's processes, read from outside the VM"));
    if let Ok(image) = dvisor_images::current_guest_image() {
        let p = |f: &str| image.patches_dir.join(f).display().to_string();
        lines.push(format!(
            "  dvisor patch apply{vm} --comm demo-service --object {} --commands {}",
            p("v2.o"),
            p("v2.cmd")
        ));
        lines.push("                               live-patch the demo service: its heartbeat says v2".to_string());
    }
    lines.push(format!("  dvisor update{vm}            a fresh boot of the guest that pauses it only for the switch"));
    lines.push("  dvisor demo                  the guided tour, on a VM of its own".to_string());
    let mut out = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
}

fn resolve_image(args: &RunArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(k) = &args.kernel {
        return Ok((k.clone(), args.initrd.clone()));
    }
    let image = match dvisor_images::current_guest_image() {
        Ok(image) => image,
        Err(_) => {
            eprintln!("dvisor: no guest image built yet; building it now (`dvisor image build`)");
            dvisor_images::build_guest_image(&dvisor_images::BuildOptions::default())
                .context("building the default guest image")?
        }
    };
    // The monitor needs the kernel profile for introspection; building it
    // here, natively, spares a monitor in the TCG carrier the slow part.
    if carrier::needed() {
        if let Err(e) = dvisor_monitor::profile::KernelProfile::load_or_build(&image.vmlinux, &dvisor_images::cache_root()) {
            tracing::warn!("kernel profile of {}: {e}", image.vmlinux.display());
        }
    }
    Ok((image.kernel, Some(args.initrd.clone().unwrap_or(image.initrd))))
}

fn run_direct(config: &VmConfig, args: &RunArgs) -> anyhow::Result<i32> {
    if !args.no_monitor {
        if let Some(api) = &config.api_socket {
            let control = control_socket_for(api, &args.name);
            spawn_monitor(api, &control, &args.name)?;
            if let Err(why) = relay::serve_from_env(&control) {
                eprintln!("dvisor: warning: the host cannot reach this VM's monitor (`dvisor pause` etc. work only inside the carrier): {why}");
            }
        }
    }
    let _term = dvisor_vmm::console::RawTerminal::enable();
    let restore = args.restore.as_ref().map(|d| dvisor_vmm::RestoreFrom {
        dir: absolute(d),
        paused: args.paused,
        new_generation: true,
        adopt: false,
    });
    let outcome = dvisor_vmm::run(config, &|| Box::new(std::io::stdout()), restore);
    let _ = std::io::stdout().flush();
    drop(_term);
    Ok(match outcome {
        Ok(RunOutcome::PowerOff) => 0,
        Ok(RunOutcome::Reboot) => {
            eprintln!("dvisor: guest rebooted (--on-reboot exit)");
            EXIT_GUEST_REBOOT
        }
        Ok(RunOutcome::Signal(s)) => {
            eprintln!("\ndvisor: stopped by signal {s}");
            128 + s
        }
        Err(VmmError::Snapshot(e)) if e.is_bad_snapshot() => crate::snapshot_cmd::refuse(&e),
        Err(
            e @ (VmmError::KernelOpen(..)
            | VmmError::BadKernel(..)
            | VmmError::InitrdOpen(..)
            | VmmError::Config(_)
            | VmmError::Cmdline(_)
            | VmmError::Disk(_)
            | VmmError::Net(_)
            | VmmError::Api(..)),
        ) => {
            eprintln!("dvisor: error: {e}");
            EXIT_CONFIG
        }
        Err(e) => {
            eprintln!("\ndvisor: error: {e}");
            EXIT_GUEST_FAILED
        }
    })
}

/// The monitor's control socket sits next to the API socket.
fn control_socket_for(api: &std::path::Path, name: &str) -> PathBuf {
    api.parent().map(PathBuf::from).unwrap_or_else(|| paths::vm_dir(name)).join("monitor.sock")
}

/// Starts the monitor as its own process, in its own process group so that
/// a Ctrl-C meant for the console does not reach it; it exits by itself
/// when the VMM closes the support API. Its log goes to monitor.log.
fn spawn_monitor(api: &std::path::Path, control: &std::path::Path, name: &str) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the dvisor executable")?;
    let dir = control.parent().map(PathBuf::from).unwrap_or_else(|| paths::vm_dir(name));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("monitor.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = std::process::Command::new(exe)
        .args(["monitor", "--vm", name, "--attach"])
        .arg(api)
        .arg("--control")
        .arg(control)
        .env_remove(relay::ENV_LISTEN)
        .env_remove(relay::ENV_TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the monitor process")?;
    // Reap it whenever it ends (killed, upgraded, or after the VMM).
    std::thread::spawn(move || child.wait());
    Ok(())
}

fn run_in_carrier(config: &VmConfig, args: &RunArgs) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding the dvisor executable")?;
    let mut cmd = vec![exe.display().to_string(), "run".into()];
    cmd.extend(carrier_run_args(config, args).to_argv());
    // The carrier needs room for the guest plus its own kernel and page cache.
    let carrier_mem = if args.carrier_mem > 0 {
        args.carrier_mem
    } else {
        (config.mem_mib as u32).saturating_add(768).max(1024)
    };
    let opts = carrier::CarrierOptions {
        mem_mib: carrier_mem,
        ..Default::default()
    };
    if args.no_monitor {
        return Ok(carrier::run(&cmd, &opts)?);
    }
    // The monitor's control socket, relayed to this host.
    Ok(relay::run_relaying(&cmd, &opts, paths::control_socket(&args.name))?)
}

/// What the `dvisor run` inside the carrier is told: the resolved VM
/// (absolute paths, the default image's kernel), or the snapshot again
/// (its shape, kernel and disks come from it), and never the carrier.
/// Socket paths are resolved inside the carrier (its runtime dir is a
/// local tmpfs), unless given explicitly.
fn carrier_run_args(config: &VmConfig, args: &RunArgs) -> RunArgs {
    let inner = RunArgs { no_carrier: true, carrier_mem: 0, ..args.clone() };
    match &args.restore {
        Some(dir) => RunArgs { restore: Some(absolute(dir)), ..inner },
        None => RunArgs {
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            kernel: Some(absolute(&config.kernel)),
            initrd: config.initrd.as_deref().map(absolute),
            cmdline: config.cmdline.clone(),
            disk: config.disks.iter().map(|d| DiskConfig { path: absolute(&d.path), ..d.clone() }).collect(),
            net: config.nets.clone(),
            ..inner
        },
    }
}

impl RunArgs {
    /// The options (after `dvisor run`) that parse back to `self`: each
    /// one that differs from its default. Every field is named here, so a
    /// new option does not compile until it is passed on;
    /// `tests::argv_round_trips_every_option` checks the result against
    /// clap.
    pub fn to_argv(&self) -> Vec<String> {
        let RunArgs {
            restore,
            paused,
            no_net,
            vcpus,
            mem_mib,
            kernel,
            initrd,
            cmdline,
            disk,
            net,
            name,
            api,
            no_monitor,
            on_reboot,
            no_carrier,
            carrier_mem,
        } = self;
        let mut argv = Vec::new();
        let mut flag = |on: bool, name: &str| {
            if on {
                argv.push(format!("--{name}"));
            }
        };
        flag(*paused, "paused");
        flag(*no_net, "no-net");
        flag(*no_monitor, "no-monitor");
        flag(*no_carrier, "no-carrier");
        let mut opt = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                argv.push(format!("--{name}={v}"));
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        opt("restore", path(restore));
        opt("vcpus", (*vcpus != DEFAULT_VCPUS).then(|| vcpus.to_string()));
        opt("mem", (*mem_mib != DEFAULT_MEM_MIB).then(|| mem_mib.to_string()));
        opt("kernel", path(kernel));
        opt("initrd", path(initrd));
        opt("cmdline", (cmdline != dvisor_images::DEFAULT_CMDLINE).then(|| cmdline.clone()));
        for d in disk {
            opt("disk", Some(format!("{}{}", d.path.display(), if d.read_only { ",readonly" } else { "" })));
        }
        for n in net {
            let mac = n.mac != DEFAULT_MAC;
            let link = if n.tap.is_empty() { "none".to_string() } else { format!("tap={}", n.tap) };
            opt("net", Some(format!("{link}{}", if mac { format!(",mac={}", format_mac(&n.mac)) } else { String::new() })));
        }
        opt("name", (name != paths::DEFAULT_VM_NAME).then(|| name.clone()));
        opt("api", path(api));
        let reboot = match on_reboot {
            RebootAction::Restart => None,
            RebootAction::Exit => Some("exit".to_string()),
        };
        opt("on-reboot", reboot);
        opt("carrier-mem", (*carrier_mem != 0).then(|| carrier_mem.to_string()));
        argv
    }
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "readonly")) | Some((p, "ro")) => (p, true),
        Some((_, opt)) => return Err(format!("unknown disk option {opt:?}: the only option is \"readonly\"")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    Ok(DiskConfig { path: path.into(), read_only })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = DEFAULT_MAC;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", m)) => mac = parse_mac(m)?,
            // An interface with no host link (a ShadowReboot shadow's).
            None if part == "none" => tap = Some(String::new()),
            _ => return Err(format!("bad --net part {part:?}: expected tap=NAME[,mac=XX:XX:XX:XX:XX:XX] or none[,mac=...]")),
        }
    }
    let tap = tap.ok_or("--net needs tap=NAME (create one with scripts/tap-up.sh), or none for an interface with no host link")?;
    Ok(NetConfig { tap, mac })
}

/// A MAC address is six colon-separated hex numbers, each one or two
/// digits (`2:d5:0:0:0:1` is accepted): not a hex string, so not the `hex`
/// crate, whose decoder wants exactly two digits a byte and no separators.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("bad MAC address {s:?}: expected six hex bytes like 02:d5:00:00:00:01");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {s} is multicast (lowest bit of the first byte set): pick a unicast one"));
    }
    Ok(mac)
}

fn format_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// The `dvisor run` that starts a ShadowReboot shadow VM (the monitor's
/// launcher): no monitor of its own, never a carrier (it runs beside the
/// VM it shadows), exits rather than reboots.
pub fn shadow_command(spec: &dvisor_monitor::services::update::ShadowSpec) -> std::process::Command {
    let args = RunArgs {
        restore: None,
        paused: false,
        no_net: false,
        vcpus: u8::try_from(spec.vcpus).unwrap_or(u8::MAX),
        mem_mib: spec.mem_mib,
        kernel: Some(spec.kernel.clone()),
        initrd: spec.initrd.clone(),
        cmdline: spec.cmdline.clone(),
        disk: spec.disks.iter().map(|(path, read_only)| DiskConfig { path: path.clone(), read_only: *read_only }).collect(),
        net: spec.macs.iter().map(|mac| NetConfig { tap: String::new(), mac: *mac }).collect(),
        name: spec.name.clone(),
        api: Some(spec.api.clone()),
        no_monitor: true,
        on_reboot: RebootAction::Exit,
        no_carrier: true,
        carrier_mem: 0,
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("dvisor"));
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("run").args(args.to_argv());
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    fn parse(argv: &[String]) -> Result<RunArgs, clap::Error> {
        let cmd = RunArgs::augment_args(clap::Command::new("run"));
        let m = cmd.try_get_matches_from(std::iter::once("run".to_string()).chain(argv.iter().cloned()))?;
        RunArgs::from_arg_matches(&m)
    }

    /// Every option set away from its default, in the two shapes clap
    /// allows (a boot, a restore).
    fn samples() -> [RunArgs; 2] {
        let boot = RunArgs {
            restore: None,
            paused: false,
            no_net: false,
            vcpus: 3,
            mem_mib: 512,
            kernel: Some("/k/bz Image".into()),
            initrd: Some("/k/initrd".into()),
            cmdline: "console=ttyS0 -- init=/bin/sh".into(),
            disk: vec![DiskConfig { path: "/d/a.img".into(), read_only: false }, DiskConfig { path: "/d/b.img".into(), read_only: true }],
            net: vec![
                NetConfig { tap: "tap0".into(), mac: DEFAULT_MAC },
                NetConfig { tap: "tap1".into(), mac: [0x02, 0xab, 0, 0, 0, 0x0f] },
                NetConfig { tap: String::new(), mac: [0x02, 0xab, 0, 0, 0, 0x10] },
            ],
            name: "vm-2".into(),
            api: Some("rel/api.sock".into()),
            no_monitor: true,
            on_reboot: RebootAction::Exit,
            no_carrier: true,
            carrier_mem: 3000,
        };
        let restore = RunArgs {
            restore: Some("/snap/s1".into()),
            paused: true,
            no_net: true,
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            kernel: None,
            initrd: None,
            cmdline: dvisor_images::DEFAULT_CMDLINE.into(),
            disk: Vec::new(),
            net: Vec::new(),
            ..boot.clone()
        };
        [boot, restore]
    }

    #[test]
    fn argv_round_trips_every_option() {
        let defaults = parse(&[]).unwrap();
        assert!(defaults.to_argv().is_empty(), "{:?}", defaults.to_argv());
        let mut seen = Vec::new();
        for args in samples() {
            let argv = args.to_argv();
            let back = parse(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(format!("{back:?}"), format!("{args:?}"), "{argv:?}");
            seen.extend(argv);
        }
        // The samples, and so to_argv, cover every option clap knows.
        let cmd = RunArgs::augment_args(clap::Command::new("run"));
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let given = seen.iter().any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
            assert!(given, "--{long} is not covered by to_argv's samples");
        }
    }

    #[test]
    fn the_carrier_is_told_the_resolved_vm() {
        let [boot, restore] = samples();
        let config = VmConfig {
            name: boot.name.clone(),
            kernel: "k".into(),
            initrd: None,
            cmdline: boot.cmdline.clone(),
            vcpus: 1,
            mem_mib: 128,
            on_reboot: OnReboot::Exit,
            disks: vec![DiskConfig { path: "d.img".into(), read_only: true }],
            nets: boot.net.clone(),
            api_socket: None,
        };
        let inner = carrier_run_args(&config, &RunArgs { no_carrier: false, ..boot });
        assert!(inner.no_carrier && inner.carrier_mem == 0);
        assert_eq!((inner.vcpus, inner.mem_mib, inner.initrd.clone()), (1, 128, None));
        assert_eq!(inner.kernel, Some(absolute(std::path::Path::new("k"))));
        assert!(inner.disk[0].path.is_absolute() && inner.disk[0].read_only);
        let inner = carrier_run_args(&config, &restore);
        assert_eq!(inner.restore.as_deref(), Some(std::path::Path::new("/snap/s1")));
        assert!(inner.kernel.is_none() && inner.disk.is_empty() && inner.paused && inner.no_net);
        parse(&inner.to_argv()).unwrap();
    }
}
