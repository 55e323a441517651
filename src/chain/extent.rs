//! Resolved ranges of a chain's virtual disk, and the one iterator over them that `map`, `check`,
//! `export`, the allocation count and SEEK_DATA/SEEK_HOLE all use.

use std::collections::VecDeque;

use super::Chain;
use crate::error::Result;

/// Where a range of the chain's virtual disk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored by layer `depth` (0 = top) in its source `source` at `offset`.
    Data { depth: u16, source: u32, offset: u64 },
    /// Zeros decided at `depth`; `depth == layers.len()` means no layer allocates it.
    Zero { depth: u16 },
}

/// A resolved range of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    pub fn is_data(&self) -> bool {
        matches!(self.kind, ExtentKind::Data { .. })
    }
    /// The layer that decides this range (`depth == layers` when none does).
    pub fn depth(&self) -> usize {
        match self.kind {
            ExtentKind::Data { depth, .. } | ExtentKind::Zero { depth } => depth as usize,
        }
    }

    /// `other` continues `self`: adjacent, same kind and depth, and for data the next bytes of
    /// the same source.
    fn continued_by(&self, other: &Extent) -> bool {
        self.end() == other.start
            && match (self.kind, other.kind) {
                (ExtentKind::Zero { depth: a }, ExtentKind::Zero { depth: b }) => a == b,
                (
                    ExtentKind::Data { depth: a, source: s, offset: o },
                    ExtentKind::Data { depth: b, source: t, offset: p },
                ) => a == b && s == t && o + self.len == p,
                _ => false,
            }
    }
}

/// Appends `e`, merging it with the last extent when they continue each other.
pub(super) fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut()
        && last.continued_by(&e)
    {
        last.len += e.len;
        return;
    }
    out.push(e);
}

/// First window resolved by [`Extents`]; it doubles up to [`MAX_WINDOW`] across long runs, so
/// a caller that stops early (SEEK_DATA) resolves little and a full walk takes few steps.
const FIRST_WINDOW: u64 = 1 << 20;
const MAX_WINDOW: u64 = 1 << 30;

/// The extents of `[from, end)` in order, merged across window boundaries.
pub struct Extents<'a> {
    chain: &'a Chain,
    /// Layers from this depth down are not asked (see `Chain::walk_above`).
    limit: usize,
    pos: u64,
    end: u64,
    window: u64,
    ready: VecDeque<Extent>,
    failed: bool,
}

impl<'a> Extents<'a> {
    pub(super) fn new(chain: &'a Chain, from: u64, end: u64, limit: usize) -> Self {
        Extents {
            chain,
            limit,
            pos: from,
            end: end.min(chain.size()),
            window: FIRST_WINDOW,
            ready: VecDeque::new(),
            failed: false,
        }
    }

    /// Resolves the next window into `ready`, merging its first extent into the last one held.
    fn fill(&mut self) -> Result<()> {
        let n = self.window.min(self.end - self.pos);
        for e in self.chain.extents_above(self.pos, n, self.limit)? {
            match self.ready.back_mut() {
                Some(last) if last.continued_by(&e) => last.len += e.len,
                _ => self.ready.push_back(e),
            }
        }
        self.pos += n;
        self.window = (self.window * 2).min(MAX_WINDOW);
        Ok(())
    }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        if self.failed {
            return None;
        }
        // Hold the last extent back until the next window shows whether it continues.
        while self.pos < self.end && self.ready.len() < 2 {
            if let Err(e) = self.fill() {
                self.failed = true;
                return Some(Err(e));
            }
        }
        self.ready.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_extents_join_only_contiguous_runs() {
        let mut v = Vec::new();
        let d = |start, len, off| Extent { start, len, kind: ExtentKind::Data { depth: 0, source: 0, offset: off } };
        push_merged(&mut v, d(0, 512, 4096));
        push_merged(&mut v, d(512, 512, 4608));
        push_merged(&mut v, d(1024, 512, 9999));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len, 1024);
    }
}
