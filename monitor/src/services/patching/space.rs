//! Patch space of one process, as the memory-efficient dynamic update
//! method keeps it: the areas mapped into the process for patches, and a
//! free map of the bytes in them that no applied patch uses. A new patch
//! takes the first free range that fits; a reverted patch's range goes
//! back to the free map; an area that becomes entirely free is unmapped.
//!
//! The bodies of functions a patch redirected are space too: behind the
//! jump at their entry nothing runs any more, so while that patch stays
//! applied its bytes can hold the code of later patches. A body lives in
//! the program's text (read-only to the process), so it takes only
//! patches without writable data; it is never unmapped, and it leaves the
//! map when its patch is reverted, which it must be empty for.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceMap {
    /// Mapped areas (each one mmap).
    pub areas: Vec<Range>,
    /// Free ranges inside the areas and bodies, sorted and coalesced.
    pub free: Vec<Range>,
    /// Bodies of replaced functions, with the patch that replaced them.
    #[serde(default)]
    pub bodies: Vec<Body>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    pub range: Range,
    /// The applied patch whose jump made this body dead code.
    pub owner: u32,
}

impl SpaceMap {
    /// The bodies patch `owner` gave, if none of them holds a patch now.
    pub fn free_bodies_of(&self, owner: u32) -> Result<Vec<Range>, Range> {
        let mine: Vec<Range> = self.bodies.iter().filter(|b| b.owner == owner).map(|b| b.range).collect();
        match mine.iter().find(|r| !self.free.contains(r)) {
            Some(r) => Err(*r),
            None => Ok(mine),
        }
    }
}

impl SpaceMap {
    /// First free range in the mapped areas that holds `len` bytes at
    /// `align`; the bytes are taken out of the free map.
    pub fn allocate(&mut self, len: u64, align: u64) -> Option<u64> {
        let bodies = self.bodies.clone();
        self.allocate_where(len, align, |r| !inside(&bodies, r))
    }

    /// The same, for a patch with only code and read-only data: replaced
    /// function bodies are tried first, then the mapped areas.
    pub fn allocate_code(&mut self, len: u64, align: u64) -> Option<u64> {
        let bodies = self.bodies.clone();
        self.allocate_where(len, align, |r| inside(&bodies, r)).or_else(|| self.allocate(len, align))
    }

    /// Whether `r` lies in a replaced function's body.
    pub fn in_body(&self, r: Range) -> bool {
        inside(&self.bodies, &r)
    }

    fn allocate_where(&mut self, len: u64, align: u64, usable: impl Fn(&Range) -> bool) -> Option<u64> {
        let align = align.max(1);
        for i in 0..self.free.len() {
            let r = self.free[i];
            if !usable(&r) {
                continue;
            }
            let start = r.start.div_ceil(align) * align;
            if start + len > r.end() {
                continue;
            }
            self.free.remove(i);
            if start > r.start {
                self.insert_free(Range { start: r.start, len: start - r.start });
            }
            if start + len < r.end() {
                self.insert_free(Range { start: start + len, len: r.end() - start - len });
            }
            return Some(start);
        }
        None
    }

    /// A new mapped area, entirely free.
    pub fn add_area(&mut self, area: Range) {
        self.areas.push(area);
        self.insert_free(area);
    }

    /// A replaced function's body, free for code, owned by patch `owner`.
    pub fn add_body(&mut self, range: Range, owner: u32) {
        self.bodies.push(Body { range, owner });
        self.insert_free(range);
    }

    /// Takes the bodies of patch `owner` out of the map, if all of them are
    /// free; otherwise leaves everything as it is and returns a body in use.
    pub fn remove_bodies(&mut self, owner: u32) -> Result<(), Range> {
        for r in self.free_bodies_of(owner)? {
            self.free.retain(|x| *x != r);
        }
        self.bodies.retain(|b| b.owner != owner);
        Ok(())
    }

    /// Gives a range back. Returns the areas that are now entirely free
    /// (to unmap); they leave the map.
    pub fn release(&mut self, r: Range) -> Vec<Range> {
        self.insert_free(r);
        let empty: Vec<Range> = self.areas.iter().copied().filter(|a| self.free.contains(a)).collect();
        for a in &empty {
            self.areas.retain(|x| x != a);
            self.free.retain(|x| x != a);
        }
        empty
    }

    /// Bytes mapped for patches in total.
    pub fn mapped(&self) -> u64 {
        self.areas.iter().map(|a| a.len).sum()
    }

    fn insert_free(&mut self, r: Range) {
        if r.len == 0 {
            return;
        }
        let at = self.free.partition_point(|x| x.start < r.start);
        self.free.insert(at, r);
        // Coalesce neighbours, but never across areas: an area must be
        // seen whole to be unmapped.
        let mut i = at.saturating_sub(1);
        while i + 1 < self.free.len() {
            let (a, b) = (self.free[i], self.free[i + 1]);
            if a.end() == b.start && self.same_area(a.start, b.start) {
                self.free[i] = Range { start: a.start, len: a.len + b.len };
                self.free.remove(i + 1);
            } else if i > at {
                break;
            } else {
                i += 1;
            }
        }
    }

    fn same_area(&self, x: u64, y: u64) -> bool {
        self.areas
            .iter()
            .chain(self.bodies.iter().map(|b| &b.range))
            .any(|a| x >= a.start && x < a.end() && y >= a.start && y < a.end())
    }
}

fn inside(bodies: &[Body], r: &Range) -> bool {
    bodies.iter().any(|b| b.range.start <= r.start && r.end() <= b.range.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_coalesce_and_unmap() {
        let mut m = SpaceMap::default();
        assert_eq!(m.allocate(100, 16), None);
        m.add_area(Range { start: 0x1000_0000, len: 0x2000 });
        let a = m.allocate(0x100, 16).unwrap();
        let b = m.allocate(0x100, 16).unwrap();
        assert_eq!((a, b), (0x1000_0000, 0x1000_0100));
        assert!(m.release(Range { start: a, len: 0x100 }).is_empty());
        // The freed hole is reused first.
        assert_eq!(m.allocate(0x80, 16), Some(a));
        assert!(m.release(Range { start: a, len: 0x80 }).is_empty());
        let gone = m.release(Range { start: b, len: 0x100 });
        assert_eq!(gone, vec![Range { start: 0x1000_0000, len: 0x2000 }]);
        assert_eq!(m.mapped(), 0);
        assert!(m.free.is_empty());
    }

    #[test]
    fn alignment_and_separate_areas() {
        let mut m = SpaceMap::default();
        m.add_area(Range { start: 0x1000, len: 0x1000 });
        m.add_area(Range { start: 0x2000, len: 0x1000 });
        // Adjacent areas stay apart in the free map.
        assert_eq!(m.free.len(), 2);
        assert_eq!(m.allocate(8, 1), Some(0x1000));
        assert_eq!(m.allocate(0x100, 0x100), Some(0x1100));
        assert_eq!(m.allocate(0x1000, 1), Some(0x2000), "a whole area");
        assert_eq!(m.allocate(0x1000, 1), None);
    }

    #[test]
    fn cycles_do_not_grow() {
        let mut m = SpaceMap::default();
        let mut peak = 0;
        for i in 0..1000u64 {
            let len = 0x40 + (i * 37) % 0x300;
            let at = match m.allocate(len, 16) {
                Some(a) => a,
                None => {
                    m.add_area(Range { start: 0x1000_0000, len: 0x1000 });
                    m.allocate(len, 16).unwrap()
                }
            };
            peak = peak.max(m.mapped());
            m.release(Range { start: at, len });
        }
        assert_eq!(peak, 0x1000);
        assert_eq!(m.mapped(), 0);
    }

    #[test]
    fn replaced_bodies_hold_code_until_their_patch_goes() {
        let mut m = SpaceMap::default();
        m.add_area(Range { start: 0x1000_0000, len: 0x1000 });
        let body = Range { start: 0x4018c5, len: 0xa4 };
        m.add_body(body, 1);
        // Data-carrying patches never go into a body; code-only ones do, first.
        assert_eq!(m.allocate(0x10, 16), Some(0x1000_0000));
        let code = m.allocate_code(0x20, 16).unwrap();
        assert!(m.in_body(Range { start: code, len: 0x20 }), "{code:#x}");
        // Too big for the body: an area.
        assert_eq!(m.allocate_code(0x100, 16), Some(0x1000_0010));
        // The owner cannot go while the body is used.
        assert_eq!(m.remove_bodies(1), Err(body));
        assert!(m.release(Range { start: code, len: 0x20 }).is_empty(), "a body is never unmapped");
        assert_eq!(m.remove_bodies(1), Ok(()));
        assert!(m.bodies.is_empty());
        assert!(m.free.iter().all(|r| !(r.start >= body.start && r.start < body.end())), "{:?}", m.free);
        assert_eq!(m.allocate_code(0x20, 16), Some(0x1000_0110));
    }
}
