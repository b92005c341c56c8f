//! The patch state file (`patches.json` beside the control socket): what
//! a restarted monitor needs to revert the patches applied in this boot.
//!
//! Its bytes go back into guest code on a revert, so it is trusted only
//! whole and checked: a JSON envelope with a magic, a version and the
//! SHA-256 of the state exactly as written, and the state itself, whose
//! every site is validated (hex of even length, lengths that match,
//! addresses that do not wrap) before any of it is used. It is written to
//! a temporary name and renamed, so a crash leaves the old file or the new.
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::{AppliedPatch, Saved, Site};

pub const MAGIC: &str = "dvisor-patch-state";
/// 1: plain JSON of the state, no checksum. 2: this envelope.
pub const VERSION: u32 = 2;
/// No site of ours holds more (a jump is 5 or 14 bytes, a variable a few;
/// a replaced body is one function).
const MAX_SITE_BYTES: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    magic: String,
    version: u32,
    sha256: String,
    #[serde(borrow)]
    state: &'a RawValue,
}

/// The file's bytes for `state`.
pub(super) fn encode(state: &Saved) -> Result<Vec<u8>, String> {
    let body = serde_json::to_string(state).map_err(|e| e.to_string())?;
    let raw = RawValue::from_string(body).map_err(|e| e.to_string())?;
    let env = Envelope { magic: MAGIC.into(), version: VERSION, sha256: hex::encode(Sha256::digest(raw.get())), state: &raw };
    serde_json::to_vec(&env).map_err(|e| e.to_string())
}

/// The state in `bytes`, or why it is refused.
pub(super) fn decode(bytes: &[u8]) -> Result<Saved, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 ({e})"))?;
    let env: Envelope = serde_json::from_str(text).map_err(|e| format!("not a patch state file ({e})"))?;
    if env.magic != MAGIC {
        return Err(format!("magic {:?}, expected {MAGIC:?}", env.magic));
    }
    if env.version != VERSION {
        return Err(format!("version {}, this monitor reads version {VERSION}", env.version));
    }
    let sum = hex::encode(Sha256::digest(env.state.get()));
    if sum != env.sha256 {
        return Err(format!("checksum mismatch (file says {}, contents give {sum}): the file was changed or damaged", env.sha256));
    }
    let state: Saved = serde_json::from_str(env.state.get()).map_err(|e| format!("bad state ({e})"))?;
    validate(&state)?;
    Ok(state)
}

/// Every value a revert would use is one this monitor could have written.
fn validate(s: &Saved) -> Result<(), String> {
    let mut ids = std::collections::HashSet::new();
    for p in &s.applied {
        // Ids are handed out as 1, 2, ...: `next_id` holds the last one.
        if !ids.insert(p.id) || p.id == 0 || p.id > s.next_id {
            return Err(format!("patch id {} is repeated, zero or above the last id given ({})", p.id, s.next_id));
        }
        p.space.checked_add(p.space_len).ok_or_else(|| format!("patch {}: its space wraps around", p.id))?;
        for site in &p.sites {
            let (orig, new) = (site_bytes(p, site, &site.original)?, site_bytes(p, site, &site.new)?);
            if orig.is_empty() || orig.len() != new.len() {
                return Err(format!("patch {} site {:#x}: {} original bytes against {} new", p.id, site.addr, orig.len(), new.len()));
            }
        }
        for body in &p.bodies {
            if site_bytes(p, body, &body.original)?.is_empty() {
                return Err(format!("patch {} body {:#x}: no bytes", p.id, body.addr));
            }
        }
    }
    Ok(())
}

/// A site's bytes from its hex, within bounds and not wrapping.
fn site_bytes(p: &AppliedPatch, site: &Site, hex_text: &str) -> Result<Vec<u8>, String> {
    let b = hex::decode(hex_text).map_err(|e| format!("patch {} site {:#x} ({}): bad hex ({e})", p.id, site.addr, site.target))?;
    if b.len() > MAX_SITE_BYTES || site.addr.checked_add(b.len() as u64).is_none() {
        return Err(format!("patch {} site {:#x}: {} bytes is out of range", p.id, site.addr, b.len()));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Saved {
        let site = Site { target: "get_message".into(), addr: 0x401000, original: "554889e5c3".into(), new: "e9fbefbf0f".into() };
        let body = Site { target: "get_message".into(), addr: 0x401005, original: "90909090".into(), new: String::new() };
        let p = AppliedPatch {
            id: 1,
            pid: 107,
            object: "v2.o".into(),
            space: 0x1000_0000,
            space_len: 0x1000,
            sites: vec![site],
            timing: Default::default(),
            attempts: 1,
            bodies: vec![body],
            warnings: Vec::new(),
        };
        // As the service leaves it after its first apply: id 1, next_id 1.
        Saved { format: 1, boot: 3, next_id: 1, applied: vec![p], ..Saved::default() }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let back = decode(&encode(&s).unwrap()).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), serde_json::to_string(&s).unwrap());
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let bytes = encode(&sample()).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        // A byte of guest code changed in the file: the checksum says so.
        let tampered = text.replacen("554889e5c3", "554889e5cc", 1);
        assert!(decode(tampered.as_bytes()).unwrap_err().contains("checksum mismatch"));
        for (at, with) in [(0, b'['), (bytes.len() / 2, b'\xff'), (bytes.len() - 1, b' ')] {
            let mut b = bytes.clone();
            b[at] = with;
            assert!(decode(&b).is_err(), "byte {at} changed to {with:#x} was accepted");
        }
        assert!(decode(&bytes[..bytes.len() / 2]).is_err(), "a truncated file was accepted");
    }

    /// What a hand edit that also fixed the checksum could put there.
    fn resealed(edit: impl FnOnce(&mut Saved)) -> Result<Saved, String> {
        let mut s = sample();
        edit(&mut s);
        decode(&encode(&s).unwrap())
    }

    #[test]
    fn invalid_sites_are_refused_even_with_a_good_checksum() {
        let e = resealed(|s| s.applied[0].sites[0].original = "55zz".into()).unwrap_err();
        assert!(e.contains("bad hex"), "{e}");
        let e = resealed(|s| s.applied[0].sites[0].original = "5".into()).unwrap_err();
        assert!(e.contains("bad hex"), "{e}");
        let e = resealed(|s| s.applied[0].sites[0].original = "éé".into()).unwrap_err();
        assert!(e.contains("bad hex"), "{e}");
        let e = resealed(|s| s.applied[0].sites[0].new = "e9".into()).unwrap_err();
        assert!(e.contains("original bytes against"), "{e}");
        let e = resealed(|s| s.applied[0].sites[0].addr = u64::MAX - 1).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = resealed(|s| s.next_id = 0).unwrap_err();
        assert!(e.contains("above the last id"), "{e}");
        let e = resealed(|s| s.applied[0].bodies[0].original = String::new()).unwrap_err();
        assert!(e.contains("no bytes"), "{e}");
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let text = String::from_utf8(encode(&sample()).unwrap()).unwrap();
        let e = decode(text.replacen(MAGIC, "something-else", 1).as_bytes()).unwrap_err();
        assert!(e.contains("magic"), "{e}");
        let e = decode(text.replacen("\"version\":2", "\"version\":7", 1).as_bytes()).unwrap_err();
        assert!(e.contains("version 7"), "{e}");
        // The old format (plain state JSON) is not this file.
        let e = decode(serde_json::to_string(&sample()).unwrap().as_bytes()).unwrap_err();
        assert!(e.contains("not a patch state file"), "{e}");
    }
}
