//! A disk as consumers see it: a chain, and (later) an overlay that takes writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::chain::Chain;
use crate::error::{Error, Kind, Result};

/// Allocation not known yet.
const UNKNOWN: u64 = u64::MAX;

/// One flat raw disk.
#[derive(Debug)]
pub struct Disk {
    name: String,
    chain: Arc<Chain>,
    mtime: SystemTime,
    allocated: AtomicU64,
}

impl Disk {
    pub fn new(name: impl Into<String>, chain: Chain, mtime: SystemTime) -> Self {
        Disk { name: name.into(), chain: Arc::new(chain), mtime, allocated: AtomicU64::new(UNKNOWN) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }
    pub fn size(&self) -> u64 {
        self.chain.size()
    }
    pub fn mtime(&self) -> SystemTime {
        self.mtime
    }
    pub fn writable(&self) -> bool {
        false
    }

    /// Bytes backed by data, once [`Disk::compute_allocated`] has run; the full size before.
    pub fn allocated(&self) -> u64 {
        match self.allocated.load(Ordering::Relaxed) {
            UNKNOWN => self.size(),
            n => n,
        }
    }

    /// Walks the chain's allocation once (cheap: layers answer long runs in one step).
    pub fn compute_allocated(&self) -> Result<u64> {
        let n = self.chain.allocated_bytes()?;
        self.allocated.store(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Up to `size` bytes at `offset`; short only at the end of the disk.
    pub fn read(&self, offset: u64, size: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(offset, size, &mut buf)?;
        Ok(buf)
    }

    /// Like [`Disk::read`], into a caller's buffer (resized; its old contents are overwritten, so
    /// a buffer reused across requests costs no allocation and no zeroing).
    pub fn read_into(&self, offset: u64, size: usize, buf: &mut Vec<u8>) -> Result<()> {
        let end = offset.saturating_add(size as u64).min(self.size());
        let n = end.saturating_sub(offset) as usize;
        buf.resize(n, 0);
        if n > 0 {
            self.chain.read(offset, buf)?;
        }
        Ok(())
    }

    /// Writes need an overlay; without one the disk is read-only.
    pub fn write(&self, _offset: u64, _data: &[u8]) -> Result<usize> {
        Err(Error::new(Kind::ReadOnly, "read-only disk (mount with --overlay FILE to make it writable)"))
    }

    /// SEEK_DATA: the first data offset at or after `offset`, `None` past the last data (ENXIO).
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size() {
            return Ok(None);
        }
        self.chain.next_data(offset)
    }

    /// SEEK_HOLE: the first hole at or after `offset` (the end of the disk is one), `None` past it.
    pub fn seek_hole(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size() {
            return Ok(None);
        }
        self.chain.next_hole(offset).map(Some)
    }
}
