//! COM1: a 16550A UART (vm-superio) whose output is the guest console and
//! whose input FIFO is fed from the host terminal. Interrupts go to GSI 4
//! through an irqfd, so raising one never takes a VM exit.
use std::io::Write;
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::PioDevice;

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
}

impl Serial {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Serial { uart: Uart::new(IrqFdTrigger(irq), out) }
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
