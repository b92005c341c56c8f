//! Extracting the uncompressed kernel ELF (`vmlinux`) from a bzImage.
//!
//! The x86 boot protocol's setup header gives the compressed payload's place
//! (`payload_offset`/`payload_length` at 0x248/0x24c, relative to the start
//! of the protected-mode code). Debian compresses it with LZ4 (6.1 cloud, the
//! *legacy* lz4 frame), XZ (6.1 generic) or ZSTD (6.12); the kernel build
//! appends the 4-byte little-endian uncompressed size after the stream.
//! The monitor needs the ELF for its BTF and kallsyms tables.

use std::io::Read;
use std::path::Path;

use crate::error::ImageError;

const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0];
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Where the compressed payload lives in the bzImage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLocation {
    pub offset: usize,
    pub length: usize,
}

/// Compression formats we can unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4Legacy,
    Xz,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Lz4Legacy => "lz4-legacy",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

/// Parses the setup header of a bzImage.
pub fn locate_payload(image: &[u8]) -> Result<PayloadLocation, String> {
    if image.len() < 0x250 || &image[0x202..0x206] != HDRS_MAGIC {
        return Err("no `HdrS` setup header at 0x202".into());
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x0208 {
        return Err(format!("boot protocol {version:#x} has no payload fields (need >= 2.08)"));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let pm_start = (setup_sects + 1) * 512;
    let rd = |at: usize| u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]]) as usize;
    let (offset, length) = (pm_start + rd(0x248), rd(0x24c));
    if length < 8 || offset.checked_add(length).is_none_or(|end| end > image.len()) {
        return Err(format!("payload {offset:#x}+{length:#x} lies outside the {} byte file", image.len()));
    }
    Ok(PayloadLocation { offset, length })
}

pub fn detect(payload: &[u8]) -> Option<Compression> {
    let magic = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?);
    if magic == LZ4_LEGACY_MAGIC {
        Some(Compression::Lz4Legacy)
    } else if magic == ZSTD_MAGIC {
        Some(Compression::Zstd)
    } else if payload.starts_with(XZ_MAGIC) {
        Some(Compression::Xz)
    } else {
        None
    }
}

/// Unpacks the bzImage at `path` and returns the vmlinux ELF bytes.
pub fn extract_vmlinux(path: &Path) -> Result<Vec<u8>, ImageError> {
    let image = std::fs::read(path).map_err(|e| ImageError::io(path, e))?;
    let bad = |reason: String| ImageError::BadBzImage { path: path.to_path_buf(), reason };
    let loc = locate_payload(&image).map_err(bad)?;
    let payload = &image[loc.offset..loc.offset + loc.length];
    let format = detect(payload).ok_or_else(|| bad(format!("unknown payload compression (magic {:02x?})", &payload[..4])))?;
    // The last 4 bytes are the uncompressed size, not part of the stream.
    let (stream, size) = payload.split_at(payload.len() - 4);
    let expected = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
    let perr = |reason: String| ImageError::Payload { path: path.to_path_buf(), format: format.name(), reason };
    let out = decompress(format, stream, expected).map_err(perr)?;
    if out.len() != expected {
        tracing::warn!(got = out.len(), expected, "vmlinux size differs from the size trailer");
    }
    check_elf(&out).map_err(|r| bad(format!("payload is not the kernel ELF: {r}")))?;
    Ok(out)
}

pub fn decompress(format: Compression, stream: &[u8], size_hint: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(size_hint.min(1 << 30));
    match format {
        Compression::Lz4Legacy => lz4_legacy(stream, &mut out)?,
        Compression::Xz => {
            liblzma::read::XzDecoder::new(stream).read_to_end(&mut out).map_err(|e| e.to_string())?;
        }
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::new(stream).map_err(|e| e.to_string())?.single_frame();
            dec.read_to_end(&mut out).map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// The lz4 "legacy" format (`lz4 -l`): magic, then blocks of up to 8 MiB,
/// each preceded by its compressed length (u32 LE). A repeated magic starts a
/// new concatenated archive, as the kernel's own unlz4 allows.
fn lz4_legacy(mut data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while data.len() >= 4 {
        let word = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        data = &data[4..];
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        let len = word as usize;
        if len == 0 || len > data.len() {
            return Err(format!("block length {len} exceeds the {} bytes left", data.len()));
        }
        let n = lz4_flex::block::decompress_into(&data[..len], &mut block).map_err(|e| e.to_string())?;
        out.extend_from_slice(&block[..n]);
        data = &data[len..];
    }
    Ok(())
}

/// Checks that `bytes` start with a 64-bit little-endian x86-64 ELF header.
pub fn check_elf(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("no ELF magic".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not ELF64 little-endian".into());
    }
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    if machine != 62 {
        return Err(format!("e_machine {machine}, not x86-64 (62)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_elf() -> Vec<u8> {
        let mut elf = vec![0u8; 4096];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        for (i, b) in elf.iter_mut().enumerate().skip(64) {
            *b = (i % 7) as u8;
        }
        elf
    }

    /// A bzImage-shaped buffer: setup header + `payload` placed after the
    /// setup sectors, as the boot protocol describes.
    fn crafted_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3usize;
        let pm_start = (setup_sects + 1) * 512;
        let mut img = vec![0u8; pm_start + 0x100];
        img[0x1f1] = setup_sects as u8;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0u8; 32]);
        img
    }

    #[test]
    fn header_parsing() {
        let img = crafted_bzimage(b"0123456789");
        let loc = locate_payload(&img).unwrap();
        assert_eq!(loc, PayloadLocation { offset: 4 * 512 + 0x100, length: 10 });
        assert_eq!(&img[loc.offset..loc.offset + loc.length], b"0123456789");
        assert!(locate_payload(&img[..0x240]).is_err());
        let mut bad = img.clone();
        bad[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(locate_payload(&bad).is_err());
    }

    #[test]
    fn lz4_legacy_round_trip_through_bzimage() {
        let elf = fake_elf();
        let mut payload = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in elf.chunks(1000) {
            let c = lz4_flex::block::compress(chunk);
            payload.extend_from_slice(&(c.len() as u32).to_le_bytes());
            payload.extend_from_slice(&c);
        }
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bzImage");
        std::fs::write(&path, crafted_bzimage(&payload)).unwrap();
        assert_eq!(extract_vmlinux(&path).unwrap(), elf);
    }

    #[test]
    fn zstd_and_xz_round_trip() {
        let elf = fake_elf();
        let z = zstd::encode_all(&elf[..], 3).unwrap();
        assert_eq!(detect(&z), Some(Compression::Zstd));
        assert_eq!(decompress(Compression::Zstd, &z, elf.len()).unwrap(), elf);
        let mut x = Vec::new();
        liblzma::read::XzEncoder::new(&elf[..], 6).read_to_end(&mut x).unwrap();
        assert_eq!(detect(&x), Some(Compression::Xz));
        assert_eq!(decompress(Compression::Xz, &x, elf.len()).unwrap(), elf);
    }

    #[test]
    fn elf_check() {
        assert!(check_elf(&fake_elf()).is_ok());
        assert!(check_elf(b"MZ").is_err());
    }
}
