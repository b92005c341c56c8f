//! Picking kernel modules out of an unpacked kernel package, with their
//! dependencies, in load order.
//!
//! The .deb ships no `modules.dep` (depmod runs at install time), so the
//! dependencies come from each module's own `.modinfo` section
//! (`depends=a,b`). Modules may be plain `.ko` or `.ko.xz`/`.ko.zst`; we
//! always ship them decompressed, because busybox `insmod` loads only plain
//! ELF objects.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};

/// A module ready to go into an initramfs.
#[derive(Debug, Clone)]
pub struct Module {
    /// Canonical name (dashes folded to underscores), e.g. `kvm_amd`.
    pub name: String,
    /// Path relative to `lib/modules/<release>/`, always ending in `.ko`.
    pub rel_path: String,
    /// Decompressed ELF object.
    pub data: Vec<u8>,
}

/// Module names are compared with `-` and `_` treated alike, as the kernel does.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Returns `wanted` plus all their dependencies, each after its dependencies.
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, ImageError> {
    let index = index(modules_dir)?;
    let mut loaded: BTreeMap<String, Module> = BTreeMap::new();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut queue: Vec<String> = wanted.iter().map(|w| canonical(w)).collect();
    while let Some(name) = queue.pop() {
        if loaded.contains_key(&name) {
            continue;
        }
        let path = index
            .get(&name)
            .ok_or_else(|| ImageError::ModuleMissing { name: name.clone(), dir: modules_dir.to_path_buf() })?;
        let data = read_module(path)?;
        let info = modinfo(&data).map_err(|reason| ImageError::BadModule { path: path.clone(), reason })?;
        let my_deps: Vec<String> = info.get("depends").map(|d| parse_depends(d)).unwrap_or_default();
        queue.extend(my_deps.iter().cloned());
        deps.insert(name.clone(), my_deps);
        let rel = path.strip_prefix(modules_dir).unwrap_or(path).to_string_lossy().into_owned();
        let rel_path = rel.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
        loaded.insert(name.clone(), Module { name, rel_path, data });
    }
    let order = load_order(&wanted.iter().map(|w| canonical(w)).collect::<Vec<_>>(), &deps);
    Ok(order.into_iter().filter_map(|n| loaded.remove(&n)).collect())
}

/// Depth-first post-order over `deps` from `roots`: every module comes after
/// the modules it depends on; roots keep their given order otherwise.
pub fn load_order(roots: &[String], deps: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    fn visit(n: &str, deps: &BTreeMap<String, Vec<String>>, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        if !seen.insert(n.to_string()) {
            return;
        }
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, seen, out);
        }
        out.push(n.to_string());
    }
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for r in roots {
        visit(r, deps, &mut seen, &mut out);
    }
    out
}

pub fn parse_depends(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(canonical).collect()
}

/// Maps canonical module name → file, over `kernel/` of the module tree.
fn index(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut map = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let fname = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let stem = ["ko", "ko.xz", "ko.zst"].iter().find_map(|ext| fname.strip_suffix(&format!(".{ext}")));
            if let Some(stem) = stem {
                map.insert(canonical(stem), path);
            }
        }
    }
    Ok(map)
}

fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let raw = std::fs::read(path).at(path)?;
    let bad = |reason: String| ImageError::BadModule { path: path.to_path_buf(), reason };
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| bad(e.to_string()))?;
    } else if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&raw[..])
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| bad(e.to_string()))?;
    } else {
        out = raw;
    }
    Ok(out)
}

/// The `key=value` strings of an ELF64 object's `.modinfo` section.
pub fn modinfo(elf: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let section = elf_section(elf, ".modinfo")?.ok_or("no .modinfo section")?;
    let mut map = BTreeMap::new();
    for item in section.split(|&b| b == 0) {
        let s = String::from_utf8_lossy(item);
        if let Some((k, v)) = s.split_once('=') {
            map.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }
    Ok(map)
}

/// Finds a section by name in an ELF64 little-endian file, bounds-checked.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize);
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return Err("not an ELF64 object".into());
    }
    let trunc = || "truncated ELF header".to_string();
    let shoff = u64_at(0x28).ok_or_else(trunc)?;
    let shentsize = u16_at(0x3a).ok_or_else(trunc)?;
    let shnum = u16_at(0x3c).ok_or_else(trunc)?;
    let shstrndx = u16_at(0x3e).ok_or_else(trunc)?;
    let section = |i: usize| -> Option<(usize, &'a [u8])> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = elf.get(base..base + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
        let off = u64_at(base + 0x18)?;
        let size = u64_at(base + 0x20)?;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) = section(shstrndx).ok_or("bad section string table")?;
    for i in 0..shnum {
        let Some((name_off, data)) = section(i) else { continue };
        let name = strtab.get(name_off..).and_then(|s| s.split(|&b| b == 0).next()).unwrap_or_default();
        if name == wanted.as_bytes() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_deps_first() {
        let mut deps = BTreeMap::new();
        deps.insert("kvm_amd".to_string(), vec!["kvm".to_string(), "ccp".to_string()]);
        deps.insert("kvm".to_string(), vec!["irqbypass".to_string()]);
        deps.insert("virtio_net".to_string(), vec!["net_failover".to_string()]);
        deps.insert("net_failover".to_string(), vec!["failover".to_string()]);
        let order = load_order(&["kvm_amd".into(), "virtio_net".into(), "kvm".into()], &deps);
        assert_eq!(order, ["irqbypass", "kvm", "ccp", "kvm_amd", "failover", "net_failover", "virtio_net"]);
    }

    #[test]
    fn depends_value() {
        assert_eq!(parse_depends("kvm,ccp"), ["kvm", "ccp"]);
        assert_eq!(parse_depends(""), Vec::<String>::new());
        assert_eq!(parse_depends("virtio-ring"), ["virtio_ring"]);
    }

    /// A minimal ELF64 with a .shstrtab and a .modinfo section.
    #[test]
    fn modinfo_from_crafted_elf() {
        let modinfo_data = b"license=GPL\0depends=kvm,ccp\0name=kvm_amd\0";
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let shstr_off = elf.len();
        elf.extend_from_slice(shstr);
        let mi_off = elf.len();
        elf.extend_from_slice(modinfo_data);
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut e = vec![0u8; 64];
            e[..4].copy_from_slice(&name.to_le_bytes());
            e[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            e[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&e);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstr.len());
        sh(11, mi_off, modinfo_data.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        let info = modinfo(&elf).unwrap();
        assert_eq!(info["depends"], "kvm,ccp");
        assert_eq!(info["name"], "kvm_amd");
        assert!(modinfo(b"garbage").is_err());
    }
}
