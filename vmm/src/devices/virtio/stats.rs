//! Per-device I/O accounting: running totals plus a bounded ring of the
//! latest operations with their times, so the monitor can correlate guest
//! I/O with injected input (keyloggers, bots) without unbounded memory.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use dvisor_api::monotonic_ns;
use serde::{Deserialize, Serialize};

/// Records kept per device; older ones are dropped (and counted).
pub const DEFAULT_RECORDS: usize = 4096;

// The wire types of these stats are the support API's.
pub use dvisor_api::protocol::{IoKind, IoRecord, IoTotals};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStats {
    pub totals: IoTotals,
    pub records: VecDeque<IoRecord>,
    /// Records pushed out of the ring since the last `take_records`.
    pub records_lost: u64,
}

/// A device's stats, shared between the device (writer) and whoever
/// reports them (support API), so reporting never waits on device I/O.
#[derive(Debug, Clone)]
pub struct StatsHandle {
    inner: Arc<Mutex<IoStats>>,
    capacity: usize,
}

impl Default for StatsHandle {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_RECORDS)
    }
}

impl StatsHandle {
    pub fn with_capacity(capacity: usize) -> Self {
        StatsHandle { inner: Arc::default(), capacity: capacity.max(1) }
    }

    pub fn record(&self, kind: IoKind, bytes: u64) {
        let mut s = self.lock();
        let t = &mut s.totals;
        let (ops, total) = match kind {
            IoKind::Read => (&mut t.read_ops, Some(&mut t.read_bytes)),
            IoKind::Write => (&mut t.write_ops, Some(&mut t.write_bytes)),
            IoKind::Flush => (&mut t.flush_ops, None),
            IoKind::Rx => (&mut t.rx_packets, Some(&mut t.rx_bytes)),
            IoKind::Tx => (&mut t.tx_packets, Some(&mut t.tx_bytes)),
        };
        *ops += 1;
        if let Some(total) = total {
            *total = total.saturating_add(bytes);
        }
        if s.records.len() >= self.capacity {
            s.records.pop_front();
            s.records_lost += 1;
        }
        s.records.push_back(IoRecord { t_ns: monotonic_ns(), kind, bytes });
    }

    pub fn error(&self) {
        self.lock().totals.errors += 1;
    }

    pub fn dropped(&self) {
        self.lock().totals.dropped += 1;
    }

    pub fn totals(&self) -> IoTotals {
        self.lock().totals.clone()
    }

    pub fn snapshot(&self) -> IoStats {
        self.lock().clone()
    }

    /// Hands over the records since the last call (for an event stream),
    /// keeping the totals.
    pub fn take_records(&self) -> IoStats {
        let mut s = self.lock();
        let out = IoStats {
            totals: s.totals.clone(),
            records: std::mem::take(&mut s.records),
            records_lost: s.records_lost,
        };
        s.records_lost = 0;
        out
    }

    fn lock(&self) -> MutexGuard<'_, IoStats> {
        // Counters stay meaningful after a panic elsewhere; keep counting.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_ring_and_serde() {
        let s = StatsHandle::with_capacity(2);
        s.record(IoKind::Read, 512);
        s.record(IoKind::Write, 1024);
        s.record(IoKind::Flush, 0);
        s.error();
        let snap = s.snapshot();
        assert_eq!(snap.totals.read_ops, 1);
        assert_eq!(snap.totals.read_bytes, 512);
        assert_eq!(snap.totals.write_bytes, 1024);
        assert_eq!(snap.totals.flush_ops, 1);
        assert_eq!(snap.totals.errors, 1);
        assert_eq!(snap.records.len(), 2);
        assert_eq!(snap.records_lost, 1);
        assert!(snap.records[0].t_ns <= snap.records[1].t_ns);
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains("\"kind\":\"flush\""));
        let back: IoStats = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let taken = s.take_records();
        assert_eq!(taken.records.len(), 2);
        assert!(s.snapshot().records.is_empty());
        assert_eq!(s.totals().write_ops, 1);
    }
}
