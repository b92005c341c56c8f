//! An event fan-out: publishers hand an event to every subscriber of its
//! kind, each through a bounded queue. A subscriber that falls behind loses
//! events (and is told how many), never slows the publisher down.
//!
//! The VMM publishes its devices', vCPUs' and VM loop's events through
//! one; the monitor passes the VMM's stream on to its own control-socket
//! clients through another.
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::monotonic_ns;
use crate::protocol::{Event, EventKind, Lifecycle};

/// Events queued per subscriber before it starts losing them.
const QUEUE: usize = 4096;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_their_kinds_and_count_what_they_lose() {
        let hub = EventHub::default();
        let console = hub.subscribe(&[EventKind::Console]);
        let life = hub.subscribe(&[EventKind::Lifecycle]);
        hub.lifecycle(Lifecycle::Reboot, "test");
        assert_eq!(console.rx.try_iter().count(), 0);
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
