//! COM1: a 16550A UART (vm-superio) whose output is the guest console and
//! whose input FIFO is fed from the host terminal. Interrupts go to GSI 4
//! through an irqfd, so raising one never takes a VM exit.
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState as UartState;
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{DeviceStateError, PioDevice};

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt line by signalling its irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type ConsoleOut = Box<dyn Write + Send>;

pub struct Serial {
    uart: Uart<IrqFdTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
    /// The same irqfd as the UART's trigger, to raise a pending interrupt
    /// again after a restore (`reassert_irq`).
    irq: Option<EventFd>,
}

/// The UART's registers and receive FIFO, for snapshots. A field-for-field
/// copy of vm-superio's `SerialState`, which has no serde support. Bytes
/// the guest wrote are already on the console, so there is no output side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (IER).
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR).
    pub interrupt_identification: u8,
    /// Line control register (LCR).
    pub line_control: u8,
    /// Line status register (LSR).
    pub line_status: u8,
    /// Modem control register (MCR).
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// Host input the guest has not read yet, oldest first (at most the
    /// 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl From<UartState> for SerialState {
    fn from(s: UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Serial {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        let again = irq.try_clone().ok();
        Serial { uart: Uart::new(IrqFdTrigger(irq), out), irq: again }
    }

    /// The guest-visible state, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Rebuilds the UART from `state`. vm-superio signals `irq` at once if
    /// the state has an enabled interrupt pending (THR empty or data
    /// ready); that edge reaches KVM before the interrupt controllers are
    /// restored, which overwrite it, so the caller raises it again with
    /// `reassert_irq` once they are.
    pub fn from_state(irq: EventFd, out: ConsoleOut, state: &SerialState) -> Result<Serial, DeviceStateError> {
        const DEVICE: &str = "serial";
        let again = irq.try_clone().map_err(|source| DeviceStateError::Interrupt { device: DEVICE, source })?;
        let uart = Uart::from_state(&state.into(), IrqFdTrigger(irq), vm_superio::serial::NoEvents, out).map_err(|e| match e {
            vm_superio::serial::Error::Trigger(source) => DeviceStateError::Interrupt { device: DEVICE, source },
            other => DeviceStateError::invalid(
                DEVICE,
                format!("{other} ({} input bytes held)", state.in_buffer.len()),
            ),
        })?;
        Ok(Serial { uart, irq: Some(again) })
    }

    /// Raises the interrupt again if one is pending (IIR says so), for a
    /// restore whose first edge the restored interrupt controllers
    /// overwrote. A guest whose 8250 driver waits for THR-empty to send the
    /// rest of its output would otherwise wait forever, and every process
    /// writing to the console with it; if the edge was not lost, the
    /// driver sees one interrupt with nothing to do, which it ignores.
    pub fn reassert_irq(&mut self) {
        let pending = self.uart.state().interrupt_identification & 1 == 0;
        if let (true, Some(irq)) = (pending, &self.irq) {
            let _ = irq.write(1);
        }
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            // A console write error (closed stdout) loses output, not the VM.
            let _ = self.uart.write(offset as u8, b);
            if offset == 0 {
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    // Register offsets and bits of the 16550A.
    const DATA: u16 = 0;
    const IER: u16 = 1;
    const LCR: u16 = 3;
    const LSR: u16 = 5;
    const SCR: u16 = 7;
    const LCR_DLAB: u8 = 0x80;
    const LSR_DATA_READY: u8 = 0x01;
    const IER_RDA: u8 = 0x01;

    /// Console output that the test can look at.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn irq() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn read(s: &mut Serial, offset: u16) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    /// Everything the guest can read, consuming the FIFO.
    fn observe(s: &mut Serial) -> Vec<u8> {
        let mut regs: Vec<u8> = (1..8).map(|o| read(s, o)).collect();
        let lcr = read(s, LCR);
        s.write(LCR, &[lcr | LCR_DLAB]);
        regs.extend([read(s, 0), read(s, 1)]);
        s.write(LCR, &[lcr]);
        while read(s, LSR) & LSR_DATA_READY != 0 {
            regs.push(read(s, DATA));
        }
        regs
    }

    #[test]
    fn state_round_trips_through_json() {
        let out = Sink::default();
        let mut s = Serial::new(irq(), Box::new(out.clone()));
        // 9600 baud 7E1 by hand, a scratch value, RX interrupts on.
        s.write(LCR, &[LCR_DLAB]);
        s.write(0, &[12]);
        s.write(1, &[0]);
        s.write(LCR, &[0x1a]);
        s.write(SCR, &[0x5a]);
        s.write(IER, &[IER_RDA]);
        s.write(DATA, b"!");
        assert_eq!(s.enqueue_input(b"hello"), 5);

        let state = s.state();
        assert_eq!(state.in_buffer, b"hello");
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let fd = irq();
        let mut r = Serial::from_state(fd.try_clone().unwrap(), Box::new(Sink::default()), &back).unwrap();
        assert_eq!(fd.read().unwrap(), 1, "the pending data-ready interrupt is replayed");
        r.reassert_irq();
        assert_eq!(fd.read().unwrap(), 1, "a pending interrupt is raised again after the irqchip restore");
        assert_eq!(r.state(), state);
        assert_eq!(observe(&mut r), observe(&mut s));
        assert_eq!(*out.0.lock().unwrap(), b"!");
    }

    #[test]
    fn reassert_raises_nothing_without_a_pending_interrupt() {
        let fd = irq();
        let mut s = Serial::new(fd.try_clone().unwrap(), Box::new(Sink::default()));
        s.reassert_irq();
        assert!(fd.read().is_err(), "an idle UART raised an interrupt");
    }

    #[test]
    fn an_over_full_fifo_is_refused() {
        let mut state = Serial::new(irq(), Box::new(Sink::default())).state();
        state.in_buffer = vec![b'x'; 65];
        let err = Serial::from_state(irq(), Box::new(Sink::default()), &state).err().unwrap();
        assert!(matches!(err, DeviceStateError::Invalid { device: "serial", .. }), "{err}");
        state.in_buffer.truncate(64);
        assert!(Serial::from_state(irq(), Box::new(Sink::default()), &state).is_ok());
    }
}
