//! The crate-wide error: a stable [`Kind`], the file it concerns, and a message a user can act on.
//!
//! Format modules keep their own `thiserror` enums (what exactly failed, with offsets) and convert
//! into this type at their boundary. The FUSE adapter turns it into an errno with [`Error::errno`];
//! the CLI prints it as one line, `vdiskfs: <file>: <what is wrong>`.

use std::fmt;
use std::io;

/// What kind of failure this is. Stable: scripts and the FUSE adapter depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The operating system refused or failed an I/O call.
    Io,
    /// The image's structures are inconsistent (bad checksum, wild table entry, truncation).
    Corrupt,
    /// A valid image using a feature vdiskfs does not implement.
    Unsupported,
    /// A file (image, extent, parent) could not be found.
    NotFound,
    /// A path was refused by the confinement rules, or permission was denied.
    Denied,
    /// A write was attempted on a read-only disk.
    ReadOnly,
    /// A parent does not carry the identity its child expects.
    Mismatch,
    /// The source changed under us.
    Stale,
    /// A passing failure (network); a retry may succeed.
    Transient,
    /// The command line is wrong.
    Usage,
}

/// The crate's error type.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    file: Option<String>,
    msg: String,
    source: Option<io::Error>,
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error { kind, file: None, msg: msg.into(), source: None }
    }
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(Kind::Corrupt, msg)
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(Kind::Unsupported, msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, msg)
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Self::new(Kind::Usage, msg)
    }
    /// An OS error, with what we were doing when it happened.
    pub fn io(what: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => Kind::NotFound,
            io::ErrorKind::PermissionDenied => Kind::Denied,
            _ => Kind::Io,
        };
        Error { kind, file: None, msg: what.into(), source: Some(err) }
    }

    /// Names the file this error concerns, unless one is already named.
    pub fn in_file(mut self, file: impl fmt::Display) -> Self {
        if self.file.is_none() {
            self.file = Some(file.to_string());
        }
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }
    /// The message without the file prefix.
    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The errno a FUSE reply should carry. Anything that means "the bytes cannot be trusted" is EIO.
    pub fn errno(&self) -> i32 {
        match self.kind {
            Kind::Io => self.source.as_ref().and_then(|e| e.raw_os_error()).unwrap_or(libc::EIO),
            Kind::Corrupt | Kind::Unsupported | Kind::Mismatch | Kind::Transient => libc::EIO,
            Kind::NotFound => libc::ENOENT,
            Kind::Denied => libc::EACCES,
            Kind::ReadOnly => libc::EROFS,
            Kind::Stale => libc::ESTALE,
            Kind::Usage => libc::EINVAL,
        }
    }

    /// True when a retry may succeed (remote sources).
    pub fn is_transient(&self) -> bool {
        self.kind == Kind::Transient
    }

    /// Process exit code for the CLI: 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        if self.kind == Kind::Usage { 2 } else { 1 }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        f.write_str(&self.msg)?;
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_then_message() {
        let e = Error::corrupt("footer checksum mismatch").in_file("base.vhd").in_file("other");
        assert_eq!(e.to_string(), "base.vhd: footer checksum mismatch");
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let e = Error::io("reading", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        let e = Error::io("opening", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), Kind::NotFound);
    }
}
