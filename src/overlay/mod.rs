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

use memmap2::MmapMut;
use parking_lot::{Mutex, RwLock};

use crate::error::{Error, ErrorKind, Kind, Result};
use crate::source::Pinned;

mod checkpoint;
mod file;
mod header;
mod write;

pub use self::file::OverlayFile;
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
    #[error("not a vdiskfs overlay (bad magic); refusing to overwrite it")]
    BadMagic,
    /// The path exists and is no regular file (a block device, a FIFO, a directory...).
    #[error("not a vdiskfs overlay: a {0}, not a regular file; refusing to use it")]
    NotAFile(&'static str),
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
    #[error(
        "an earlier write-back or sync of the overlay failed (see the log): writes, fsync and flush fail until it is remounted"
    )]
    Failed,
    /// A read of a range changed since the last good checkpoint of a failed overlay.
    #[error(
        "virtual {0:#x} changed after the overlay's last good checkpoint, and a sync failed since: what the overlay holds there is unknown until it is remounted"
    )]
    Unsettled(u64),
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
            OverlayError::NotAFile(_) => Kind::Mismatch,
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
            OverlayError::Failed | OverlayError::Unsettled(_) => Kind::Io,
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
    file: Box<dyn OverlayFile>,
    header: OverlayHeader,
    /// Private (copy-on-write) mapping of the map region: changes stay in memory until a checkpoint.
    map: MmapMut,
    writable: bool,
    /// Map pages changed since the last checkpoint.
    dirty: Mutex<std::collections::BTreeSet<u64>>,
    /// Writers hold it shared; a checkpoint holds it exclusively (see the module doc).
    epoch: RwLock<()>,
    stripes: Vec<Mutex<()>>,
    /// Clusters changed since the last good checkpoint.
    changed: Mutex<checkpoint::ClusterRanges>,
    /// Held by the one checkpoint running.
    checkpointing: Mutex<()>,
    /// A write-back or sync failed (see `checkpoint.rs`).
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

/// What a path that is no regular file is, for an error.
fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    match () {
        _ if t.is_dir() => "directory",
        _ if t.is_block_device() => "block device",
        _ if t.is_char_device() => "character device",
        _ if t.is_fifo() => "FIFO",
        _ if t.is_socket() => "socket",
        _ => "special file",
    }
}

/// Writes the header of a new overlay into the empty `file` and sizes it, durably.
fn create(file: &File, path: &Path, cluster: u64, virtual_size: u64, identity: &str) -> Result<OverlayHeader> {
    if !cluster.is_power_of_two() || !(512..=16 << 20).contains(&cluster) {
        // A command-line mistake, not the file's: no file name.
        return Err(OverlayError::ClusterSize(cluster).into());
    }
    let h = OverlayHeader::new(cluster, virtual_size, identity);
    file.write_all_at(&h.encode(), 0).map_err(|e| io(path, "writing overlay header", e))?;
    // The map's blocks exist from the start: a checkpoint rewrites them in place, so it never
    // needs space (it still works, and makes the acknowledged writes durable, on a full disk).
    let zeros = vec![0u8; 1 << 20];
    let (mut at, map_end) = (h.map_offset, (h.map_offset + h.map_bytes).next_multiple_of(PAGE));
    while at < map_end {
        let n = (map_end - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at).map_err(|e| io(path, "writing overlay map", e))?;
        at += n as u64;
    }
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
        Self::attach_with(path, virtual_size, identity, cluster, writable, |f| Box::new(f))
    }

    /// [`Overlay::attach`], with the opened (and locked) file wrapped by `wrap` before the
    /// overlay uses it: tests record or fail what the overlay does to its file this way.
    pub fn attach_with(
        path: &Path,
        virtual_size: u64,
        identity: &str,
        cluster: u64,
        writable: bool,
        wrap: impl FnOnce(File) -> Box<dyn OverlayFile>,
    ) -> Result<Overlay> {
        let in_file = |e: OverlayError| Error::from(e).in_file(path.display());
        // The type is checked on a descriptor that does not open the file (opening a FIFO
        // blocks, a device may act on open), and then that same inode is opened; a missing
        // overlay is created new (`O_EXCL`), so nothing put at the name meanwhile is opened.
        let (file, meta) = match Pinned::new(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !writable => {
                return Err(in_file(OverlayError::NotFound));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| io(path, "cannot create overlay", e))?;
                let meta = file.metadata().map_err(|e| io(path, "stat", e))?;
                (file, meta)
            }
            Err(e) => return Err(io(path, "cannot open overlay", e)),
            Ok(p) if !p.metadata().is_file() => return Err(in_file(OverlayError::NotAFile(file_kind(p.metadata())))),
            Ok(p) => {
                let file = p
                    .open(OpenOptions::new().read(true).write(writable))
                    .map_err(|e| io(path, "cannot open overlay", e))?;
                let meta = file.metadata().map_err(|e| io(path, "stat", e))?;
                (file, meta)
            }
        };
        lock(&file, writable).map_err(in_file)?;
        let len = meta.len();
        let header = if len == 0 {
            create(&file, path, cluster, virtual_size, identity)?
        } else {
            if len < HEADER {
                // Some other small file: not ours to overwrite.
                return Err(in_file(OverlayError::BadMagic));
            }
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
        let file = wrap(file);
        let map = file
            .map_private(header.map_offset, header.map_bytes as usize)
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
            changed: Mutex::new(Default::default()),
            checkpointing: Mutex::new(()),
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
        self.check_settled(offset, buf.len() as u64)?;
        self.file
            .read_at(buf, self.header.data_offset + offset)
            .map_err(|e| io(&self.path, &format!("reading overlay data at virtual {offset:#x}"), e))
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::from(OverlayError::ReadOnly).in_file(self.path.display()));
        }
        self.check_not_failed()
    }

    /// Bytes that can still be written to the overlay's file system; 0 when the overlay is
    /// read-only or failed (what `statfs` reports as free).
    pub fn available(&self) -> u64 {
        if !self.writable || self.failed() {
            return 0;
        }
        self.file.available().unwrap_or(0)
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
        if self.writable && self.is_dirty() && !self.failed() {
            let _ = self.checkpoint();
        }
    }
}

#[cfg(test)]
mod tests;
