//! The overlay's own file, as the overlay uses it, and how that file is opened.
//!
//! [`OverlayFile`] is all the overlay asks of its file: positional reads and writes, syncs,
//! holes, and a private mapping of the map region. A plain [`File`] implements it; tests wrap
//! one to record every write and sync (and so build the states a power loss can leave) or to
//! fail a sync the way a dying disk does.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use memmap2::{MmapMut, MmapOptions};

/// What the overlay does to its file. Every method is positional and thread-safe.
pub trait OverlayFile: Send + Sync + fmt::Debug {
    /// Fills `buf` from `offset` (a short file is an error).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: every write so far is durable, or an error says that some may not be.
    fn sync_data(&self) -> io::Result<()>;
    /// Deallocates `[offset, offset + len)`; it reads as zeros afterwards. The size stays.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserves space for `[offset, offset + len)` (contents and size unchanged), so that later
    /// writes there cannot fail for lack of space.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes still free for this file on its file system.
    fn available(&self) -> io::Result<u64>;
    /// A private (copy-on-write) mapping of `[offset, offset + len)`: changes made through it
    /// stay in memory and never reach the file.
    fn map_private(&self, offset: u64, len: usize) -> io::Result<MmapMut>;
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate on an owned descriptor.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, off, n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl OverlayFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self, libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }
    fn available(&self) -> io::Result<u64> {
        // SAFETY: fstatvfs into a zeroed local struct.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(self.as_raw_fd(), &mut s) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }
    fn map_private(&self, offset: u64, len: usize) -> io::Result<MmapMut> {
        // SAFETY: a private mapping of a file the overlay holds a lock on; changes never reach
        // the file through it (they are written explicitly at checkpoints).
        unsafe { MmapOptions::new().offset(offset).len(len).map_copy(self) }
    }
}

/// Lets a test keep a handle on its wrapper while the overlay owns it.
impl<T: OverlayFile + ?Sized> OverlayFile for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(offset, len)
    }
    fn available(&self) -> io::Result<u64> {
        (**self).available()
    }
    fn map_private(&self, offset: u64, len: usize) -> io::Result<MmapMut> {
        (**self).map_private(offset, len)
    }
}
