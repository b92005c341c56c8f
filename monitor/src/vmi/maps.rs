//! A process's memory map, as /proc/PID/maps shows it: the VMAs of its
//! mm, found in the mm's maple tree (Linux 6.1+) or VMA list (older).
use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{Vmi, VmiError};
use crate::paging::PhysRead;
use crate::profile::layouts::VmaIndex;

/// Most VMAs and maple nodes visited, and the deepest tree walked.
const MAX_VMAS: usize = 65_536;
const MAX_NODES: usize = 65_536;
const MAX_DEPTH: usize = 16;
const MAX_PATH_DEPTH: usize = 64;

const VM_READ: u64 = 0x1;
const VM_WRITE: u64 = 0x2;
const VM_EXEC: u64 = 0x4;
const VM_MAYSHARE: u64 = 0x80;

// lib/maple_tree.c: a node pointer carries its type in bits 3..6 and is
// an xarray "internal" entry (low bits 0b10) above 4096.
const MAPLE_NODE_MASK: u64 = 0xff;
const MAPLE_NODE_TYPE_SHIFT: u64 = 3;
const MAPLE_NODE_TYPE_MASK: u64 = 0xf;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// "r-xp" as in /proc/PID/maps.
    pub perms: String,
    pub offset: u64,
    /// The file's path, or [heap] / [stack] / [vdso] / [vvar], or empty.
    pub name: String,
    pub flags: u64,
}

fn is_node(e: u64) -> bool {
    e & 3 == 2 && e > 4096
}


impl<M: PhysRead> Vmi<'_, M> {
    pub fn memory_map(&self, pid: u32) -> Result<Vec<Vma>, VmiError> {
        let p = self.process_by_pid(pid)?;
        if p.mm == 0 {
            return Err(VmiError::KernelThread(pid));
        }
        self.vmas(p.mm)
    }

    pub fn vmas(&self, mm: u64) -> Result<Vec<Vma>, VmiError> {
        let l = &self.profile.layouts;
        let candidates = match &l.mm_struct.vmas {
            VmaIndex::MapleTree { mm_mt } => {
                let maple = l.maple.as_ref().ok_or_else(|| VmiError::Profile("maple tree layouts".into()))?;
                let root = self.read_u64(mm + mm_mt.offset + maple.ma_root.offset)?;
                let mut out = Vec::new();
                self.maple_entries(root, &mut out)?;
                out
            }
            VmaIndex::List { mmap, vm_next } => {
                let mut out = Vec::new();
                let mut v = self.read_u64(mm + mmap.offset)?;
                while v != 0 {
                    if out.len() >= MAX_VMAS || out.contains(&v) {
                        return Err(VmiError::Corrupt(format!("the VMA list of mm {mm:#x} loops or is too long")));
                    }
                    out.push(v);
                    v = self.read_u64(v + vm_next.offset)?;
                }
                out
            }
        };
        let v = &l.vm_area_struct;
        let m = &l.mm_struct;
        let (start_brk, brk, start_stack) =
            (self.read_field(mm, &m.start_brk)?, self.read_field(mm, &m.brk)?, self.read_field(mm, &m.start_stack)?);
        let vdso = match l.fields.get("mm_struct.context.vdso") {
            Some(f) => self.read_field(mm, f)?,
            None => 0,
        };
        let mut seen = HashSet::new();
        let mut vmas = Vec::new();
        for vma in candidates {
            // Slots past a node's end can hold stale pointers: keep only
            // VMAs that belong to this mm.
            if !seen.insert(vma) || self.read_field(vma, &v.vm_mm).ok() != Some(mm) {
                continue;
            }
            let start = self.read_field(vma, &v.vm_start)?;
            let end = self.read_field(vma, &v.vm_end)?;
            if start >= end {
                continue;
            }
            let flags = self.read_field(vma, &v.vm_flags)?;
            let file = self.read_field(vma, &v.vm_file)?;
            let pgoff = self.read_field(vma, &v.vm_pgoff)?;
            let name = if file != 0 {
                self.file_path(file)?
            } else if start <= brk && end >= start_brk {
                "[heap]".into()
            } else if start <= start_stack && start_stack <= end {
                "[stack]".into()
            } else if vdso != 0 && start == vdso {
                "[vdso]".into()
            } else if vdso != 0 && end == vdso {
                "[vvar]".into()
            } else {
                String::new()
            };
            let perms = format!(
                "{}{}{}{}",
                if flags & VM_READ != 0 { 'r' } else { '-' },
                if flags & VM_WRITE != 0 { 'w' } else { '-' },
                if flags & VM_EXEC != 0 { 'x' } else { '-' },
                if flags & VM_MAYSHARE != 0 { 's' } else { 'p' },
            );
            let offset = if file != 0 { pgoff << 12 } else { 0 };
            vmas.push(Vma { start, end, perms, offset, name, flags });
        }
        vmas.sort_by_key(|v| v.start);
        if vmas.windows(2).any(|w| w[0].end > w[1].start) {
            return Err(VmiError::Corrupt(format!("VMAs of mm {mm:#x} overlap")));
        }
        Ok(vmas)
    }

    /// Collects every leaf entry of a maple tree. Only the root pointer
    /// is an xarray "internal" entry (low bits 0b10); child pointers in a
    /// node's slots carry just their type (bits 3..6) and bit 2
    /// (MAPLE_ENODE_NULL). Any other root value is a single entry.
    fn maple_entries(&self, root: u64, out: &mut Vec<u64>) -> Result<(), VmiError> {
        if root == 0 {
            return Ok(());
        }
        if !is_node(root) {
            if root & 7 == 0 && self.is_kernel_va(root) {
                out.push(root);
            }
            return Ok(());
        }
        let mut nodes = 0;
        self.maple_node(root, 0, &mut nodes, out)
    }

    fn maple_node(&self, enode: u64, depth: usize, nodes: &mut usize, out: &mut Vec<u64>) -> Result<(), VmiError> {
        *nodes += 1;
        if depth > MAX_DEPTH || *nodes > MAX_NODES || out.len() > MAX_VMAS {
            return Err(VmiError::Corrupt(format!("maple tree deeper than {MAX_DEPTH} or larger than {MAX_NODES} nodes")));
        }
        let maple = self.profile.layouts.maple.as_ref().ok_or_else(|| VmiError::Profile("maple tree layouts".into()))?;
        let node = enode & !MAPLE_NODE_MASK;
        if !self.is_kernel_va(node) {
            return Err(VmiError::Corrupt(format!("maple node pointer {enode:#x} is not a kernel address")));
        }
        let kind = ((enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK) as i64;
        let layout = if kind == maple.type_arange_64 {
            &maple.arange_64
        } else if kind == maple.type_range_64 || kind == maple.type_leaf_64 {
            &maple.range_64
        } else {
            return Err(VmiError::Corrupt(format!("maple node {node:#x} has unknown type {kind}")));
        };
        let slots = (layout.slot.size / 8) as usize;
        let mut raw = vec![0u8; slots * 8];
        self.read_kernel(node + layout.slot.offset, &mut raw)?;
        for s in raw.chunks_exact(8) {
            let e = u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
            if e == 0 {
                continue;
            }
            if kind == maple.type_leaf_64 {
                if e & 7 == 0 && self.is_kernel_va(e) {
                    out.push(e);
                }
            } else {
                self.maple_node(e, depth + 1, nodes, out)?;
            }
        }
        Ok(())
    }

    /// The path of a `struct file`, from its dentry up to the root of its
    /// file system (the guest's root is one initramfs).
    pub fn file_path(&self, file: u64) -> Result<String, VmiError> {
        let l = &self.profile.layouts;
        let mut dentry = self.read_field(file, &l.file.path_dentry)?;
        let mut parts = Vec::new();
        for _ in 0..MAX_PATH_DEPTH {
            let parent = self.read_field(dentry, &l.dentry.d_parent)?;
            if parent == dentry || parent == 0 {
                parts.reverse();
                return Ok(format!("/{}", parts.join("/")));
            }
            let name_ptr = self.read_field(dentry, &l.dentry.name_ptr)?;
            let len = self.read_field(dentry, &l.dentry.name_len)? as usize;
            parts.push(self.read_cstr(name_ptr, len.clamp(1, 255))?);
            dentry = parent;
        }
        Err(VmiError::Corrupt(format!("path of file {file:#x} is deeper than {MAX_PATH_DEPTH} directories")))
    }
}
