//! The i8042 keyboard controller, as much as the guest's reboot path needs:
//! command 0xFE on port 0x64 pulses the CPU reset line.
//!
//! The keyboard itself (scancodes on IRQ 1, injection) comes with the
//! support API; the FADT does not announce an 8042 yet, so the guest's
//! driver does not probe for it.
use crate::devices::irq::IrqLine;
use crate::devices::PioDevice;
use crate::lifecycle::{EventSender, VmEvent};

pub const I8042_PORT: u16 = 0x60;
/// The keyboard's ISA interrupt (IOAPIC pin 1, edge).
pub const KEYBOARD_GSI: u32 = 1;
/// Ports 0x60 (data) to 0x64 (status/command).
pub const I8042_LEN: u16 = 5;
const DATA: u16 = 0;
const COMMAND: u16 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    events: EventSender,
    #[allow(dead_code)]
    irq: Box<dyn IrqLine>,
}

impl I8042 {
    pub fn new(events: EventSender, irq: Box<dyn IrqLine>) -> Self {
        I8042 { events, irq }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Output buffer empty, input buffer empty: nothing to read, ready for
        // commands. Port 0x61 is not ours (the in-kernel PIT owns it).
        data.fill(match offset {
            DATA | COMMAND => 0,
            _ => 0xff,
        });
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        tracing::trace!(offset, ?data, "i8042 write");
        if offset == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            let _ = self.events.send(VmEvent::Reset { source: "i8042 reset line" });
        }
    }
}
