//! The offline kernel profile: the guest kernel's symbols (from its own
//! kallsyms tables) and the struct layouts the monitor needs (from its
//! BTF), read from the vmlinux file and cached beside it
//! (docs/vmi-profile.md). Addresses are those of the unslid image; add
//! the KASLR slide for a live guest.
pub mod btf;
pub(crate) mod bytes;
mod cache;
pub mod elf;
pub mod error;
pub mod kallsyms;
mod kallsyms_locate;
pub mod layouts;
mod release;
mod symbols;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use btf::{Btf, Field};
pub use cache::{cache_file_beside, fallback_cache_file};
pub use error::ProfileError;
pub use kallsyms::{KallsymsTables, KernelSymbol};
pub use kallsyms_locate::AddressEncoding;
pub use layouts::Layouts;

/// Bumped whenever the profile's content or encoding changes; a cache of
/// another version is rebuilt.
pub const FORMAT_VERSION: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelProfile {
    pub format_version: u32,
    /// `6.1.0-56-cloud-amd64`: from the `Linux version` banner in the
    /// image, else the image's manifest.json, else "unknown".
    pub kernel_release: String,
    pub banner: Option<String>,
    /// The GNU build-id note, hex.
    pub build_id: Option<String>,
    pub vmlinux_sha256: String,
    pub vmlinux_size: u64,
    pub kallsyms: KallsymsTables,
    /// Sorted by address (kallsyms order); per-cpu symbols (type `A`,
    /// offsets into the per-cpu area) come first.
    #[serde(with = "symbols")]
    pub symbols: Vec<KernelSymbol>,
    pub layouts: Layouts,
    #[serde(skip)]
    name_index: OnceLock<Vec<u32>>,
}

impl PartialEq for KernelProfile {
    fn eq(&self, o: &Self) -> bool {
        self.format_version == o.format_version
            && self.kernel_release == o.kernel_release
            && self.banner == o.banner
            && self.build_id == o.build_id
            && self.vmlinux_sha256 == o.vmlinux_sha256
            && self.vmlinux_size == o.vmlinux_size
            && self.kallsyms == o.kallsyms
            && self.symbols == o.symbols
            && self.layouts == o.layouts
    }
}

impl KernelProfile {
    /// Builds the profile from a vmlinux file (no cache).
    pub fn from_vmlinux(path: &Path) -> Result<Self, ProfileError> {
        let data = std::fs::read(path).map_err(|e| ProfileError::Read { path: error::Source(path.into()), source: e })?;
        let mut p = Self::from_bytes(&data).map_err(|e| e.at(path))?;
        if p.kernel_release == "unknown" {
            if let Some(r) = release::from_manifest(path) {
                p.kernel_release = r;
            }
        }
        Ok(p)
    }

    /// Builds the profile from vmlinux bytes.
    pub fn from_bytes(data: &[u8]) -> Result<Self, ProfileError> {
        // Hashing 50 MB takes as long as the rest: do it beside the parsing.
        std::thread::scope(|scope| {
            let sha = scope.spawn(|| bytes::hex(&Sha256::digest(data)));
            let mut profile = Self::parse(data, String::new())?;
            profile.vmlinux_sha256 = sha.join().unwrap_or_else(|_| bytes::hex(&Sha256::digest(data)));
            Ok(profile)
        })
    }

    /// Builds the profile from vmlinux bytes whose SHA-256 is known.
    fn parse(data: &[u8], sha256: String) -> Result<Self, ProfileError> {
        let elf = elf::ElfImage::parse(data)?;
        let (mut symbols, tables) = kallsyms::extract_from_elf(&elf)?;
        symbols.sort_by_key(|s| s.addr);
        let btf_section = elf.section(".BTF").ok_or_else(|| ProfileError::no_btf("the ELF has no .BTF section"))?;
        let btf_data = elf.section_data(btf_section).ok_or_else(|| ProfileError::no_btf(".BTF lies past the end of the file"))?;
        let layouts = Layouts::from_btf(&Btf::parse(btf_data)?)?;
        let rodata = elf.section(".rodata").and_then(|s| elf.section_data(s)).unwrap_or(data);
        let banner = release::from_banner(rodata).or_else(|| release::from_banner(data));
        let profile = KernelProfile {
            format_version: FORMAT_VERSION,
            kernel_release: banner.as_ref().map_or_else(|| "unknown".to_string(), |b| b.0.clone()),
            banner: banner.map(|b| b.1),
            build_id: elf.build_id(),
            vmlinux_sha256: sha256,
            vmlinux_size: data.len() as u64,
            kallsyms: tables,
            symbols,
            layouts,
            name_index: OnceLock::new(),
        };
        profile.check()?;
        Ok(profile)
    }

    /// Cross-checks that would catch tables found in the wrong place.
    fn check(&self) -> Result<(), ProfileError> {
        for name in ["_text", "_end"] {
            match self.addr_of(name) {
                Some(a) if a >= kallsyms_locate::KERNEL_HALF => {}
                other => {
                    return Err(ProfileError::no_kallsyms(format!(
                        "the decoded symbols give {name} = {other:x?}, not a kernel address"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Loads the cached profile of `vmlinux`, or builds and caches it
    /// (see [`cache`] for where and how it is validated); `cache_root`
    /// holds the profiles of kernels whose own directory is read-only.
    pub fn load_or_build(vmlinux: &Path, cache_root: &Path) -> Result<Self, ProfileError> {
        cache::load_or_build(vmlinux, cache_root)
    }

    fn names(&self) -> &[u32] {
        self.name_index.get_or_init(|| symbols::name_index(&self.symbols))
    }

    /// The first symbol called `name` (kallsyms has duplicate local names;
    /// see [`KernelProfile::symbols_named`] for all).
    pub fn symbol(&self, name: &str) -> Option<&KernelSymbol> {
        let first = symbols::named(&self.symbols, self.names(), name).first()?;
        self.symbols.get(*first as usize)
    }

    /// The unslid address of the first symbol called `name`.
    pub fn addr_of(&self, name: &str) -> Option<u64> {
        self.symbol(name).map(|s| s.addr)
    }

    /// All symbols called `name`, in table order.
    pub fn symbols_named(&self, name: &str) -> impl Iterator<Item = &KernelSymbol> + '_ {
        symbols::named(&self.symbols, self.names(), name).iter().filter_map(|&i| self.symbols.get(i as usize))
    }

    /// `(name, offset)` of the symbol at or before the unslid `addr`, for
    /// addresses from `_text` up to `_end` (or the last symbol); `None`
    /// outside that range.
    pub fn symbolize(&self, addr: u64) -> Option<(&str, u64)> {
        let range = symbols::text_range(&self.symbols, |n| self.addr_of(n))?;
        symbols::symbolize(&self.symbols, range, addr)
    }
}
