//! Writes and discards: data first, then the cluster's state in the in-memory map.

use parking_lot::MutexGuard;

use super::{ClusterState, Overlay, OverlayError, STRIPES, io};
use crate::error::{Error, Result};

impl Overlay {
    /// Locks the stripes of clusters `first..=last` in a fixed order.
    fn lock_clusters(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> =
            (first..=last.min(first + STRIPES as u64)).map(|c| (c % STRIPES as u64) as usize).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.stripes[i].lock()).collect()
    }

    /// Writes `data` at virtual `offset`. `fill` reads the chain's bytes for read-modify-write.
    pub fn write(&self, offset: u64, data: &[u8], fill: &dyn Fn(u64, &mut [u8]) -> Result<()>) -> Result<()> {
        self.check_writable()?;
        let end = offset + data.len() as u64;
        if end > self.header.virtual_size {
            return Err(OverlayError::WritePastEnd.into());
        }
        if data.is_empty() {
            return Ok(());
        }
        let cl = self.header.cluster;
        let _epoch = self.epoch.read();
        self.changing(offset / cl, (end - 1) / cl);
        let _locks = self.lock_clusters(offset / cl, (end - 1) / cl);
        let mut pos = offset;
        while pos < end {
            let c = pos / cl;
            let cstart = c * cl;
            let cend = (cstart + cl).min(self.header.virtual_size);
            let wend = end.min(cend);
            let piece = &data[(pos - offset) as usize..(wend - offset) as usize];
            let whole = pos == cstart && wend == cend;
            match self.state(c) {
                ClusterState::Data => self.put(pos, piece)?,
                ClusterState::Zero | ClusterState::Chain if whole => {
                    self.put(pos, piece)?;
                    self.set_state(c, ClusterState::Data);
                }
                // The file under a zeroed cluster may hold bytes of a write a crash undid or that
                // ran out of space: a partial write rewrites the whole cluster, zeros around it.
                ClusterState::Zero => {
                    let mut buf = vec![0u8; (cend - cstart) as usize];
                    buf[(pos - cstart) as usize..(wend - cstart) as usize].copy_from_slice(piece);
                    self.put(cstart, &buf)?;
                    self.set_state(c, ClusterState::Data);
                }
                ClusterState::Chain => {
                    let mut buf = vec![0u8; (cend - cstart) as usize];
                    fill(cstart, &mut buf)?;
                    buf[(pos - cstart) as usize..(wend - cstart) as usize].copy_from_slice(piece);
                    self.put(cstart, &buf)?;
                    self.set_state(c, ClusterState::Data);
                }
                ClusterState::Invalid => {
                    return Err(Error::from(OverlayError::InvalidCluster(c)).in_file(self.path.display()));
                }
            }
            pos = wend;
        }
        Ok(())
    }

    /// Writes data at virtual `offset`. Running out of space fails this write only (the map
    /// does not change); any other error fails the overlay (see `checkpoint.rs`).
    fn put(&self, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.file.write_at(data, self.header.data_offset + offset);
        r.map_err(|e| {
            let out_of_space = matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
            let e = io(&self.path, &format!("writing overlay data at virtual {offset:#x}"), e);
            if !out_of_space {
                self.fail(&e);
            }
            e
        })
    }

    /// Makes `[offset, offset + len)` read as zeros; whole clusters are punched out of the file.
    pub fn discard(&self, offset: u64, len: u64, fill: &dyn Fn(u64, &mut [u8]) -> Result<()>) -> Result<()> {
        self.check_writable()?;
        let end = offset.saturating_add(len).min(self.header.virtual_size);
        if offset >= end {
            return Ok(());
        }
        let cl = self.header.cluster;
        let first_whole = offset.next_multiple_of(cl);
        let last_whole = if end == self.header.virtual_size { end } else { end / cl * cl };
        // Partial clusters at the edges become zeros through the write path.
        let zero_edge = |from: u64, to: u64| -> Result<()> {
            if from < to { self.write(from, &vec![0u8; (to - from) as usize], fill) } else { Ok(()) }
        };
        if first_whole >= last_whole {
            return zero_edge(offset, end);
        }
        zero_edge(offset, first_whole)?;
        zero_edge(last_whole, end)?;
        let _epoch = self.epoch.read();
        let (first, last) = (first_whole / cl, (last_whole - 1) / cl);
        self.changing(first, last);
        let mut c = first;
        while c <= last {
            let upto = (c + STRIPES as u64 - 1).min(last);
            // Map and hole under the same locks: a write landing in between would see a zeroed
            // cluster, write its data, and lose it to the punch.
            let _locks = self.lock_clusters(c, upto);
            for k in c..=upto {
                if self.state(k) != ClusterState::Zero {
                    self.set_state(k, ClusterState::Zero);
                }
            }
            let (from, to) = (c * cl, ((upto + 1) * cl).min(last_whole));
            if let Err(e) = self.file.punch_hole(self.header.data_offset + from, to - from) {
                // Only space is lost: what a zeroed cluster's file bytes hold is never read.
                log::warn!("{}: punching a hole failed: {e}", self.path.display());
            }
            c = upto + 1;
        }
        Ok(())
    }

    /// `fallocate` mode 0: reserves file space for every cluster of `[offset, offset + len)`,
    /// so that writes there cannot run out of space. The clusters' contents do not change (the
    /// map does not either: reserved space under a chain or zeroed cluster is never read).
    pub fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let end = offset.saturating_add(len).min(self.header.virtual_size);
        if offset >= end {
            return Ok(());
        }
        let cl = self.header.cluster;
        let (from, to) = (offset / cl * cl, end.next_multiple_of(cl).min(self.header.virtual_size));
        // A file system that runs out part-way keeps what it reserved: refuse up front what
        // cannot fit (clusters with data have their space already).
        let need: u64 =
            self.runs(from, to - from).iter().filter(|r| r.state != ClusterState::Data).map(|r| r.len).sum();
        if need > self.file.available().unwrap_or(u64::MAX) {
            let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
            return Err(io(&self.path, &format!("reserving {need} bytes of overlay space"), e));
        }
        self.file
            .allocate(self.header.data_offset + from, to - from)
            .map_err(|e| io(&self.path, &format!("reserving overlay space at virtual {from:#x}"), e))
    }
}
