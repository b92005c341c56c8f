//! `dvisor disk`: make, inspect and commit copy-on-write overlays (see
//! docs/disks.md). Works on files only; no VM is involved.
use std::path::{Path, PathBuf};

use clap::Subcommand;
use dvisor_vmm::devices::virtio::disk::{self, DiskError, ImageFormat};
use dvisor_vmm::devices::virtio::overlay::{self, Overlay};
use serde::Serialize;

const ABOUT_OVERLAYS: &str = "\
An overlay is a file that holds only the clusters (64 KiB each) a VM wrote; \
everything else reads from its base, which must not change while the overlay \
exists (the overlay records the base's size, inode and mtime and refuses to \
open if any changed). `dvisor run --disk FILE.ovl` serves an overlay like any \
disk. A base may itself be an overlay.

Exit status: 0 on success, 2 when a file is missing, not an overlay, corrupt, \
in use, or its base changed; the message names the file and the fix, and no \
file is changed.";

#[derive(Debug, Subcommand)]
#[command(after_help = ABOUT_OVERLAYS)]
pub enum DiskCmd {
    /// Make an empty overlay over a disk image.
    ///
    /// A VM running on the overlay writes only to it; the base stays as it
    /// is, and must not be written while the overlay exists.
    #[command(after_help = ABOUT_OVERLAYS)]
    Overlay {
        /// The image to put the overlay over (raw or overlay); it must not be
        /// written while the overlay exists.
        #[arg(long, value_name = "FILE")]
        base: PathBuf,
        /// The overlay to create; must not exist.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Print the new overlay's description as JSON (as `info --json`).
        #[arg(long)]
        json: bool,
    },
    /// Fold an overlay's writes into its base and empty the overlay.
    ///
    /// The overlay stays usable, over the updated base. Refuses while a VM
    /// uses the overlay or the base. Overlays made earlier over the same
    /// base stop opening, as after any write to their base. An interrupted
    /// commit is finished by running it again.
    #[command(after_help = ABOUT_OVERLAYS)]
    Commit {
        /// The overlay whose writes go into its base.
        #[arg(value_name = "OVERLAY")]
        overlay: PathBuf,
        /// Print what was committed as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Describe a disk image (raw or overlay) and its chain of bases.
    ///
    /// Shows the format and size, and for an overlay each base down to the
    /// raw file with the bytes each level holds. Every header, checksum and
    /// base identity is checked on the way.
    #[command(after_help = ABOUT_OVERLAYS)]
    Info {
        /// A raw image or an overlay.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print JSON: {path, format, virtual_size, allocated_bytes, chain: [...]}.
        #[arg(long)]
        json: bool,
    },
}

/// One level of a chain, top first.
#[derive(Debug, Serialize)]
struct Level {
    path: PathBuf,
    format: ImageFormat,
    virtual_size: u64,
    /// The file's length (an overlay is sparse; this is not its disk use).
    file_size: u64,
    /// Overlays only.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    /// Set when opening fell back to an older header after a cut-short flush.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<String>,
}

#[derive(Debug, Serialize)]
struct Info {
    path: PathBuf,
    format: ImageFormat,
    virtual_size: u64,
    /// What the top file holds: its allocated bytes for an overlay, the
    /// whole size for a raw image.
    allocated_bytes: u64,
    chain: Vec<Level>,
}

pub fn run(cmd: DiskCmd) -> anyhow::Result<i32> {
    match cmd {
        DiskCmd::Overlay { base, out, json } => {
            Overlay::create(&base, &out).map_err(plain)?;
            let info = describe(&out)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let below = info.chain.get(1).map(|l| l.path.display().to_string()).unwrap_or_default();
                println!("created {}: an empty overlay over {below} ({})", out.display(), size(info.virtual_size));
                println!("a VM on it writes only to the overlay; do not write {below} while the overlay exists");
            }
            Ok(0)
        }
        DiskCmd::Commit { overlay: path, json } => {
            let report = overlay::commit(&path).map_err(plain)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.clusters == 0 && !report.resumed {
                println!("{} holds no writes; nothing to commit", path.display());
            } else {
                let what = if report.resumed { "finished an interrupted commit: copied" } else { "copied" };
                println!(
                    "{what} {} clusters ({}) of {} into {}; the overlay is empty again",
                    report.clusters,
                    size(report.bytes),
                    path.display(),
                    report.base.display()
                );
                println!("other overlays made over {} before this commit no longer open", report.base.display());
            }
            Ok(0)
        }
        DiskCmd::Info { file, json } => {
            let info = describe(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_info(&info);
            }
            Ok(0)
        }
    }
}

/// The library's message alone: its errors already name the file, the
/// cause and the fix, and a source chain would repeat the cause.
fn plain(e: DiskError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Opens `path` and each base below it, checking each on the way.
fn describe(path: &Path) -> anyhow::Result<Info> {
    let mut chain = Vec::new();
    let mut at = path.to_owned();
    loop {
        if chain.len() > disk::MAX_CHAIN_DEPTH {
            return Err(plain(DiskError::ChainTooDeep { path: path.to_owned(), max: disk::MAX_CHAIN_DEPTH }));
        }
        let file_size = std::fs::metadata(&at).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", at.display()))?.len();
        match disk::detect_format(&at).map_err(plain)? {
            ImageFormat::Overlay => {
                let i = overlay::info(&at).map_err(plain)?;
                chain.push(Level {
                    path: at.clone(),
                    format: ImageFormat::Overlay,
                    virtual_size: i.virtual_size,
                    file_size,
                    cluster_size: Some(i.cluster_size),
                    allocated_clusters: Some(i.allocated_clusters),
                    allocated_bytes: Some(i.allocated_bytes),
                    generation: Some(i.generation),
                    recovered: i.recovered,
                });
                at = i.base;
            }
            ImageFormat::Raw => {
                let img = disk::open_image(&at, true).map_err(plain)?;
                chain.push(Level {
                    path: at.clone(),
                    format: ImageFormat::Raw,
                    virtual_size: img.size(),
                    file_size,
                    cluster_size: None,
                    allocated_clusters: None,
                    allocated_bytes: None,
                    generation: None,
                    recovered: None,
                });
                break;
            }
        }
    }
    let top = &chain[0];
    Ok(Info {
        path: path.to_owned(),
        format: top.format,
        virtual_size: top.virtual_size,
        allocated_bytes: top.allocated_bytes.unwrap_or(top.virtual_size),
        chain,
    })
}

fn print_info(info: &Info) {
    println!("{}: {}, {} ({} bytes)", info.path.display(), info.format, size(info.virtual_size), info.virtual_size);
    if info.format == ImageFormat::Raw {
        return;
    }
    println!("chain, top first:");
    let width = info.chain.iter().map(|l| l.path.display().to_string().len()).max().unwrap_or(0);
    for l in &info.chain {
        let held = match (l.allocated_bytes, l.allocated_clusters, l.cluster_size) {
            (Some(bytes), Some(n), Some(cs)) => {
                let plural = if n == 1 { "" } else { "s" };
                format!("{} allocated ({n} cluster{plural} of {})", size(bytes), size(u64::from(cs)))
            }
            _ => format!("{} file", size(l.file_size)),
        };
        println!("  {:<width$}  {:<7}  {held}", l.path.display().to_string(), l.format.to_string());
        if let Some(note) = &l.recovered {
            println!("  {:<width$}  note: {note}", "");
        }
    }
}

/// `768 KiB`, `1.5 GiB`: binary units, one decimal above KiB.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(768 << 10), "768 KiB");
        assert_eq!(size(1536 << 20), "1.5 GiB");
        assert_eq!(size(10 << 30), "10 GiB");
    }
}
