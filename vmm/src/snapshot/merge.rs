//! Folding an incremental chain into one full snapshot: every page from
//! the newest layer that holds it, the newest layer's CPU and device
//! state, no parent.
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, Manifest, SnapshotKind, Staging};
use super::memory::PAGE_SIZE;
use super::SnapshotError;

#[derive(Debug, serde::Serialize)]
pub struct Merged {
    pub dir: PathBuf,
    pub id: String,
    pub layers: usize,
    pub bytes: u64,
}

pub fn merge(dir: &Path, out: &Path) -> Result<Merged, SnapshotError> {
    let chain = format::chain(dir)?;
    let layers = super::restore::layers(&chain)?;
    let Some(last) = chain.last() else {
        return Err(SnapshotError::Invalid("empty chain".into()));
    };
    let staging = Staging::new(out)?;
    let len = last.state.memory_file_len();
    let file = staging.memory_file(len)?;
    let mut bytes = 0u64;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    // Which layer supplies each page: the newest that holds it. Only the
    // data extents of each file are read; holes stay holes.
    let extents: Vec<Vec<(u64, u64)>> =
        layers.iter().map(|l| super::memory::data_extents(&l.file, len)).collect::<Result<_, _>>()?;
    for (i, (layer, ext)) in layers.iter().zip(&extents).enumerate() {
        for &(off, n) in ext {
            let first = off / PAGE_SIZE;
            let last_page = (off + n).div_ceil(PAGE_SIZE);
            for p in first..last_page {
                if layer.pages.as_ref().is_some_and(|s| !s.contains(p)) {
                    continue;
                }
                // A newer layer that holds this page wins.
                if layers[i + 1..].iter().any(|l| l.pages.as_ref().is_none_or(|s| s.contains(p))) {
                    continue;
                }
                let at = p * PAGE_SIZE;
                if at + PAGE_SIZE > len {
                    break;
                }
                layer.file.read_exact_at(&mut page, at).map_err(|e| SnapshotError::Io("reading a layer".into(), e))?;
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                file.write_all_at(&page, at).map_err(|e| SnapshotError::Io("writing the merged memory".into(), e))?;
                bytes += PAGE_SIZE;
            }
        }
    }
    let mut state = last.state.clone();
    state.id = format::new_id();
    state.parent = None;
    state.memory.pages = None;
    let manifest = Manifest {
        id: state.id.clone(),
        parent: None,
        kind: SnapshotKind::Full,
        memory_pages: super::memory::all_pages(&state.memory.ranges).count(),
        memory_bytes: bytes,
        dvisor_version: format::writer_version().into(),
        format: format::FORMAT_VERSION,
        ..last.manifest.clone()
    };
    let id = state.id.clone();
    let dir = staging.commit(state, &manifest)?;
    Ok(Merged { dir, id, layers: chain.len(), bytes })
}
