//! virtio-blk: what the guest writes reaches the host file after a flush;
//! a read-only disk serves the host's data and refuses guest writes.
mod common;

use common::Console;

const SECTOR: usize = 512;

#[test]
fn guest_writes_reach_the_file_and_readonly_disks_refuse_writes() {
    common::carrier_reruns("guest_writes_reach_the_file_and_readonly_disks_refuse_writes", disk_session);
}

fn disk_session() {
    common::ensure_image();
    let dir = std::env::temp_dir().join(format!("dvisor-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rw = dir.join("rw.raw");
    let ro = dir.join("ro.raw");
    std::fs::write(&rw, vec![0u8; 2048 * SECTOR]).unwrap();
    let mut ro_data = b"HOSTDATA-7f3a9c1e".to_vec();
    ro_data.resize(256 * SECTOR, 0x5a);
    std::fs::write(&ro, &ro_data).unwrap();

    let rw_arg = rw.display().to_string();
    let ro_arg = format!("{},readonly", ro.display());
    let mut c = Console::start(&["--vcpus", "1", "--disk", &rw_arg, "--disk", &ro_arg]);
    let shell = c.wait_for(0, "the guest shell", |l| l.contains("dvisor-guest: shell"));
    c.wait_prompt(shell, "guest# ");

    // Markers are computed by the guest shell so that the echoed command
    // line itself never matches.
    let mark = c.line_count();
    c.type_line("echo dvisor-disk-ok > /tmp/m && dd if=/tmp/m of=/dev/vda conv=fsync 2>/dev/null; echo RW-RC-$((100+$?))");
    let rw_line = c.wait_for(mark, "the write to /dev/vda", |l| l.contains("RW-RC-1"));
    assert!(c.lines()[rw_line].contains("RW-RC-100"), "dd to /dev/vda failed: {}", c.lines()[rw_line]);

    c.wait_prompt(rw_line + 1, "guest# ");
    let mark = c.line_count();
    c.type_line("dd if=/tmp/m of=/dev/vdb conv=fsync 2>/dev/null; echo RO-RC-$((100+$?))");
    let ro_line = c.wait_for(mark, "the write to /dev/vdb", |l| l.contains("RO-RC-1"));
    assert!(!c.lines()[ro_line].contains("RO-RC-100"), "a read-only disk took a write: {}", c.lines()[ro_line]);

    c.wait_prompt(ro_line + 1, "guest# ");
    let mark = c.line_count();
    c.type_line("dd if=/dev/vdb bs=17 count=1 2>/dev/null | tr A-Z a-z; echo");
    let read = c.wait_for(mark, "host data read from /dev/vdb", |l| l.contains("hostdata-7f3a9c1e"));

    // Typed ahead of the prompt, input can be eaten while the shell sets up
    // its line editor: wait for it.
    c.wait_prompt(read + 1, "guest# ");
    c.type_line("poweroff -f");
    let st = c.wait_exit();
    assert!(st.success(), "stderr:\n{}", c.stderr());

    let written = std::fs::read(&rw).unwrap();
    assert_eq!(&written[..15], b"dvisor-disk-ok\n");
    assert_eq!(std::fs::read(&ro).unwrap(), ro_data, "read-only disk changed");
    std::fs::remove_dir_all(&dir).unwrap();
}
