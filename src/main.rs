//! The `dvisor` command line: parses arguments and calls the crates.
mod bench;
mod bench_api;
mod bench_patch;
mod bench_snapshot;
mod bench_update;
mod bench_vm;
mod bench_vmi;
mod clone_cmd;
mod demo;
mod disk_cmd;
mod images;
mod monitor_cmd;
mod ops;
mod policy;
mod run;
mod snapshot_cmd;
mod update_cmd;
mod vmi_cmd;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "dvisor", version, about = "Keep services alive while their OS and programs are patched, updated and watched from outside the VM")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot a guest on D-Visor and attach its console (the default image
    /// unless --kernel is given).
    Run(run::RunArgs),
    /// Build or locate the default guest image.
    #[command(subcommand)]
    Image(images::ImageCmd),
    /// Run a command inside the QEMU-TCG carrier VM, which has a real /dev/kvm.
    Carrier(images::CarrierArgs),
    /// Make, inspect and commit copy-on-write disk overlays.
    #[command(subcommand)]
    Disk(disk_cmd::DiskCmd),
    /// Check, replay and benchmark D-Script policies.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Benchmarks that print a ratio against a baseline measured side by side.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Run the D-System Monitor attached to a running VM (`dvisor run` starts one).
    Monitor(monitor_cmd::MonitorArgs),
    /// Pause all vCPUs of a VM.
    Pause(ops::SimpleArgs),
    /// Resume a paused VM.
    Resume(ops::SimpleArgs),
    /// Show vCPU registers.
    Regs(ops::RegsArgs),
    /// Type on the guest's PS/2 keyboard.
    Keys(ops::KeysArgs),
    /// Show per-device I/O counters.
    Stats(ops::SimpleArgs),
    /// Follow the VM's events: console lines, device I/O, lifecycle, debug.
    Events(ops::EventsArgs),
    /// Show the VM's and its monitor's state.
    Status(ops::SimpleArgs),
    /// List the guest's processes from outside (VMI).
    Ps(vmi_cmd::PsArgs),
    /// Show a guest process's memory map (VMI).
    Maps(vmi_cmd::MapsArgs),
    /// Read or write a guest process's virtual memory.
    Mem(vmi_cmd::MemArgs),
    /// Read or write guest kernel virtual memory.
    Kmem(vmi_cmd::KmemArgs),
    /// Look up a guest kernel symbol, or the symbol at an address.
    Ksym(vmi_cmd::KsymArgs),
    /// Live-patch a guest process from outside: apply, list, revert.
    #[command(subcommand)]
    Patch(vmi_cmd::PatchCmd),
    /// Snapshots of running VMs: create, verify, list, rm, merge, restore in place.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCmd),
    /// Start a second, independent VM from a live snapshot of a running one.
    Clone(clone_cmd::CloneArgs),
    /// Update or rejuvenate the guest's kernel and software through a
    /// shadow VM, pausing it only for the switch (ShadowReboot).
    Update(update_cmd::UpdateArgs),
    /// A guided tour of what dvisor does, on a VM of its own: live patch,
    /// snapshot and clone, ShadowReboot update (`--list` names the steps).
    Demo(demo::DemoArgs),
    /// Run one system call inside a guest process (debugging aid).
    #[command(hide = true)]
    Syscall(vmi_cmd::SyscallArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("DVISOR_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Image(c) => images::run_image(c),
        Cmd::Carrier(a) => images::run_carrier(a),
        Cmd::Disk(c) => disk_cmd::run(c),
        Cmd::Policy(c) => policy::run(c),
        Cmd::Bench(c) => bench::run(c),
        Cmd::Monitor(a) => monitor_cmd::run(a),
        Cmd::Pause(a) => ops::pause(a),
        Cmd::Resume(a) => ops::resume(a),
        Cmd::Regs(a) => ops::regs(a),
        Cmd::Keys(a) => ops::keys(a),
        Cmd::Stats(a) => ops::stats(a),
        Cmd::Events(a) => ops::events(a),
        Cmd::Status(a) => ops::status(a),
        Cmd::Ps(a) => vmi_cmd::ps(a),
        Cmd::Maps(a) => vmi_cmd::maps(a),
        Cmd::Mem(a) => vmi_cmd::mem(a),
        Cmd::Kmem(a) => vmi_cmd::kmem(a),
        Cmd::Ksym(a) => vmi_cmd::ksym(a),
        Cmd::Syscall(a) => vmi_cmd::syscall(a),
        Cmd::Patch(c) => vmi_cmd::patch(c),
        Cmd::Snapshot(c) => snapshot_cmd::run(c),
        Cmd::Clone(a) => clone_cmd::clone(a),
        Cmd::Update(a) => update_cmd::update(a),
        Cmd::Demo(a) => demo::demo(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("dvisor: error: {e:#}");
            std::process::exit(2);
        }
    }
}
