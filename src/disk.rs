//! A disk as consumers see it: a chain, and optionally an overlay that takes writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::chain::Chain;
use crate::error::{Error, ErrorKind, Kind, Result};
use crate::overlay::{ClusterState, Overlay, OverlayError};

/// Allocation not known yet.
const UNKNOWN: u64 = u64::MAX;

/// What a disk refuses.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("--overlay {} is one of the source images", .0.display())]
    OverlayIsSource(PathBuf),
    #[error("read-only disk (mount with --overlay FILE to make it writable)")]
    ReadOnly,
    #[error("write past the end of the disk")]
    WritePastEnd,
}

impl ErrorKind for DiskError {
    fn kind(&self) -> Kind {
        match self {
            DiskError::OverlayIsSource(_) | DiskError::WritePastEnd => Kind::Usage,
            DiskError::ReadOnly => Kind::ReadOnly,
        }
    }
}

/// One flat raw disk.
#[derive(Debug)]
pub struct Disk {
    name: String,
    chain: Arc<Chain>,
    overlay: Option<Overlay>,
    mtime: SystemTime,
    allocated: AtomicU64,
}

impl Disk {
    pub fn new(name: impl Into<String>, chain: Chain, mtime: SystemTime) -> Self {
        Disk { name: name.into(), chain: Arc::new(chain), overlay: None, mtime, allocated: AtomicU64::new(UNKNOWN) }
    }

    /// Puts `overlay` over the chain: reads merge it, writes go to it.
    pub fn with_overlay(mut self, overlay: Overlay) -> Self {
        self.overlay = Some(overlay);
        self
    }

    /// Attaches the overlay file at `path` (created if missing; refused if it is one of the
    /// disk's sources or was made for another chain). `cluster` sizes a new overlay (a power
    /// of two, 512 B to 16 MiB; the CLI's default is [`crate::overlay::DEFAULT_CLUSTER`]);
    /// `writable` false merges it read-only.
    pub fn attach_overlay(self, path: &Path, cluster: u64, writable: bool) -> Result<Self> {
        if let Ok(a) = std::fs::canonicalize(path)
            && self.source_paths().iter().any(|s| std::fs::canonicalize(s).is_ok_and(|b| b == a))
        {
            return Err(DiskError::OverlayIsSource(path.to_path_buf()).into());
        }
        let ov = Overlay::attach(path, self.size(), &self.chain.identity_text()?, cluster, writable)?;
        Ok(self.with_overlay(ov))
    }

    /// Every local file this disk reads: every source of every layer (VMDK extents too), the
    /// top left out by `--exclude-top` (it is still opened, and it is the running VM's disk),
    /// and the overlay. None of them may ever be written by an export or a sync.
    pub fn source_paths(&self) -> Vec<PathBuf> {
        let layers = self.chain.layers().iter().chain(self.chain.excluded_top()).flat_map(|l| l.sources());
        let files = layers.filter_map(|s| s.location().as_path().map(Path::to_path_buf));
        files.chain(self.overlay.iter().map(|o| o.path().to_path_buf())).collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }
    pub fn size(&self) -> u64 {
        self.chain.size()
    }
    pub fn mtime(&self) -> SystemTime {
        self.mtime
    }
    pub fn writable(&self) -> bool {
        self.overlay.as_ref().is_some_and(|o| o.writable())
    }

    /// Bytes backed by data, once [`Disk::compute_allocated`] has run; the full size before.
    pub fn allocated(&self) -> u64 {
        match self.allocated.load(Ordering::Relaxed) {
            UNKNOWN => self.size(),
            n => n,
        }
    }

    /// Walks the allocation once (cheap: layers answer long runs in one step).
    pub fn compute_allocated(&self) -> Result<u64> {
        let mut n = self.chain.allocated_bytes()?;
        if let Some(o) = &self.overlay {
            n = (n + o.data_bytes()).min(self.size());
        }
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
        if n == 0 {
            return Ok(());
        }
        let Some(ov) = &self.overlay else { return self.chain.read(offset, buf) };
        for r in ov.runs(offset, n as u64) {
            let b = &mut buf[(r.start - offset) as usize..(r.start - offset + r.len) as usize];
            match r.state {
                ClusterState::Chain => self.chain.read(r.start, b)?,
                ClusterState::Data => ov.read_data(r.start, b)?,
                ClusterState::Zero => b.fill(0),
                ClusterState::Invalid => {
                    return Err(Error::from(OverlayError::InvalidAt(r.start)).in_file(ov.path().display()));
                }
            }
        }
        Ok(())
    }

    fn overlay_for_write(&self) -> Result<&Overlay> {
        self.overlay.as_ref().filter(|o| o.writable()).ok_or_else(|| DiskError::ReadOnly.into())
    }

    fn fill(&self) -> impl Fn(u64, &mut [u8]) -> Result<()> + '_ {
        |off, buf| self.chain.read(off, buf)
    }

    /// Writes `data` at `offset` into the overlay. Never touches the chain's sources.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let ov = self.overlay_for_write()?;
        if offset.saturating_add(data.len() as u64) > self.size() {
            return Err(DiskError::WritePastEnd.into());
        }
        ov.write(offset, data, &self.fill())?;
        Ok(data.len())
    }

    /// Makes a range read as zeros (discard / punch hole / zero range).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay_for_write()?.discard(offset, len, &self.fill())
    }

    /// Reserves overlay space so that writes to the range cannot fail for lack of it.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay_for_write()?.reserve(offset, len)
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&self) -> Result<()> {
        match &self.overlay {
            Some(o) => o.checkpoint(),
            None => Ok(()),
        }
    }

    /// SEEK_DATA: the first data offset at or after `offset`, `None` past the last data (ENXIO).
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size() {
            return Ok(None);
        }
        let Some(ov) = &self.overlay else { return self.chain.next_data(offset) };
        for r in ov.runs(offset, self.size() - offset) {
            match r.state {
                ClusterState::Data | ClusterState::Invalid => return Ok(Some(r.start)),
                ClusterState::Zero => {}
                ClusterState::Chain => {
                    if let Some(d) = self.chain.next_data(r.start)?
                        && d < r.start + r.len
                    {
                        return Ok(Some(d));
                    }
                }
            }
        }
        Ok(None)
    }

    /// SEEK_HOLE: the first hole at or after `offset` (the end of the disk is one), `None` past it.
    pub fn seek_hole(&self, offset: u64) -> Result<Option<u64>> {
        if offset >= self.size() {
            return Ok(None);
        }
        let Some(ov) = &self.overlay else { return self.chain.next_hole(offset).map(Some) };
        for r in ov.runs(offset, self.size() - offset) {
            match r.state {
                ClusterState::Zero => return Ok(Some(r.start)),
                ClusterState::Data | ClusterState::Invalid => {}
                ClusterState::Chain => {
                    let h = self.chain.next_hole(r.start)?;
                    if h < r.start + r.len {
                        return Ok(Some(h));
                    }
                }
            }
        }
        Ok(Some(self.size()))
    }
}
