//! SFTP over the pipes of `ssh -s HOST sftp`, with the `openssh-sftp-client` crate: requests are
//! pipelined (many in flight on one connection), and a chunk's reads are followed, on the same
//! connection and so processed after them, by an `fstat` that proves the file still has the
//! size and mtime it had at open.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::BytesMut;
use futures_util::future::{join, join_all};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::file::File;
use openssh_sftp_client::metadata::MetaData;
use openssh_sftp_client::{Error as SftpError, Sftp, SftpOptions};
use parking_lot::Mutex;
use tokio::io::AsyncSeek;

use super::ssh::{SshConns, collect_stderr};
use super::{Fetched, Refusal, RemoteError, RemoteKind, RemoteStat};

/// One SFTP session.
pub struct SftpConn {
    host: String,
    sftp: Sftp,
    /// Open handles by path (opened once per connection).
    files: Mutex<HashMap<String, File>>,
    /// Largest read one request asks for: 128 KiB (OpenSSH allows 255 KiB), lowered when the
    /// server is seen to answer less.
    piece: AtomicU32,
    _child: tokio::process::Child,
}

fn kind_of(md: &MetaData) -> RemoteKind {
    match md.file_type() {
        Some(t) if t.is_file() => RemoteKind::Regular,
        Some(t) if t.is_block_device() => RemoteKind::BlockDevice,
        Some(t) if t.is_dir() => RemoteKind::Directory,
        Some(t) if t.is_symlink() => RemoteKind::Symlink,
        Some(t) if t.is_fifo() => RemoteKind::Other("FIFO"),
        Some(t) if t.is_socket() => RemoteKind::Other("socket"),
        Some(t) if t.is_char_device() => RemoteKind::Other("character device"),
        _ => RemoteKind::Other("special file"),
    }
}

fn stat_of(md: &MetaData) -> RemoteStat {
    RemoteStat {
        size: md.len().unwrap_or(0),
        mtime: md.modified().map_or(0, |t| t.as_duration().as_secs() as i64),
        kind: kind_of(md),
    }
}

impl SftpConn {
    pub async fn connect(conns: &SshConns) -> Result<SftpConn, RemoteError> {
        let host = conns.host.to_string();
        let mut cmd = conns.command(&["-s", "--", &conns.host.host, "sftp"]);
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| RemoteError::Connect { host: host.clone(), detail: format!("cannot run ssh: {e}") })?;
        let (stdin, stdout) = (child.stdin.take().expect("piped"), child.stdout.take().expect("piped"));
        let err = collect_stderr(child.stderr.take());
        let opts = SftpOptions::new().max_pending_requests(std::num::NonZeroU16::new(1024).expect("nonzero"));
        match Sftp::new(stdin, stdout, opts).await {
            Ok(sftp) => Ok(SftpConn {
                host,
                sftp,
                files: Mutex::new(HashMap::new()),
                piece: AtomicU32::new(128 << 10),
                _child: child,
            }),
            Err(e) => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let said = err.lock().clone();
                if said.contains("subsystem request failed") {
                    return Err(RemoteError::NoSftp { host });
                }
                let detail = if said.is_empty() { e.to_string() } else { said };
                Err(RemoteError::Connect { host, detail })
            }
        }
    }

    fn error(&self, what: &'static str, e: SftpError) -> RemoteError {
        match e {
            SftpError::SftpError(code, msg) => {
                let detail = msg.get().0.to_string();
                match code {
                    SftpErrorKind::NoSuchFile => RemoteError::Refused { what, detail, kind: Refusal::NotFound },
                    SftpErrorKind::PermDenied => RemoteError::refused(what, detail, Refusal::Denied),
                    _ => RemoteError::refused(what, detail, Refusal::Other),
                }
            }
            e => RemoteError::Lost { host: self.host.clone(), detail: e.to_string() },
        }
    }

    pub async fn lstat(&self, path: &str) -> Result<Option<RemoteStat>, RemoteError> {
        match self.sftp.fs().symlink_metadata(path).await {
            Ok(md) => Ok(Some(stat_of(&md))),
            Err(SftpError::SftpError(SftpErrorKind::NoSuchFile, _)) => Ok(None),
            Err(e) => Err(self.error("lstat", e)),
        }
    }

    pub async fn stat(&self, path: &str) -> Result<Option<RemoteStat>, RemoteError> {
        match self.sftp.fs().metadata(path).await {
            Ok(md) => Ok(Some(stat_of(&md))),
            Err(SftpError::SftpError(SftpErrorKind::NoSuchFile, _)) => Ok(None),
            Err(e) => Err(self.error("stat", e)),
        }
    }

    pub async fn realpath(&self, path: &str) -> Result<String, RemoteError> {
        let p = self.sftp.fs().canonicalize(path).await.map_err(|e| self.error("realpath", e))?;
        Ok(p.to_string_lossy().into_owned())
    }

    async fn file(&self, path: &str) -> Result<File, RemoteError> {
        if let Some(f) = self.files.lock().get(path) {
            return Ok(f.clone());
        }
        let f = self.sftp.options().read(true).open(path).await.map_err(|e| match self.error("open", e) {
            RemoteError::Refused { detail, kind: Refusal::Other, .. } => RemoteError::MaybeInUse { detail },
            e => e,
        })?;
        self.files.lock().insert(path.to_string(), f.clone());
        Ok(f)
    }

    /// Opens the file once (so a file the host refuses fails at open, not at the first read)
    /// and returns its size; a block device's size comes from sysfs or by probing.
    pub async fn check_open(&self, path: &str, st: RemoteStat) -> Result<u64, RemoteError> {
        self.file(path).await?;
        if st.kind != RemoteKind::BlockDevice {
            return Ok(st.size);
        }
        let real = self.realpath(path).await?;
        if let Some(name) = real.strip_prefix("/dev/") {
            let sys = format!("/sys/class/block/{name}/size");
            if let Ok(f) = self.sftp.options().read(true).open(&sys).await {
                let text = read_piece(f, 0, 64).await.map(|r| r.0).unwrap_or_default();
                if let Ok(sectors) = String::from_utf8_lossy(&text).trim().parse::<u64>() {
                    return Ok(sectors * 512);
                }
            }
        }
        self.probe_size(path).await
    }

    /// The size of something whose stat does not say: the first offset where a read finds EOF.
    async fn probe_size(&self, path: &str) -> Result<u64, RemoteError> {
        let f = self.file(path).await?;
        let has = |off: u64| {
            let f = f.clone();
            async move { read_piece(f, off, 1).await.map(|b| !b.0.is_empty()) }
        };
        let (mut lo, mut hi) = (0u64, 1u64 << 20);
        while has(hi - 1).await.map_err(|e| self.error("read", e))? {
            lo = hi;
            hi = hi.checked_mul(2).ok_or(RemoteError::Local("device size beyond 2^64".into()))?;
        }
        // Invariant: size >= lo, size < hi.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if has(mid - 1).await.map_err(|e| self.error("read", e))? { lo = mid } else { hi = mid }
        }
        Ok(if has(lo).await.map_err(|e| self.error("read", e))? { lo + 1 } else { lo })
    }

    /// `len` bytes at `off` in pieces sent at once, then an `fstat` checked against `expect`.
    pub async fn read(&self, path: &str, off: u64, len: usize, expect: RemoteStat) -> Fetched {
        let f = self.file(path).await?;
        let piece = self.piece.load(Ordering::Relaxed) as u64;
        let mut pieces = Vec::new();
        let mut sizes = Vec::new();
        let mut o = off;
        while o < off + len as u64 {
            let n = (off + len as u64 - o).min(piece) as u32;
            pieces.push(read_piece(f.clone(), o, n));
            sizes.push(n);
            o += n as u64;
        }
        let mut fs = f.clone();
        // join/join_all poll in order, so the reads are queued before the fstat.
        let (parts, md) = join(join_all(pieces), async move { fs.metadata().await }).await;
        let md = md.map_err(|e| self.error("fstat", e))?;
        let now = stat_of(&md);
        if expect.kind == RemoteKind::Regular && (now.size, now.mtime) != (expect.size, expect.mtime) {
            return Err(RemoteError::Changed {
                what: format!("size {} → {}, mtime {} → {}", expect.size, now.size, expect.mtime, now.mtime),
            });
        }
        let mut out = Vec::with_capacity(len);
        let mut short = false;
        for (p, n) in parts.into_iter().zip(sizes) {
            let (p, first) = p.map_err(|e| self.error("read", e))?;
            if short && !p.is_empty() {
                return Err(RemoteError::Short { at: off, got: out.len(), want: len });
            }
            if first < p.len() {
                // The server answers at most `first` bytes a request: ask for that from now on.
                let fit = 1u32 << (31 - (first as u32).max(4096).leading_zeros());
                self.piece.fetch_min(fit, Ordering::Relaxed);
            }
            short |= p.len() < n as usize;
            out.extend_from_slice(&p);
        }
        Ok(out)
    }
}

/// Up to `n` bytes at `off` (fewer only at EOF): one request, or more if the server sends less;
/// also what the first request brought.
async fn read_piece(mut f: File, off: u64, n: u32) -> Result<(Vec<u8>, usize), SftpError> {
    let mut out = Vec::with_capacity(n as usize);
    let mut first = None;
    while out.len() < n as usize {
        Pin::new(&mut f).start_seek(std::io::SeekFrom::Start(off + out.len() as u64))?;
        let want = n - out.len() as u32;
        match f.read(want, BytesMut::with_capacity(want as usize)).await? {
            Some(b) if !b.is_empty() => out.extend_from_slice(&b),
            _ => break,
        }
        first.get_or_insert(out.len());
    }
    Ok((out, first.unwrap_or(0)))
}
