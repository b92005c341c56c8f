//! Windows: bounded series of timestamped samples, kept per rule across firings.

use std::collections::VecDeque;

/// How a window bounds itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// Keep the last N samples.
    Count(usize),
    /// Keep samples younger than this many nanoseconds (and at most `MAX_AGE_SAMPLES`).
    Age(i64),
}

/// Hard cap on samples in an age-bounded window, so memory stays bounded.
pub const MAX_AGE_SAMPLES: usize = 100_000;
/// Largest count a window may declare.
pub const MAX_COUNT: usize = 1_000_000;

#[derive(Debug, Clone)]
pub struct Window {
    pub capacity: Capacity,
    times: VecDeque<i64>,
    values: VecDeque<f64>,
}

impl Window {
    pub fn new(capacity: Capacity) -> Window {
        // Twice the capacity so `make_contiguous` rotates rarely (amortized O(1) per push).
        let reserve = match capacity {
            Capacity::Count(n) => (2 * n).min(4096),
            Capacity::Age(_) => 64,
        };
        Window { capacity, times: VecDeque::with_capacity(reserve), values: VecDeque::with_capacity(reserve) }
    }

    pub fn push(&mut self, t: i64, v: f64) {
        self.times.push_back(t);
        self.values.push_back(v);
        let limit = match self.capacity {
            Capacity::Count(n) => n,
            Capacity::Age(age) => {
                while self.times.front().is_some_and(|&t0| t.saturating_sub(t0) > age) {
                    self.times.pop_front();
                    self.values.pop_front();
                }
                MAX_AGE_SAMPLES
            }
        };
        while self.values.len() > limit {
            self.times.pop_front();
            self.values.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.times.clear();
        self.values.clear();
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn get(&self, i: usize) -> Option<f64> {
        self.values.get(i).copied()
    }

    /// Lays the samples out in one slice each; cheap when they already are.
    pub fn make_contiguous(&mut self) {
        self.times.make_contiguous();
        self.values.make_contiguous();
    }

    /// The samples, oldest first. Complete only after [`Window::make_contiguous`].
    pub fn values(&self) -> &[f64] {
        self.values.as_slices().0
    }

    /// Timestamps (ns), oldest first. Complete only after [`Window::make_contiguous`].
    pub fn times(&self) -> &[i64] {
        self.times.as_slices().0
    }
}
