//! A remote file as a [`Source`]: aligned chunks, one fetch per chunk shared by every reader
//! waiting for it, readahead that follows sequential readers, a deadline on every read.
//!
//! A chunk is looked for in memory, then in the persistent [`ChunkCache`], then fetched. The
//! in-flight map's lock is held only to find or insert a chunk's [`Slot`]; readers then wait on
//! the slot (with the read's deadline), never on a lock held across the network. A fetch that
//! outlives its readers' deadline still fills the caches when it lands.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::cache::{ChunkCache, EntryKey};
use super::{RemoteError, RemoteOptions, RemoteStat, RemoteStats, Transport};
use crate::cache::ByteCache;
use crate::error::{Error, Result};
use crate::source::{FileId, Location, Source};

type Chunk = Arc<[u8]>;
type Answer = std::result::Result<Chunk, RemoteError>;

/// Where one chunk's fetch reports; every reader of that chunk waits here.
#[derive(Default)]
struct Slot {
    answer: Mutex<Option<Answer>>,
    cv: Condvar,
}

impl Slot {
    /// The answer, or `None` when `deadline` passes first.
    fn wait(&self, deadline: Instant) -> Option<Answer> {
        let mut g = self.answer.lock();
        while g.is_none() {
            if self.cv.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.clone()
    }

    fn complete(&self, a: Answer) {
        *self.answer.lock() = Some(a);
        self.cv.notify_all();
    }
}

/// A chunk a read needs: here already, or on its way.
enum Pending {
    Ready(Chunk),
    Wait(Arc<Slot>),
}

/// What fetch callbacks share with readers.
struct Shared {
    loc: Location,
    inflight: Mutex<HashMap<u64, Arc<Slot>>>,
    mem: ByteCache<u64, Chunk>,
    disk: Option<(Arc<ChunkCache>, EntryKey)>,
    fetched: AtomicU64,
    from_cache: AtomicU64,
    requests: AtomicU64,
    /// Set once the file is seen to have changed: every later read fails.
    stale: Mutex<Option<RemoteError>>,
}

impl Shared {
    /// Publishes a chunk's answer: memory cache first, then the slot leaves the map, then its
    /// waiters wake (so no reader can miss both).
    fn finish(&self, i: u64, a: Answer) {
        if let Ok(c) = &a {
            self.mem.insert(i, c.clone());
        }
        let slot = self.inflight.lock().remove(&i);
        if let Some(s) = slot {
            s.complete(a);
        }
    }
}

/// One sequential reader being followed.
#[derive(Clone, Copy, Default)]
struct Stream {
    start: u64,
    end: u64,
    window: u64,
    /// Highest chunk already asked for.
    ahead: u64,
    used: u64,
}

/// A remote file, read through chunks.
pub struct RemoteSource {
    transport: Arc<dyn Transport>,
    stat: RemoteStat,
    id: FileId,
    chunk: u64,
    timeout: Duration,
    readahead: u64,
    sh: Arc<Shared>,
    streams: Mutex<(Vec<Stream>, u64)>,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource").field("loc", &self.sh.loc).field("transport", &self.transport).finish()
    }
}

fn hash(x: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    x.hash(&mut h);
    h.finish()
}

impl RemoteSource {
    pub fn new(
        loc: Location,
        transport: Arc<dyn Transport>,
        stat: RemoteStat,
        opts: &RemoteOptions,
        cache: Option<Arc<ChunkCache>>,
    ) -> RemoteSource {
        let chunk = opts.chunk.max(4096) as u64;
        let disk = cache.map(|c| {
            // A version tag (an HTTP ETag) joins the name, so a new version is a new entry.
            let version = transport.version();
            let name = if version.is_empty() { loc.to_string() } else { format!("{loc}\nversion {version}") };
            (c, EntryKey::new(&name, stat.size, stat.mtime, chunk))
        });
        let (host, path) = match (&loc, loc.as_ssh()) {
            (_, Some(s)) => (hash(&s.host), hash(&s.path)),
            (Location::Http(u), _) => (hash(&u.origin), hash(u.to_string())),
            _ => (0, hash(loc.to_string())),
        };
        let id = FileId { dev: host, ino: path, size: stat.size, mtime_ns: stat.mtime as i128 * 1_000_000_000 };
        let sh = Shared {
            loc,
            inflight: Mutex::new(HashMap::new()),
            mem: ByteCache::sharded(opts.memory_bytes, 8),
            disk,
            fetched: AtomicU64::new(0),
            from_cache: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            stale: Mutex::new(None),
        };
        RemoteSource {
            transport,
            stat,
            id,
            chunk,
            timeout: opts.timeout,
            readahead: opts.readahead as u64,
            sh: Arc::new(sh),
            streams: Mutex::new((vec![Stream::default(); 8], 0)),
        }
    }

    pub fn stat(&self) -> RemoteStat {
        self.stat
    }

    fn chunk_len(&self, i: u64) -> usize {
        (self.stat.size - i * self.chunk).min(self.chunk) as usize
    }

    /// Chunk `i`: from memory, or the slot its (possibly new) fetch reports to.
    fn get(&self, i: u64) -> Pending {
        if let Some(c) = self.sh.mem.get(&i) {
            return Pending::Ready(c);
        }
        let (slot, mine) = {
            let mut m = self.sh.inflight.lock();
            match m.get(&i) {
                Some(s) => (s.clone(), false),
                None => {
                    let s = Arc::new(Slot::default());
                    m.insert(i, s.clone());
                    (s, true)
                }
            }
        };
        if mine {
            self.start(i);
        }
        Pending::Wait(slot)
    }

    /// Fills chunk `i`'s slot: from the persistent cache, else by a fetch.
    fn start(&self, i: u64) {
        let want = self.chunk_len(i);
        if let Some(c) = self.sh.mem.get(&i) {
            self.sh.finish(i, Ok(c));
            return;
        }
        if let Some((cache, key)) = &self.sh.disk
            && let Some(c) = cache.get(key, i, want)
        {
            self.sh.from_cache.fetch_add(want as u64, Ordering::Relaxed);
            self.sh.finish(i, Ok(c.into()));
            return;
        }
        self.sh.requests.fetch_add(1, Ordering::Relaxed);
        let sh = self.sh.clone();
        let at = i * self.chunk;
        self.transport.fetch(
            at,
            want,
            Box::new(move |r| {
                let a = match r {
                    Ok(v) if v.len() == want => {
                        sh.fetched.fetch_add(want as u64, Ordering::Relaxed);
                        if let Some((cache, key)) = &sh.disk {
                            cache.put(key, i, &v);
                        }
                        Ok(Chunk::from(v))
                    }
                    Ok(v) => Err(RemoteError::Short { at, got: v.len(), want }),
                    Err(e) => {
                        if matches!(e, RemoteError::Changed { .. }) {
                            let mut s = sh.stale.lock();
                            if s.is_none() {
                                log::warn!("{}: {e}; every further read fails", sh.loc);
                                *s = Some(e.clone());
                            }
                        }
                        Err(e)
                    }
                };
                sh.finish(i, a);
            }),
        );
    }

    /// Follows sequential readers: a read that continues one (within a little slack, since
    /// FUSE threads may deliver a stream's pieces out of order) extends it. Once a stream has
    /// read 1 MiB in order, as much again (up to `readahead`) is asked for ahead of it without
    /// waiting; scattered table reads at open never trigger it.
    fn read_ahead(&self, off: u64, end: u64) {
        if self.readahead == 0 {
            return;
        }
        let slack = 1 << 20;
        let (from, to) = {
            let mut g = self.streams.lock();
            let (streams, clock) = &mut *g;
            *clock += 1;
            let hit = streams.iter_mut().find(|s| s.end > 0 && off + slack >= s.end && off <= s.end + s.window + slack);
            let Some(s) = hit else {
                let lru = streams.iter_mut().min_by_key(|s| s.used).expect("streams");
                *lru = Stream { start: off, end, window: 0, ahead: 0, used: *clock };
                return;
            };
            s.end = s.end.max(end);
            s.used = *clock;
            if s.end - s.start < 1 << 20 {
                return;
            }
            s.window = (s.end - s.start).min(self.readahead);
            let last = (s.end + s.window).min(self.stat.size).div_ceil(self.chunk);
            let from = s.ahead.max(s.end.div_ceil(self.chunk));
            s.ahead = s.ahead.max(last);
            (from, last)
        };
        for i in from..to {
            let cached = self.sh.disk.as_ref().is_some_and(|(c, k)| c.contains(k, i));
            if !cached && self.sh.mem.get(&i).is_none() {
                let _ = self.get(i);
            }
        }
    }

    fn fail(&self, e: RemoteError) -> Error {
        Error::from(e).in_file(&self.sh.loc)
    }
}

impl Drop for RemoteSource {
    /// Fetches already on the network (readahead, mostly) are waited for briefly, so that what
    /// was paid for lands in the persistent cache instead of being lost when a command ends.
    fn drop(&mut self) {
        if self.sh.disk.is_none() {
            return;
        }
        let deadline = Instant::now() + self.timeout.min(Duration::from_secs(2));
        let slots: Vec<Arc<Slot>> = self.sh.inflight.lock().values().cloned().collect();
        for s in slots {
            if s.wait(deadline).is_none() {
                break;
            }
        }
    }
}

impl Source for RemoteSource {
    fn location(&self) -> &Location {
        &self.sh.loc
    }

    fn len(&self) -> Result<u64> {
        Ok(self.stat.size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if let Some(e) = self.sh.stale.lock().clone() {
            return Err(self.fail(e));
        }
        if offset >= self.stat.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.stat.size - offset) as usize;
        let end = offset + n as u64;
        let deadline = Instant::now() + self.timeout;
        let (first, last) = (offset / self.chunk, (end - 1) / self.chunk);
        let pending: Vec<(u64, Pending)> = (first..=last).map(|i| (i, self.get(i))).collect();
        self.read_ahead(offset, end);
        for (i, p) in pending {
            let c = match p {
                Pending::Ready(c) => c,
                Pending::Wait(slot) => match slot.wait(deadline) {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(self.fail(e)),
                    None => return Err(self.fail(RemoteError::Timeout { secs: self.timeout.as_secs() })),
                },
            };
            let base = i * self.chunk;
            let (s, t) = (offset.max(base), end.min(base + c.len() as u64));
            if s >= t {
                return Err(self.fail(RemoteError::Short { at: base, got: c.len(), want: self.chunk_len(i) }));
            }
            buf[(s - offset) as usize..(t - offset) as usize]
                .copy_from_slice(&c[(s - base) as usize..(t - base) as usize]);
        }
        Ok(n)
    }

    fn id(&self) -> Option<FileId> {
        Some(self.id)
    }

    fn remote_stats(&self) -> Option<RemoteStats> {
        Some(RemoteStats {
            transport: self.transport.name(),
            fetched: self.sh.fetched.load(Ordering::Relaxed),
            from_cache: self.sh.from_cache.load(Ordering::Relaxed),
            requests: self.sh.requests.load(Ordering::Relaxed),
        })
    }

    fn note_identity(&self, identity: &str) -> Result<()> {
        match &self.sh.disk {
            Some((cache, key)) => cache.note_identity(key, identity).map_err(|e| self.fail(e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::remote::{Done, RemoteKind};

    /// A transport over bytes in memory that counts fetches and can hold them back.
    #[derive(Default)]
    struct Fake {
        data: Vec<u8>,
        fetches: AtomicU64,
        held: Mutex<Vec<(u64, usize, Done)>>,
        hold: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Debug for Fake {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Fake")
        }
    }

    impl Transport for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn fetch(&self, offset: u64, len: usize, done: Done) {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.hold.load(Ordering::SeqCst) {
                self.held.lock().push((offset, len, done));
                return;
            }
            let o = offset as usize;
            done(Ok(self.data[o..(o + len).min(self.data.len())].to_vec()))
        }
    }

    fn source(fake: Arc<Fake>, timeout: Duration) -> RemoteSource {
        let stat = RemoteStat { size: fake.data.len() as u64, mtime: 1, kind: RemoteKind::Regular };
        let opts = RemoteOptions { chunk: 4096, readahead: 0, timeout, ..Default::default() };
        RemoteSource::new(Location::local("/fake"), fake, stat, &opts, None)
    }

    #[test]
    fn reads_span_chunks_and_each_chunk_is_fetched_once() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let fake = Arc::new(Fake { data: data.clone(), ..Default::default() });
        let s = source(fake.clone(), Duration::from_secs(5));
        let mut buf = vec![0u8; 10_000];
        assert_eq!(s.read_at(&mut buf, 3000).unwrap(), 10_000);
        assert_eq!(&buf[..], &data[3000..13_000]);
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 4);
        assert_eq!(s.read_at(&mut buf, 19_000).unwrap(), 1000, "short only at the end");
        assert_eq!(&buf[..1000], &data[19_000..]);
        s.read_exact_at(&mut buf[..100], 5000).unwrap();
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn waiters_share_one_fetch_and_a_late_answer_times_out() {
        let fake = Arc::new(Fake { data: vec![9u8; 8192], ..Default::default() });
        fake.hold.store(true, Ordering::SeqCst);
        let s = Arc::new(source(fake.clone(), Duration::from_millis(300)));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.read_at(&mut [0u8; 16], 100).map_err(|e| e.to_string()))
            })
            .collect();
        let t = Instant::now();
        for r in readers {
            let e = r.join().unwrap().unwrap_err();
            assert!(e.contains("no answer within"), "{e}");
        }
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1, "one fetch for every waiter");
        // The answer lands later: it fills the cache, and the next read needs no fetch.
        for (o, l, done) in fake.held.lock().drain(..) {
            done(Ok(vec![9u8; l.min(8192 - o as usize)]));
        }
        fake.hold.store(false, Ordering::SeqCst);
        let mut b = [0u8; 16];
        s.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [9u8; 16]);
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_fetch_on_the_network_at_drop_still_lands_in_the_persistent_cache() {
        let t = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(t.path(), 1 << 20).unwrap());
        let fake = Arc::new(Fake { data: vec![7u8; 8192], ..Default::default() });
        fake.hold.store(true, Ordering::SeqCst);
        let stat = RemoteStat { size: 8192, mtime: 1, kind: RemoteKind::Regular };
        let opts =
            RemoteOptions { chunk: 4096, readahead: 0, timeout: Duration::from_millis(500), ..Default::default() };
        let open = |f: Arc<Fake>| RemoteSource::new(Location::local("/f"), f, stat, &opts, Some(cache.clone()));
        let s = open(fake.clone());
        assert!(s.read_at(&mut [0u8; 8], 0).is_err(), "no answer within the timeout");
        // The answer lands while the source is being dropped (a command ending).
        let f = fake.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            for (o, l, done) in f.held.lock().drain(..) {
                done(Ok(vec![7u8; l.min(8192 - o as usize)]));
            }
        });
        drop(s);
        // The next command, right after: without the wait at drop it would fetch again.
        let again = Arc::new(Fake { data: vec![7u8; 8192], ..Default::default() });
        let mut b = [0u8; 8];
        open(again.clone()).read_at(&mut b, 0).unwrap();
        assert_eq!((b, again.fetches.load(Ordering::SeqCst)), ([7u8; 8], 0), "served from the cache");
        late.join().unwrap();
    }

    #[test]
    fn a_changed_file_fails_every_later_read() {
        #[derive(Debug)]
        struct Changing;
        impl Transport for Changing {
            fn name(&self) -> &'static str {
                "changing"
            }
            fn fetch(&self, _: u64, _: usize, done: Done) {
                done(Err(RemoteError::Changed { what: "size 8192 → 4096".into() }))
            }
        }
        let stat = RemoteStat { size: 8192, mtime: 1, kind: RemoteKind::Regular };
        let opts = RemoteOptions { chunk: 4096, readahead: 0, ..Default::default() };
        let s = RemoteSource::new(Location::local("/f"), Arc::new(Changing), stat, &opts, None);
        let e = s.read_at(&mut [0u8; 8], 0).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::Stale);
        assert!(e.to_string().contains("changed under us"), "{e}");
        assert!(s.read_at(&mut [0u8; 8], 4096).unwrap_err().to_string().contains("changed under us"));
    }
}
