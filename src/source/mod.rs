//! Sources: positional, thread-safe reads of one file.
//!
//! A [`Source`] is what a format reads from: a local file or block device, or a file on an ssh
//! host or a web server ([`remote`]). It has no seek cursor (every read names its offset), it is never mmap'd
//! (a file truncated underneath would SIGBUS the whole mount), and it is always opened read-only.
//! [`Location`] names a source in a way that lets a format resolve *relative* names (a parent, an
//! extent) against it, so that a relative path on a remote host becomes another URL on that host.

pub mod faulty;
mod http_url;
mod local;
mod location;
mod mem;
pub mod remote;

use std::fmt;
use std::io;

pub use http_url::{HttpOrigin, HttpUrl};
pub use local::{FileTypes, LocalSource, Pinned};
pub use location::{Location, SshHost, SshPath, UrlError, normalize, normalize_remote};
pub use mem::MemSource;

use crate::error::{ErrorKind, Kind, Result};

/// What can go wrong reading a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("truncated: needs {need} bytes at {at:#x} but the file ends at {end:#x}")]
    Truncated { need: usize, at: u64, end: u64 },
    #[error("read of {len} bytes at {at:#x} failed")]
    Read {
        len: usize,
        at: u64,
        #[source]
        source: io::Error,
    },
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("is a directory, not an image")]
    Directory,
    #[error("is a {0}, not a regular file or block device: refused (opening it could block or act)")]
    Special(&'static str),
    #[error(
        "is a block device: a file named inside an image may be one only when the chain's top is a block device, or with --allow-devices"
    )]
    DeviceNotAllowed,
}

impl ErrorKind for SourceError {
    fn kind(&self) -> Kind {
        match self {
            SourceError::Truncated { .. } => Kind::Corrupt,
            SourceError::Read { source, .. } | SourceError::Os { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => Kind::NotFound,
                io::ErrorKind::PermissionDenied => Kind::Denied,
                _ => Kind::Io,
            },
            SourceError::Directory => Kind::Usage,
            // Refused by the type rule, like a block device where none may be: not a mistake
            // on the command line when an image named it (exit 1, EACCES).
            SourceError::Special(_) | SourceError::DeviceNotAllowed => Kind::Denied,
        }
    }
}

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
    /// What a remote source fetched and served from its cache (`None` for a local one).
    fn remote_stats(&self) -> Option<remote::RemoteStats> {
        None
    }
    /// Told the identity of the layer read from this source once it is known, so a cache of
    /// its bytes can tell a different version apart.
    fn note_identity(&self, _identity: &str) -> Result<()> {
        Ok(())
    }

    /// Fills `buf` from `offset`. Running into the end of the file is corruption: the structure
    /// that pointed there promised more bytes than the file holds.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                let end = self.len().unwrap_or(0);
                return Err(crate::Error::from(SourceError::Truncated { need: buf.len(), at: offset, end })
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
