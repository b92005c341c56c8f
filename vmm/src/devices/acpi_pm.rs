//! The ACPI power-management registers of the hardware-reduced FADT: sleep
//! control (power off on S5), sleep status, and the reset register.
use crate::devices::PioDevice;
use crate::lifecycle::{EventSender, VmEvent};

pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_PM_LEN: u16 = 3;
pub const SLEEP_CONTROL_OFFSET: u16 = 0;
pub const SLEEP_STATUS_OFFSET: u16 = 1;
pub const RESET_OFFSET: u16 = 2;
pub const RESET_VALUE: u8 = 1;

/// SLP_TYP is bits 2..=4 and SLP_EN bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
const S5: u8 = 5;

pub struct AcpiPm {
    events: EventSender,
}

impl AcpiPm {
    pub fn new(events: EventSender) -> Self {
        AcpiPm { events }
    }
}

impl PioDevice for AcpiPm {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        tracing::debug!(offset, value = v, "ACPI PM register write");
        match offset {
            SLEEP_CONTROL_OFFSET if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5 => {
                let _ = self.events.send(VmEvent::PowerOff);
            }
            RESET_OFFSET if v == RESET_VALUE => {
                let _ = self.events.send(VmEvent::Reset { source: "ACPI reset register" });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let (tx, rx) = lifecycle::channel();
        let mut pm = AcpiPm::new(tx);
        pm.write(SLEEP_CONTROL_OFFSET, &[(S5 << 2) | SLP_EN]);
        assert_eq!(rx.try_recv().ok(), Some(VmEvent::PowerOff));
        pm.write(SLEEP_CONTROL_OFFSET, &[3 << 2 | SLP_EN]); // S3: ignored
        assert!(rx.try_recv().is_err());
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset { .. })));
    }
}
