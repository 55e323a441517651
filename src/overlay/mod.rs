//! The copy-on-write overlay: a writable view of a read-only chain, in one file vdiskfs owns.
//!
//! ```text
//!  0            header (4 KiB, little-endian, CRC-32C at 4092)
//!  map_offset   map: 2 bits per cluster, 4 clusters per byte, cluster i in bits 2*(i%4)..
//!                 0 = not in the overlay (read the chain)   1 = data in the overlay
//!                 2 = zeros (discarded)                       3 = invalid (EIO)
//!  data_offset  data: the cluster holding virtual offset v lives at data_offset + v (sparse file;
//!               discarded clusters are punched out)
//! ```
//!
//! Crash safety comes from ordering, not from a journal. Map changes go to a private
//! (copy-on-write) mapping of the map region, so the kernel never writes them back on its own.
//! A checkpoint (fsync, fdatasync, FUSE flush, unmount, and every few seconds) does three things
//! in order: `fdatasync` the file so every data write is durable, then writes the changed map pages
//! to the file, then `fdatasync`s again (the bulk of the data is flushed first without holding
//! writers off). The durable map therefore never names a cluster whose data is not durable.
//! After a crash, a cluster reads its last checkpointed state, or, for clusters that were
//! overwritten in place, bytes from one of the writes. It never reads unwritten garbage.
//! A cluster that a partial write allocates is first filled from the chain (read-modify-write), so
//! writes of any size (512 bytes included) are exact.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use memmap2::{MmapMut, MmapOptions};
use parking_lot::{Mutex, RwLock};

use crate::error::{Error, ErrorKind, Kind, Result};

mod header;

pub use self::header::OverlayHeader;
use self::header::{HEADER, PAGE};

const STRIPES: usize = 64;
/// Default cluster size.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;

/// What can be wrong with an overlay file or a request to it.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay not found")]
    NotFound,
    #[error("overlay is in use by another vdiskfs (mount or export)")]
    InUse,
    #[error("overlay cluster size {0} must be a power of two, 512 B to 16 MiB")]
    ClusterSize(u64),
    #[error("not a vdiskfs overlay (bad magic)")]
    BadMagic,
    #[error("overlay header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("unsupported overlay version {0}")]
    Version(u32),
    #[error("bad overlay cluster size 2^{0}")]
    ClusterShift(u32),
    #[error("bad overlay identity length")]
    IdentityLength,
    #[error("overlay header layout is inconsistent")]
    Layout,
    #[error("overlay is truncated ({len} bytes, should be {needed})")]
    Truncated { len: u64, needed: u64 },
    #[error(
        "overlay was made for a different disk: it records [{recorded}] ({recorded_size} bytes), this chain is [{chain}] ({chain_size} bytes)"
    )]
    OtherDisk { recorded: String, recorded_size: u64, chain: String, chain_size: u64 },
    #[error("overlay attached read-only")]
    ReadOnly,
    #[error("an earlier checkpoint failed; refusing further writes")]
    CheckpointFailed,
    #[error("write past the end of the disk")]
    WritePastEnd,
    #[error("overlay map entry for cluster {0} is invalid")]
    InvalidCluster(u64),
    /// What a read met in the map (see [`ClusterState::Invalid`]).
    #[error("overlay map entry at virtual {0:#x} is invalid")]
    InvalidAt(u64),
}

impl ErrorKind for OverlayError {
    fn kind(&self) -> Kind {
        match self {
            OverlayError::NotFound => Kind::NotFound,
            OverlayError::InUse => Kind::Denied,
            OverlayError::ClusterSize(_) | OverlayError::WritePastEnd => Kind::Usage,
            OverlayError::BadMagic
            | OverlayError::HeaderChecksum { .. }
            | OverlayError::ClusterShift(_)
            | OverlayError::IdentityLength
            | OverlayError::Layout
            | OverlayError::Truncated { .. }
            | OverlayError::InvalidCluster(_)
            | OverlayError::InvalidAt(_) => Kind::Corrupt,
            OverlayError::Version(_) => Kind::Unsupported,
            OverlayError::OtherDisk { .. } => Kind::Mismatch,
            OverlayError::ReadOnly => Kind::ReadOnly,
            // The durable state is unknown after a failed sync: an I/O error, reported as EIO.
            OverlayError::CheckpointFailed => Kind::Io,
        }
    }
}

/// What the overlay's map says about one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    Chain = 0,
    Data = 1,
    Zero = 2,
    Invalid = 3,
}

impl ClusterState {
    fn from_bits(b: u8) -> ClusterState {
        match b & 3 {
            0 => ClusterState::Chain,
            1 => ClusterState::Data,
            2 => ClusterState::Zero,
            _ => ClusterState::Invalid,
        }
    }
}

/// A writable overlay attached to one disk.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
    file: File,
    header: OverlayHeader,
    /// Private (copy-on-write) mapping of the map region: changes stay in memory until a checkpoint.
    map: MmapMut,
    writable: bool,
    /// Map pages changed since the last checkpoint.
    dirty: Mutex<std::collections::BTreeSet<u64>>,
    /// Writers hold it shared; a checkpoint holds it exclusively (see the module doc).
    epoch: RwLock<()>,
    stripes: Vec<Mutex<()>>,
    failed: AtomicBool,
}

/// What reading a cluster range needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
    pub state: ClusterState,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::io(what.to_string(), e).in_file(path.display())
}

/// Takes the overlay's lock: exclusive to write, shared to read.
fn lock(file: &File, writable: bool) -> Result<(), OverlayError> {
    let lock = if writable { libc::LOCK_EX } else { libc::LOCK_SH };
    // A vdiskfs that was just unmounted may still be writing its last checkpoint: give it a
    // few seconds before calling the overlay busy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // SAFETY: flock on an owned descriptor.
    while unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() > deadline {
            return Err(OverlayError::InUse);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// Writes the header of a new overlay into the empty `file` and sizes it, durably.
fn create(file: &File, path: &Path, cluster: u64, virtual_size: u64, identity: &str) -> Result<OverlayHeader> {
    if !cluster.is_power_of_two() || !(512..=16 << 20).contains(&cluster) {
        // A command-line mistake, not the file's: no file name.
        return Err(OverlayError::ClusterSize(cluster).into());
    }
    let h = OverlayHeader::new(cluster, virtual_size, identity);
    file.write_all_at(&h.encode(), 0).map_err(|e| io(path, "writing overlay header", e))?;
    // Full apparent size (sparse): every data offset reads, zeros until written.
    file.set_len(h.data_offset + virtual_size).map_err(|e| io(path, "sizing overlay", e))?;
    file.sync_all().map_err(|e| io(path, "syncing new overlay", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(h)
}

impl Overlay {
    /// Creates FILE for a chain, or reattaches it. Refuses an overlay made for another chain.
    pub fn attach(path: &Path, virtual_size: u64, identity: &str, cluster: u64, writable: bool) -> Result<Overlay> {
        let in_file = |e: OverlayError| Error::from(e).in_file(path.display());
        if !writable && !path.exists() {
            return Err(in_file(OverlayError::NotFound));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable)
            .truncate(false)
            .open(path)
            .map_err(|e| io(path, "cannot open overlay", e))?;
        lock(&file, writable).map_err(in_file)?;
        let len = file.metadata().map_err(|e| io(path, "stat", e))?.len();
        let header = if len == 0 {
            create(&file, path, cluster, virtual_size, identity)?
        } else {
            let mut b = vec![0u8; HEADER as usize];
            file.read_exact_at(&mut b, 0).map_err(|e| io(path, "reading overlay header", e))?;
            let h = OverlayHeader::parse(&b, len).map_err(in_file)?;
            if h.identity != identity || h.virtual_size != virtual_size {
                return Err(in_file(OverlayError::OtherDisk {
                    recorded: h.identity,
                    recorded_size: h.virtual_size,
                    chain: identity.to_string(),
                    chain_size: virtual_size,
                }));
            }
            h
        };
        // SAFETY: a private mapping of a file we hold a lock on; changes never reach the file
        // through the mapping (they are written explicitly at checkpoints).
        let map =
            unsafe { MmapOptions::new().offset(header.map_offset).len(header.map_bytes as usize).map_copy(&file) }
                .map_err(|e| io(path, "mapping overlay map", e))?;
        let ov = Overlay {
            path: path.to_path_buf(),
            file,
            header,
            map,
            writable,
            dirty: Mutex::new(Default::default()),
            epoch: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            failed: AtomicBool::new(false),
        };
        Ok(ov)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn header(&self) -> &OverlayHeader {
        &self.header
    }
    pub fn cluster(&self) -> u64 {
        self.header.cluster
    }
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn atoms(&self) -> &[AtomicU8] {
        // SAFETY: AtomicU8 has the layout of u8; the mapping lives as long as `self`, and all
        // concurrent access to it goes through these atomics.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const AtomicU8, self.map.len()) }
    }

    /// The state of cluster `c`.
    pub fn state(&self, c: u64) -> ClusterState {
        let byte = self.atoms()[(c / 4) as usize].load(Ordering::Acquire);
        ClusterState::from_bits(byte >> (2 * (c % 4)))
    }

    fn set_state(&self, c: u64, s: ClusterState) {
        let shift = 2 * (c % 4);
        let a = &self.atoms()[(c / 4) as usize];
        let _ =
            a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| Some((b & !(3 << shift)) | ((s as u8) << shift)));
        self.dirty.lock().insert(c / 4 / PAGE);
    }

    /// Splits `[offset, offset + len)` into runs of equal cluster state.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<Run> {
        let cl = self.header.cluster;
        let end = offset + len;
        let mut out: Vec<Run> = Vec::new();
        let mut pos = offset;
        let atoms = self.atoms();
        while pos < end {
            let c = pos / cl;
            // Four untouched clusters in one byte: skip them together.
            let state = if c.is_multiple_of(4) && atoms[(c / 4) as usize].load(Ordering::Acquire) == 0 {
                let next = ((c + 4) * cl).min(end);
                push_run(&mut out, pos, next - pos, ClusterState::Chain);
                pos = next;
                continue;
            } else {
                self.state(c)
            };
            let next = ((c + 1) * cl).min(end);
            push_run(&mut out, pos, next - pos, state);
            pos = next;
        }
        out
    }

    /// Reads overlay data (state `Data`) at virtual `offset`.
    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, self.header.data_offset + offset)
            .map_err(|e| io(&self.path, &format!("reading overlay data at virtual {offset:#x}"), e))
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::from(OverlayError::ReadOnly).in_file(self.path.display()));
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::from(OverlayError::CheckpointFailed).in_file(self.path.display()));
        }
        Ok(())
    }

    /// Locks the stripes of clusters `first..=last` in a fixed order.
    fn lock_clusters(&self, first: u64, last: u64) -> Vec<parking_lot::MutexGuard<'_, ()>> {
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
                // A punched cluster reads zeros from the file: a partial write needs no fill.
                ClusterState::Zero => {
                    self.put(pos, piece)?;
                    self.set_state(c, ClusterState::Data);
                }
                ClusterState::Chain if whole => {
                    self.put(pos, piece)?;
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

    fn put(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, self.header.data_offset + offset)
            .map_err(|e| io(&self.path, &format!("writing overlay data at virtual {offset:#x}"), e))
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
        let mut c = first;
        while c <= last {
            let upto = (c + STRIPES as u64 - 1).min(last);
            let _locks = self.lock_clusters(c, upto);
            for k in c..=upto {
                if self.state(k) != ClusterState::Zero {
                    self.set_state(k, ClusterState::Zero);
                }
            }
            c = upto + 1;
        }
        let at = self.header.data_offset + first_whole;
        let n = last_whole - first_whole;
        // SAFETY: fallocate on an owned descriptor.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as libc::off_t,
                n as libc::off_t,
            )
        };
        if r != 0 {
            // The map already says zeros; without a hole the stale bytes would only waste space,
            // but a later partial write relies on the hole reading zeros: write them.
            let e = std::io::Error::last_os_error();
            log::warn!("{}: punching a hole failed ({e}); writing zeros instead", self.path.display());
            let zeros = vec![0u8; (cl as usize).min(n as usize)];
            let mut p = first_whole;
            while p < last_whole {
                let k = (last_whole - p).min(zeros.len() as u64) as usize;
                self.put(p, &zeros[..k])?;
                p += k as u64;
            }
        }
        Ok(())
    }

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
                    .write_all_at(&self.map[s..e], self.header.map_offset + s as u64)
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

    /// True when map changes wait for a checkpoint.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.lock().is_empty()
    }

    /// Bytes of data the overlay holds (clusters in state Data).
    pub fn data_bytes(&self) -> u64 {
        let cl = self.header.cluster;
        let clusters = self.header.virtual_size.div_ceil(cl);
        (0..clusters).filter(|&c| self.state(c) == ClusterState::Data).count() as u64 * cl
    }
}

fn push_run(out: &mut Vec<Run>, start: u64, len: u64, state: ClusterState) {
    if let Some(last) = out.last_mut()
        && last.state == state
        && last.start + last.len == start
    {
        last.len += len;
        return;
    }
    out.push(Run { start, len, state });
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.writable && self.is_dirty() {
            let _ = self.checkpoint();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_pattern(off: u64, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((off + i as u64) % 251) as u8;
        }
        Ok(())
    }

    fn read(ov: &Overlay, off: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        for r in ov.runs(off, len) {
            let b = &mut out[(r.start - off) as usize..(r.start - off + r.len) as usize];
            match r.state {
                ClusterState::Chain => fill_pattern(r.start, b).unwrap(),
                ClusterState::Data => ov.read_data(r.start, b).unwrap(),
                ClusterState::Zero => b.fill(0),
                ClusterState::Invalid => panic!("invalid"),
            }
        }
        out
    }

    #[test]
    fn small_writes_merge_with_the_chain_and_survive_reattach() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("o.ovl");
        let size = 1 << 20;
        let mut model = vec![0u8; size as usize];
        fill_pattern(0, &mut model).unwrap();
        {
            let ov = Overlay::attach(&p, size, "id", 4096, true).unwrap();
            ov.write(1000, &[7u8; 512], &fill_pattern).unwrap();
            model[1000..1512].fill(7);
            ov.discard(8192, 3 * 4096 + 100, &fill_pattern).unwrap();
            model[8192..8192 + 3 * 4096 + 100].fill(0);
            ov.write(8192 + 4096 + 10, &[9u8; 20], &fill_pattern).unwrap();
            model[8192 + 4096 + 10..8192 + 4096 + 30].fill(9);
            assert_eq!(read(&ov, 0, size), model);
            ov.checkpoint().unwrap();
        }
        let ov = Overlay::attach(&p, size, "id", 4096, true).unwrap();
        assert_eq!(read(&ov, 0, size), model);
        assert!(Overlay::attach(&t.path().join("o2"), size, "id", 4096, true).is_ok());
        drop(ov);
        let e = Overlay::attach(&p, size, "other", 4096, true).unwrap_err();
        assert!(e.to_string().contains("different disk"), "{e}");
    }

    #[test]
    fn unsynced_map_changes_are_not_in_the_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("o.ovl");
        let ov = Overlay::attach(&p, 1 << 20, "id", 4096, true).unwrap();
        ov.write(0, &[1u8; 4096], &fill_pattern).unwrap();
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(on_disk[HEADER as usize], 0, "the map reaches the file only at a checkpoint");
        ov.checkpoint().unwrap();
        assert_eq!(std::fs::read(&p).unwrap()[HEADER as usize], 1);
        std::mem::forget(ov); // simulate a crash: no drop-time checkpoint
    }
}
