//! The persistent chunk cache: remote chunks kept on local disk, bounded, least recently used
//! evicted first, shared by every command that uses the same `--cache-dir`.
//!
//! An entry is one version of one remote file: its directory is named after a hash of the
//! location (user, host, port, path), size, mtime and chunk size, so a file that changed is a
//! new entry and old chunks are never served for it. The entry also records the identity of
//! the layer read from it (VHD UUID, VHDX DataWriteGuid, VMDK CID); a layer opened later with
//! another identity drops the entry. Each chunk is one file, `<index>.c`: an XXH64 of the bytes,
//! then the bytes; written under a temporary name and renamed, so a reader sees a whole chunk or
//! none, and a chunk whose checksum fails is deleted and fetched again.
//!
//! Every process keeps its own account of the cache (built by scanning it at start, oldest
//! first by mtime) and evicts to stay under the bound; a chunk served is touched, so the next
//! process sees the order too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use lru::LruCache;
use parking_lot::Mutex;

use super::RemoteError;

/// Names one version of one remote file in the cache.
#[derive(Debug, Clone)]
pub struct EntryKey {
    name: String,
    text: String,
}

impl EntryKey {
    pub fn new(location: &str, size: u64, mtime: i64, chunk: u64) -> EntryKey {
        let text = format!("{location}\nsize {size}\nmtime {mtime}\nchunk {chunk}\n");
        let name = format!("{:016x}", xxhash_rust::xxh64::xxh64(text.as_bytes(), 0x0076_6469_736b_6673));
        EntryKey { name, text }
    }
}

struct State {
    /// (entry, chunk) → bytes on disk, least recently used first out.
    lru: LruCache<(String, u64), u64>,
    total: u64,
    /// Entries whose directory and key file exist.
    made: HashSet<String>,
}

/// The cache directory and this process's account of it.
pub struct ChunkCache {
    dir: PathBuf,
    max: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache").field("dir", &self.dir).field("max", &self.max).finish()
    }
}

const HEAD: usize = 8;

impl ChunkCache {
    /// Opens (creating) the cache in `dir`, bounded by `max` bytes.
    pub fn open(dir: &Path, max: u64) -> std::io::Result<ChunkCache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let entry = e.file_name().to_string_lossy().into_owned();
            let Ok(rd) = std::fs::read_dir(e.path()) else { continue };
            for c in rd.flatten() {
                let n = c.file_name().to_string_lossy().into_owned();
                let Some(i) = n.strip_suffix(".c").and_then(|x| u64::from_str_radix(x, 16).ok()) else {
                    if n.contains(".tmp-") {
                        let _ = std::fs::remove_file(c.path());
                    }
                    continue;
                };
                if let Ok(md) = c.metadata() {
                    found.push((md.modified().ok(), entry.clone(), i, md.len()));
                }
            }
        }
        found.sort();
        let mut st = State { lru: LruCache::unbounded(), total: 0, made: HashSet::new() };
        for (_, entry, i, len) in found {
            st.total += len;
            st.lru.put((entry, i), len);
        }
        let cache = ChunkCache { dir: dir.to_path_buf(), max, state: Mutex::new(st) };
        cache.evict(None);
        Ok(cache)
    }

    fn chunk_path(&self, key: &EntryKey, i: u64) -> PathBuf {
        self.dir.join(&key.name).join(format!("{i:x}.c"))
    }

    /// True when chunk `i` of `key` is on disk (no promotion).
    pub fn contains(&self, key: &EntryKey, i: u64) -> bool {
        self.state.lock().lru.peek(&(key.name.clone(), i)).is_some()
    }

    /// Chunk `i` of `key`, if it is cached whole and intact.
    pub fn get(&self, key: &EntryKey, i: u64, want: usize) -> Option<Vec<u8>> {
        self.state.lock().lru.get(&(key.name.clone(), i))?;
        let p = self.chunk_path(key, i);
        let bytes = std::fs::read(&p).ok();
        let ok = bytes.as_ref().is_some_and(|b| {
            b.len() == HEAD + want && b[..HEAD] == xxhash_rust::xxh64::xxh64(&b[HEAD..], 0).to_le_bytes()
        });
        if !ok {
            log::warn!("{}: cached chunk damaged or missing; fetching it again", p.display());
            self.forget(key, i);
            let _ = std::fs::remove_file(&p);
            return None;
        }
        if let Ok(f) = std::fs::File::options().write(true).open(&p) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        bytes.map(|mut b| b.split_off(HEAD))
    }

    fn forget(&self, key: &EntryKey, i: u64) {
        let mut st = self.state.lock();
        if let Some(n) = st.lru.pop(&(key.name.clone(), i)) {
            st.total -= n;
        }
    }

    /// Stores chunk `i` of `key`; evicts the least recently used chunks beyond the bound. A
    /// failure only means the chunk is not cached.
    pub fn put(&self, key: &EntryKey, i: u64, data: &[u8]) {
        if let Err(e) = self.try_put(key, i, data) {
            log::debug!("{}: cannot cache a chunk: {e}", self.dir.display());
        }
    }

    fn try_put(&self, key: &EntryKey, i: u64, data: &[u8]) -> std::io::Result<()> {
        let len = (HEAD + data.len()) as u64;
        if len > self.max {
            return Ok(());
        }
        self.make_entry(key)?;
        let p = self.chunk_path(key, i);
        let tmp = p.with_extension(format!("tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut buf = Vec::with_capacity(HEAD + data.len());
        buf.extend_from_slice(&xxhash_rust::xxh64::xxh64(data, 0).to_le_bytes());
        buf.extend_from_slice(data);
        std::fs::write(&tmp, &buf)?;
        std::fs::rename(&tmp, &p).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        {
            let mut st = self.state.lock();
            if let Some(old) = st.lru.put((key.name.clone(), i), len) {
                st.total -= old;
            }
            st.total += len;
        }
        self.evict(Some((&key.name, i)));
        Ok(())
    }

    fn make_entry(&self, key: &EntryKey) -> std::io::Result<()> {
        if self.state.lock().made.contains(&key.name) {
            return Ok(());
        }
        let d = self.dir.join(&key.name);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("key"), &key.text)?;
        self.state.lock().made.insert(key.name.clone());
        Ok(())
    }

    /// Removes least recently used chunks until the total is within the bound (never `keep`).
    fn evict(&self, keep: Option<(&str, u64)>) {
        loop {
            let victim = {
                let mut st = self.state.lock();
                if st.total <= self.max {
                    return;
                }
                let Some(((e, i), n)) = st.lru.pop_lru() else { return };
                if keep.is_some_and(|(ke, ki)| ke == e && ki == i) {
                    st.lru.put((e, i), n);
                    return;
                }
                st.total -= n;
                self.dir.join(&e).join(format!("{i:x}.c"))
            };
            let _ = std::fs::remove_file(victim);
        }
    }

    /// Records the identity of the layer read from `key`'s file; if the entry recorded another,
    /// the entry is dropped and the caller must not trust what it read.
    pub fn note_identity(&self, key: &EntryKey, identity: &str) -> Result<(), RemoteError> {
        let local = |e: std::io::Error| RemoteError::Local(format!("chunk cache: {e}"));
        self.make_entry(key).map_err(local)?;
        let p = self.dir.join(&key.name).join("identity");
        match std::fs::read_to_string(&p) {
            Ok(old) if old == identity => Ok(()),
            Ok(old) => {
                self.drop_entry(key);
                self.make_entry(key).map_err(local)?;
                std::fs::write(&p, identity).map_err(local)?;
                Err(RemoteError::CachedOtherVersion { cached: old, now: identity.to_string() })
            }
            Err(_) => std::fs::write(&p, identity).map_err(local),
        }
    }

    fn drop_entry(&self, key: &EntryKey) {
        let mut st = self.state.lock();
        let gone: Vec<(String, u64)> =
            st.lru.iter().filter(|((e, _), _)| *e == key.name).map(|(k, _)| k.clone()).collect();
        for k in gone {
            if let Some(n) = st.lru.pop(&k) {
                st.total -= n;
            }
        }
        st.made.remove(&key.name);
        drop(st);
        let _ = std::fs::remove_dir_all(self.dir.join(&key.name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_survive_a_reopen_and_the_least_recent_go_first() {
        let t = tempfile::tempdir().unwrap();
        let k = EntryKey::new("ssh://h/f", 100, 1, 10);
        let c = ChunkCache::open(t.path(), 3 * (HEAD as u64 + 10)).unwrap();
        for i in 0..3 {
            c.put(&k, i, &[i as u8; 10]);
        }
        assert_eq!(c.get(&k, 0, 10).unwrap(), [0u8; 10]); // 0 is now the most recent
        c.put(&k, 3, &[3u8; 10]);
        assert!(c.contains(&k, 0) && !c.contains(&k, 1) && c.contains(&k, 3));
        drop(c);
        let c = ChunkCache::open(t.path(), 1 << 20).unwrap();
        assert_eq!(c.get(&k, 3, 10).unwrap(), [3u8; 10]);
        assert!(c.get(&k, 1, 10).is_none());
        let other = EntryKey::new("ssh://h/f", 100, 2, 10);
        assert!(c.get(&other, 3, 10).is_none(), "another mtime is another entry");
    }

    #[test]
    fn a_damaged_chunk_is_dropped_and_another_identity_drops_the_entry() {
        let t = tempfile::tempdir().unwrap();
        let k = EntryKey::new("ssh://h/f", 100, 1, 10);
        let c = ChunkCache::open(t.path(), 1 << 20).unwrap();
        c.put(&k, 0, &[7u8; 10]);
        c.put(&k, 1, &[8u8; 10]);
        let p = c.chunk_path(&k, 0);
        let mut b = std::fs::read(&p).unwrap();
        b[HEAD] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(c.get(&k, 0, 10).is_none());
        assert!(!p.exists());
        c.note_identity(&k, "vhd:1234").unwrap();
        c.note_identity(&k, "vhd:1234").unwrap();
        let e = c.note_identity(&k, "vhd:5678").unwrap_err();
        assert!(matches!(e, RemoteError::CachedOtherVersion { .. }), "{e}");
        assert!(c.get(&k, 1, 10).is_none());
    }
}
