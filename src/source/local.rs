//! Local files and block devices, opened read-only, checked before anything is read.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::{FileId, Location, Source, SourceError};
use crate::error::{Error, Result};

/// Which kinds of file an open accepts. Regular files always; anything that could block or act
/// when opened (FIFOs, sockets, character devices such as `/dev/watchdog`) never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileTypes {
    RegularOnly,
    RegularOrBlockDevice,
}

/// A local regular file or block device. The size is taken once at open, by seeking to the end,
/// which is right for block devices (`metadata().len()` is 0 for them).
#[derive(Debug)]
pub struct LocalSource {
    file: File,
    loc: Location,
    len: u64,
    id: FileId,
    block_device: bool,
}

fn kind_name(ft: &std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

impl LocalSource {
    /// Opens `path` read-only after checking its type without blocking: `stat` first (so a
    /// character device is never opened at all), then an `O_NONBLOCK` open (so a FIFO swapped in
    /// meanwhile cannot hang us), `fstat` to confirm it is the same object, and only then the
    /// flag is cleared.
    pub fn open(path: &Path, accept: FileTypes) -> Result<Self> {
        let loc = Location::local(path);
        let fail = |e: SourceError| Error::from(e).in_file(&loc);
        let before = std::fs::metadata(path).map_err(|e| fail(SourceError::Os { what: "cannot open", source: e }))?;
        check_type(&before.file_type(), accept).map_err(fail)?;
        let flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
        // O_NOATIME keeps even the access time of a source untouched where we are allowed to.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_NOATIME)
            .open(path)
            .or_else(|_| OpenOptions::new().read(true).custom_flags(flags).open(path))
            .map_err(|e| fail(SourceError::Os { what: "cannot open", source: e }))?;
        let md = file.metadata().map_err(|e| fail(SourceError::Os { what: "cannot stat", source: e }))?;
        let ft = md.file_type();
        check_type(&ft, accept).map_err(fail)?;
        if md.dev() != before.dev() || md.ino() != before.ino() {
            return Err(fail(SourceError::Os {
                what: "changed while being opened",
                source: std::io::Error::from_raw_os_error(libc::ESTALE),
            }));
        }
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        let len = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| fail(SourceError::Os { what: "cannot find the size", source: e }))?;
        let block_device = ft.is_block_device();
        let dev = if block_device { md.rdev() } else { md.dev() };
        let id = FileId {
            dev,
            ino: if block_device { 0 } else { md.ino() },
            size: len,
            mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        };
        Ok(LocalSource { file, loc, len, id, block_device })
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

fn check_type(ft: &std::fs::FileType, accept: FileTypes) -> std::result::Result<(), SourceError> {
    if ft.is_dir() {
        return Err(SourceError::Directory);
    }
    if ft.is_file() || (ft.is_block_device() && accept == FileTypes::RegularOrBlockDevice) {
        return Ok(());
    }
    if ft.is_block_device() {
        return Err(SourceError::DeviceNotAllowed);
    }
    Err(SourceError::Special(kind_name(ft)))
}

impl Source for LocalSource {
    fn location(&self) -> &Location {
        &self.loc
    }
    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(
                        Error::from(SourceError::Read { len: buf.len(), at: offset, source: e }).in_file(&self.loc)
                    );
                }
            }
        }
    }
    fn id(&self) -> Option<FileId> {
        Some(self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_char_devices_are_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("parent.vhd");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path in our temp dir.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = LocalSource::open(&fifo, FileTypes::RegularOrBlockDevice).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let e = LocalSource::open(Path::new("/dev/null"), FileTypes::RegularOrBlockDevice).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = LocalSource::open(t.path(), FileTypes::RegularOnly).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }
}
