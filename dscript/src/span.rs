//! Byte ranges into the policy source, and line/column lookup for messages.

/// A half-open byte range `start..end` into the policy source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        // Sources are capped well below 4 GiB (see `MAX_SOURCE_LEN`), so the casts never truncate.
        Span { start: start as u32, end: end as u32 }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }

    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    /// 1-based line and column (in characters) of the span start.
    pub fn line_col(self, src: &str) -> (usize, usize) {
        let start = (self.start as usize).min(src.len());
        let before = src.get(..start).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

/// Largest policy source accepted, so spans fit in `u32`.
pub const MAX_SOURCE_LEN: usize = 16 * 1024 * 1024;
