//! Connections to one ssh host, through the system OpenSSH client, so that `~/.ssh/config`,
//! the agent, `known_hosts`, ProxyJump and keys behave as they do for the operator's `ssh`.
//!
//! Each connection is one `ssh -s HOST sftp` process (or, on a host without an SFTP subsystem,
//! a `ssh -M` master that `dd` runs through). A host has a few connections, used in turn.
//! A connection that breaks is dropped and made again by the next request; a host that cannot
//! be reached is not tried again until its backoff (1 s, doubling to 30 s) has passed, and every
//! request meanwhile fails at once instead of queueing. Requests run on a small private tokio
//! runtime; callers wait with deadlines, never on a lock held across the network.

use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::io::AsyncBufReadExt;
use tokio::runtime::Runtime;

use super::dd::DdConn;
use super::sftp::SftpConn;
use super::{Done, Fetched, Health, RemoteError, RemoteOptions, RemoteStat, Transport};
use crate::source::location::SshHost;

/// One connection, by the way the host is read.
pub enum Conn {
    Sftp(SftpConn),
    Dd(DdConn),
}

impl Conn {
    pub async fn lstat(&self, path: &str) -> Result<Option<RemoteStat>, RemoteError> {
        match self {
            Conn::Sftp(c) => c.lstat(path).await,
            Conn::Dd(c) => c.stat(path, false).await,
        }
    }
    pub async fn stat(&self, path: &str) -> Result<RemoteStat, RemoteError> {
        let st = match self {
            Conn::Sftp(c) => c.stat(path).await?,
            Conn::Dd(c) => c.stat(path, true).await?,
        };
        st.ok_or_else(|| RemoteError::Refused {
            what: "stat",
            detail: "no such file".into(),
            kind: super::Refusal::NotFound,
        })
    }
    pub async fn realpath(&self, path: &str) -> Result<String, RemoteError> {
        match self {
            Conn::Sftp(c) => c.realpath(path).await,
            Conn::Dd(c) => c.realpath(path).await,
        }
    }
    /// `len` bytes at `off`, then a check that the file is still the version `expect` saw.
    pub async fn read(&self, path: &str, off: u64, len: usize, expect: RemoteStat) -> Fetched {
        match self {
            Conn::Sftp(c) => c.read(path, off, len, expect).await,
            Conn::Dd(c) => c.read(path, off, len, expect).await,
        }
    }
}

/// A slot holding one connection, made once by whoever needs it first.
#[derive(Default)]
struct Cell(tokio::sync::OnceCell<Result<Arc<Conn>, RemoteError>>, std::sync::atomic::AtomicBool);

/// Every connection to one host.
pub struct SshConns {
    pub host: SshHost,
    pub opts: Arc<RemoteOptions>,
    rt: Option<Runtime>,
    cells: Vec<Mutex<Arc<Cell>>>,
    next: AtomicUsize,
    health: Mutex<Health>,
    /// Known once the first connection is made: whether the host speaks SFTP.
    dd_only: std::sync::atomic::AtomicBool,
}

impl Drop for SshConns {
    fn drop(&mut self) {
        // Never wait for a host: the ssh processes are killed with their connections.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl SshConns {
    pub fn new(host: SshHost, opts: Arc<RemoteOptions>) -> Arc<SshConns> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vdiskfs-ssh")
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let n = opts.connections.clamp(1, 16);
        Arc::new(SshConns {
            host,
            opts,
            rt: Some(rt),
            cells: (0..n).map(|_| Mutex::new(Arc::new(Cell::default()))).collect(),
            next: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            dd_only: Default::default(),
        })
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().expect("runtime lives as long as the host")
    }

    /// Runs `fut` on the host's runtime without waiting.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.rt().spawn(fut);
    }

    /// Runs a request to completion from a plain thread.
    fn block<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<Conn>) -> std::pin::Pin<Box<dyn Future<Output = Result<T, RemoteError>> + Send>> + Send + 'static,
    ) -> Result<T, RemoteError> {
        let me = self.clone();
        self.rt().block_on(async move { me.call(f).await })
    }

    pub fn lstat(self: &Arc<Self>, path: &str) -> Result<Option<RemoteStat>, RemoteError> {
        let p = path.to_string();
        self.block(move |c| Box::pin(async move { c.lstat(&p).await }))
    }

    pub fn stat(self: &Arc<Self>, path: &str) -> Result<RemoteStat, RemoteError> {
        let p = path.to_string();
        self.block(move |c| Box::pin(async move { c.stat(&p).await }))
    }

    pub fn realpath(self: &Arc<Self>, path: &str) -> Result<String, RemoteError> {
        let p = path.to_string();
        self.block(move |c| Box::pin(async move { c.realpath(&p).await }))
    }

    /// A transport for the file at `path` (already stat'ed as `st`), and its size (a block
    /// device's size is asked of the host, since its stat says 0).
    pub fn open_file(self: &Arc<Self>, path: &str, st: RemoteStat) -> Result<(Arc<dyn Transport>, u64), RemoteError> {
        let p = path.to_string();
        let size = self.block(move |c| {
            Box::pin(async move {
                match &*c {
                    Conn::Sftp(s) => s.check_open(&p, st).await,
                    Conn::Dd(d) => d.check_open(&p, st).await,
                }
            })
        })?;
        let dd = self.dd_only.load(Ordering::Relaxed);
        let t = SshFile { conns: self.clone(), path: path.into(), expect: st, dd };
        Ok((Arc::new(t), size))
    }

    /// Runs one request on a connection, within the deadline. A broken connection is dropped
    /// (the next request makes a new one); a request that times out also marks the host dead
    /// for its backoff, so the readers behind it fail at once.
    pub async fn call<T, Fut>(self: &Arc<Self>, f: impl FnOnce(Arc<Conn>) -> Fut) -> Result<T, RemoteError>
    where
        Fut: Future<Output = Result<T, RemoteError>>,
    {
        let (i, cell, conn) = self.conn().await?;
        match tokio::time::timeout(self.opts.timeout, f(conn)).await {
            Ok(Ok(v)) => {
                self.alive();
                Ok(v)
            }
            Ok(Err(e)) => {
                if matches!(e, RemoteError::Lost { .. }) {
                    log::info!("{}: {e}; reconnecting on the next read", self.host);
                    self.drop_cell(i, &cell);
                }
                Err(e)
            }
            Err(_) => {
                let e = RemoteError::Timeout { secs: self.opts.timeout.as_secs() };
                log::warn!("{}: {e}; dropping the connection", self.host);
                self.drop_cell(i, &cell);
                self.dead();
                Err(e)
            }
        }
    }

    /// A ready connection, in turn. When none is, one is made and waited for; once one is
    /// ready, the others are made in the background (a handshake costs CPU on both ends, so
    /// they do not compete with the first).
    async fn conn(self: &Arc<Self>) -> Result<(usize, Arc<Cell>, Arc<Conn>), RemoteError> {
        if let Some(until) = self.health.lock().dead_until {
            let now = Instant::now();
            if until > now {
                return Err(RemoteError::HostDown { host: self.host.to_string(), secs: (until - now).as_secs() + 1 });
            }
        }
        let n = self.cells.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut idle = None;
        let mut ready = None;
        for k in 0..n {
            let i = (start + k) % n;
            let cell = self.cells[i].lock().clone();
            match cell.0.get() {
                Some(Ok(c)) if ready.is_none() => ready = Some((i, cell.clone(), c.clone())),
                Some(Ok(_)) => {}
                Some(Err(_)) => self.drop_cell(i, &cell),
                None if idle.is_none() => idle = Some((i, cell)),
                None => {}
            }
        }
        if let Some(r) = ready {
            if let Some((_, cell)) = idle
                && !cell.1.swap(true, Ordering::Relaxed)
            {
                let me = self.clone();
                tokio::spawn(async move {
                    let _ = cell.0.get_or_init(|| me.connect()).await;
                });
            }
            return Ok(r);
        }
        let (i, cell) = idle.unwrap_or_else(|| (0, self.cells[0].lock().clone()));
        cell.1.store(true, Ordering::Relaxed);
        let r = cell.0.get_or_init(|| self.connect()).await.clone();
        match r {
            Ok(c) => Ok((i, cell, c)),
            Err(e) => {
                self.drop_cell(i, &cell);
                self.dead();
                Err(e)
            }
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<Arc<Conn>, RemoteError> {
        let t = self.opts.timeout;
        let timed_out = || RemoteError::Connect {
            host: self.host.to_string(),
            detail: format!("no answer within {} s (--timeout)", t.as_secs()),
        };
        if !self.dd_only.load(Ordering::Relaxed) {
            match tokio::time::timeout(t, SftpConn::connect(self)).await {
                Ok(Ok(c)) => return Ok(Arc::new(Conn::Sftp(c))),
                Ok(Err(RemoteError::NoSftp { .. })) => {
                    log::warn!("{}: no SFTP subsystem; reading with dd on the host instead", self.host);
                    self.dd_only.store(true, Ordering::Relaxed);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(timed_out()),
            }
        }
        match tokio::time::timeout(t, DdConn::connect(self)).await {
            Ok(r) => r.map(|c| Arc::new(Conn::Dd(c))),
            Err(_) => Err(timed_out()),
        }
    }

    fn drop_cell(&self, i: usize, cell: &Arc<Cell>) {
        let mut g = self.cells[i].lock();
        if Arc::ptr_eq(&g, cell) {
            *g = Arc::new(Cell::default());
        }
    }

    fn dead(&self) {
        self.health.lock().dead();
    }

    fn alive(&self) {
        self.health.lock().alive();
    }

    /// `ssh` and its options for this host: never prompts, notices a dead peer.
    pub fn argv(&self) -> Vec<String> {
        let mut a = self.opts.ssh_command.clone();
        let secs = self.opts.timeout.as_secs().max(1);
        for o in ["BatchMode=yes", "ServerAliveInterval=5", "ServerAliveCountMax=3", &format!("ConnectTimeout={secs}")]
        {
            a.extend(["-o".to_string(), o.to_string()]);
        }
        a.extend(["-T", "-x", "-a", "-e", "none"].map(String::from));
        if let Some(p) = self.host.port {
            a.extend(["-p".to_string(), p.to_string()]);
        }
        if let Some(u) = &self.host.user {
            a.extend(["-l".to_string(), u.clone()]);
        }
        a
    }

    /// `ssh` with [`SshConns::argv`] and `extra`.
    pub fn command(&self, extra: &[&str]) -> tokio::process::Command {
        command(&self.argv(), extra)
    }
}

impl std::fmt::Debug for SshConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SshConns({})", self.host)
    }
}

/// A file on an ssh host, read over whichever connection the host gives: SFTP, or `dd` on a
/// host without an SFTP subsystem.
#[derive(Debug)]
pub struct SshFile {
    conns: Arc<SshConns>,
    path: Arc<str>,
    expect: RemoteStat,
    dd: bool,
}

impl Transport for SshFile {
    fn name(&self) -> &'static str {
        if self.dd { "dd (the host has no SFTP subsystem)" } else { "sftp" }
    }

    fn fetch(&self, offset: u64, len: usize, done: Done) {
        let (conns, path, expect) = (self.conns.clone(), self.path.clone(), self.expect);
        self.conns.spawn(async move {
            let r = conns.call(|c| async move { c.read(&path, offset, len, expect).await }).await;
            done(r)
        });
    }
}

/// A command line as a child process that is killed with its handle and has its own process
/// group (a terminal's Ctrl-C is for vdiskfs, which unmounts first).
pub fn command(argv: &[String], extra: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(&argv[0]);
    c.args(&argv[1..]);
    c.args(extra);
    c.process_group(0).kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Keeps the last lines an ssh process wrote to stderr, for error messages.
pub fn collect_stderr(err: Option<tokio::process::ChildStderr>) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    if let Some(err) = err {
        let t = text.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let l = l.trim().to_string();
                if !l.is_empty() {
                    log::debug!("ssh: {l}");
                    *t.lock() = l;
                }
            }
        });
    }
    text
}

/// `--ssh-command` split into words as a shell would (quotes and backslashes; no expansion).
pub fn split_command(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => w.push(chars.next()?),
                        c => w.push(c),
                    }
                }
            }
            '\\' => cur.get_or_insert_with(String::new).push(chars.next()?),
            c if c.is_whitespace() => words.extend(cur.take()),
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(cur);
    (!words.is_empty()).then_some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_commands_split_like_a_shell() {
        assert_eq!(split_command("ssh -F ./cfg -i key").unwrap(), ["ssh", "-F", "./cfg", "-i", "key"]);
        assert_eq!(
            split_command(r#"ssh -o 'ProxyJump=a b' "-i" my\ key"#).unwrap(),
            ["ssh", "-o", "ProxyJump=a b", "-i", "my key"]
        );
        assert_eq!(split_command("  "), None);
        assert_eq!(split_command("ssh 'open"), None);
    }
}
