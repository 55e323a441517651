//! Checkpoints: what makes the overlay's writes durable (see the ordering in the module doc).

use std::sync::atomic::Ordering;

use super::header::PAGE;
use super::{Overlay, io};
use crate::error::Result;

impl Overlay {
    /// Makes every write so far durable (see the module doc for the ordering).
    pub fn checkpoint(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // Phase 1, without blocking writers: flush the bulk of the dirty data, again while writers
        // keep it slow, so that phase 2 has little left.
        for _ in 0..4 {
            let t = std::time::Instant::now();
            self.file.sync_data().map_err(|e| io(&self.path, "syncing overlay data", e))?;
            if t.elapsed() < std::time::Duration::from_millis(50) {
                break;
            }
        }
        // Phase 2, exclusive: flush what arrived meanwhile, then the map, in that order.
        let _epoch = self.epoch.write();
        let pages: Vec<u64> = std::mem::take(&mut *self.dirty.lock()).into_iter().collect();
        let r = (|| {
            self.file.sync_data().map_err(|e| io(&self.path, "syncing overlay data", e))?;
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
            self.file.sync_data().map_err(|e| io(&self.path, "syncing overlay map", e))
        })();
        if let Err(e) = &r {
            // The durable state is unknown from here on: stop taking writes rather than promise.
            self.failed.store(true, Ordering::Release);
            self.dirty.lock().extend(pages);
            log::error!("{e}");
        }
        r
    }
}
