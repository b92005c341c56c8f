//! `dvisor run`: boot a guest on D-Visor, directly on hardware KVM or
//! inside the carrier VM.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::relay;
use clap::{Args, ValueEnum};
use dvisor_images::carrier;
use dvisor_monitor::paths;
use dvisor_vmm::{DiskConfig, NetConfig, OnReboot, RunOutcome, VmConfig, VmmError};

/// Exit status when the guest rebooted and `--on-reboot exit` was given.
pub const EXIT_GUEST_REBOOT: i32 = 3;
/// Exit status when the guest crashed or KVM failed.
pub const EXIT_GUEST_FAILED: i32 = 1;
/// Exit status for configuration errors (bad kernel, bad flags).
pub const EXIT_CONFIG: i32 = 2;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RebootAction {
    /// Boot the guest again.
    Restart,
    /// Exit with status 3.
    Exit,
}

#[derive(Debug, Args)]
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
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long = "mem", value_name = "MIB", default_value_t = 256)]
    pub mem_mib: u64,
    /// Kernel bzImage [default: the built guest image's kernel].
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initramfs [default: the built guest image's, unless --kernel is given].
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = dvisor_vmm::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Raw disk image served as virtio-blk (/dev/vda, /dev/vdb, ... in
    /// order); append ",readonly" to refuse guest writes. Repeatable.
    #[arg(long, value_name = "FILE[,readonly]", value_parser = parse_disk)]
    pub disk: Vec<DiskConfig>,
    /// Network interface served as virtio-net (eth0, eth1, ... in order),
    /// backed by an existing host tap device: tap=NAME[,mac=XX:XX:XX:XX:XX:XX].
    /// See scripts/tap-up.sh. Repeatable.
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
    if !carrier::host_has_hardware_kvm() && std::env::var_os("DVISOR_IN_CARRIER").is_none() {
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
    if carrier::host_has_hardware_kvm() || std::env::var_os("DVISOR_IN_CARRIER").is_some() {
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
    if !dvisor_images::carrier::host_has_hardware_kvm() && std::env::var_os("DVISOR_IN_CARRIER").is_none() {
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
            serve_carrier_relay(&control);
        }
    }
    let _term = dvisor_vmm::console::RawTerminal::enable();
    let restore = args.restore.as_ref().map(|d| dvisor_vmm::RestoreFrom {
        dir: absolute(d),
        paused: args.paused,
        new_generation: true,
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

/// Inside the carrier, when the host side of `dvisor run` asked for it
/// (`DVISOR_CONTROL_RELAY`): serve the monitor's control socket over TCP
/// for the host (src/relay.rs). A failure only costs the host its access.
fn serve_carrier_relay(control: &std::path::Path) {
    if std::env::var_os("DVISOR_IN_CARRIER").is_none() {
        return;
    }
    let Ok(listen) = std::env::var(relay::ENV_LISTEN) else { return };
    let warn = |why: String| {
        eprintln!("dvisor: warning: the host cannot reach this VM's monitor (`dvisor pause` etc. work only inside the carrier): {why}")
    };
    let Some(addr) = relay::parse_listen(&listen) else {
        return warn(format!("bad {}={listen:?}", relay::ENV_LISTEN));
    };
    let Some(token) = std::env::var(relay::ENV_TOKEN).ok().filter(|t| !t.is_empty()) else {
        return warn(format!("{} is not set", relay::ENV_TOKEN));
    };
    if let Err(e) = relay::serve_in_carrier(addr, token, control.to_owned()) {
        warn(format!("listening on {addr}: {e}"));
    }
}

/// Host side of the control relay: a free 127.0.0.1 port for QEMU to
/// forward into the carrier, and the host socket served while the
/// carrier's monitor answers. `None` (after one warning) if it cannot be
/// set up: the VM runs anyway.
fn start_host_relay(name: &str) -> Option<(relay::HostRelay, u16, String)> {
    let setup = || -> Result<(relay::HostRelay, u16, String), String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free 127.0.0.1 port: {e}"))?
            .port();
        let token = relay::new_token().map_err(|e| format!("reading /dev/urandom: {e}"))?;
        let r = relay::HostRelay::start(paths::control_socket(name), port, token.clone())?;
        Ok((r, port, token))
    };
    match setup() {
        Ok(v) => Some(v),
        Err(e) => {
            warn_no_relay(&e);
            None
        }
    }
}

fn warn_no_relay(why: &str) {
    eprintln!("dvisor: warning: not relaying the monitor's control socket to this host: {why}; `dvisor pause` etc. from here will not reach this VM (the console works)");
}

fn run_in_carrier(config: &VmConfig, args: &RunArgs) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding the dvisor executable")?;
    let mut cmd = vec![
        exe.display().to_string(),
        "run".into(),
        "--no-carrier".into(),
        format!(
            "--on-reboot={}",
            if config.on_reboot == OnReboot::Exit { "exit" } else { "restart" }
        ),
    ];
    if let Some(dir) = &args.restore {
        // The shape, kernel and disks come from the snapshot again.
        cmd.push(format!("--restore={}", absolute(dir).display()));
        if args.paused {
            cmd.push("--paused".into());
        }
        if args.no_net {
            cmd.push("--no-net".into());
        }
        for n in config.nets.iter().filter(|_| !args.no_net) {
            cmd.push(format!("--net=tap={}", n.tap));
        }
    } else {
        cmd.push(format!("--vcpus={}", config.vcpus));
        cmd.push(format!("--mem={}", config.mem_mib));
        cmd.push(format!("--kernel={}", absolute(&config.kernel).display()));
        cmd.push(format!("--cmdline={}", config.cmdline));
        if let Some(initrd) = &config.initrd {
            cmd.push(format!("--initrd={}", absolute(initrd).display()));
        }
        for d in &config.disks {
            let ro = if d.read_only { ",readonly" } else { "" };
            cmd.push(format!("--disk={}{ro}", absolute(&d.path).display()));
        }
        for n in &config.nets {
            cmd.push(format!("--net=tap={},mac={}", n.tap, format_mac(&n.mac)));
        }
    }
    // Socket paths are resolved inside the carrier (its runtime dir is a
    // local tmpfs), unless given explicitly.
    cmd.push(format!("--name={}", args.name));
    if let Some(api) = &args.api {
        cmd.push(format!("--api={}", api.display()));
    }
    if args.no_monitor {
        cmd.push("--no-monitor".into());
    }
    // The carrier needs room for the guest plus its own kernel and page cache.
    let carrier_mem = if args.carrier_mem > 0 {
        args.carrier_mem
    } else {
        (config.mem_mib as u32).saturating_add(768).max(1024)
    };
    let mut opts = carrier::CarrierOptions {
        mem_mib: carrier_mem,
        ..Default::default()
    };
    // The monitor's control socket, relayed to this host (src/relay.rs).
    let relay = if args.no_monitor { None } else { start_host_relay(&args.name) };
    let Some((guard, port, token)) = relay else {
        return Ok(carrier::run(&cmd, &opts)?);
    };
    let forward = carrier::TcpForward { host_port: port, carrier_port: relay::CARRIER_PORT };
    let plain_env = opts.extra_env.clone();
    opts.extra_env.push((relay::ENV_LISTEN.into(), format!("{}:{}", carrier::CARRIER_IP, relay::CARRIER_PORT)));
    opts.extra_env.push((relay::ENV_TOKEN.into(), token));
    let result = match carrier::run_forwarding(&cmd, &opts, &[forward]) {
        // The port was taken since we picked it; nothing ran yet.
        Err(carrier::CarrierError::HostForward(e)) => {
            drop(guard);
            warn_no_relay(&e);
            opts.extra_env = plain_env;
            carrier::run(&cmd, &opts)
        }
        other => other,
    };
    Ok(result?)
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
    let mut mac = dvisor_vmm::devices::virtio::net::DEFAULT_MAC;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", m)) => mac = parse_mac(m)?,
            _ => return Err(format!("bad --net part {part:?}: expected tap=NAME[,mac=XX:XX:XX:XX:XX:XX]")),
        }
    }
    let tap = tap.ok_or("--net needs tap=NAME (create one with scripts/tap-up.sh)")?;
    Ok(NetConfig { tap, mac })
}

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
