//! `dvisor monitor`: the D-System Monitor process.
use std::path::PathBuf;

use clap::Args;
use dvisor_monitor::{paths, Monitor};

#[derive(Debug, Args)]
#[command(after_help = "\
The monitor maps guest memory through the support API, follows the VM's \
events and serves the operator's control socket that `dvisor pause`, \
`regs`, `keys`, `stats`, `events` and `status` talk to. `dvisor run` starts \
one; if it dies the guest runs on, and running this command again \
re-attaches. It exits (status 0) when the VMM stops.")]
pub struct MonitorArgs {
    /// The VMM's support API socket [default: the --vm's api.sock].
    #[arg(long, value_name = "API_SOCKET")]
    pub attach: Option<PathBuf>,
    /// The control socket to serve [default: monitor.sock beside the API socket].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The uncompressed kernel (vmlinux) the VM runs, for introspection
    /// [default: `vmlinux` beside the VM's kernel image].
    #[arg(long, value_name = "PATH")]
    pub vmlinux: Option<PathBuf>,
    /// VM name, used for the default socket paths.
    #[arg(long, value_name = "NAME", default_value = paths::DEFAULT_VM_NAME)]
    pub vm: String,
}

pub fn run(args: MonitorArgs) -> anyhow::Result<i32> {
    paths::check_vm_name(&args.vm).map_err(anyhow::Error::msg)?;
    let api = args.attach.unwrap_or_else(|| paths::api_socket(&args.vm));
    let control = args.control.unwrap_or_else(|| match api.parent() {
        Some(dir) => dir.join("monitor.sock"),
        None => paths::control_socket(&args.vm),
    });
    let monitor = Monitor::attach(&api, args.vmlinux, dvisor_images::cache_root(), Some(Box::new(crate::run::shadow_command)))?;
    eprintln!(
        "dvisor monitor: attached to {} (pid {}); control socket {}",
        api.display(),
        std::process::id(),
        control.display()
    );
    monitor.serve(&control)?;
    Ok(0)
}
