//! Remote sources: a file on another host, read as if it were local.
//!
//! ```text
//!  RemoteSource   Source: aligned chunks, one in-flight fetch per chunk shared by every waiter,
//!    │            readahead for sequential readers, a deadline on every read, the chunk caches
//!  ChunkCache     persistent, bounded, LRU, keyed by host, path, size, mtime (+ layer identity)
//!  Transport      fetch(offset, len) → bytes, checked against the version seen at open
//!    │            (sftp.rs: SFTP over `ssh -s host sftp`; dd.rs: `dd` on the host;
//!    │             http/: `GET` with `Range` on a web server)
//!  SshConns       connections to one ssh host: ssh processes, reconnect with backoff, fail fast
//!  HttpHost       connections to one web server: keep-alive workers, retries, fail fast
//! ```
//!
//! The formats never see any of this: a [`RemoteSource`] is a [`crate::source::Source`]. No
//! lock is held while a request is on the network; readers wait on their chunk's slot with a
//! deadline, so a dead host costs a reader at most `--timeout`, and fails fast after that.

mod cache;
mod chunked;
mod dd;
pub mod http;
mod sftp;
mod ssh;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

pub use cache::ChunkCache;
pub use chunked::RemoteSource;
pub use ssh::split_command;

use super::location::{SshHost, SshPath};
use super::{FileTypes, HttpOrigin, HttpUrl, Location, SourceError};
use crate::error::{Error, ErrorKind, Kind, Result};

/// How remote files are reached and cached.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The ssh client and its options (`--ssh-command`), as words.
    pub ssh_command: Vec<String>,
    /// A read that cannot complete within this fails with EIO (`--timeout`).
    pub timeout: Duration,
    /// Where the persistent chunk cache lives (`<cache-dir>/remote`); `None`: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Bound of the persistent chunk cache (`--cache-size`).
    pub cache_bytes: u64,
    /// Connections (ssh processes) per host.
    pub connections: usize,
    /// Fetch and cache granularity.
    pub chunk: usize,
    /// Most bytes read ahead of a sequential reader.
    pub readahead: usize,
    /// In-memory chunk cache of each remote file.
    pub memory_bytes: usize,
    /// How web servers are reached (TLS, credentials, presigned layer URLs).
    pub http: http::HttpOptions,
}

/// The default `--cache-size`.
pub const DEFAULT_CACHE_BYTES: u64 = 8 << 30;
/// The default `--timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            ssh_command: vec!["ssh".into()],
            timeout: DEFAULT_TIMEOUT,
            cache_dir: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
            connections: 2,
            chunk: 256 << 10,
            readahead: 8 << 20,
            memory_bytes: 32 << 20,
            http: http::HttpOptions::default(),
        }
    }
}

/// What can go wrong with a remote file. Cloned: one failed fetch answers every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot connect to {host}: {detail}")]
    Connect { host: String, detail: String },
    #[error("{host} did not answer the last attempt; not trying again for {secs} s")]
    HostDown { host: String, secs: u64 },
    #[error("no answer within {secs} s (--timeout)")]
    Timeout { secs: u64 },
    #[error("connection to {host} lost: {detail}")]
    Lost { host: String, detail: String },
    #[error("{host} has no SFTP subsystem")]
    NoSftp { host: String },
    #[error("{what}: {detail}")]
    Refused { what: &'static str, detail: String, kind: Refusal },
    #[error(
        "in use by a running VM (the host says: {detail}): snapshot the VM and use the chain below its running delta, or power the VM off"
    )]
    InUse { detail: String },
    #[error(
        "the host refused to open it ({detail}); ESXi answers so for a file a running VM holds: snapshot the VM and use the chain below its running delta, or power the VM off"
    )]
    MaybeInUse { detail: String },
    #[error("changed under us ({what}): refusing to mix bytes of two versions")]
    Changed { what: String },
    #[error("the host sent {got} bytes at {at:#x} where {want} were expected")]
    Short { at: u64, got: usize, want: usize },
    #[error(
        "cached bytes belong to another version (identity {cached}, now {now}); the cache entry was dropped: run the command again"
    )]
    CachedOtherVersion { cached: String, now: String },
    #[error("{0}")]
    Local(String),
    #[error("{detail}")]
    Http { detail: String, kind: Refusal },
    #[error("the presigned URL expired {when}{said}: presign it again")]
    Expired { when: String, said: String },
    #[error("TLS with {host}: {detail}")]
    Tls { host: String, detail: String },
    #[error("{detail}")]
    Protocol { detail: String },
    #[error("{0}")]
    Setup(String),
}

/// Why the host refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    Denied,
    Other,
}

impl ErrorKind for RemoteError {
    fn kind(&self) -> Kind {
        match self {
            RemoteError::Connect { .. }
            | RemoteError::HostDown { .. }
            | RemoteError::Timeout { .. }
            | RemoteError::Lost { .. } => Kind::Transient,
            RemoteError::NoSftp { .. } | RemoteError::Protocol { .. } => Kind::Unsupported,
            RemoteError::Refused { kind: Refusal::NotFound, .. }
            | RemoteError::Http { kind: Refusal::NotFound, .. } => Kind::NotFound,
            RemoteError::Refused { kind: Refusal::Denied, .. }
            | RemoteError::Http { kind: Refusal::Denied, .. }
            | RemoteError::Expired { .. }
            | RemoteError::Tls { .. } => Kind::Denied,
            RemoteError::Setup(_) => Kind::Usage,
            RemoteError::Refused { .. }
            | RemoteError::Http { .. }
            | RemoteError::InUse { .. }
            | RemoteError::MaybeInUse { .. }
            | RemoteError::Local(_) => Kind::Io,
            RemoteError::Changed { .. } | RemoteError::CachedOtherVersion { .. } => Kind::Stale,
            RemoteError::Short { .. } => Kind::Corrupt,
        }
    }
}

impl RemoteError {
    /// A refusal whose text says a running VM holds the file (ESXi: "Device or resource busy").
    pub fn refused(what: &'static str, detail: String, kind: Refusal) -> RemoteError {
        let d = detail.to_ascii_lowercase();
        if d.contains("busy") || d.contains("lock") || d.contains("being used by another process") {
            RemoteError::InUse { detail }
        } else {
            RemoteError::Refused { what, detail, kind }
        }
    }
}

/// What kind of object a remote name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteKind {
    Regular,
    BlockDevice,
    Directory,
    Symlink,
    Other(&'static str),
}

/// A remote file as its host reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteStat {
    pub size: u64,
    /// Seconds since the epoch (SFTP v3 has no finer resolution).
    pub mtime: i64,
    pub kind: RemoteKind,
}

/// One fetch's answer.
pub type Fetched = std::result::Result<Vec<u8>, RemoteError>;
/// Called once with a fetch's answer, on a transport thread.
pub type Done = Box<dyn FnOnce(Fetched) + Send>;

/// Byte ranges of one remote file: over SFTP, `dd` on an ssh host, or HTTP range requests.
pub trait Transport: Send + Sync + fmt::Debug {
    /// How it reads (`sftp`, `dd`, `https`), for `info`.
    fn name(&self) -> &'static str;
    /// Starts reading `len` bytes at `offset` (fewer only at the end of the file), checking
    /// that the file still has the size and mtime it had at open; calls `done` exactly once.
    /// Never blocks on the network.
    fn fetch(&self, offset: u64, len: usize, done: Done);
    /// What names this version of the file beyond its size and mtime (an HTTP `ETag`), for the
    /// chunk cache's key; empty when nothing does.
    fn version(&self) -> String {
        String::new()
    }
}

/// What a remote source did, for `info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStats {
    pub transport: &'static str,
    /// Bytes fetched over the network.
    pub fetched: u64,
    /// Bytes served from the persistent chunk cache.
    pub from_cache: u64,
    /// Fetch requests sent.
    pub requests: u64,
}

/// Every remote host this process talks to, and the chunk cache they share. Made once per
/// command; opening many files on one host reuses its connections.
pub struct Remotes {
    opts: Arc<RemoteOptions>,
    hosts: Mutex<HashMap<SshHost, Arc<ssh::SshConns>>>,
    web: Mutex<HashMap<HttpOrigin, Arc<http::HttpHost>>>,
    cache: Mutex<Option<Option<Arc<ChunkCache>>>>,
}

impl fmt::Debug for Remotes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remotes").field("opts", &self.opts).finish()
    }
}

impl Remotes {
    pub fn new(opts: RemoteOptions) -> Arc<Remotes> {
        Arc::new(Remotes {
            opts: Arc::new(opts),
            hosts: Mutex::new(HashMap::new()),
            web: Mutex::new(HashMap::new()),
            cache: Mutex::new(None),
        })
    }

    pub fn options(&self) -> &RemoteOptions {
        &self.opts
    }

    fn host(&self, h: &SshHost) -> Arc<ssh::SshConns> {
        self.hosts.lock().entry(h.clone()).or_insert_with(|| ssh::SshConns::new(h.clone(), self.opts.clone())).clone()
    }

    fn web(&self, o: &HttpOrigin) -> Arc<http::HttpHost> {
        self.web.lock().entry(o.clone()).or_insert_with(|| http::HttpHost::new(o.clone(), &self.opts)).clone()
    }

    fn cache(&self) -> Option<Arc<ChunkCache>> {
        let mut c = self.cache.lock();
        c.get_or_insert_with(|| {
            let dir = self.opts.cache_dir.as_ref()?.join("remote");
            match ChunkCache::open(&dir, self.opts.cache_bytes) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    log::warn!("{}: {e}; remote chunks are cached in memory only", dir.display());
                    None
                }
            }
        })
        .clone()
    }

    /// What is at `p`, without following a final symlink; `None` when nothing is.
    pub fn lstat(&self, p: &SshPath) -> Result<Option<RemoteStat>> {
        self.host(&p.host).lstat(&p.path).map_err(|e| in_file(e, p))
    }

    /// `p` with every symlink resolved, as the host sees it.
    pub fn realpath(&self, p: &SshPath) -> Result<SshPath> {
        let path = self.host(&p.host).realpath(&p.path).map_err(|e| in_file(e, p))?;
        Ok(SshPath { host: p.host.clone(), path })
    }

    /// Opens the remote file at `loc` for reading, after checking its type as a local open does.
    pub fn open(&self, p: &SshPath, accept: FileTypes) -> Result<Arc<RemoteSource>> {
        let host = self.host(&p.host);
        let fail = |e: RemoteError| in_file(e, p);
        let st = host.stat(&p.path).map_err(fail)?;
        let bad = |e: SourceError| Error::from(e).in_file(Location::Ssh(p.clone()));
        match st.kind {
            RemoteKind::Regular => {}
            RemoteKind::BlockDevice if accept == FileTypes::RegularOrBlockDevice => {}
            RemoteKind::BlockDevice => return Err(bad(SourceError::DeviceNotAllowed)),
            RemoteKind::Directory => return Err(bad(SourceError::Directory)),
            RemoteKind::Symlink => return Err(bad(SourceError::Special("symbolic link"))),
            RemoteKind::Other(k) => return Err(bad(SourceError::Special(k))),
        }
        let (transport, size) = host.open_file(&p.path, st).map_err(fail)?;
        let st = RemoteStat { size, ..st };
        let src = RemoteSource::new(Location::Ssh(p.clone()), transport, st, &self.opts, self.cache());
        Ok(Arc::new(src))
    }

    /// Opens the file at `u` on a web server (only regular files are served there).
    pub fn open_http(&self, u: &HttpUrl) -> Result<Arc<RemoteSource>> {
        let loc = Location::Http(u.clone());
        let (transport, st) = self.web(&u.origin).open(u).map_err(|e| Error::from(e).in_file(&loc))?;
        Ok(Arc::new(RemoteSource::new(loc, transport, st, &self.opts, self.cache())))
    }

    /// The URL `--layer-url` gives the file named `name`, if any.
    pub fn layer_url(&self, name: &str) -> Option<&HttpUrl> {
        self.opts.http.layer_urls.iter().find(|(n, _)| n == name).map(|(_, u)| u)
    }
}

fn in_file(e: RemoteError, p: &SshPath) -> Error {
    Error::from(e).in_file(Location::Ssh(p.clone()))
}

/// A host's (or server's) health: after a failure it is not tried again until its backoff
/// (1 s, doubling to 30 s) has passed, so the readers behind a dead host fail at once.
pub(super) struct Health {
    pub dead_until: Option<std::time::Instant>,
    backoff: std::time::Duration,
}

const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for Health {
    fn default() -> Self {
        Health { dead_until: None, backoff: FIRST_BACKOFF }
    }
}

impl Health {
    pub fn dead(&mut self) {
        self.dead_until = Some(std::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    pub fn alive(&mut self) {
        self.dead_until = None;
        self.backoff = FIRST_BACKOFF;
    }
}
