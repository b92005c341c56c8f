//! ShadowReboot (docs/shadowreboot.md): the guest's kernel and software are
//! updated, or merely rejuvenated, by booting a *shadow* VM of the same
//! shape beside the running one, waiting until its service is ready, and
//! then loading the shadow's state into the original's VMM in place. The
//! original runs on through the shadow's boot; its downtime is the switch.
//!
//! Steps and where each can fail, all before the original is touched:
//! 1. the shadow starts (a `dvisor run` the CLI's launcher builds: this
//!    crate knows the VMM only through the support API), with the update's
//!    kernel, initrd and command line (or the original's: rejuvenation),
//!    the original's vCPUs, memory size and MAC addresses, no host link,
//!    and blank sparse stand-ins of the original's disks, which its guest
//!    never mounts (the disk consistency model, docs/shadowreboot.md);
//! 2. its console is watched until a line matches the ready pattern, or it
//!    exits, or the timeout passes;
//! 3. it is paused and snapshotted, then stopped;
//! 4. the original's VMM adopts that snapshot (`restore` with `adopt`): it
//!    keeps its disk files, taps, socket and this monitor. The VMM builds
//!    the new boot while the old one is only paused, and resumes the old
//!    one if that fails, so there is no half-switched guest.
//!
//! Why a fresh boot and not a clone that reboots, as in the papers: a
//! reboot discards everything a clone copied except its configuration and
//! disks, which the shadow gets directly; cloning would only add a pause
//! of the original (the clone point) and a copy of its memory.
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dvisor_api::client::VmmClient;
use dvisor_api::protocol::{CreateReport, Request, Status};
use serde::{Deserialize, Serialize};

use crate::core::Core;
use crate::error::MonitorError;

/// What the default guest image prints once its service runs.
pub const DEFAULT_READY: &str = "^heartbeat ";
/// Kernel command-line word that tells a guest it boots as a shadow (its
/// init may then leave the disks alone until the switch).
pub const SHADOW_CMDLINE_WORD: &str = "dvisor.shadow=1";
/// The shadow's nice value: about a tenth of a CPU's share against the
/// running guest's threads when both want it. An equal share starved the
/// running guest on the carrier's two CPUs (RCU stalls); SCHED_IDLE
/// starved the shadow under a client's steady load (no boot in 6 min).
const SHADOW_NICE: libc::c_int = 10;
/// Console lines kept for an error report.
const TAIL_LINES: usize = 25;

/// The VM a launcher must start.
#[derive(Debug, Clone)]
pub struct ShadowSpec {
    pub name: String,
    /// Its support API socket.
    pub api: PathBuf,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// (file, read-only) per disk, in the original's order.
    pub disks: Vec<(PathBuf, bool)>,
    /// Each interface's MAC; no host link.
    pub macs: Vec<[u8; 6]>,
}

/// Builds the command that starts a shadow VMM (stdout is its console).
pub type Launcher = Box<dyn Fn(&ShadowSpec) -> Command + Send + Sync>;

/// `dvisor update`'s request. With no kernel, initrd or command line it is
/// a rejuvenation: a fresh boot of the same software.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UpdateRequest {
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// A regular expression a console line of the shadow must match.
    #[serde(default)]
    pub ready: Option<String>,
    pub timeout_ms: u64,
}

/// Every phase with its duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// "rejuvenation" or "update".
    pub kind: String,
    pub old_kernel: String,
    pub new_kernel: String,
    pub cmdline: String,
    /// Launch to the shadow's support API answering.
    pub shadow_start_ms: f64,
    /// The shadow's API answering to its ready line.
    pub boot_to_ready_ms: f64,
    pub ready_line: String,
    /// Pausing and snapshotting the shadow, and stopping it.
    pub snapshot_ms: f64,
    /// The original's pause: its downtime as the VMM sees it.
    pub switch_ms: f64,
    /// The switch request as this monitor saw it (the pause plus the
    /// request's round trip and the VMM's checks, made while the old guest
    /// still ran).
    pub switch_call_ms: f64,
    pub total_ms: f64,
    /// The boot number the updated guest runs as.
    pub boot: u64,
    /// Process patches of the old guest, gone with it.
    pub patches_dropped: usize,
}

/// One update at a time per VM.
pub struct UpdateService {
    launcher: Option<Launcher>,
    /// Where each update's scratch directory goes.
    work_root: PathBuf,
    busy: Mutex<()>,
}

fn failed(msg: impl Into<String>) -> MonitorError {
    MonitorError::Api(dvisor_api::protocol::ApiError::new(dvisor_api::protocol::ErrorCode::Failed, msg.into()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl UpdateService {
    pub fn new(launcher: Option<Launcher>, work_root: PathBuf) -> Self {
        UpdateService { launcher, work_root, busy: Mutex::new(()) }
    }

    /// Runs a whole update; on any error before the switch the original
    /// was never paused.
    pub fn update(&self, core: &Core, vm_name: &str, req: &UpdateRequest, patches: usize) -> Result<UpdateReport, MonitorError> {
        let launcher = self.launcher.as_ref().ok_or_else(|| {
            failed("this monitor cannot start VMs (it was started without a launcher): run it with `dvisor monitor`")
        })?;
        let _one = self.busy.try_lock().map_err(|_| failed("an update of this VM is already running"))?;
        let ready = regex::Regex::new(req.ready.as_deref().unwrap_or(DEFAULT_READY))
            .map_err(|e| MonitorError::Api(dvisor_api::protocol::ApiError::new(
                dvisor_api::protocol::ErrorCode::BadRequest,
                format!("--ready: not a regular expression: {e}"),
            )))?;
        for (what, p) in [("--kernel", req.kernel.as_ref()), ("--initrd", req.initrd.as_ref())] {
            if let Some(p) = p {
                std::fs::metadata(p).map_err(|e| failed(format!("{what} {}: {e}", p.display())))?;
            }
        }
        let total = Instant::now();
        let status: Status = core.vmm().call(Request::Status)?;
        let shape = status.shape.clone().ok_or_else(|| failed("the VMM does not report its configuration (an older dvisor?)"))?;
        let rejuvenation = req.kernel.is_none() && req.initrd.is_none() && req.cmdline.is_none();
        let kernel = req.kernel.clone().unwrap_or_else(|| PathBuf::from(&status.kernel));
        let initrd = match (&req.kernel, &req.initrd) {
            (_, Some(i)) => Some(i.clone()),
            // A new kernel without an initrd of its own keeps the old one
            // only if it was given none: the modules would not match.
            (Some(_), None) => None,
            (None, None) => shape.initrd.clone(),
        };
        let cmdline = req.cmdline.clone().unwrap_or_else(|| shape.cmdline.clone());

        let work = Scratch::create(&self.work_root)?;
        let mut disks = Vec::new();
        for (i, d) in shape.disks.iter().enumerate() {
            // A blank stand-in of the guest-visible size: the shadow's
            // kernel sees a disk of the right size and never this VM's
            // data (docs/shadowreboot.md).
            let p = work.path.join(format!("vd{}.standin", (b'a' + i as u8) as char));
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(d.size))
                .map_err(|e| MonitorError::Io(format!("creating {}", p.display()), e))?;
            disks.push((p, d.read_only));
        }
        let macs = shape
            .nets
            .iter()
            .map(|m| {
                let b = hex::decode(m).ok().and_then(|b| <[u8; 6]>::try_from(b).ok());
                b.ok_or_else(|| failed(format!("the VMM reported a bad MAC address {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = ShadowSpec {
            name: format!("{vm_name}-shadow"),
            api: work.path.join("api.sock"),
            vcpus: status.vcpus,
            mem_mib: shape.mem_mib,
            kernel: kernel.clone(),
            initrd,
            cmdline: format!("{cmdline} {SHADOW_CMDLINE_WORD}"),
            disks,
            macs,
        };

        // 1. The shadow.
        let console_path = work.path.join("console.log");
        let console = std::fs::File::create(&console_path).map_err(|e| MonitorError::Io(format!("creating {}", console_path.display()), e))?;
        let log = std::fs::File::create(work.path.join("vmm.log")).map_err(|e| MonitorError::Io("creating the shadow's log".into(), e))?;
        let mut cmd = launcher(&spec);
        cmd.stdin(Stdio::null()).stdout(console).stderr(log);
        // The shadow must not outlive this thread (a monitor killed during
        // an update leaves no VM behind), and must leave the running
        // service the CPU time it wants while it boots: it runs niced
        // (inherited by all its threads).
        // SAFETY: prctl and setpriority are async-signal-safe; nothing else
        // runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::setpriority(libc::PRIO_PROCESS, 0, SHADOW_NICE);
                Ok(())
            });
        }
        tracing::info!(kernel = %kernel.display(), "update: starting the shadow VM");
        let started = Instant::now();
        let child = cmd.spawn().map_err(|e| MonitorError::Io("starting the shadow VM".into(), e))?;
        let mut shadow = Shadow { child, console: console_path, deadline: started + Duration::from_millis(req.timeout_ms) };

        let client = shadow.connect(&spec.api)?;
        let shadow_start = started.elapsed();
        // 2. Ready.
        let t = Instant::now();
        let ready_line = shadow.wait_ready(&ready)?;
        let boot_to_ready = t.elapsed();
        // 3. The shadow's state at its ready point.
        let t = Instant::now();
        let snap = work.path.join("snapshot");
        let _: serde_json::Value = client.call(Request::Pause).map_err(|e| shadow.fail(format!("pausing the shadow: {e}")))?;
        let _: CreateReport = client
            .call(Request::Snapshot { out: snap.clone(), parent: None, clone: None })
            .map_err(|e| shadow.fail(format!("snapshotting the shadow: {e}")))?;
        drop(client);
        shadow.stop();
        let snapshot = t.elapsed();

        // 4. The switch.
        tracing::info!("update: switching");
        let t = Instant::now();
        let reply: serde_json::Value = core
            .vmm()
            .call(Request::Restore { dir: snap, paused: false, adopt: true })
            .map_err(|e| failed(format!("the switch failed; the guest runs on as before: {e}")))?;
        let switch_call = t.elapsed();
        let switch_ns = reply.get("switch_ns").and_then(|v| v.as_u64()).unwrap_or(0);
        let boot = reply.get("boot").and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(UpdateReport {
            kind: if rejuvenation { "rejuvenation" } else { "update" }.into(),
            old_kernel: status.kernel,
            new_kernel: kernel.display().to_string(),
            cmdline,
            shadow_start_ms: ms(shadow_start),
            boot_to_ready_ms: ms(boot_to_ready),
            ready_line,
            snapshot_ms: ms(snapshot),
            switch_ms: switch_ns as f64 / 1e6,
            switch_call_ms: ms(switch_call),
            total_ms: ms(total.elapsed()),
            boot,
            patches_dropped: patches,
        })
    }
}

/// An update's scratch directory, removed when the update ends (the
/// restored VM keeps the memory file open while it loads it lazily).
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create(root: &Path) -> Result<Scratch, MonitorError> {
        // Left by a monitor killed during an update (one update at a time).
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("update-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let path = root.join(format!("update-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| MonitorError::Io(format!("creating {}", path.display()), e))?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The running shadow VMM; stopped when dropped.
struct Shadow {
    child: Child,
    console: PathBuf,
    deadline: Instant,
}

impl Shadow {
    /// The last lines of its console, then of its VMM's own messages, for
    /// an error report.
    fn tail(&self) -> String {
        let last = |p: &Path| {
            let text = std::fs::read(p).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
        };
        let console = last(&self.console);
        let vmm = last(&self.console.with_file_name("vmm.log"));
        let mut out = format!("The shadow's console ended with:\n{}", if console.is_empty() { "(nothing)" } else { &console });
        if !vmm.is_empty() {
            out.push_str(&format!("\nIts VMM said:\n{vmm}"));
        }
        out
    }

    /// An error naming `why`, with the shadow's console tail; stops it.
    fn fail(&mut self, why: String) -> MonitorError {
        self.stop();
        failed(format!("{why}; the original VM was not touched. {}", self.tail()))
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(format!("the shadow VM exited ({s}) before it was ready")),
            _ => None,
        }
    }

    fn connect(&mut self, api: &Path) -> Result<VmmClient, MonitorError> {
        loop {
            if let Some(why) = self.exited() {
                return Err(self.fail(why));
            }
            if Instant::now() > self.deadline {
                return Err(self.fail("the shadow VMM did not serve its support API in time".into()));
            }
            if api.exists() {
                if let Ok(c) = VmmClient::connect(api, "dvisor-update") {
                    return Ok(c);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Follows the console until a complete line matches `ready`.
    fn wait_ready(&mut self, ready: &regex::Regex) -> Result<String, MonitorError> {
        let mut file = std::fs::File::open(&self.console).map_err(|e| MonitorError::Io(format!("opening {}", self.console.display()), e))?;
        let mut pos = 0u64;
        let mut partial = Vec::new();
        loop {
            let mut buf = Vec::new();
            let _ = file.seek(SeekFrom::Start(pos)).and_then(|_| file.read_to_end(&mut buf));
            pos += buf.len() as u64;
            partial.extend_from_slice(&buf);
            while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
                if ready.is_match(&line) {
                    return Ok(line);
                }
            }
            if let Some(why) = self.exited() {
                return Err(self.fail(why));
            }
            if Instant::now() > self.deadline {
                return Err(self.fail(format!("no console line of the shadow matched {:?} before the timeout", ready.as_str())));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = self.child.id() as i32;
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        self.stop();
    }
}
