//! The event stream: devices, vCPUs and the VM loop publish; each API
//! subscriber has a bounded queue. A subscriber that falls behind loses
//! events (and is told how many), never slows the guest down.
use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use super::protocol::{Event, EventKind, Lifecycle};
use crate::devices::virtio::stats::monotonic_ns;

/// Events queued per subscriber before it starts losing them.
const QUEUE: usize = 4096;
/// Console lines longer than this are split (a guest printing without
/// newlines must not grow our memory).
const MAX_LINE: usize = 4096;

struct Subscriber {
    kinds: HashSet<EventKind>,
    tx: SyncSender<Arc<Event>>,
    lost: Arc<AtomicU64>,
}

#[derive(Clone, Default)]
pub struct EventHub {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

/// The receiving end of one subscription.
pub struct Subscription {
    pub rx: Receiver<Arc<Event>>,
    pub lost: Arc<AtomicU64>,
}

impl EventHub {
    pub fn subscribe(&self, kinds: &[EventKind]) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let sub = Subscriber { kinds: kinds.iter().copied().collect(), tx, lost: lost.clone() };
        if let Ok(mut s) = self.subscribers.lock() {
            s.push(sub);
        }
        Subscription { rx, lost }
    }

    pub fn has_subscribers(&self, kind: EventKind) -> bool {
        self.subscribers.lock().map(|s| s.iter().any(|s| s.kinds.contains(&kind))).unwrap_or(false)
    }

    pub fn publish(&self, event: Event) {
        let Some(kind) = event.kind() else { return };
        let Ok(mut subs) = self.subscribers.lock() else { return };
        if subs.is_empty() {
            return;
        }
        let event = Arc::new(event);
        subs.retain(|s| {
            if !s.kinds.contains(&kind) {
                return true;
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    pub fn lifecycle(&self, what: Lifecycle, detail: impl Into<String>) {
        self.publish(Event::Lifecycle { t_ns: monotonic_ns(), what, detail: detail.into() });
    }
}

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

    #[test]
    fn subscribers_get_their_kinds_and_count_what_they_lose() {
        let hub = EventHub::default();
        let console = hub.subscribe(&[EventKind::Console]);
        let life = hub.subscribe(&[EventKind::Lifecycle]);
        let mut tee = ConsoleTee::new(Vec::new(), hub.clone());
        tee.write_all(b"heartbeat 1 v1\r\nhalf").unwrap();
        tee.write_all(b" line\n").unwrap();
        hub.lifecycle(Lifecycle::Reboot, "test");
        let lines: Vec<_> = console.rx.try_iter().collect();
        assert_eq!(lines.len(), 2);
        assert!(matches!(&*lines[1], Event::Console { line, .. } if line == "half line"));
        assert_eq!(life.rx.try_iter().count(), 1);
        for _ in 0..QUEUE + 10 {
            hub.lifecycle(Lifecycle::Boot, "");
        }
        assert_eq!(life.lost.load(Ordering::Relaxed), 10);
        drop(life);
        hub.lifecycle(Lifecycle::Boot, "");
        assert!(!hub.has_subscribers(EventKind::Lifecycle));
    }
}
