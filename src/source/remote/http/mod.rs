//! Files on web servers (`http://`, `https://`): ESXi's datastore browser, presigned
//! object-store URLs, mirrors. Every read is a `GET` with `Range`, and every answer must be a
//! `206` whose `Content-Range` is exactly the range asked for, uncompressed, of the same
//! version of the file (size, `ETag`, `Last-Modified`) as the first answer: anything else is an
//! error, never the whole file taken silently, never bytes of two versions.
//!
//! The client is `ureq` (synchronous, rustls): a few worker threads per server, each with its
//! own keep-alive connection, take the chunk fetches that [`super::RemoteSource`] queues; runs
//! of adjacent chunks of one file are asked for in one request (up to `merge` bytes) and handed
//! out chunk by chunk as the body streams in. A request that fails for a transient reason (a
//! connection refused or broken off, a 5xx) is tried again with backoff for part of
//! `--timeout`; a server that still fails is then failed fast for a backoff, like an ssh host.

mod auth;
mod tls;
mod wire;

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

pub use auth::{PASSWORD_ENV, Secret};
pub use tls::{Fingerprint, parse_fingerprint};

use super::{Done, Health, RemoteError, RemoteKind, RemoteOptions, RemoteStat, Transport};
use crate::source::{HttpOrigin, HttpUrl};
use wire::Version;

/// How web servers are reached.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// `--http-user`: basic auth as this user.
    pub user: Option<String>,
    /// `VDISKFS_HTTP_PASSWORD`, read at start; else `~/.netrc` is asked per server.
    pub password: Option<Secret>,
    /// `--ca-cert`: CAs trusted beside the system's.
    pub ca_certs: Vec<PathBuf>,
    /// `--pin-sha256`: trust exactly these server certificates instead.
    pub pins: Vec<Fingerprint>,
    /// `--layer-url NAME=URL`: where the file a chain names NAME is (presigned URLs).
    pub layer_urls: Vec<(String, HttpUrl)>,
    /// Connections (worker threads) per server.
    pub connections: usize,
    /// Largest run of adjacent chunks asked for in one request.
    pub merge: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            user: None,
            password: None,
            ca_certs: Vec::new(),
            pins: Vec::new(),
            layer_urls: Vec::new(),
            connections: 4,
            merge: 2 << 20,
        }
    }
}

/// A request's failure, and whether asking again may help.
struct Failure {
    err: RemoteError,
    transient: bool,
}

impl Failure {
    fn once(err: RemoteError) -> Failure {
        Failure { err, transient: false }
    }
}

/// What requests to one server share: the agent (its keep-alive connections), credentials,
/// cookies, the server's health.
struct Client {
    origin: HttpOrigin,
    agent: ureq::Agent,
    verifier: Option<Arc<tls::Verifier>>,
    user: Option<String>,
    auth: Option<String>,
    cookies: auth::Cookies,
    timeout: Duration,
    health: Mutex<Health>,
}

/// One chunk fetch waiting for a worker.
struct Job {
    url: Arc<HttpUrl>,
    off: u64,
    len: usize,
    version: Arc<Version>,
    done: Done,
}

#[derive(Default)]
struct Pool {
    queue: Mutex<VecDeque<Job>>,
    cv: Condvar,
    closed: AtomicBool,
}

impl Pool {
    /// The next job and the adjacent jobs of the same file behind it (up to `merge` bytes);
    /// `None` once the pool is closed.
    fn take(&self, merge: usize) -> Option<VecDeque<Job>> {
        let mut q = self.queue.lock();
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(j) = q.pop_front() {
                let mut total = j.len;
                let mut batch = VecDeque::from([j]);
                while let Some(n) = q.front() {
                    let last = batch.back().expect("one job at least");
                    let next_to = Arc::ptr_eq(&n.url, &last.url) && n.off == last.off + last.len as u64;
                    if !next_to || total + n.len > merge {
                        break;
                    }
                    total += n.len;
                    batch.push_back(q.pop_front().expect("front exists"));
                }
                return Some(batch);
            }
            self.cv.wait(&mut q);
        }
    }
}

/// Every connection to one web server.
pub struct HttpHost {
    origin: HttpOrigin,
    client: Result<Arc<Client>, RemoteError>,
    pool: Arc<Pool>,
    workers: usize,
    merge: usize,
    started: Once,
}

impl std::fmt::Debug for HttpHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpHost({})", self.origin)
    }
}

impl Drop for HttpHost {
    fn drop(&mut self) {
        self.pool.closed.store(true, Ordering::Relaxed);
        self.pool.cv.notify_all();
    }
}

impl HttpHost {
    pub fn new(origin: HttpOrigin, opts: &RemoteOptions) -> Arc<HttpHost> {
        let client = Client::new(&origin, opts).map(Arc::new);
        Arc::new(HttpHost {
            origin,
            client,
            pool: Arc::new(Pool::default()),
            workers: opts.http.connections.clamp(1, 32),
            merge: opts.http.merge.max(opts.chunk),
            started: Once::new(),
        })
    }

    fn client(&self) -> Result<&Arc<Client>, RemoteError> {
        self.client.as_ref().map_err(Clone::clone)
    }

    /// Asks for the first byte of `url`: its size and version, or why it cannot be read.
    pub fn open(self: &Arc<Self>, url: &HttpUrl) -> Result<(Arc<dyn Transport>, RemoteStat), RemoteError> {
        let c = self.client()?;
        let version = c.with_retries(|| {
            let resp = c.request(url, 0, 0)?;
            let v = c.check(&resp, 0, 0)?;
            let _ = resp.into_reader().read(&mut [0u8; 1]);
            Ok(v)
        })?;
        let stat = RemoteStat { size: version.size, mtime: version.mtime(), kind: RemoteKind::Regular };
        let file = HttpFile { host: self.clone(), url: Arc::new(url.clone()), version: Arc::new(version) };
        Ok((Arc::new(file), stat))
    }

    fn submit(&self, job: Job) {
        let c = match self.client() {
            Ok(c) => c.clone(),
            Err(e) => return (job.done)(Err(e)),
        };
        self.started.call_once(|| {
            for i in 0..self.workers {
                let (pool, c, merge) = (self.pool.clone(), c.clone(), self.merge);
                let spawned = std::thread::Builder::new().name(format!("vdiskfs-http-{i}")).spawn(move || {
                    while let Some(batch) = pool.take(merge) {
                        c.serve(batch);
                    }
                });
                if let Err(e) = spawned {
                    log::warn!("{}: cannot start an HTTP worker: {e}", self.origin);
                }
            }
        });
        self.pool.queue.lock().push_back(job);
        self.pool.cv.notify_one();
    }
}

impl Client {
    fn new(origin: &HttpOrigin, opts: &RemoteOptions) -> Result<Client, RemoteError> {
        let h = &opts.http;
        let setup = RemoteError::Setup;
        let auth = match &h.user {
            Some(u) => {
                let pw = auth::password(h.password.as_ref(), &origin.host, u).map_err(setup)?;
                if !origin.tls {
                    log::warn!("{origin}: sending the password of {u} without TLS (http://)");
                }
                Some(auth::basic(u, &pw))
            }
            None => None,
        };
        let mut b = ureq::AgentBuilder::new()
            .timeout_connect(opts.timeout)
            .timeout_read(opts.timeout)
            .timeout_write(opts.timeout)
            .max_idle_connections_per_host(h.connections.max(1) * 2)
            .user_agent(concat!("vdiskfs/", env!("CARGO_PKG_VERSION")));
        let mut verifier = None;
        if origin.tls {
            let v = tls::Verifier::new(&h.ca_certs, &h.pins).map_err(setup)?;
            b = b.tls_config(Arc::new(v.client_config().map_err(setup)?));
            verifier = Some(v);
        }
        Ok(Client {
            origin: origin.clone(),
            agent: b.build(),
            verifier,
            user: h.user.clone(),
            auth,
            cookies: auth::Cookies::default(),
            timeout: opts.timeout,
            health: Mutex::new(Health::default()),
        })
    }

    /// `GET url` for bytes `first..=last`: the answer if the server said 2xx.
    fn request(&self, url: &HttpUrl, first: u64, last: u64) -> Result<ureq::Response, Failure> {
        if let Some(until) = self.health.lock().dead_until {
            let now = Instant::now();
            if until > now {
                let secs = (until - now).as_secs() + 1;
                return Err(Failure::once(RemoteError::HostDown { host: self.origin.to_string(), secs }));
            }
        }
        let mut req = self
            .agent
            .get(&url.request_url())
            .set("Range", &format!("bytes={first}-{last}"))
            .set("Accept-Encoding", "identity");
        if let Some(a) = &self.auth {
            req = req.set("Authorization", a);
        }
        if let Some(c) = self.cookies.header() {
            req = req.set("Cookie", &c);
        }
        match req.call() {
            Ok(resp) => {
                self.cookies.set(&resp.all("set-cookie"));
                Ok(resp)
            }
            Err(ureq::Error::Status(code, resp)) => {
                self.cookies.set(&resp.all("set-cookie"));
                let text = resp.status_text().to_string();
                let mut body = Vec::new();
                let _ = resp.into_reader().take(8192).read_to_end(&mut body);
                let body = String::from_utf8_lossy(&body);
                let err = wire::status_error(url, code, &text, &body, self.user.as_deref());
                Err(Failure { err, transient: wire::transient_status(code) })
            }
            Err(ureq::Error::Transport(t)) => Err(self.transport_error(&t)),
        }
    }

    /// A failure below HTTP: a refused certificate (with its fingerprint), no connection, a
    /// connection broken or silent past the timeout.
    fn transport_error(&self, t: &ureq::Transport) -> Failure {
        let host = self.origin.to_string();
        if let Some(r) = self.verifier.as_ref().and_then(|v| v.take_refused()) {
            let fp = tls::show_fingerprint(&r.fingerprint);
            let detail = format!(
                "{}; the server's certificate has SHA-256 {fp}: if it is the right one, pass --pin-sha256 {fp} (or its CA with --ca-cert FILE)",
                r.reason
            );
            return Failure::once(RemoteError::Tls { host, detail });
        }
        let mut cause = std::error::Error::source(t);
        let mut detail = t.message().map(str::to_string);
        while let Some(c) = cause {
            if let Some(e) = c.downcast_ref::<rustls::Error>() {
                return Failure::once(RemoteError::Tls { host, detail: e.to_string() });
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                if let Some(e) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return Failure::once(RemoteError::Tls { host, detail: e.to_string() });
                }
                if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
                    let err = RemoteError::Timeout { secs: self.timeout.as_secs() };
                    return Failure { err, transient: true };
                }
            }
            detail.get_or_insert_with(|| c.to_string());
            cause = c.source();
        }
        let detail = detail.unwrap_or_else(|| t.kind().to_string());
        let err = match t.kind() {
            ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed => RemoteError::Connect { host, detail },
            _ => RemoteError::Lost { host, detail },
        };
        Failure { err, transient: true }
    }

    /// The version an answer for bytes `first..=last` describes, if it is exactly that range,
    /// uncompressed (it ends early only where the file does).
    fn check(&self, resp: &ureq::Response, first: u64, last: u64) -> Result<Version, Failure> {
        let bad = |detail: String| Failure::once(RemoteError::Protocol { detail });
        match resp.status() {
            206 => {}
            200 => {
                return Err(bad(
                    "the server answered a range request with 200 and the whole file: it does not serve byte ranges, which vdiskfs needs".into(),
                ));
            }
            s => return Err(bad(format!("the server answered a range request with {s} {}", resp.status_text()))),
        }
        if let Some(enc) = resp.header("content-encoding").filter(|e| !e.eq_ignore_ascii_case("identity")) {
            return Err(bad(format!("the server compressed a range read (Content-Encoding: {enc})")));
        }
        let cr = resp.header("content-range").unwrap_or("");
        let size = match wire::content_range(cr) {
            Some((Some((a, b)), Some(total))) if a == first && (b == last || (b + 1 == total && b < last)) => total,
            Some((_, None)) => {
                return Err(bad(format!("the server does not say the file's size (Content-Range: {cr})")));
            }
            _ => return Err(bad(format!("Content-Range {cr:?} does not answer bytes={first}-{last}"))),
        };
        Ok(Version {
            size,
            etag: resp.header("etag").map(str::to_string),
            last_modified: resp.header("last-modified").map(str::to_string),
        })
    }

    /// Runs `f` until it succeeds, fails for good, or the retry budget (two thirds of the
    /// timeout, so that a reader sees why) is spent; backoff 200 ms, doubling.
    fn with_retries<T>(&self, mut f: impl FnMut() -> Result<T, Failure>) -> Result<T, RemoteError> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            match f() {
                Ok(v) => {
                    self.alive();
                    return Ok(v);
                }
                Err(Failure { err, transient: true }) if start.elapsed() + wait < self.timeout * 2 / 3 => {
                    log::info!("{}: {err}; asking again in {} ms", self.origin, wait.as_millis());
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(Failure { err, transient }) => {
                    if transient {
                        self.dead();
                    }
                    return Err(err);
                }
            }
        }
    }

    /// Serves a run of adjacent chunks of one file, asking again for the chunks not yet
    /// delivered while the retry budget lasts.
    fn serve(&self, batch: VecDeque<Job>) {
        let mut jobs = batch;
        let r = self.with_retries(|| self.stream(&mut jobs));
        if let Err(e) = r {
            for j in jobs.drain(..) {
                (j.done)(Err(e.clone()));
            }
        }
    }

    /// One request for every job in `jobs`; each is answered (and removed) as its bytes arrive.
    fn stream(&self, jobs: &mut VecDeque<Job>) -> Result<(), Failure> {
        let Some(head) = jobs.front() else { return Ok(()) };
        let (url, version, first) = (head.url.clone(), head.version.clone(), head.off);
        let last = jobs.back().map_or(first, |j| j.off + j.len as u64 - 1);
        let resp = self.request(&url, first, last)?;
        let now = self.check(&resp, first, last)?;
        version.check(&now).map_err(Failure::once)?;
        let mut body = resp.into_reader();
        while let Some(j) = jobs.front() {
            let mut buf = vec![0u8; j.len];
            body.read_exact(&mut buf).map_err(|e| {
                let err = if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
                    RemoteError::Timeout { secs: self.timeout.as_secs() }
                } else {
                    RemoteError::Lost { host: self.origin.to_string(), detail: format!("the answer broke off: {e}") }
                };
                Failure { err, transient: true }
            })?;
            let j = jobs.pop_front().expect("front exists");
            (j.done)(Ok(buf));
        }
        Ok(())
    }

    fn dead(&self) {
        self.health.lock().dead();
    }

    fn alive(&self) {
        self.health.lock().alive();
    }
}

/// A file on a web server, read with range requests.
#[derive(Debug)]
pub struct HttpFile {
    host: Arc<HttpHost>,
    url: Arc<HttpUrl>,
    version: Arc<Version>,
}

impl Transport for HttpFile {
    fn name(&self) -> &'static str {
        if self.url.origin.tls { "https" } else { "http" }
    }

    fn fetch(&self, offset: u64, len: usize, done: Done) {
        let job = Job { url: self.url.clone(), off: offset, len, version: self.version.clone(), done };
        self.host.submit(job);
    }

    fn version(&self) -> String {
        self.version.etag.clone().unwrap_or_default()
    }
}
