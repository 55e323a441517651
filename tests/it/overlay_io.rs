//! A recording, fault-injecting layer under an overlay's file I/O (`vdiskfs::overlay::OverlayFile`),
//! and a model reader: what the crash-state and failing-disk tests are built on.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::MmapMut;
use parking_lot::Mutex;
use vdiskfs::overlay::{ClusterState, Overlay, OverlayFile};

/// One thing the overlay did to its file that changes what a crash can leave.
#[derive(Debug, Clone)]
pub enum FileOp {
    Write { at: u64, data: Vec<u8> },
    Punch { at: u64, len: u64 },
    Sync,
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// Passes everything through to a real file, records writes, punches and syncs, and fails
/// what a test asks it to.
pub struct Recorder {
    inner: File,
    pub ops: Mutex<Vec<FileOp>>,
    /// The N-th sync from now fails with EIO (0: none). Like the kernel, it reports it once.
    fail_sync_in: AtomicU32,
    /// Writes fail with ENOSPC once this many more bytes are written (u64::MAX: never); the
    /// failing write writes what fits first, and the space is back afterwards.
    enospc_after: AtomicU64,
    /// Runs before each punch (to race something against it).
    before_punch: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("ops", &self.ops.lock().len()).finish()
    }
}

impl Recorder {
    pub fn new(inner: File) -> Arc<Recorder> {
        Arc::new(Recorder {
            inner,
            ops: Mutex::new(Vec::new()),
            fail_sync_in: AtomicU32::new(0),
            enospc_after: AtomicU64::new(u64::MAX),
            before_punch: Mutex::new(None),
        })
    }
    /// The `n`-th sync from now fails (1: the next one).
    pub fn fail_sync(&self, n: u32) {
        self.fail_sync_in.store(n, Ordering::SeqCst);
    }
    /// Writes run out of space after `bytes` more bytes (once).
    pub fn enospc_after(&self, bytes: u64) {
        self.enospc_after.store(bytes, Ordering::SeqCst);
    }
    pub fn before_punch(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.before_punch.lock() = Some(Box::new(hook));
    }
    pub fn len(&self) -> usize {
        self.ops.lock().len()
    }
}

impl OverlayFile for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let room = self.enospc_after.load(Ordering::SeqCst);
        if room != u64::MAX && room >= data.len() as u64 {
            self.enospc_after.store(room - data.len() as u64, Ordering::SeqCst);
        } else if room != u64::MAX {
            self.enospc_after.store(u64::MAX, Ordering::SeqCst);
            let part = &data[..room as usize];
            if !part.is_empty() {
                self.inner.write_at(part, offset)?;
                self.ops.lock().push(FileOp::Write { at: offset, data: part.to_vec() });
            }
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(data, offset)?;
        self.ops.lock().push(FileOp::Write { at: offset, data: data.to_vec() });
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let n = self.fail_sync_in.load(Ordering::SeqCst);
        if n > 0 {
            self.fail_sync_in.store(n - 1, Ordering::SeqCst);
            if n == 1 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        OverlayFile::sync_data(&self.inner)?;
        self.ops.lock().push(FileOp::Sync);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(h) = &*self.before_punch.lock() {
            h();
        }
        self.inner.punch_hole(offset, len)?;
        self.ops.lock().push(FileOp::Punch { at: offset, len });
        Ok(())
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn available(&self) -> io::Result<u64> {
        self.inner.available()
    }
    fn map_private(&self, offset: u64, len: usize) -> io::Result<MmapMut> {
        self.inner.map_private(offset, len)
    }
}

/// Attaches `path` writable with a [`Recorder`] under it; returns both.
pub fn attach_recorded(path: &Path, size: u64, cluster: u64) -> (Overlay, Arc<Recorder>) {
    let mut rec = None;
    let ov = Overlay::attach_with(path, size, "id", cluster, true, |f| {
        let r = Recorder::new(f);
        rec = Some(r.clone());
        Box::new(r)
    })
    .expect("attach overlay");
    (ov, rec.expect("wrapped"))
}

/// The chain under every test overlay: byte `i` of the disk is `chain_byte(i)`.
pub fn chain_byte(off: u64) -> u8 {
    (off % 251) as u8 ^ 0x5a
}

pub fn fill(off: u64, buf: &mut [u8]) -> vdiskfs::Result<()> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = chain_byte(off + i as u64);
    }
    Ok(())
}

/// Reads `[off, off + len)` of the disk the overlay shows over the [`chain_byte`] chain.
pub fn read(ov: &Overlay, off: u64, len: u64) -> vdiskfs::Result<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    for r in ov.runs(off, len) {
        let b = &mut out[(r.start - off) as usize..(r.start - off + r.len) as usize];
        match r.state {
            ClusterState::Chain => fill(r.start, b)?,
            ClusterState::Data => ov.read_data(r.start, b)?,
            ClusterState::Zero => ov.check_settled(r.start, r.len).map(|()| b.fill(0))?,
            ClusterState::Invalid => panic!("invalid cluster at {:#x}", r.start),
        }
    }
    Ok(out)
}
