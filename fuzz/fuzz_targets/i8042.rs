//! The guest's port I/O to the PS/2 controller: any sequence of reads and
//! writes to ports 0x60 and 0x64 keeps the device consistent.
#![no_main]
use dvisor_vmm::devices::i8042::I8042;
use dvisor_vmm::devices::irq::IrqLine;
use dvisor_vmm::devices::PioDevice;

struct NoIrq;
impl IrqLine for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (tx, _rx) = dvisor_vmm::lifecycle::channel();
    let mut dev = I8042::new(tx, Box::new(NoIrq));
    for op in data.chunks(2) {
        let offset = if op[0] & 1 == 0 { 0 } else { 4 };
        match (op[0] & 2 == 0, op.get(1)) {
            (true, Some(v)) => dev.write(offset, &[*v]),
            _ => {
                let mut b = [0u8];
                dev.read(offset, &mut b);
            }
        }
    }
});
