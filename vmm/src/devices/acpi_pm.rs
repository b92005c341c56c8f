//! The ACPI power-management registers of the hardware-reduced FADT: sleep
//! control (power off on S5), sleep status, and the reset register.
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceStateError, PioDevice};
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

/// The PM registers' state, for snapshots. Empty on purpose: the registers
/// read as zero and every write acts at once (power off, reset), so nothing
/// the guest could see survives between accesses. A struct rather than
/// nothing, so that a snapshot format has a place for it if that changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {}

impl AcpiPm {
    pub fn new(events: EventSender) -> Self {
        AcpiPm { events }
    }

    /// The guest-visible state, for a snapshot (there is none yet).
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {}
    }

    /// Rebuilds the device from `state`. It cannot fail while the state is
    /// empty; the `Result` keeps callers right when the state grows.
    pub fn from_state(events: EventSender, state: &AcpiPmState) -> Result<Self, DeviceStateError> {
        let AcpiPmState {} = state;
        Ok(AcpiPm::new(events))
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

    #[test]
    fn state_round_trips_through_json() {
        let (tx, rx) = lifecycle::channel();
        let state = AcpiPm::new(tx.clone()).state();
        let json = serde_json::to_string(&state).unwrap();
        let back: AcpiPmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let mut pm = AcpiPm::from_state(tx, &back).unwrap();
        let mut b = [0xffu8];
        pm.read(SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [0]);
        pm.write(SLEEP_CONTROL_OFFSET, &[(S5 << 2) | SLP_EN]);
        assert_eq!(rx.try_recv().ok(), Some(VmEvent::PowerOff));
    }
}
