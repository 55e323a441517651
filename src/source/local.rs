//! Local files and block devices, opened read-only, checked before anything is read.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

/// A file named by path, held by an `O_PATH` descriptor: it names the inode without opening
/// it, so no driver's `open` runs (a `/dev/watchdog` is not armed) and a FIFO cannot block.
/// The caller checks [`Pinned::metadata`] (taken from that descriptor), then [`Pinned::open`]
/// opens that very inode: whatever is renamed over the path in between is never opened.
#[derive(Debug)]
pub struct Pinned {
    fd: std::os::fd::OwnedFd,
    md: std::fs::Metadata,
    path: PathBuf,
}

impl Pinned {
    /// Pins what `path` names now (following symlinks, as `stat` does).
    pub fn new(path: &Path) -> std::io::Result<Pinned> {
        let f = OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_CLOEXEC).open(path)?;
        let md = f.metadata()?;
        Ok(Pinned { fd: f.into(), md, path: path.to_path_buf() })
    }

    /// The pinned inode's metadata (`fstat` of the `O_PATH` descriptor).
    pub fn metadata(&self) -> &std::fs::Metadata {
        &self.md
    }

    /// Opens the pinned inode with `opts` (never creating: it exists) through `/proc/self/fd`,
    /// with the access checks of an open by name. Where `/proc` is not mounted it opens the name
    /// again instead (and so has the race of an open by name); either way the opened file must
    /// be the pinned inode, or the open fails.
    pub fn open(&self, opts: &OpenOptions) -> std::io::Result<File> {
        let f = match opts.open(format!("/proc/self/fd/{}", self.fd.as_raw_fd())) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => opts.open(&self.path)?,
            r => r?,
        };
        let md = f.metadata()?;
        if md.dev() != self.md.dev() || md.ino() != self.md.ino() {
            return Err(std::io::Error::other("changed while being opened (another file was put at its name)"));
        }
        Ok(f)
    }
}

impl LocalSource {
    /// Opens `path` read-only after checking its type on a descriptor that does not open it
    /// ([`Pinned`]: a character device is never opened, a FIFO never blocks), then opens that
    /// same inode `O_NONBLOCK` (belt and braces) and clears the flag.
    pub fn open(path: &Path, accept: FileTypes) -> Result<Self> {
        let loc = Location::local(path);
        let fail = |e: SourceError| Error::from(e).in_file(&loc);
        let pinned = Pinned::new(path).map_err(|e| fail(SourceError::Os { what: "cannot open", source: e }))?;
        check_type(&pinned.metadata().file_type(), accept).map_err(fail)?;
        let flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
        // O_NOATIME keeps even the access time of a source untouched where we are allowed to.
        let file = pinned
            .open(OpenOptions::new().read(true).custom_flags(flags | libc::O_NOATIME))
            .or_else(|_| pinned.open(OpenOptions::new().read(true).custom_flags(flags)))
            .map_err(|e| fail(SourceError::Os { what: "cannot open", source: e }))?;
        let md = file.metadata().map_err(|e| fail(SourceError::Os { what: "cannot stat", source: e }))?;
        let ft = md.file_type();
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
    fn a_pinned_name_opens_the_inode_checked_not_what_is_put_at_the_name_later() {
        use std::io::Read;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("parent.vhd");
        std::fs::write(&p, b"checked").unwrap();
        let pinned = Pinned::new(&p).unwrap();
        assert!(pinned.metadata().is_file());
        // Between the check and the open, a FIFO is renamed over the name: opening the name
        // would block (or open a device); the pinned inode is opened instead, at once.
        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo at a path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::rename(&fifo, &p).unwrap();
        let mut f = pinned.open(std::fs::OpenOptions::new().read(true)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "checked");
        // A FIFO pinned by name is held without opening it (no reader or writer is needed).
        let fifo_pinned = Pinned::new(&p).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo_pinned.metadata().file_type()));
    }

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
