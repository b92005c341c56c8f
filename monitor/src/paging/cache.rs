//! A software TLB for the monitor: translations of 4 KiB pages keyed by
//! (page-table root, paging mode, virtual page). Emptied on every guest
//! resume, since the guest may change its page tables while it runs.
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::{translate, PagingError, PagingMode, PhysRead, Translation, PHYS_ADDR_MASK};

/// Default bound: 64 Ki pages (256 MiB of guest memory).
pub const DEFAULT_CACHE_ENTRIES: usize = 64 * 1024;

/// Multiply-rotate hashing of the two-word key: much cheaper than SipHash,
/// and the keys are not attacker-chosen in a way that matters here (a guest
/// that makes the monitor's cache slow only slows its own inspection).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    /// The root table's address, with the paging mode in bit 0.
    root: u64,
    /// `va >> 12`.
    page: u64,
}

impl Key {
    fn new(cr3: u64, mode: PagingMode, va: u64) -> Self {
        Key { root: (cr3 & PHYS_ADDR_MASK) | u64::from(mode.la57), page: va >> 12 }
    }
}

pub struct TranslationCache {
    /// The translation of each cached page's first byte.
    map: HashMap<Key, Translation, BuildHasherDefault<KeyHasher>>,
    capacity: usize,
    hits: u64,
    misses: u64,
    flushes: u64,
}

impl Default for TranslationCache {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TranslationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TranslationCache")
            .field("len", &self.map.len())
            .field("capacity", &self.capacity)
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .field("flushes", &self.flushes)
            .finish()
    }
}

impl TranslationCache {
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CACHE_ENTRIES)
    }

    /// A cache of at most `capacity` pages (at least 1). When full, the next
    /// miss empties it: simple, and a guest stopped for inspection touches
    /// far fewer pages than that.
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        TranslationCache { map: HashMap::default(), capacity, hits: 0, misses: 0, flushes: 0 }
    }

    /// `super::translate`, answered from the cache when it can. Only
    /// successful walks are cached; a page that is not mapped is walked again
    /// every time. A 4 KiB slice of a large page keeps the large page's
    /// `page_size`, so a hit equals what an uncached walk returns.
    pub fn translate(
        &mut self,
        mem: &impl PhysRead,
        cr3: u64,
        mode: PagingMode,
        va: u64,
    ) -> Result<Translation, PagingError> {
        let key = Key::new(cr3, mode, va);
        let offset = va & 0xfff;
        // A non-canonical va can share a page number only with another
        // non-canonical one, which never gets cached.
        if let Some(t) = self.map.get(&key) {
            self.hits += 1;
            return Ok(Translation { pa: t.pa | offset, ..*t });
        }
        self.misses += 1;
        let t = translate(mem, cr3, mode, va)?;
        if self.map.len() >= self.capacity {
            self.map.clear();
            self.flushes += 1;
        }
        self.map.insert(key, Translation { pa: t.pa & !0xfff, ..t });
        Ok(t)
    }

    /// Forget everything: call whenever the guest may have run since the
    /// translations were made (on every resume).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn hits(&self) -> u64 {
        self.hits
    }

    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// How many times the cache emptied itself because it was full.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    pub fn reset_counters(&mut self) {
        self.hits = 0;
        self.misses = 0;
        self.flushes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
