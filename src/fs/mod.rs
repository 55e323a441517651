//! The filesystem as plain Rust: one directory holding one raw file per disk.
//! Everything here returns `Result` and is testable without /dev/fuse; `fuse.rs` adapts it.

pub mod background;
pub mod fuse;

use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use crate::disk::Disk;
use crate::error::{ErrorKind, Kind, Result};

pub const ROOT: u64 = 1;
const FIRST_DISK: u64 = 2;

/// What the filesystem refuses. Each variant's kind gives the errno FUSE replies with.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no inode {0}")]
    NoInode(u64),
    #[error("no disk named {0:?}")]
    NoDisk(OsString),
    /// A lookup in a disk (ENOENT: disks hold no names).
    #[error("not a directory")]
    LookupInFile,
    /// A readdir of a disk (EINVAL).
    #[error("not a directory")]
    ReaddirOfFile,
    /// `truncate` to another size (EACCES).
    #[error("the size of a disk is fixed")]
    Resize,
    /// `fallocate` past the end without KEEP_SIZE (EINVAL).
    #[error("the disk size is fixed")]
    Extend,
    #[error("range overflows")]
    RangeOverflows,
    #[error("fallocate mode {0:#x} is not supported")]
    FallocateMode(i32),
}

impl ErrorKind for FsError {
    fn kind(&self) -> Kind {
        match self {
            FsError::NoInode(_) | FsError::NoDisk(_) | FsError::LookupInFile => Kind::NotFound,
            FsError::ReaddirOfFile | FsError::Extend | FsError::RangeOverflows => Kind::Usage,
            FsError::Resize => Kind::Denied,
            FsError::FallocateMode(_) => Kind::Unsupported,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
}

/// Attributes of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    /// Allocated bytes (reported as 512-byte blocks).
    pub allocated: u64,
    pub perm: u16,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
}

/// `lseek` whence values the filesystem answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whence {
    Data,
    Hole,
}

/// Filesystem-wide statistics.
#[derive(Debug, Clone, Copy)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub bsize: u32,
}

/// The filesystem: a root directory of disks.
#[derive(Debug)]
pub struct VdiskFs {
    disks: Vec<Disk>,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    /// Writable disks are writable by everyone (mode 0666), not only by their owner.
    others_write: bool,
}

impl VdiskFs {
    pub fn new(disks: Vec<Disk>) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        VdiskFs { disks, uid, gid, mtime: SystemTime::now(), others_write: false }
    }

    /// Lets every user write the writable disks (the kernel enforces the modes: see
    /// `default_permissions` at mount).
    pub fn others_write(mut self, yes: bool) -> Self {
        self.others_write = yes;
        self
    }

    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    fn disk(&self, ino: u64) -> Result<&Disk> {
        ino.checked_sub(FIRST_DISK).and_then(|i| self.disks.get(i as usize)).ok_or_else(|| FsError::NoInode(ino).into())
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        if ino == ROOT {
            return Ok(Attr {
                ino,
                kind: NodeKind::Dir,
                size: 0,
                allocated: 0,
                perm: 0o555,
                mtime: self.mtime,
                uid: self.uid,
                gid: self.gid,
            });
        }
        let d = self.disk(ino)?;
        Ok(Attr {
            ino,
            kind: NodeKind::File,
            size: d.size(),
            allocated: d.allocated(),
            perm: match (d.writable(), self.others_write) {
                (true, true) => 0o666,
                (true, false) => 0o644,
                (false, _) => 0o444,
            },
            mtime: d.mtime(),
            uid: self.uid,
            gid: self.gid,
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        if parent != ROOT {
            return Err(FsError::LookupInFile.into());
        }
        let i = self
            .disks
            .iter()
            .position(|d| OsStr::new(d.name()) == name)
            .ok_or_else(|| FsError::NoDisk(name.to_os_string()))?;
        self.getattr(FIRST_DISK + i as u64)
    }

    /// `truncate`/`setattr` of the size: only the current size is accepted (a disk has a fixed size).
    pub fn setattr_size(&self, ino: u64, size: u64) -> Result<Attr> {
        let a = self.getattr(ino)?;
        if a.kind == NodeKind::File && size != a.size {
            return Err(FsError::Resize.into());
        }
        Ok(a)
    }

    /// Entries of the root directory (after `.` and `..`).
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, NodeKind, String)>> {
        if ino != ROOT {
            return Err(FsError::ReaddirOfFile.into());
        }
        let mut v = vec![(ROOT, NodeKind::Dir, ".".to_string()), (ROOT, NodeKind::Dir, "..".to_string())];
        v.extend(
            self.disks.iter().enumerate().map(|(i, d)| (FIRST_DISK + i as u64, NodeKind::File, d.name().to_string())),
        );
        Ok(v)
    }

    /// Checks an open: writing needs a writable disk.
    pub fn open(&self, ino: u64, write: bool) -> Result<()> {
        let d = self.disk(ino)?;
        if write && !d.writable() {
            return d.write(0, &[]).map(|_| ());
        }
        Ok(())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.disk(ino)?.read(offset, size as usize)
    }

    /// [`VdiskFs::read`] into a reusable buffer.
    pub fn read_into(&self, ino: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> Result<()> {
        self.disk(ino)?.read_into(offset, size as usize, buf)
    }

    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        self.disk(ino)?.write(offset, data)
    }

    /// fsync / fdatasync / flush: every acknowledged write becomes durable.
    pub fn fsync(&self, ino: u64) -> Result<()> {
        if ino == ROOT {
            return Ok(());
        }
        self.disk(ino)?.flush()
    }

    /// Checkpoints every overlay (unmount, periodic background flush).
    pub fn flush_all(&self) -> Result<()> {
        for d in &self.disks {
            d.flush()?;
        }
        Ok(())
    }

    /// `fallocate`: PUNCH_HOLE (with KEEP_SIZE) and ZERO_RANGE make the range read as zeros; a
    /// plain allocation reserves the overlay's space for the range (ENOSPC when there is none,
    /// EOPNOTSUPP when its file system cannot); anything that would change the size is refused.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let d = self.disk(ino)?;
        let end = offset.checked_add(len).ok_or(FsError::RangeOverflows)?;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let known = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if mode & !known != 0 || (punch && !keep) {
            return Err(FsError::FallocateMode(mode).into());
        }
        if end > d.size() && !keep {
            return Err(FsError::Extend.into());
        }
        if punch || zero {
            return d.discard(offset, len);
        }
        d.reserve(offset, len)
    }

    /// SEEK_DATA / SEEK_HOLE. `None` means ENXIO (no data at or after `offset`, or past the end).
    pub fn lseek(&self, ino: u64, offset: u64, whence: Whence) -> Result<Option<u64>> {
        let d = self.disk(ino)?;
        match whence {
            Whence::Data => d.seek_data(offset),
            Whence::Hole => d.seek_hole(offset),
        }
    }

    /// The disks' total size, and as free space what the overlays can still take (the least of
    /// them; none when read-only, or when an overlay has failed).
    pub fn statfs(&self) -> Statfs {
        let total: u64 = self.disks.iter().map(|d| d.size()).sum();
        let blocks = total.div_ceil(4096);
        let overlays = self.disks.iter().map(|d| d.overlay().filter(|o| o.writable()).map_or(0, |o| o.available()));
        let bfree = (overlays.min().unwrap_or(0) / 4096).min(blocks);
        Statfs { blocks, bfree, files: self.disks.len() as u64 + 1, bsize: 4096 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_the_errno_fuse_replies_with() {
        let fs = VdiskFs::new(Vec::new());
        let e = fs.getattr(7).unwrap_err();
        assert_eq!((e.errno(), e.to_string().as_str()), (libc::ENOENT, "no inode 7"));
        let e = fs.lookup(ROOT, OsStr::new("a.raw")).unwrap_err();
        assert_eq!((e.errno(), e.to_string().as_str()), (libc::ENOENT, "no disk named \"a.raw\""));
        assert_eq!(fs.lookup(FIRST_DISK, OsStr::new("x")).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(fs.readdir(FIRST_DISK).unwrap_err().errno(), libc::EINVAL);
        assert!(fs.readdir(ROOT).is_ok());
    }
}
