//! Sources: positional, thread-safe reads of one file.
//!
//! A [`Source`] is what a format reads from: a local file or block device today, an SFTP or HTTP
//! range reader later. It has no seek cursor (every read names its offset), it is never mmap'd
//! (a file truncated underneath would SIGBUS the whole mount), and it is always opened read-only.
//! [`Location`] names a source in a way that lets a format resolve *relative* names (a parent, an
//! extent) against it, so that a relative path on a remote host becomes another URL on that host.

mod local;
mod mem;

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub use local::LocalSource;
pub use mem::MemSource;

use crate::error::{Error, Kind, Result};

/// Positional, thread-safe reads. Short reads only at end of file. No seek cursor.
#[allow(clippy::len_without_is_empty)]
pub trait Source: Send + Sync + fmt::Debug {
    /// Where this source lives; used to name it in messages and to resolve relative names.
    fn location(&self) -> &Location;
    /// Size in bytes (for a block device, the device size).
    fn len(&self) -> Result<u64>;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
    /// Identity of the underlying object, for cycle detection and cache keys.
    fn id(&self) -> Option<FileId> {
        None
    }

    /// Fills `buf` from `offset`. Running into the end of the file is corruption: the structure
    /// that pointed there promised more bytes than the file holds.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                let len = self.len().unwrap_or(0);
                return Err(Error::corrupt(format!(
                    "truncated: needs {} bytes at {:#x} but the file ends at {:#x}",
                    buf.len(),
                    offset,
                    len
                ))
                .in_file(self.location()));
            }
            done += n;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a new buffer (for tables and headers).
    fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_exact_at(&mut v, offset)?;
        Ok(v)
    }
}

/// Identity of an opened file: (device, inode) plus what tells a changed file apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileId {
    /// Same object, whatever its size or mtime.
    pub fn same_object(&self, other: &FileId) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// Where a source lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local file or block device.
    Local(PathBuf),
}

impl Location {
    pub fn local(p: impl Into<PathBuf>) -> Self {
        Location::Local(p.into())
    }

    /// The local path, if this is a local location.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
        }
    }

    /// The directory holding this source.
    pub fn dir(&self) -> Location {
        match self {
            Location::Local(p) => Location::Local(match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            }),
        }
    }

    /// The last path component, as text.
    pub fn file_name(&self) -> String {
        match self {
            Location::Local(p) => p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }

    /// `self` (a directory) joined with a relative `/`-separated path, normalised lexically
    /// (`.` dropped, `..` pops). `None` when the path climbs above `self`'s root.
    pub fn join(&self, rel: &str) -> Option<Location> {
        match self {
            Location::Local(dir) => normalize(&dir.join(rel)).map(Location::Local),
        }
    }

    /// True when `self` lies inside directory `root` (both lexically normalised).
    pub fn is_within(&self, root: &Location) -> bool {
        match (self, root) {
            (Location::Local(p), Location::Local(r)) => match (normalize(p), normalize(r)) {
                (Some(p), Some(r)) => p.starts_with(r),
                _ => false,
            },
        }
    }

    /// True when something exists at this location.
    pub fn exists(&self) -> bool {
        match self {
            Location::Local(p) => p.exists(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Lexical normalisation: makes the path absolute against the current directory, drops `.`,
/// resolves `..` without touching the filesystem. `None` if `..` climbs above `/`.
/// Symlinks are deliberately not resolved: a symlink placed by the operator is the operator's
/// choice; a locator string written inside an image is not trusted to climb out.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().ok()?.join(p) };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(s) => out.push(s),
        }
    }
    Some(out)
}

/// Opens the source at `loc`, read-only.
pub fn open(loc: &Location) -> Result<Arc<dyn Source>> {
    match loc {
        Location::Local(p) => Ok(Arc::new(LocalSource::open(p)?)),
    }
}

/// Error for a location that does not exist.
pub fn missing(loc: &Location, what: &str) -> Error {
    Error::new(Kind::NotFound, format!("{what} not found")).in_file(loc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_normalises_and_refuses_climbing_above_root() {
        let d = Location::local("/srv/images");
        assert_eq!(d.join("./base.vhd"), Some(Location::local("/srv/images/base.vhd")));
        assert_eq!(d.join("../other/base.vhd"), Some(Location::local("/srv/other/base.vhd")));
        assert_eq!(d.join("../../../../etc/shadow"), None);
    }

    #[test]
    fn is_within_is_lexical() {
        let root = Location::local("/srv/images");
        assert!(Location::local("/srv/images/a/../b.vhd").is_within(&root));
        assert!(!Location::local("/srv/images/../etc/shadow").is_within(&root));
        assert!(!Location::local("/srv/images2/x").is_within(&root));
    }
}
