//! Random access to the tar stream of a compressed export, without a decompressed copy.
//!
//! The index pass decodes the stream once, recording restart points (`restart.rs`, filled by
//! `gzip.rs` and `zstd.rs`). Reads are served in whole 1 MiB blocks of the decompressed stream:
//! a block is decoded by an idle decoder standing at or before it, or by a new one started at the
//! nearest restart point, and every whole block a decoder passes is kept in a memory cache of
//! [`MEM_CACHE_BYTES`]. A reader waits for a busy decoder that is already heading its way instead
//! of starting another, so concurrent and slightly out-of-order sequential readers (FUSE threads,
//! readahead) decode each block once. Where some stretch of the stream is more than [`LONG`]
//! bytes without a restart point (a single-frame zstd stream), blocks are also kept in a bounded
//! on-disk cache ([`FileBlockCache`]), so that going back does not mean decoding from the start
//! of the stream again. Locks are held only to take or return a decoder or to look up a block,
//! never while decoding.
//!
//! Memory per archive: the block cache (32 MiB), at most [`MAX_IDLE_DECODERS`] idle decoders plus
//! one per reader (gzip: 256 KiB of input buffer and zlib's 32 KiB window each; zstd: the input
//! buffer and up to libzstd's 128 MiB window limit each), and one 1 MiB block per reader.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::{Condvar, Mutex};

use super::Error;
use super::gzip::GzDecoder;
use super::restart::{Recorder, RestartPoint, WindowStore};
use super::zstd::ZstdDecoder;
use crate::cache::ByteCache;
use crate::error::{Error as CrateError, Result};
use crate::gate::create_private_file;
use crate::source::Source;

/// How the archive is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Plain,
    Gzip,
    Zstd,
}

impl Codec {
    pub fn detect(head: &[u8]) -> Codec {
        if head.starts_with(&[0x1f, 0x8b]) {
            Codec::Gzip
        } else if is_zstd(head) {
            Codec::Zstd
        } else {
            Codec::Plain
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Codec::Plain => "plain tar",
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
        }
    }
}

/// A zstd frame, or a skippable frame (`pzstd` starts with one holding the frame's size).
pub fn is_zstd(head: &[u8]) -> bool {
    head.len() >= 4 && {
        let m = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        m == 0xFD2F_B528 || m & 0xFFFF_FFF0 == 0x184D_2A50
    }
}

/// A forward decoder standing somewhere in the decompressed stream.
pub trait ForwardDecoder: Send {
    /// Where it stands in the decompressed stream.
    fn pos(&self) -> u64;
    /// Where it stands in the compressed file.
    fn compressed_pos(&self) -> u64;
    /// Decodes the next bytes into `out`; 0 only at the end of the stream.
    fn decode(&mut self, out: &mut [u8]) -> Result<usize>;
}

/// A decoder at the start of the file for the index pass.
pub fn scanner(codec: Codec, src: Arc<dyn Source>, rec: Recorder) -> Result<Scanner> {
    Ok(match codec {
        Codec::Gzip => Scanner::Gz(Box::new(GzDecoder::scanner(src, rec)?)),
        Codec::Zstd => Scanner::Zstd(Box::new(ZstdDecoder::scanner(src, rec)?)),
        Codec::Plain => return Err(CrateError::internal("a plain archive has no decoder")),
    })
}

/// The index pass's decoder, which records restart points as it goes.
pub enum Scanner {
    Gz(Box<GzDecoder>),
    Zstd(Box<ZstdDecoder>),
}

impl Scanner {
    pub fn decoder(&mut self) -> &mut dyn ForwardDecoder {
        match self {
            Scanner::Gz(d) => d.as_mut(),
            Scanner::Zstd(d) => d.as_mut(),
        }
    }
    pub fn finish(self) -> Option<Recorder> {
        match self {
            Scanner::Gz(d) => d.into_recorder(),
            Scanner::Zstd(d) => d.into_recorder(),
        }
    }
}

/// Decompressed bytes between restart points above which the block cache is used.
pub const LONG: u64 = 32 << 20;
/// The block caches' unit.
pub const BLOCK: u64 = 1 << 20;
/// Decoders kept idle per archive, for the next read near where they stand.
pub const MAX_IDLE_DECODERS: usize = 6;
/// Decoded blocks kept in memory per archive: 32 blocks.
pub const MEM_CACHE_BYTES: usize = 32 << 20;

struct Pool {
    idle: Vec<(Box<dyn ForwardDecoder>, u64)>,
    /// Start positions of decoders in use.
    busy: Vec<u64>,
    tick: u64,
}

/// What [`CompressedTar::take`] found.
enum Taken {
    /// A decoder, and the position it started at (its key in the pool's `busy` list).
    Decoder(Box<dyn ForwardDecoder>, u64),
    /// While waiting for another reader's decoder, the block was cached.
    CachedMeanwhile,
}

/// Random access to the decompressed tar stream of a compressed archive.
pub struct CompressedTar {
    src: Arc<dyn Source>,
    codec: Codec,
    points: Box<[RestartPoint]>,
    windows: WindowStore,
    total: u64,
    pool: Mutex<Pool>,
    cv: Condvar,
    blocks: Option<FileBlockCache>,
    /// Recently decoded blocks.
    mem: ByteCache<u64, Arc<[u8]>>,
    pub decoded: AtomicU64,
}

impl std::fmt::Debug for CompressedTar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressedTar").field("codec", &self.codec).field("points", &self.points.len()).finish()
    }
}

impl CompressedTar {
    /// `cache` is where the block cache (if the stream needs one) may keep up to `cache_bytes`.
    pub fn new(
        src: Arc<dyn Source>,
        codec: Codec,
        points: Vec<RestartPoint>,
        windows: WindowStore,
        total: u64,
        cache: Option<&Path>,
        cache_bytes: u64,
    ) -> Result<Self> {
        let longest = longest_interval(&points, total);
        let blocks = if longest > LONG { Some(FileBlockCache::new(cache, cache_bytes)?) } else { None };
        Ok(CompressedTar {
            src,
            codec,
            points: points.into(),
            windows,
            total,
            pool: Mutex::new(Pool { idle: Vec::new(), busy: Vec::new(), tick: 0 }),
            cv: Condvar::new(),
            blocks,
            mem: ByteCache::new(MEM_CACHE_BYTES),
            decoded: AtomicU64::new(0),
        })
    }

    pub fn points(&self) -> usize {
        self.points.len()
    }
    /// Longest run of decompressed bytes without a restart point.
    pub fn longest_interval(&self) -> u64 {
        longest_interval(&self.points, self.total)
    }
    /// The block cache bound, when the stream uses one.
    pub fn block_cache(&self) -> Option<u64> {
        self.blocks.as_ref().map(|b| b.slots as u64 * BLOCK)
    }

    fn point_before(&self, off: u64) -> RestartPoint {
        let i = self.points.partition_point(|p| p.out <= off);
        // The index pass records a point at the start; one read back without any starts there too.
        self.points.get(i.saturating_sub(1)).copied().unwrap_or(RestartPoint::new(0, 0, 0, true))
    }

    fn open(&self, p: &RestartPoint) -> Result<Box<dyn ForwardDecoder>> {
        Ok(match self.codec {
            Codec::Gzip => {
                let w = self.windows.window(p)?;
                Box::new(GzDecoder::at(self.src.clone(), p, &w)?)
            }
            _ => Box::new(ZstdDecoder::at(self.src.clone(), p)?),
        })
    }

    fn is_cached(&self, b: u64) -> bool {
        self.mem.get(&b).is_some() || self.blocks.as_ref().is_some_and(|c| c.contains(b))
    }

    /// An idle decoder standing in `[from, off]` (the closest), or a new one at `p`. With
    /// `wait`, a decoder in use that started in that range is waited for instead.
    fn take(&self, off: u64, p: &RestartPoint, wait: bool) -> Result<Taken> {
        let mut pool = self.pool.lock();
        loop {
            let best = pool
                .idle
                .iter()
                .enumerate()
                .filter(|(_, (c, _))| c.pos() >= p.out && c.pos() <= off)
                .max_by_key(|(_, (c, _))| c.pos())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let (c, _) = pool.idle.swap_remove(i);
                let s = c.pos();
                pool.busy.push(s);
                return Ok(Taken::Decoder(c, s));
            }
            // A decoder that started a little before the point is as good as a new one at it.
            let from = p.out.min(off.saturating_sub(2 * super::gzip::SPAN));
            if wait && pool.busy.iter().any(|&s| s >= from && s <= off) {
                self.cv.wait(&mut pool);
                if self.is_cached(off / BLOCK) {
                    return Ok(Taken::CachedMeanwhile);
                }
                continue;
            }
            pool.busy.push(p.out);
            break;
        }
        drop(pool);
        match self.open(p) {
            Ok(c) => Ok(Taken::Decoder(c, p.out)),
            Err(e) => {
                self.release(p.out, None);
                Err(e)
            }
        }
    }

    fn release(&self, start: u64, c: Option<Box<dyn ForwardDecoder>>) {
        let mut pool = self.pool.lock();
        if let Some(i) = pool.busy.iter().position(|&s| s == start) {
            pool.busy.swap_remove(i);
        }
        if let Some(c) = c {
            pool.tick += 1;
            let t = pool.tick;
            pool.idle.push((c, t));
            if pool.idle.len() > MAX_IDLE_DECODERS
                && let Some(i) = pool.idle.iter().enumerate().min_by_key(|(_, (_, t))| *t).map(|(i, _)| i)
            {
                pool.idle.swap_remove(i);
            }
        }
        drop(pool);
        self.cv.notify_all();
    }

    fn early_end(&self, at: u64) -> CrateError {
        Error::StreamEndsEarly { codec: self.codec.name(), at }.into()
    }

    /// Decodes forward from the decoder's position to `to` (a block boundary), keeping every
    /// whole block passed; a partial block before the first boundary is discarded.
    fn advance(&self, c: &mut dyn ForwardDecoder, to: u64, scratch: &mut Vec<u8>) -> Result<()> {
        while c.pos() < to {
            let pos = c.pos();
            if pos.is_multiple_of(BLOCK) {
                let data: Arc<[u8]> = self.decode_block(c, scratch)?.into();
                self.keep(pos / BLOCK, data);
                continue;
            }
            let n = (to - pos).min(BLOCK - pos % BLOCK) as usize;
            scratch.resize(n, 0);
            let got = c.decode(&mut scratch[..n])?;
            if got == 0 {
                return Err(self.early_end(pos));
            }
            self.decoded.fetch_add(got as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn decode_block<'a>(&self, c: &mut dyn ForwardDecoder, scratch: &'a mut Vec<u8>) -> Result<&'a [u8]> {
        let pos = c.pos();
        let n = BLOCK.min(self.total.saturating_sub(pos)) as usize;
        scratch.resize(n, 0);
        let mut done = 0;
        while done < n {
            let got = c.decode(&mut scratch[done..n])?;
            if got == 0 {
                return Err(self.early_end(pos + done as u64));
            }
            done += got;
        }
        self.decoded.fetch_add(n as u64, Ordering::Relaxed);
        Ok(&scratch[..n])
    }

    /// Keeps a decoded block in memory, and on disk when the stream needs the block cache.
    fn keep(&self, b: u64, data: Arc<[u8]>) {
        if let Some(bc) = self.blocks.as_ref() {
            bc.put(b, &data);
        }
        self.mem.insert(b, data);
    }

    /// Copies from block `b` at `within` if it is cached (memory, then disk).
    fn cached(&self, b: u64, within: usize, out: &mut [u8]) -> Result<bool> {
        if let Some(d) = self.mem.get(&b) {
            if d.len() < within + out.len() {
                return Err(self.early_end(b * BLOCK + d.len() as u64));
            }
            out.copy_from_slice(&d[within..within + out.len()]);
            return Ok(true);
        }
        match self.blocks.as_ref() {
            Some(bc) => bc.get(b, within, out),
            None => Ok(false),
        }
    }

    /// Fills `buf` from decompressed offset `off`. Data is decoded in whole 1 MiB blocks, kept in
    /// a small memory cache (and the disk cache where the stream needs it), so concurrent and
    /// slightly out-of-order sequential readers decode each block once.
    pub fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let end = off.checked_add(buf.len() as u64).ok_or_else(|| self.early_end(self.total))?;
        if end > self.total {
            return Err(self.early_end(self.total));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (b, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = (buf.len() - done).min(BLOCK as usize - within);
            let out = &mut buf[done..done + n];
            if !self.cached(b, within, out)? {
                match self.fill_block(b)? {
                    Some(data) if data.len() >= within + n => out.copy_from_slice(&data[within..within + n]),
                    Some(_) => return Err(self.early_end(pos)),
                    None => continue, // another reader decoded it meanwhile
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Decodes up to and including block `b`, keeping every whole block passed; returns block
    /// `b`, or `None` when another reader produced it while this one waited.
    fn fill_block(&self, b: u64) -> Result<Option<Arc<[u8]>>> {
        let start_off = b * BLOCK;
        let p = self.point_before(start_off);
        // Wait for a decoder already heading here rather than start another one behind it.
        let (mut c, start) = match self.take(start_off, &p, true)? {
            Taken::Decoder(c, start) => (c, start),
            Taken::CachedMeanwhile => return Ok(None),
        };
        let mut scratch = Vec::new();
        let r = self.advance(c.as_mut(), start_off, &mut scratch).and_then(|_| {
            let data: Arc<[u8]> = self.decode_block(c.as_mut(), &mut scratch)?.into();
            self.keep(b, data.clone());
            Ok(data)
        });
        self.release(start, r.is_ok().then_some(c));
        r.map(Some)
    }
}

impl Drop for CompressedTar {
    fn drop(&mut self) {
        log::info!(
            "{}: decoded {} bytes of a {}-byte stream while serving reads",
            self.src.location(),
            self.decoded.load(Ordering::Relaxed),
            self.total
        );
    }
}

fn longest_interval(points: &[RestartPoint], total: u64) -> u64 {
    let mut longest = 0;
    for (i, p) in points.iter().enumerate() {
        let next = points.get(i + 1).map_or(total, |q| q.out);
        longest = longest.max(next.saturating_sub(p.out));
    }
    longest
}

/// Decompressed blocks in an unlinked file, at most `slots` of them, least recently used out.
struct FileBlockCache {
    file: File,
    slots: u32,
    map: Mutex<BlockMap>,
}

struct BlockMap {
    lru: LruCache<u64, u32>,
    lens: HashMap<u32, u32>,
    free: Vec<u32>,
    pins: Vec<u32>,
}

impl FileBlockCache {
    fn new(dir: Option<&Path>, bytes: u64) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = dir.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        // A name already taken (a stale file, something planted) moves on to the next one.
        let mut attempts = 0;
        let (file, path) = loop {
            let name = format!(".xva-blocks-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
            let path = dir.join(&name);
            match create_private_file(&dir, &name) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
                Err(e) => return Err(CrateError::io(format!("creating the block cache {}", path.display()), e)),
            }
        };
        let _ = std::fs::remove_file(&path); // lives until closed, even after a crash
        let slots = (bytes / BLOCK).clamp(8, u32::MAX as u64) as u32;
        log::info!("block cache of {} MiB in {}", (slots as u64 * BLOCK) >> 20, dir.display());
        Ok(FileBlockCache {
            file,
            slots,
            map: Mutex::new(BlockMap {
                lru: LruCache::unbounded(),
                lens: HashMap::new(),
                free: (0..slots).rev().collect(),
                pins: vec![0; slots as usize],
            }),
        })
    }

    fn contains(&self, b: u64) -> bool {
        self.map.lock().lru.contains(&b)
    }

    /// Copies block `b` from `within` into `out`; false when the block is not cached.
    fn get(&self, b: u64, within: usize, out: &mut [u8]) -> Result<bool> {
        let slot = {
            let mut m = self.map.lock();
            let Some(&s) = m.lru.get(&b) else { return Ok(false) };
            if (m.lens.get(&s).copied().unwrap_or(0) as usize) < within + out.len() {
                return Ok(false);
            }
            m.pins[s as usize] += 1;
            s
        };
        let r = self.file.read_exact_at(out, slot as u64 * BLOCK + within as u64);
        self.map.lock().pins[slot as usize] -= 1;
        r.map_err(|e| CrateError::io("reading the block cache", e))?;
        Ok(true)
    }

    fn put(&self, b: u64, data: &[u8]) {
        let slot = {
            let mut m = self.map.lock();
            if m.lru.contains(&b) {
                return;
            }
            let mut slot = m.free.pop();
            for _ in 0..16 {
                if slot.is_some() {
                    break;
                }
                match m.lru.pop_lru() {
                    Some((k, s)) if m.pins[s as usize] > 0 => {
                        m.lru.put(k, s);
                    }
                    Some((_, s)) => slot = Some(s),
                    None => break,
                }
            }
            match slot {
                Some(s) => s,
                None => return,
            }
        };
        match self.file.write_all_at(data, slot as u64 * BLOCK) {
            Ok(()) => {
                let mut m = self.map.lock();
                m.lens.insert(slot, data.len() as u32);
                m.lru.put(b, slot);
            }
            Err(e) => {
                log::warn!("block cache write failed ({e}); serving without it");
                self.map.lock().free.push(slot);
            }
        }
    }
}
