//! The event stream: devices, vCPUs and the VM loop publish through an
//! `EventHub` (dvisor-api: each subscriber has a bounded queue and loses
//! events rather than slow the guest down); the console is published line
//! by line by the tee here.
use std::io::Write;

pub use dvisor_api::events::{EventHub, Subscription};
use dvisor_api::monotonic_ns;
use dvisor_api::protocol::Event;

/// Console lines longer than this are split (a guest printing without
/// newlines must not grow our memory).
const MAX_LINE: usize = 4096;

/// Passes console output through and publishes it line by line.
pub struct ConsoleTee<W> {
    inner: W,
    hub: EventHub,
    line: Vec<u8>,
}

impl<W: Write> ConsoleTee<W> {
    pub fn new(inner: W, hub: EventHub) -> Self {
        ConsoleTee { inner, hub, line: Vec::new() }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line).replace('\r', "");
        self.line.clear();
        self.hub.publish(Event::Console { t_ns: monotonic_ns(), line: text });
    }
}

impl<W: Write> Write for ConsoleTee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.emit();
            } else {
                self.line.push(b);
                if self.line.len() >= MAX_LINE {
                    self.emit();
                }
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvisor_api::protocol::EventKind;

    #[test]
    fn the_console_is_published_line_by_line() {
        let hub = EventHub::default();
        let console = hub.subscribe(&[EventKind::Console]);
        let mut tee = ConsoleTee::new(Vec::new(), hub.clone());
        tee.write_all(b"heartbeat 1 v1\r\nhalf").unwrap();
        tee.write_all(b" line\n").unwrap();
        let lines: Vec<_> = console.rx.try_iter().collect();
        assert_eq!(lines.len(), 2);
        assert!(matches!(&*lines[1], Event::Console { line, .. } if line == "half line"));
    }
}
