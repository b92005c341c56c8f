//! Micro-benchmark of the walker, for `dvisor bench vmi`.
use std::hint::black_box;
use std::time::{Duration, Instant};

use super::{translate, PagingMode, PhysRead, TranslationCache};

/// How long each half of the benchmark runs at least.
const MIN_TIME: Duration = Duration::from_millis(100);

/// Translations per second of `vas` (each address counts once per pass,
/// failed translations included): uncached walks, then through a
/// `TranslationCache` warmed by one pass. Returns `(0.0, 0.0)` for no
/// addresses.
pub fn bench_translations(mem: &impl PhysRead, cr3: u64, mode: PagingMode, vas: &[u64]) -> (f64, f64) {
    if vas.is_empty() {
        return (0.0, 0.0);
    }
    let uncached = rate(vas.len(), || {
        for &va in vas {
            let _ = black_box(translate(mem, cr3, mode, black_box(va)));
        }
    });
    let mut cache = TranslationCache::with_capacity(vas.len().max(super::cache::DEFAULT_CACHE_ENTRIES));
    for &va in vas {
        let _ = cache.translate(mem, cr3, mode, va);
    }
    let cached = rate(vas.len(), || {
        for &va in vas {
            let _ = black_box(cache.translate(mem, cr3, mode, black_box(va)));
        }
    });
    (uncached, cached)
}

/// Runs `pass` until MIN_TIME has gone by; returns items per second.
fn rate(items_per_pass: usize, mut pass: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut passes = 0u64;
    loop {
        pass();
        passes += 1;
        let elapsed = start.elapsed();
        if elapsed >= MIN_TIME {
            return (passes as f64 * items_per_pass as f64) / elapsed.as_secs_f64();
        }
    }
}
