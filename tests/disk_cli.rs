//! `dvisor disk overlay|commit|info` on temporary files: what each prints,
//! that bad input exits 2 with a message naming the file, and that a
//! refused command changes no file. No VM is booted.
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dvisor_vmm::devices::virtio::disk::DiskImage;
use dvisor_vmm::devices::virtio::overlay::Overlay;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("dvisor-disk-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Every file and its bytes, to show that nothing changed.
    fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dvisor")).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = dvisor(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail with status 2 and returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = dvisor(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed on stdout");
    stderr
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

fn write(ovl: &Path, at: u64, bytes: &[u8]) {
    let mut ov = Overlay::open(ovl, false).unwrap();
    ov.write_at(bytes, at).unwrap();
    ov.flush().unwrap();
}

#[test]
fn overlay_info_commit_round_trip() {
    let dir = Dir::new("round-trip");
    let base = dir.path("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();

    let raw = json(&ok(&["disk", "info", s(&base), "--json"]));
    assert_eq!(raw["format"], "raw");
    assert_eq!(raw["virtual_size"], 1 << 20);
    assert!(ok(&["disk", "info", s(&base)]).contains("raw, 1 MiB (1048576 bytes)"));

    let first = dir.path("first.ovl");
    let out = ok(&["disk", "overlay", "--base", s(&base), "--out", s(&first)]);
    assert!(out.contains("created") && out.contains("first.ovl") && out.contains("base.raw"), "{out}");
    write(&first, 0, &[1u8; 4096]);

    let second = dir.path("second.ovl");
    let made = json(&ok(&["disk", "overlay", "--base", s(&first), "--out", s(&second), "--json"]));
    assert_eq!(made["allocated_bytes"], 0);
    write(&second, 200_000, &[2u8; 512]);

    let info = json(&ok(&["disk", "info", s(&second), "--json"]));
    assert_eq!(info["format"], "overlay");
    assert_eq!(info["virtual_size"], 1 << 20);
    assert_eq!(info["allocated_bytes"], 65536);
    let chain = info["chain"].as_array().unwrap();
    let formats: Vec<_> = chain.iter().map(|l| l["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["overlay", "overlay", "raw"]);
    assert_eq!(chain[1]["allocated_clusters"], 1);
    assert!(chain[2]["path"].as_str().unwrap().ends_with("base.raw"));

    let text = ok(&["disk", "info", s(&second)]);
    assert!(text.contains("chain, top first") && text.contains("64 KiB allocated (1 cluster of 64 KiB)"), "{text}");

    let out = ok(&["disk", "commit", s(&second)]);
    assert!(out.contains("copied 1 clusters (64 KiB)") && out.contains("first.ovl"), "{out}");
    let info = json(&ok(&["disk", "info", s(&second), "--json"]));
    assert_eq!(info["allocated_bytes"], 0);
    assert_eq!(info["chain"][1]["allocated_clusters"], 2);
    assert!(ok(&["disk", "commit", s(&second)]).contains("nothing to commit"));

    let report = json(&ok(&["disk", "commit", s(&first), "--json"]));
    assert_eq!((report["clusters"].as_u64(), report["resumed"].as_bool()), (Some(2), Some(false)));
    let bytes = std::fs::read(&base).unwrap();
    assert_eq!(&bytes[..4096], &[1u8; 4096]);
    assert_eq!(&bytes[200_000..200_512], &[2u8; 512]);
    // second.ovl was made over first.ovl as it was before that commit.
    let err = fails(&["disk", "info", s(&second)]);
    assert!(err.contains("second.ovl") && err.contains("first.ovl") && err.contains("changed"), "{err}");
}

#[test]
fn bad_input_exits_2_names_the_file_and_changes_nothing() {
    let dir = Dir::new("bad-input");
    let base = dir.path("base.raw");
    std::fs::write(&base, vec![0u8; 256 << 10]).unwrap();
    let ovl = dir.path("a.ovl");
    ok(&["disk", "overlay", "--base", s(&base), "--out", s(&ovl)]);
    write(&ovl, 0, &[3u8; 512]);
    let before = dir.files();

    let err = fails(&["disk", "info", s(&dir.path("missing.img"))]);
    assert!(err.contains("missing.img"), "{err}");
    let err = fails(&["disk", "commit", s(&base)]);
    assert!(err.contains("base.raw") && err.contains("not a dvisor overlay"), "{err}");
    let err = fails(&["disk", "overlay", "--base", s(&base), "--out", s(&ovl)]);
    assert!(err.contains("a.ovl") && err.contains("already exists"), "{err}");
    let err = fails(&["disk", "overlay", "--base", s(&dir.path("nope.raw")), "--out", s(&dir.path("b.ovl"))]);
    assert!(err.contains("nope.raw"), "{err}");

    // In use by this process: the commit must wait for it.
    let user = Overlay::open(&ovl, true).unwrap();
    let err = fails(&["disk", "commit", s(&ovl)]);
    assert!(err.contains("in use"), "{err}");
    drop(user);
    assert_eq!(dir.files(), before);

    // One damaged header slot: the other generation is used, and said so.
    let mut bytes = std::fs::read(&ovl).unwrap();
    bytes[4096 + 40] ^= 1;
    std::fs::write(&ovl, &bytes).unwrap();
    let info = json(&ok(&["disk", "info", s(&ovl), "--json"]));
    let note = info["chain"][0]["recovered"].as_str().unwrap_or_default();
    assert!(note.contains("slot 1") && note.contains("generation 1"), "{info}");
    assert!(ok(&["disk", "info", s(&ovl)]).contains("note: header slot 1"));

    // Both slots damaged: named, and left as they are.
    bytes[40] ^= 1;
    std::fs::write(&ovl, &bytes).unwrap();
    let before = dir.files();
    for args in [&["disk", "info", s(&ovl)][..], &["disk", "commit", s(&ovl)], &["disk", "overlay", "--base", s(&ovl), "--out", s(&dir.path("c.ovl"))]] {
        let err = fails(args);
        assert!(err.contains("a.ovl") && err.contains("checksum mismatch"), "{args:?}: {err}");
    }
    assert_eq!(dir.files(), before);
    bytes[40] ^= 1;
    bytes[4096 + 40] ^= 1;
    std::fs::write(&ovl, &bytes).unwrap();

    // A changed base: named with what changed.
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    f.write_all_at(&[9], 1000).unwrap();
    f.set_len(512 << 10).unwrap();
    drop(f);
    let before = dir.files();
    for args in [&["disk", "info", s(&ovl)][..], &["disk", "commit", s(&ovl)]] {
        let err = fails(args);
        assert!(err.contains("base.raw") && err.contains("size changed from 262144 to 524288 bytes"), "{args:?}: {err}");
    }
    assert_eq!(dir.files(), before);
}

#[test]
fn help_explains_overlays() {
    let help = ok(&["disk", "--help"]);
    assert!(help.contains("overlay") && help.contains("commit") && help.contains("info"), "{help}");
    let help = ok(&["disk", "overlay", "--help"]);
    assert!(help.contains("must not change") && help.contains("Exit status"), "{help}");
}
