//! `dvisor snapshot create|verify|list|rm|merge`: snapshots of running VMs
//! (docs/snapshots.md).
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dvisor_monitor::ControlRequest;
use dvisor_vmm::api::protocol::{Event, EventKind};
use dvisor_vmm::snapshot::create::CreateReport;
use dvisor_vmm::snapshot::{format, SnapshotError};

use crate::ops::Target;

/// Exit status for a snapshot that is refused (corrupt, wrong version,
/// changed disk...).
pub const EXIT_BAD_SNAPSHOT: i32 = 2;

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a running VM while it keeps running (short pause).
    Create(CreateArgs),
    /// Check a snapshot (and its parents) without restoring it.
    Verify(VerifyArgs),
    /// List the snapshots in directories.
    List(ListArgs),
    /// Delete snapshots (only directories that are snapshots).
    Rm(RmArgs),
    /// Fold an incremental chain into one full snapshot.
    Merge(MergeArgs),
    /// Load a snapshot into a running VM in place (same VMM process, API
    /// socket, monitor, taps and disks).
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot directory (on the VM's host).
    pub dir: PathBuf,
    /// Leave the restored VM paused.
    #[arg(long)]
    pub paused: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
#[command(after_help = "\
The VM keeps running: memory is copied while the guest runs (KVM's dirty \
log tracks what it writes meanwhile), then the vCPUs stop only for the last \
dirtied pages and the CPU and device state. A paused VM stays paused; a \
running one keeps running. The snapshot is a directory: state.bin (magic, \
version, CRC-64), memory.raw (sparse, by guest-physical address) and \
manifest.json (read it with jq). It appears only when complete.

--out is resolved on the VM's host: when the VM runs inside the carrier, \
the carrier sees this host's files at the same paths (9p), but writing \
memory there is slow; /dev/shm inside the carrier is faster and private \
to it.

Restore with `dvisor run --restore DIR`, or in place with \
`dvisor snapshot restore`.")]
pub struct CreateArgs {
    /// Directory to create (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write only the pages that differ from this snapshot (incremental).
    #[arg(long, value_name = "DIR")]
    pub parent: Option<PathBuf>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Directories whose sub-directories are snapshots [default: .].
    pub dirs: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Snapshot directories to delete.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Also delete a snapshot that other snapshots beside it use as parent.
    #[arg(long)]
    pub force: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The newest snapshot of the chain.
    pub dir: PathBuf,
    /// Where to write the full snapshot (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: SnapshotCmd) -> anyhow::Result<i32> {
    match cmd {
        SnapshotCmd::Create(a) => create(a),
        SnapshotCmd::Verify(a) => verify(a),
        SnapshotCmd::List(a) => list(a),
        SnapshotCmd::Rm(a) => rm(a),
        SnapshotCmd::Merge(a) => merge(a),
        SnapshotCmd::Restore(a) => restore(a),
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Shows progress events from the monitor on stderr while the snapshot
/// runs (terminal only; quiet with --json).
fn spawn_progress(target: &Target) -> Option<std::thread::JoinHandle<()>> {
    if target.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let mut c = target.connect().ok()?;
    c.follow(vec![EventKind::Progress], 0).ok()?;
    Some(std::thread::spawn(move || {
        let start = Instant::now();
        while let Ok(Some(ev)) = c.next_event() {
            if let Event::Progress { what, done, total, .. } = ev {
                let secs = start.elapsed().as_secs_f64().max(1e-3);
                eprint!(
                    "\r\x1b[K{what}: {} / {} MiB ({:.0} MiB/s)",
                    done >> 20,
                    total >> 20,
                    done as f64 / (1 << 20) as f64 / secs
                );
            }
        }
    }))
}

fn create(a: CreateArgs) -> anyhow::Result<i32> {
    let out = absolute(&a.out)?;
    let parent = a.parent.as_deref().map(absolute).transpose()?;
    let mut c = a.target.connect()?;
    let progress = spawn_progress(&a.target);
    let r: Result<CreateReport, _> = c.call(ControlRequest::Snapshot { out, parent, clone: None });
    if progress.is_some() {
        eprint!("\r\x1b[K");
    }
    let r = r?;
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "snapshot {} ({:?}, id {}): {} pages, {:.1} MiB written; pause {:.2} ms, total {:.0} ms, {} pre-copy round(s){}",
            r.dir.display(),
            r.kind,
            r.id,
            r.pages_in_layer,
            r.bytes_written as f64 / (1 << 20) as f64,
            r.pause_ns as f64 / 1e6,
            r.total_ns as f64 / 1e6,
            r.precopy_rounds,
            if r.was_paused { "; the VM was paused and stays paused" } else { "" }
        );
    }
    Ok(0)
}

#[derive(serde::Serialize)]
struct Verified {
    dir: PathBuf,
    ok: bool,
    error: Option<String>,
    chain: Vec<ChainEntry>,
    notes: Vec<String>,
}

#[derive(serde::Serialize)]
struct ChainEntry {
    dir: PathBuf,
    id: String,
    kind: format::SnapshotKind,
    dvisor_version: String,
}

/// Everything restore checks, without starting a VM. CPU features need a
/// hardware-model KVM to compare with: checked where there is one.
fn check_snapshot(dir: &Path) -> Result<(Vec<format::Loaded>, Vec<String>), SnapshotError> {
    let chain = format::chain(dir)?;
    let mut notes = Vec::new();
    let Some(last) = chain.last() else {
        return Err(SnapshotError::Invalid("empty chain".into()));
    };
    for (index, d) in last.state.config.disks.iter().enumerate() {
        dvisor_vmm::snapshot::restore::check_disk(index, d, &d.config.path)?;
    }
    if !dvisor_images::carrier::needed() {
        dvisor_vmm::snapshot::restore::check_host_cpu(&last.state)?;
    } else {
        notes.push("CPU features not compared: this host has no hardware KVM (restore in the carrier compares them)".into());
    }
    Ok((chain, notes))
}

/// The message and exit status for a snapshot that cannot be used.
pub fn refuse(e: &SnapshotError) -> i32 {
    eprintln!("dvisor: error: {e}");
    EXIT_BAD_SNAPSHOT
}

fn verify(a: VerifyArgs) -> anyhow::Result<i32> {
    let dir = absolute(&a.dir)?;
    let result = check_snapshot(&dir);
    let (ok, error, chain, notes) = match &result {
        Ok((chain, notes)) => (true, None, chain.as_slice(), notes.clone()),
        Err(e) => (false, Some(e.to_string()), &[][..], Vec::new()),
    };
    let chain: Vec<ChainEntry> = chain
        .iter()
        .map(|l| ChainEntry { dir: l.dir.clone(), id: l.state.id.clone(), kind: l.manifest.kind, dvisor_version: l.header.writer.clone() })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&Verified { dir: dir.clone(), ok, error: error.clone(), chain, notes })?);
    } else if let Some(e) = &error {
        eprintln!("dvisor: error: {e}");
    } else {
        for c in &chain {
            println!("ok  {}  id {}  {:?}  written by dvisor {}", c.dir.display(), c.id, c.kind, c.dvisor_version);
        }
        for n in &notes {
            println!("note: {n}");
        }
    }
    Ok(if ok { 0 } else { EXIT_BAD_SNAPSHOT })
}

#[derive(serde::Serialize)]
struct Listed {
    dir: PathBuf,
    manifest: Option<format::Manifest>,
    error: Option<String>,
    disk_bytes: u64,
}

/// Bytes the directory's files take on disk (sparse files count what is
/// allocated).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

fn list(a: ListArgs) -> anyhow::Result<i32> {
    let roots = if a.dirs.is_empty() { vec![PathBuf::from(".")] } else { a.dirs.clone() };
    let mut out = Vec::new();
    for root in &roots {
        let rd = std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))?;
        let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.join(format::STATE_FILE).exists()).collect();
        dirs.sort();
        for d in dirs {
            let (manifest, error) = match format::load(&d) {
                Ok(l) => (Some(l.manifest), None),
                Err(e) => (None, Some(e.to_string())),
            };
            out.push(Listed { disk_bytes: disk_usage(&d), dir: d, manifest, error });
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    if out.is_empty() {
        println!("no snapshots in {}", roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    for l in &out {
        match (&l.manifest, &l.error) {
            (Some(m), _) => println!(
                "{}  {:<11}  vm {}  {} vCPUs {} MiB  {:.1} MiB on disk  id {}{}",
                l.dir.display(),
                format!("{:?}", m.kind).to_lowercase(),
                m.vm_name,
                m.vcpus,
                m.mem_mib,
                l.disk_bytes as f64 / (1 << 20) as f64,
                &m.id[..m.id.len().min(8)],
                m.parent.as_ref().map(|p| format!("  parent {}", p.dir.display())).unwrap_or_default()
            ),
            (None, Some(e)) => println!("{}  BAD: {e}", l.dir.display()),
            _ => {}
        }
    }
    Ok(0)
}

fn rm(a: RmArgs) -> anyhow::Result<i32> {
    let mut removed = Vec::new();
    for d in &a.dirs {
        let dir = absolute(d)?;
        // Only what carries our state file's magic: never an arbitrary
        // directory given by mistake.
        let state = dir.join(format::STATE_FILE);
        let head = std::fs::read(&state).map(|b| b.get(..8).map(<[u8]>::to_vec).unwrap_or_default());
        if head.as_deref().ok() != Some(&format::MAGIC[..]) {
            bail!("{} is not a snapshot (no {} with the snapshot magic): not removing it", dir.display(), format::STATE_FILE);
        }
        if !a.force {
            if let Some(child) = child_of(&dir) {
                bail!(
                    "{} is the parent of {}: remove that first, merge it (dvisor snapshot merge), or pass --force",
                    dir.display(),
                    child.display()
                );
            }
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.push(dir);
    }
    if a.json {
        println!("{}", serde_json::json!({ "removed": removed }));
    } else {
        for r in &removed {
            println!("removed {}", r.display());
        }
    }
    Ok(0)
}

/// A snapshot beside `dir` whose parent is `dir`.
fn child_of(dir: &Path) -> Option<PathBuf> {
    let parent = dir.parent()?;
    for e in std::fs::read_dir(parent).ok()?.flatten() {
        let p = e.path();
        if p == dir {
            continue;
        }
        if let Ok(l) = format::load(&p) {
            if l.state.parent.as_ref().is_some_and(|r| r.dir == dir) {
                return Some(p);
            }
        }
    }
    None
}

fn merge(a: MergeArgs) -> anyhow::Result<i32> {
    let dir = absolute(&a.dir)?;
    let out = absolute(&a.out)?;
    let merged = match dvisor_vmm::snapshot::merge::merge(&dir, &out) {
        Ok(m) => m,
        Err(e) if e.is_bad_snapshot() => return Ok(refuse(&e)),
        Err(e) => return Err(e.into()),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&merged)?);
    } else {
        println!(
            "merged {} snapshot(s) into {} (id {}, {:.1} MiB of memory data)",
            merged.layers,
            merged.dir.display(),
            merged.id,
            merged.bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(0)
}

fn restore(a: RestoreArgs) -> anyhow::Result<i32> {
    let dir = absolute(&a.dir)?;
    // The files are checked here first so that a bad snapshot is refused
    // with exit status 2 before the VM is touched (the VMM checks again).
    if let Err(e) = format::chain(&dir) {
        return Ok(refuse(&e));
    }
    let mut c = a.target.connect()?;
    let started = Instant::now();
    let r: serde_json::Value = c.call(ControlRequest::Restore { dir: dir.clone(), paused: a.paused })?;
    if a.target.json {
        println!("{}", serde_json::json!({ "dir": dir, "boot": r.get("boot"), "ms": started.elapsed().as_secs_f64() * 1e3 }));
    } else {
        println!(
            "restored {} into VM {} in {:.0} ms{}",
            dir.display(),
            a.target.vm,
            started.elapsed().as_secs_f64() * 1e3,
            if a.paused { " (paused)" } else { "" }
        );
    }
    Ok(0)
}
