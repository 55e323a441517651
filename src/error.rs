//! The crate-wide error: a stable [`Kind`], the file it concerns, and the typed error that says
//! what went wrong, with its `#[source]` chain.
//!
//! Every module has its own `thiserror` enum whose variants say exactly what failed (offsets,
//! expected and found values). Each enum implements [`ErrorKind`], which decides its [`Kind`] in
//! one place per module; `?` then converts it into [`Error`] through the blanket `From`. This is
//! the only place where a kind becomes an errno ([`Error::errno`], for FUSE replies) or an exit
//! code ([`Error::exit_code`], for the CLI). The CLI prints an error as one line,
//! `vdiskfs: <file>: <what is wrong>: <cause>: <cause>…`.

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

/// A module's error type: says which [`Kind`] each of its variants is.
pub trait ErrorKind: std::error::Error + Send + Sync + 'static {
    fn kind(&self) -> Kind;
}

/// The crate's error type.
pub struct Error {
    kind: Kind,
    file: Option<String>,
    inner: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any module error converts with `?`, keeping its kind and its cause chain.
impl<E: ErrorKind> From<E> for Error {
    fn from(e: E) -> Self {
        Error { kind: e.kind(), file: None, inner: Box::new(e) }
    }
}

/// A plain message, for the few places (command line, internal invariants) where no module
/// enum says more.
#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Message {}

/// An OS error and what we were doing when it happened.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct IoError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

impl Error {
    /// A message of `kind`. Prefer a module enum wherever the failure has a shape.
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error { kind, file: None, inner: Box::new(Message(msg.into())) }
    }
    /// A command-line mistake (exit code 2).
    pub fn usage(msg: impl Into<String>) -> Self {
        Self::new(Kind::Usage, msg)
    }
    /// A broken internal invariant: never expected, reported as corruption (EIO) rather than
    /// a panic, because the data that led there came from an image.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(Kind::Corrupt, format!("internal: {}", msg.into()))
    }
    /// An OS error, with what we were doing when it happened.
    pub fn io(what: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => Kind::NotFound,
            io::ErrorKind::PermissionDenied => Kind::Denied,
            _ => Kind::Io,
        };
        Error { kind, file: None, inner: Box::new(IoError { what: what.into(), source: err }) }
    }
    /// The same error with another kind (a caller that knows better what the failure means).
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
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
    /// The message without the file prefix: the error and its causes, joined by `: `.
    pub fn message(&self) -> String {
        let mut s = self.inner.to_string();
        let mut cause = self.inner.source();
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            // A crate error's text already holds its own causes.
            cause = if c.is::<Error>() { None } else { c.source() };
        }
        s
    }

    /// The typed error inside, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.inner.downcast_ref::<E>()
    }

    /// The first OS error in the cause chain.
    fn os_error(&self) -> Option<i32> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self.inner.as_ref());
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && let Some(n) = io.raw_os_error()
            {
                return Some(n);
            }
            cur = e.source();
        }
        None
    }

    /// The errno a FUSE reply should carry. Anything that means "the bytes cannot be trusted" is EIO.
    pub fn errno(&self) -> i32 {
        match self.kind {
            Kind::Io => self.os_error().unwrap_or(libc::EIO),
            Kind::Corrupt | Kind::Unsupported | Kind::Mismatch | Kind::Transient | Kind::Stale => libc::EIO,
            Kind::NotFound => libc::ENOENT,
            Kind::Denied => libc::EACCES,
            Kind::ReadOnly => libc::EROFS,
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
        f.write_str(&self.message())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error").field("kind", &self.kind).field("file", &self.file).field("inner", &self.inner).finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.inner.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Sample {
        #[error("footer checksum mismatch")]
        Checksum,
        #[error("reading the BAT")]
        Read(#[source] io::Error),
    }
    impl ErrorKind for Sample {
        fn kind(&self) -> Kind {
            match self {
                Sample::Checksum => Kind::Corrupt,
                Sample::Read(_) => Kind::Io,
            }
        }
    }

    #[test]
    fn display_names_file_then_message_then_causes() {
        let e = Error::from(Sample::Checksum).in_file("base.vhd").in_file("other");
        assert_eq!(e.to_string(), "base.vhd: footer checksum mismatch");
        assert_eq!(e.errno(), libc::EIO);
        let e = Error::from(Sample::Read(io::Error::from_raw_os_error(libc::ENOSPC))).in_file("x");
        assert!(e.to_string().starts_with("x: reading the BAT: "), "{e}");
        assert_eq!(e.errno(), libc::ENOSPC, "the errno comes from the cause chain");
        assert!(e.downcast_ref::<Sample>().is_some());
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let e = Error::io("reading", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        let e = Error::io("opening", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), Kind::NotFound);
        assert_eq!(Error::usage("bad flag").exit_code(), 2);
    }
}
