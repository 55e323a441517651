//! Local files and block devices, opened read-only.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::{FileId, Location, Source};
use crate::error::{Error, Result};

/// A local regular file or block device. The size is taken once at open, by seeking to the end,
/// which is right for block devices (`metadata().len()` is 0 for them).
#[derive(Debug)]
pub struct LocalSource {
    file: File,
    loc: Location,
    len: u64,
    id: FileId,
}

impl LocalSource {
    pub fn open(path: &Path) -> Result<Self> {
        let loc = Location::local(path);
        // O_NOATIME keeps even the access time of a source untouched where we are allowed to.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(path)
            .or_else(|_| OpenOptions::new().read(true).open(path))
            .map_err(|e| Error::io("cannot open", e).in_file(&loc))?;
        let md = file.metadata().map_err(|e| Error::io("cannot stat", e).in_file(&loc))?;
        let ft = md.file_type();
        if ft.is_dir() {
            return Err(Error::usage("is a directory, not an image").in_file(&loc));
        }
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::usage("is neither a regular file nor a block device").in_file(&loc));
        }
        let len = (&file).seek(SeekFrom::End(0)).map_err(|e| Error::io("cannot find the size", e).in_file(&loc))?;
        let dev = if ft.is_block_device() { md.rdev() } else { md.dev() };
        let id = FileId {
            dev,
            ino: md.ino(),
            size: len,
            mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        };
        Ok(LocalSource { file, loc, len, id })
    }
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
                        Error::io(format!("read of {} bytes at {offset:#x} failed", buf.len()), e).in_file(&self.loc)
                    );
                }
            }
        }
    }
    fn id(&self) -> Option<FileId> {
        Some(self.id)
    }
}
