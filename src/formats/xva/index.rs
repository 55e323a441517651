//! The archive index: every tar member (name, data offset, size; the content of checksums and
//! `ova.xml`) and, for a compressed export, the restart points. Built in one streaming pass with
//! a progress bar on a terminal, and kept in the cache directory under the archive's identity
//! (device, inode, size, mtime), so the next open of the same file reads it back instantly.
//!
//! The file is `xva-index-<dev>-<ino>-<size>-<mtime>.v1`: the deflated gzip windows, then the
//! metadata, then a 32-byte footer (metadata offset and length, its XXH64, a magic). A file that
//! does not check out is ignored and rebuilt. It is written under a temporary name and renamed,
//! and older indexes of the same inode are removed.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Error;
use super::compressed::{self, Codec};
use super::restart::{MAX_STORED_WINDOW, Recorder, RestartPoint, WindowStore};
use super::tar::{self, End, Input, Member};
use crate::error::{Error as CrateError, Result};
use crate::progress::Progress;
use crate::source::{FileId, Source};

const MAGIC: &[u8; 8] = b"VDXVAIX1";

/// What the index pass found.
#[derive(Debug)]
pub struct Index {
    pub codec: Codec,
    pub members: Vec<Member>,
    pub end: End,
    /// Length of the (decompressed) tar stream.
    pub total: u64,
    pub points: Vec<RestartPoint>,
    pub windows: WindowStore,
    /// Read back from the cache directory.
    pub cached: Option<PathBuf>,
}

/// Members whose content goes into the index.
fn keep(name: &str, size: u64) -> bool {
    size <= tar::SMALL || (name.trim_start_matches("./") == "ova.xml" && size <= super::MAX_OVA_XML)
}

/// The index file's name for the file `id`.
fn index_name(id: &FileId) -> String {
    format!("xva-index-{:x}-{:x}-{:x}-{:x}.v1", id.dev, id.ino, id.size, id.mtime_ns as u128)
}

/// Loads the cached index of `src`, or builds (and caches) it.
pub fn open(src: &Arc<dyn Source>, codec: Codec, cache_dir: Option<&Path>, progress: &dyn Progress) -> Result<Index> {
    let id = src.id();
    let path = cache_dir.zip(id).map(|(d, id)| d.join(index_name(&id)));
    if let (Some(p), Some(id)) = (&path, id)
        && let Some(ix) = load(p, &id)
    {
        log::info!("{}: index read from {}", src.location(), p.display());
        return Ok(ix);
    }
    let tmp = match &path {
        Some(p) => match create_tmp(p) {
            Ok(x) => Some(x),
            Err(e) => {
                log::warn!("cannot write an index in {}: {e}; the index is kept in memory", p.display());
                None
            }
        },
        None => None,
    };
    let rec = match &tmp {
        Some((_, f)) => Recorder::file(f.try_clone().map_err(|e| CrateError::io("index file", e))?),
        None => Recorder::memory(),
    };
    let mut ix = build(src, codec, rec, progress)?;
    if let (Some((tp, f)), Some(p), Some(id)) = (tmp, path, id) {
        match save(&f, &tp, &p, &id, &ix) {
            Ok(()) => {
                ix.windows = WindowStore::File(File::open(&p).map_err(|e| CrateError::io("index file", e))?);
                ix.cached = Some(p);
            }
            Err(e) => {
                // The windows stay readable through the open (now unlinked) file.
                let _ = std::fs::remove_file(&tp);
                log::warn!("cannot write the index {}: {e}", p.display());
            }
        }
    }
    Ok(ix)
}

fn create_tmp(p: &Path) -> std::io::Result<(PathBuf, File)> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tp = p.with_extension(format!("tmp-{}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tp)?;
    Ok((tp, f))
}

fn build(src: &Arc<dyn Source>, codec: Codec, rec: Recorder, progress: &dyn Progress) -> Result<Index> {
    let len = src.len()?;
    let what = if codec == Codec::Plain { "indexing" } else { "indexing (decompressing)" };
    progress.start(&format!("{} {what}", src.location().file_name()), len);
    let tick = |at: u64| progress.set(at);
    let mut members = Vec::new();
    let mut push = |m: Member| {
        members.push(m);
        Ok(())
    };
    let (end, total, rec) = match codec {
        Codec::Plain => (tar::walk(Input::File(src.as_ref()), &keep, &mut push, &tick)?, len, rec),
        _ => {
            let mut scanner = compressed::scanner(codec, src.clone(), rec)?;
            let end = tar::walk(Input::Decoder(scanner.decoder()), &keep, &mut push, &tick)?;
            // Decode to the end: trailing blocks, and so the stream's own checks run (gzip CRC,
            // a zstd frame cut short).
            let d = scanner.decoder();
            let mut buf = vec![0u8; 1 << 20];
            while d.decode(&mut buf).map_err(Error::AfterTar)? > 0 {}
            let total = d.pos();
            let rec = scanner.finish().ok_or_else(|| CrateError::internal("the index pass lost its recorder"))?;
            (end, total, rec)
        }
    };
    progress.finish();
    Ok(Index { codec, members, end, total, points: rec.points, windows: rec.windows, cached: None })
}

// ---- the index file ----

fn put(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// The metadata: the archive's identity, then the members, then the restart points.
fn encode(id: &FileId, ix: &Index) -> Vec<u8> {
    let mut m = Vec::new();
    put(&mut m, id.dev);
    put(&mut m, id.ino);
    put(&mut m, id.size);
    m.extend_from_slice(&id.mtime_ns.to_le_bytes());
    m.push(ix.codec as u8);
    m.push(matches!(ix.end, End::Marker) as u8);
    put(&mut m, ix.total);
    put(&mut m, ix.members.len() as u64);
    for mem in &ix.members {
        put(&mut m, mem.name.len() as u64);
        m.extend_from_slice(mem.name.as_bytes());
        put(&mut m, mem.offset);
        put(&mut m, mem.size);
        match &mem.content {
            Some(c) => {
                m.push(1);
                put(&mut m, c.len() as u64);
                m.extend_from_slice(c);
            }
            None => m.push(0),
        }
    }
    put(&mut m, ix.points.len() as u64);
    for p in &ix.points {
        put(&mut m, p.out);
        put(&mut m, p.inp);
        m.push(p.bits);
        m.push(p.member_start as u8);
        put(&mut m, p.win_off);
        put(&mut m, p.win_len as u64);
    }
    m
}

/// Appends the metadata and the footer to `f` (the temporary file `tmp`, holding the windows),
/// then renames it to `path`.
fn save(f: &File, tmp: &Path, path: &Path, id: &FileId, ix: &Index) -> Result<()> {
    let m = encode(id, ix);
    let meta_off = f.metadata().map_err(|e| CrateError::io("index file", e))?.len();
    let mut tail = Vec::with_capacity(32);
    put(&mut tail, meta_off);
    put(&mut tail, m.len() as u64);
    put(&mut tail, xxhash_rust::xxh64::xxh64(&m, 0));
    tail.extend_from_slice(MAGIC);
    let w = |e| CrateError::io("writing the index", e);
    f.write_all_at(&m, meta_off).map_err(w)?;
    f.write_all_at(&tail, meta_off + m.len() as u64).map_err(w)?;
    (&*f).flush().map_err(w)?;
    std::fs::rename(tmp, path).map_err(w)?;
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        remove_older(dir, name, id);
    }
    Ok(())
}

/// Older indexes of the same file (it was modified since) are useless now.
fn remove_older(dir: &Path, name: &str, id: &FileId) {
    let prefix = format!("xva-index-{:x}-{:x}-", id.dev, id.ino);
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && n != name && !n.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Little-endian fields off the front of a byte slice; `None` past its end.
struct FieldReader<'a>(&'a [u8]);

impl FieldReader<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (a, b) = self.0.split_at_checked(8)?;
        self.0 = b;
        Some(u64::from_le_bytes(a.try_into().ok()?))
    }
    fn u8(&mut self) -> Option<u8> {
        let (&a, b) = self.0.split_first()?;
        self.0 = b;
        Some(a)
    }
    fn bytes(&mut self, n: u64) -> Option<&[u8]> {
        let (a, b) = self.0.split_at_checked(usize::try_from(n).ok()?)?;
        self.0 = b;
        Some(a)
    }
}

/// The index at `path`, if it is there, intact and of the file `id`.
fn load(path: &Path, id: &FileId) -> Option<Index> {
    let f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut tail = [0u8; 32];
    f.read_exact_at(&mut tail, len.checked_sub(32)?).ok()?;
    if &tail[24..] != MAGIC {
        return None;
    }
    let mut t = FieldReader(&tail);
    let (off, mlen, sum) = (t.u64()?, t.u64()?, t.u64()?);
    // The metadata lies between the windows and the footer, so it is no larger than the file.
    if off.checked_add(mlen)? != len - 32 {
        return None;
    }
    let mut m = vec![0u8; usize::try_from(mlen).ok()?];
    f.read_exact_at(&mut m, off).ok()?;
    if xxhash_rust::xxh64::xxh64(&m, 0) != sum {
        log::warn!("{}: damaged index; rebuilding it", path.display());
        return None;
    }
    let mut ix = decode(&mut FieldReader(&m), id)?;
    ix.windows = WindowStore::File(f);
    ix.cached = Some(path.to_path_buf());
    Some(ix)
}

/// The metadata written by [`encode`], if it is of the file `id`.
fn decode(r: &mut FieldReader, id: &FileId) -> Option<Index> {
    let (dev, ino, size) = (r.u64()?, r.u64()?, r.u64()?);
    let mtime = i128::from_le_bytes(r.bytes(16)?.try_into().ok()?);
    if (dev, ino, size, mtime) != (id.dev, id.ino, id.size, id.mtime_ns) {
        return None;
    }
    let codec = match r.u8()? {
        0 => Codec::Plain,
        1 => Codec::Gzip,
        2 => Codec::Zstd,
        _ => return None,
    };
    let end = if r.u8()? == 1 { End::Marker } else { End::Eof };
    let total = r.u64()?;
    let n = r.u64()?;
    let mut members = Vec::with_capacity(n.min(1 << 24) as usize);
    for _ in 0..n {
        let nl = r.u64()?;
        let name = String::from_utf8(r.bytes(nl)?.to_vec()).ok()?;
        let (offset, size) = (r.u64()?, r.u64()?);
        let content = match r.u8()? {
            1 => {
                let cl = r.u64()?;
                Some(r.bytes(cl)?.to_vec())
            }
            _ => None,
        };
        members.push(Member { name, offset, size, content });
    }
    let n = r.u64()?;
    let mut points = Vec::with_capacity(n.min(1 << 24) as usize);
    for _ in 0..n {
        let (out, inp, bits, ms) = (r.u64()?, r.u64()?, r.u8()?, r.u8()?);
        let (win_off, win_len) = (r.u64()?, r.u64()?);
        let win_len = u32::try_from(win_len).ok().filter(|&l| l <= MAX_STORED_WINDOW)?;
        points.push(RestartPoint { out, inp, bits, member_start: ms == 1, win_off, win_len });
    }
    let windows = WindowStore::Mem(Vec::new());
    Some(Index { codec, members, end, total, points, windows, cached: None })
}
