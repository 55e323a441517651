//! The target of an export or a sync: a regular file or a block device, checked before anything
//! is written to it, and the few operations the copy needs (positional writes, zeroing a range,
//! making everything durable).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::ExportError;
use crate::error::{Error, Result};
use crate::holders::loop_devices;
use crate::source::Pinned;

/// Whether a missing target may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Create a new sparse file of the disk's size (export).
    IfMissing,
    /// The target must exist (sync: it already holds an earlier state of the disk).
    Never,
}

/// An opened, checked target.
#[derive(Debug)]
pub struct Target {
    file: File,
    path: PathBuf,
    block_device: bool,
    created: bool,
    len: u64,
}

fn err(target: &Path, e: ExportError) -> Error {
    Error::from(e).in_file(target.display())
}

/// Loop devices whose backing file is `path`.
fn loop_devices_backed_by(path: &Path) -> Vec<String> {
    let Ok(canon) = std::fs::canonicalize(path) else { return Vec::new() };
    loop_devices().into_iter().filter(|(_, b)| *b == canon).map(|(d, _)| d).collect()
}

/// The file behind the loop device `rdev` (whatever node names it), if it is one: the kernel's
/// record in sysfs, found by major:minor so a `mknod`-made node is recognised too.
fn loop_backing_file(rdev: u64) -> Option<PathBuf> {
    let (major, minor) = (libc::major(rdev as libc::dev_t), libc::minor(rdev as libc::dev_t));
    let bf = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file")).ok()?;
    Some(PathBuf::from(bf.trim_end_matches('\n')))
}

/// The source `target` would overwrite, if any: the same file (device and inode), the same
/// block device under another name (the device number it names), or a loop device whose
/// backing file is a source. `sources` are every file a layer reads, and the overlay.
fn source_it_names(md: &std::fs::Metadata, sources: &[PathBuf]) -> Option<ExportError> {
    let block = md.file_type().is_block_device();
    let backing = if block { loop_backing_file(md.rdev()) } else { None };
    let backing_md = backing.as_deref().and_then(|b| std::fs::metadata(b).ok());
    for s in sources {
        let Ok(smd) = std::fs::metadata(s) else { continue };
        let same_file = smd.dev() == md.dev() && smd.ino() == md.ino();
        let same_device = block && smd.file_type().is_block_device() && smd.rdev() == md.rdev();
        if same_file || same_device {
            return Some(ExportError::IsSource(s.display().to_string()));
        }
        if let (Some(b), Some(bmd)) = (&backing, &backing_md)
            && bmd.dev() == smd.dev()
            && bmd.ino() == smd.ino()
        {
            return Some(ExportError::LoopOfSource {
                backing: b.display().to_string(),
                image: s.display().to_string(),
            });
        }
    }
    None
}

impl Target {
    /// Opens `path` for a disk of `size` bytes. Refuses anything but a regular file or a block
    /// device, one of `sources` (by file, by device number, or as a loop device backed by one), a
    /// file attached to a loop device, a block device that is mounted or held (`O_EXCL`), and a
    /// target smaller than the disk.
    pub fn open(path: &Path, size: u64, sources: &[PathBuf], create: Create) -> Result<Target> {
        // Checked on a descriptor that does not open the target, then that same inode is opened:
        // nothing put at the name in between (a character device, a source) is ever opened.
        match Pinned::new(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create == Create::IfMissing => {
                let file = OpenOptions::new()
                    .write(true)
                    .read(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| Error::io("cannot create target", e).in_file(path.display()))?;
                file.set_len(size).map_err(|e| Error::io("cannot size target", e).in_file(path.display()))?;
                Ok(Target { file, path: path.to_path_buf(), block_device: false, created: true, len: size })
            }
            Err(e) => Err(Error::io("cannot stat target", e).in_file(path.display())),
            Ok(pinned) => Self::open_existing(path, &pinned, size, sources),
        }
    }

    fn open_existing(path: &Path, pinned: &Pinned, size: u64, sources: &[PathBuf]) -> Result<Target> {
        let md = pinned.metadata();
        let ft = md.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(err(path, ExportError::NotFileOrDevice));
        }
        if let Some(e) = source_it_names(md, sources) {
            return Err(err(path, e));
        }
        if ft.is_file() {
            let loops = loop_devices_backed_by(path);
            if !loops.is_empty() {
                return Err(err(path, ExportError::LoopAttached(loops.join(", "))));
            }
        }
        // O_EXCL on a block device is an exclusive open: it fails if the device is mounted,
        // holds a mounted partition, or is claimed by device-mapper or md.
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if ft.is_block_device() {
            oo.custom_flags(libc::O_EXCL);
        }
        let file = pinned.open(&oo).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                err(path, ExportError::InUse)
            } else {
                Error::io("cannot open target", e).in_file(path.display())
            }
        })?;
        let len = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("cannot find the target's size", e).in_file(path.display()))?;
        if len < size {
            return Err(err(path, ExportError::TooSmall { len, size }));
        }
        Ok(Target { file, path: path.to_path_buf(), block_device: ft.is_block_device(), created: false, len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
    /// True when this open created the file (it reads as zeros).
    pub fn created(&self) -> bool {
        self.created
    }
    /// Size in bytes (a block device's size, a file's length).
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Makes `[off, off + len)` read as zeros: `BLKZEROOUT` on a block device,
    /// `FALLOC_FL_ZERO_RANGE` (then `PUNCH_HOLE`) on a file, writing zeros where neither works.
    pub fn zero_range(&self, off: u64, len: u64) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        let done = if self.block_device {
            let range: [u64; 2] = [off, len];
            // BLKZEROOUT = _IO(0x12, 127)
            // SAFETY: ioctl with a pointer to two u64, as BLKZEROOUT expects.
            unsafe { libc::ioctl(fd, 0x127f, range.as_ptr()) == 0 }
        } else {
            let (o, l) = (off as i64, len as i64);
            // SAFETY: fallocate on an owned descriptor.
            unsafe {
                libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, o, l) == 0
                    || libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, o, l) == 0
            }
        };
        if done {
            return Ok(());
        }
        const Z: usize = 4 << 20;
        let zeros = vec![0u8; Z];
        let mut p = off;
        while p < off + len {
            let n = (off + len - p).min(Z as u64) as usize;
            self.file.write_all_at(&zeros[..n], p)?;
            p += n as u64;
        }
        Ok(())
    }

    /// Makes every write durable: `fsync`, which for a block device also writes back the
    /// device's page cache and flushes its volatile write cache.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io("syncing target", e).in_file(self.path.display()))
    }
}
