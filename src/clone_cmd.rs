//! `dvisor clone`: a second, independent VM started from a live snapshot
//! of a running one (docs/snapshots.md, "Clones").
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use dvisor_monitor::{paths, ControlRequest};
use dvisor_vmm::api::protocol::CloneSpec;
use dvisor_vmm::snapshot::create::CreateReport;

use crate::ops::Target;

#[derive(Debug, Args)]
#[command(after_help = "\
The clone starts from a live snapshot of the running VM (--vm), which keeps \
running. Afterwards the two are independent: memory is copied, and each \
writable disk becomes two copy-on-write overlays over the disk as it was at \
the clone point, one for each VM (vdX.<name>.ovl in --dir; the VM being \
cloned moves onto its own overlay at that instant). Fold an overlay back \
with `dvisor disk commit`. Read-only disks are shared.

Network: the clone gets its interfaces but no link to the host unless \
--net gives it a tap of its own; two guests never share a tap. Its guest \
keeps the same IP and MAC addresses as the original.

Randomness: the clone's VM generation ID changes, so a guest kernel with \
the vmgenid driver reseeds its RNG; the default guest image does it with \
its vmgenid-watch agent. User-space RNG state, TCP sequence numbers and \
anything else in the guest's memory are duplicated (docs/snapshots.md).

The clone's console is attached here, as with `dvisor run` (Ctrl-C stops \
the clone, not the original).")]
pub struct CloneArgs {
    /// Name of the new VM.
    #[arg(long = "as", value_name = "NAME")]
    pub name: String,
    /// Give the clone this tap (tap=NAME); it must not be the original's.
    #[arg(long, value_name = "tap=NAME", conflicts_with = "no_net")]
    pub net: Option<String>,
    /// No host link for the clone's interfaces (the default).
    #[arg(long)]
    pub no_net: bool,
    /// Where the clone's snapshot and both VMs' disk overlays go [default:
    /// <runtime dir>/clones/NAME when the VMs run here, else
    /// <cache dir>/clones/NAME].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Start the clone paused.
    #[arg(long)]
    pub paused: bool,
    #[command(flatten)]
    pub target: Target,
}

fn default_dir(name: &str) -> PathBuf {
    let local = !dvisor_images::carrier::needed();
    if local {
        paths::runtime_dir().join("clones").join(name)
    } else {
        // The VM runs in the carrier, which sees this host's files but not
        // its runtime dir.
        dvisor_images::cache::cache_root().join("clones").join(name)
    }
}

pub fn clone(a: CloneArgs) -> anyhow::Result<i32> {
    if let Err(e) = paths::check_vm_name(&a.name) {
        bail!("--as: {e}");
    }
    if a.name == a.target.vm {
        bail!("--as {}: a clone needs a name of its own", a.name);
    }
    if std::os::unix::net::UnixStream::connect(paths::api_socket(&a.name)).is_ok() {
        bail!("a VM named {} is already running: pick another --as", a.name);
    }
    let tap = match &a.net {
        Some(n) => Some(
            n.strip_prefix("tap=")
                .filter(|t| !t.is_empty() && !t.contains(','))
                .with_context(|| format!("--net {n:?}: expected tap=NAME"))?
                .to_string(),
        ),
        None => None,
    };
    let dir = std::path::absolute(a.dir.clone().unwrap_or_else(|| default_dir(&a.name)))?;
    let snap = dir.join("snapshot");
    if snap.exists() {
        bail!("{} exists (an earlier clone named {}?): remove it or pass another --dir", snap.display(), a.name);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut c = a.target.connect()?;
    let r: CreateReport = c.call(ControlRequest::Snapshot {
        out: snap.clone(),
        parent: None,
        clone: Some(CloneSpec { dir: dir.clone(), name: a.name.clone() }),
    })?;
    eprintln!(
        "dvisor: cloning {} as {} from {} (pause {:.1} ms)",
        a.target.vm,
        a.name,
        r.dir.display(),
        r.pause_ns as f64 / 1e6
    );
    if let Some(t) = &tap {
        let loaded = dvisor_vmm::snapshot::format::load(&snap)?;
        if loaded.state.config.nets.iter().any(|n| &n.tap == t) {
            bail!("tap {t} is {}'s: give the clone a tap of its own (scripts/tap-up.sh), or --no-net", a.target.vm);
        }
    }
    let exe = std::env::current_exe().context("finding the dvisor executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["run", "--restore"]).arg(&snap).args(["--name", &a.name]);
    match &tap {
        Some(t) => cmd.arg(format!("--net=tap={t}")),
        None => cmd.arg("--no-net"),
    };
    if a.paused {
        cmd.arg("--paused");
    }
    // `dvisor run --restore` from here on: same console, same exit status.
    let e = cmd.exec();
    Err(e).context("starting dvisor run --restore")
}
