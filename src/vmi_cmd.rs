//! Introspection commands through the VM's monitor: ps, maps, mem, kmem,
//! ksym.
use clap::Args;
use dvisor_monitor::introspect::{parse_addr, SymbolAnswer};
use dvisor_monitor::vmi::{Process, Vma};
use dvisor_monitor::ControlRequest;
use serde::Deserialize;

use crate::ops::Target;

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Pause the VM around the walk, so the list is one moment's.
    #[arg(long)]
    pub consistent: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct MapsArgs {
    pub pid: u32,
    /// Pause the VM around the walk.
    #[arg(long)]
    pub consistent: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
#[command(after_help = "ADDR is hex with 0x, or decimal. Prints a hex dump; --write HEX writes those bytes instead.")]
pub struct MemArgs {
    pub pid: u32,
    #[arg(value_parser = addr)]
    pub addr: u64,
    /// Bytes to read (up to 1 MiB).
    #[arg(default_value_t = 64)]
    pub len: u64,
    /// Write these bytes (hex) instead of reading.
    #[arg(long, value_name = "HEX")]
    pub write: Option<String>,
    /// Pause the VM around the access.
    #[arg(long)]
    pub consistent: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
#[command(after_help = "TARGET is a kernel symbol (init_task) or an address (0xffffffff81000000).")]
pub struct KmemArgs {
    pub target: String,
    #[arg(default_value_t = 64)]
    pub len: u64,
    /// Write these bytes (hex) instead of reading.
    #[arg(long, value_name = "HEX")]
    pub write: Option<String>,
    #[command(flatten)]
    pub target_vm: Target,
}

#[derive(Debug, Args)]
#[command(after_help = "A name prints its runtime address (KASLR slide applied); an address prints symbol+offset.")]
pub struct KsymArgs {
    pub query: String,
    #[command(flatten)]
    pub target: Target,
}

fn addr(s: &str) -> Result<u64, String> {
    parse_addr(s).ok_or_else(|| format!("{s:?} is not an address: write hex with 0x, or decimal"))
}

#[derive(Deserialize, serde::Serialize)]
struct Bytes {
    gpa: u64,
    hex: String,
}

pub fn ps(a: PsArgs) -> anyhow::Result<i32> {
    let procs: Vec<Process> = a.target.connect()?.call(ControlRequest::Ps { consistent: a.consistent })?;
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&procs)?);
        return Ok(0);
    }
    println!("{:>6} {:>6} {:>5} S {:>4} {:>8}  {:<16} CMD", "PID", "PPID", "UID", "THR", "RSS(KiB)", "COMM");
    for p in procs {
        let cmd = if p.kernel_thread { format!("[{}]", p.comm) } else { p.cmdline.clone() };
        println!(
            "{:>6} {:>6} {:>5} {} {:>4} {:>8}  {:<16} {}",
            p.pid, p.ppid, p.uid, p.state.0, p.threads, p.rss_kib, p.comm, cmd
        );
    }
    Ok(0)
}

pub fn maps(a: MapsArgs) -> anyhow::Result<i32> {
    let vmas: Vec<Vma> = a.target.connect()?.call(ControlRequest::Maps { pid: a.pid, consistent: a.consistent })?;
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&vmas)?);
        return Ok(0);
    }
    for v in vmas {
        println!("{:08x}-{:08x} {} {:08x} {}", v.start, v.end, v.perms, v.offset, v.name);
    }
    Ok(0)
}

fn print_bytes(b: &Bytes, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(b)?);
        return Ok(());
    }
    let data = hex::decode(&b.hex).map_err(|e| anyhow::anyhow!("the monitor sent bad hex: {e}"))?;
    for (i, row) in data.chunks(16).enumerate() {
        // A dump row: bytes separated by spaces, which `hex` does not write.
        let hex: Vec<String> = row.iter().map(|x| format!("{x:02x}")).collect();
        let text: String = row.iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' }).collect();
        println!("{:016x}  {:<47}  {}", b.gpa + 16 * i as u64, hex.join(" "), text);
    }
    Ok(())
}

pub fn mem(a: MemArgs) -> anyhow::Result<i32> {
    let req = ControlRequest::Mem { pid: a.pid, addr: a.addr, len: a.len, write: a.write.clone(), consistent: a.consistent };
    let b: Bytes = a.target.connect()?.call(req)?;
    if a.write.is_some() && !a.target.json {
        println!("wrote {} bytes at {:#x} in pid {}", b.hex.len() / 2, a.addr, a.pid);
        return Ok(0);
    }
    print_bytes(&b, a.target.json)?;
    Ok(0)
}

pub fn kmem(a: KmemArgs) -> anyhow::Result<i32> {
    let req = ControlRequest::Kmem { target: a.target.clone(), len: a.len, write: a.write.clone() };
    let b: Bytes = a.target_vm.connect()?.call(req)?;
    if a.write.is_some() && !a.target_vm.json {
        println!("wrote {} bytes at {:#x}", b.hex.len() / 2, b.gpa);
        return Ok(0);
    }
    print_bytes(&b, a.target_vm.json)?;
    Ok(0)
}

pub fn ksym(a: KsymArgs) -> anyhow::Result<i32> {
    let s: SymbolAnswer = a.target.connect()?.call(ControlRequest::Ksym { query: a.query.clone() })?;
    if a.target.json {
        println!("{}", serde_json::to_string(&s)?);
    } else if s.offset == 0 {
        println!("{:016x} {} {}", s.addr, s.kind.unwrap_or('?'), s.name);
    } else {
        println!("{:016x} {}+{:#x}", s.addr, s.name, s.offset);
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct SyscallArgs {
    pub pid: u32,
    /// System call number (x86-64), e.g. 39 for getpid, 9 for mmap.
    pub nr: u64,
    /// Up to six arguments (hex with 0x, decimal, or -1).
    #[arg(allow_negative_numbers = true)]
    pub args: Vec<String>,
    #[command(flatten)]
    pub target: Target,
}

/// Debugging aid: runs one system call inside a guest process.
pub fn syscall(a: SyscallArgs) -> anyhow::Result<i32> {
    if a.args.len() > 6 {
        anyhow::bail!("at most 6 system call arguments");
    }
    let args = a
        .args
        .iter()
        .map(|s| match s.parse::<i64>() {
            Ok(v) => Ok(v as u64),
            Err(_) => parse_addr(s).ok_or_else(|| anyhow::anyhow!("bad argument {s:?}")),
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let r: serde_json::Value = a.target.connect()?.call(ControlRequest::Syscall { pid: a.pid, nr: a.nr, args })?;
    let rax = r["rax"].as_u64().unwrap_or(0);
    if a.target.json {
        println!("{r}");
    } else {
        println!("{rax:#x} ({})", rax as i64);
    }
    Ok(0)
}

#[derive(Debug, clap::Subcommand)]
pub enum PatchCmd {
    /// Apply a live patch: an ELF object built by gcc plus a command file.
    Apply(PatchApplyArgs),
    /// List applied patches with their sites.
    List(PatchListArgs),
    /// Revert an applied patch (restores the original bytes, frees its space).
    Revert(PatchRevertArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "Compile a patch with: gcc -c -O2 -fpic -fno-asynchronous-unwind-tables -ffunction-sections -fdata-sections patch.c\n\
Build the program to patch with -flive-patching=inline-clone (or -fno-ipa-ra): apply warns when its DWARF says otherwise.\n\
Sample patches of the demo service: $(dvisor image path)/patches/{v2,fix,var,ptr,callback,handler}.{o,cmd}\n\
See docs/patching.md for the command file (J/V/P lines).")]
pub struct PatchApplyArgs {
    /// The process to patch, by pid.
    #[arg(long, conflicts_with = "comm", required_unless_present = "comm")]
    pub pid: Option<u32>,
    /// The process to patch, by command name (must be unique).
    #[arg(long)]
    pub comm: Option<String>,
    /// The patch: an x86-64 ELF relocatable object (gcc -c).
    #[arg(long, value_name = "FILE")]
    pub object: std::path::PathBuf,
    /// The command file.
    #[arg(long, value_name = "FILE")]
    pub commands: std::path::PathBuf,
    /// The target program's ELF with symbols [default: the image's host copy of the program the process runs].
    #[arg(long, value_name = "FILE")]
    pub binary: Option<std::path::PathBuf>,
    /// Skip the safe-mode check (no thread executing in, or returning into, a replaced function).
    #[arg(long = "unsafe")]
    pub unsafe_mode: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct PatchListArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct PatchRevertArgs {
    pub id: u32,
    #[command(flatten)]
    pub target: Target,
}

/// The host copy of the program `proc` runs, when the guest image built it.
fn default_binary(proc: &Process) -> anyhow::Result<std::path::PathBuf> {
    if proc.kernel_thread {
        anyhow::bail!("pid {} ({}) is a kernel thread: only user processes can be patched", proc.pid, proc.comm);
    }
    let image = dvisor_images::current_guest_image()?;
    match image.program(&proc.exe) {
        Some(p) => Ok(p.to_owned()),
        None if proc.exe.is_empty() => anyhow::bail!(
            "cannot tell which program pid {} runs: pass its ELF with symbols as --binary",
            proc.pid
        ),
        None => anyhow::bail!(
            "pid {} runs {}, which the guest image did not build: pass its ELF with symbols as --binary",
            proc.pid,
            proc.exe
        ),
    }
}

fn absolute(p: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

pub fn patch(cmd: PatchCmd) -> anyhow::Result<i32> {
    use dvisor_monitor::patcher::AppliedPatch;
    match cmd {
        PatchCmd::Apply(a) => {
            let mut c = a.target.connect()?;
            let procs: Vec<Process> = c.call(ControlRequest::Ps { consistent: false })?;
            let proc = match (a.pid, &a.comm) {
                (Some(pid), _) => procs
                    .iter()
                    .find(|p| p.pid == pid)
                    .ok_or_else(|| anyhow::anyhow!("no process {pid} in the guest (see `dvisor ps`)"))?,
                (None, Some(comm)) => {
                    let m: Vec<_> = procs.iter().filter(|p| &p.comm == comm && !p.kernel_thread).collect();
                    match m[..] {
                        [p] => p,
                        [] => anyhow::bail!("no process named {comm:?} in the guest (see `dvisor ps`)"),
                        _ => anyhow::bail!("{} processes are named {comm:?}: pick one with --pid", m.len()),
                    }
                }
                (None, None) => anyhow::bail!("give --pid or --comm"),
            };
            let pid = proc.pid;
            let binary = match &a.binary {
                Some(b) => b.clone(),
                None => default_binary(proc)?,
            };
            let req = ControlRequest::PatchApply {
                pid,
                object: absolute(&a.object),
                commands: absolute(&a.commands),
                binary: absolute(&binary),
                unsafe_mode: a.unsafe_mode,
            };
            let p: AppliedPatch = c.call(req)?;
            if a.target.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                let t = &p.timing;
                println!("patch {} applied to pid {} ({} sites, space {:#x}+{:#x})", p.id, p.pid, p.sites.len(), p.space, p.space_len);
                println!(
                    "pause {} µs: attach {} µs, check {} µs, write jump {} µs, detach {} µs; outside the pause: alloc {} µs, write patch {} µs, free {} µs",
                    t.pause_us, t.attach_us, t.check_us, t.write_jump_us, t.detach_us, t.alloc_us, t.write_patch_us, t.free_us
                );
            }
            for w in &p.warnings {
                eprintln!("warning: {w}");
            }
        }
        PatchCmd::List(a) => {
            let list: Vec<AppliedPatch> = a.target.connect()?.call(ControlRequest::PatchList)?;
            if a.target.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no patches applied");
            }
            if !a.target.json {
                for p in list {
                    println!("{}  pid {}  {}  space {:#x}+{:#x}", p.id, p.pid, p.object, p.space, p.space_len);
                    for s in p.sites {
                        println!("    {:#x} {} ({} -> {})", s.addr, s.target, s.original, s.new);
                    }
                    for b in p.bodies {
                        println!("    {:#x}+{:#x} body of {}: free for later patches' code", b.addr, b.original.len() / 2, b.target);
                    }
                }
            }
        }
        PatchCmd::Revert(a) => {
            let p: AppliedPatch = a.target.connect()?.call(ControlRequest::PatchRevert { patch: a.id })?;
            if a.target.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!("patch {} reverted ({} sites restored, space freed)", p.id, p.sites.len());
            }
        }
    }
    Ok(0)
}
