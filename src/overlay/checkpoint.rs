//! Checkpoints: what makes the overlay's writes durable (see the ordering in the module doc),
//! and what happens when the file under the overlay fails.
//!
//! The kernel reports a writeback error to an `fsync` once; the next `fsync` succeeds although
//! the data never reached the disk ("fsyncgate"). So the first write-back or sync error marks
//! the overlay failed for as long as it stays attached: every later checkpoint (fsync, flush,
//! the periodic one, unmount) and every write fails with EIO, and a read of a cluster changed
//! since the last good checkpoint fails too (what is on disk there is unknown). Clusters not
//! changed since still read, so the rest of the disk can be copied off. Reattaching (remounting)
//! starts again from what the file really holds: the last good checkpoint, or later writes.
//! Checkpoints run one at a time, so that the one sync that sees an error is the one that
//! fails the overlay before any other can report success.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::header::PAGE;
use super::{Overlay, OverlayError, io};
use crate::error::{Error, Result};

/// Half-open ranges of clusters, merged as they are added.
#[derive(Debug, Default)]
pub(super) struct ClusterRanges(BTreeMap<u64, u64>);

impl ClusterRanges {
    /// Adds clusters `first..=last`.
    pub(super) fn add(&mut self, first: u64, last: u64) {
        let (mut start, mut end) = (first, last + 1);
        // Merge with every range that touches [start, end).
        while let Some((&s, &e)) = self.0.range(..=end).next_back().filter(|&(_, &e)| e >= start) {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }
    /// True when any of `first..=last` was added.
    pub(super) fn touches(&self, first: u64, last: u64) -> bool {
        self.0.range(..=last).next_back().is_some_and(|(_, &e)| e > first)
    }
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

impl Overlay {
    /// Makes every write so far durable (see the module doc for the ordering). Fails, and
    /// keeps failing until reattached, once any write-back or sync has failed.
    pub fn checkpoint(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _one = self.checkpointing.lock();
        self.check_not_failed()?;
        let r = self.sync_data_then_map();
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.file.sync_data().map_err(|e| io(&self.path, what, e))
    }

    fn sync_data_then_map(&self) -> Result<()> {
        // Phase 1, without blocking writers: flush the bulk of the dirty data, again while writers
        // keep it slow, so that phase 2 has little left.
        for _ in 0..4 {
            let t = std::time::Instant::now();
            self.sync("syncing overlay data")?;
            if t.elapsed() < std::time::Duration::from_millis(50) {
                break;
            }
        }
        // Phase 2, exclusive: flush what arrived meanwhile, then the map, in that order.
        let _epoch = self.epoch.write();
        let pages: Vec<u64> = std::mem::take(&mut *self.dirty.lock()).into_iter().collect();
        let r = (|| {
            self.sync("syncing overlay data")?;
            if pages.is_empty() {
                return Ok(());
            }
            for p in &pages {
                let s = (p * PAGE) as usize;
                let e = (s + PAGE as usize).min(self.map.len());
                self.file
                    .write_at(&self.map[s..e], self.header.map_offset + s as u64)
                    .map_err(|e| io(&self.path, "writing overlay map", e))?;
            }
            self.sync("syncing overlay map")
        })();
        match &r {
            Ok(()) => self.changed.lock().clear(),
            Err(_) => self.dirty.lock().extend(pages),
        }
        r
    }

    /// Marks the overlay failed after `e`, a write-back or sync error, and says so once.
    pub(super) fn fail(&self, e: &Error) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!(
                "{e}; the overlay is failed: writes, fsync and flush fail, and so do reads of what \
                 changed since its last good checkpoint, until it is remounted"
            );
        }
    }

    /// True once a write-back or sync has failed (until reattached).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(super) fn check_not_failed(&self) -> Result<()> {
        if self.failed() {
            return Err(Error::from(OverlayError::Failed).in_file(self.path.display()));
        }
        Ok(())
    }

    /// Records that clusters `first..=last` are about to change (before the data is written).
    pub(super) fn changing(&self, first: u64, last: u64) {
        self.changed.lock().add(first, last);
    }

    /// Fails for a range that changed since the last good checkpoint of a failed overlay: what
    /// the file holds there is unknown. Everything else reads as usual.
    pub fn check_settled(&self, offset: u64, len: u64) -> Result<()> {
        if !self.failed() || len == 0 {
            return Ok(());
        }
        let cl = self.header.cluster;
        if self.changed.lock().touches(offset / cl, (offset + len - 1) / cl) {
            return Err(Error::from(OverlayError::Unsettled(offset)).in_file(self.path.display()));
        }
        Ok(())
    }

    /// True when writes wait for a checkpoint.
    pub fn is_dirty(&self) -> bool {
        !self.changed.lock().is_empty() || !self.dirty.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterRanges;

    #[test]
    fn cluster_ranges_merge_and_answer_overlaps() {
        let mut r = ClusterRanges::default();
        r.add(10, 12);
        r.add(20, 20);
        r.add(13, 14); // adjacent: merges with 10..=12
        assert_eq!(r.0.len(), 2);
        assert!(r.touches(14, 14) && r.touches(0, 10) && r.touches(20, 30) && !r.touches(15, 19));
        r.add(5, 25);
        assert_eq!(r.0.iter().collect::<Vec<_>>(), vec![(&5, &26)]);
        assert!(!r.touches(26, 40) && !r.touches(0, 4));
        r.clear();
        assert!(r.is_empty());
    }
}
