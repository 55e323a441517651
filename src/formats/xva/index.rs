//! The archive index: every tar member (name, data offset, size; the content of checksums and
//! `ova.xml`) and, for a compressed export, the restart points. Built in one streaming pass with
//! a progress bar on a terminal, and kept in the cache directory under the archive's identity
//! (device, inode, size, mtime), so the next open of the same file reads it back instantly.
//!
//! The file is `xva-index-<dev>-<ino>-<size>-<mtime>.v1`: the deflated gzip windows, then the
//! metadata, then a 32-byte footer (metadata offset and length, its XXH64, a magic). A file that
//! does not check out is ignored and rebuilt. It is written under a temporary name of its own
//! (`<name>.tmp-<pid>-<n>`, created new and private by [`create_private_file`], so a file or
//! symlink someone placed at that name is never written through) and renamed; it is read back
//! without following a symlink, and only when it is this user's file that no one else may write.
//! A cache directory that another user owns or others may write to is not used at all (a
//! warning says so, and the index is built in memory). Older indexes of the same inode are
//! removed.

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
use crate::gate::{create_private_file, open_private_file, private_dir_problem};
use crate::progress::Progress;
use crate::source::{FileId, Source};

const MAGIC: &[u8; 8] = b"VDXVAIX1";
/// Members an index holds: each costs about 100 to 150 bytes (its name, offset, size and a
/// checksum's text), and a tar header is 512 bytes that compress to almost nothing, so a few MB
/// of gzip could otherwise claim gigabytes of index. 2^22 members are the chunks and checksums
/// of 2 TiB of disk data in xapi's 1 MiB chunks (xapi's largest VDI on VHD-based storage), in at
/// most about 600 MiB.
pub const MAX_MEMBERS: usize = 1 << 22;
/// Temporary names tried before giving up on writing the index.
const TMP_ATTEMPTS: u32 = 8;

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

fn tmp_name(name: &str, attempt: u32) -> String {
    format!("{name}.tmp-{}-{attempt}", std::process::id())
}

/// Loads the cached index of `src`, or builds (and caches) it.
pub fn open(src: &Arc<dyn Source>, codec: Codec, cache_dir: Option<&Path>, progress: &dyn Progress) -> Result<Index> {
    // An index is read back and trusted for where the data lies: it is kept only in a directory
    // no one else may write to.
    let cache_dir = cache_dir.filter(|dir| match private_dir_problem(dir) {
        None => true,
        Some(why) => {
            log::warn!(
                "cache directory {} {why}: XVA indexes are not kept there (each open builds one in memory); give --cache-dir a directory of your own that only you may write",
                dir.display()
            );
            false
        }
    });
    let place = cache_dir.zip(src.id()).map(|(dir, id)| (dir, id, index_name(&id)));
    if let Some((dir, id, name)) = &place
        && let Some(ix) = load(dir, name, id)
    {
        log::info!("{}: index read from {}", src.location(), dir.join(name).display());
        return Ok(ix);
    }
    let tmp = place.as_ref().and_then(|(dir, _, name)| match create_tmp(dir, name) {
        Ok(x) => Some(x),
        Err(e) => {
            log::warn!("cannot write an index in {}: {e}; the index is kept in memory", dir.display());
            None
        }
    });
    let rec = match &tmp {
        Some((_, f)) => Recorder::file(f.try_clone().map_err(|e| CrateError::io("index file", e))?),
        None => Recorder::memory(),
    };
    // The windows are read through the recorder's handle on the file, renamed or not.
    let mut ix = build(src, codec, rec, progress, MAX_MEMBERS)?;
    if let (Some((tmp, f)), Some((dir, id, name))) = (tmp, place) {
        match save(&f, dir, &tmp, &name, &id, &ix) {
            Ok(()) => ix.cached = Some(dir.join(name)),
            Err(e) => {
                let _ = std::fs::remove_file(dir.join(&tmp));
                log::warn!("cannot write the index {}: {e}", dir.join(name).display());
            }
        }
    }
    Ok(ix)
}

/// Creates the temporary file the index is written to, under a name no one else uses: when
/// something (a stale file, a planted symlink) is already at a name, the next one is tried.
fn create_tmp(dir: &Path, name: &str) -> std::io::Result<(String, File)> {
    let mut attempt = 0;
    loop {
        let tmp = tmp_name(name, attempt);
        match create_private_file(dir, &tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt + 1 < TMP_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// The index pass, keeping at most `max_members` members.
fn build(
    src: &Arc<dyn Source>,
    codec: Codec,
    rec: Recorder,
    progress: &dyn Progress,
    max_members: usize,
) -> Result<Index> {
    let len = src.len()?;
    let what = if codec == Codec::Plain { "indexing" } else { "indexing (decompressing)" };
    progress.start(&format!("{} {what}", src.location().file_name()), len);
    let tick = |at: u64| progress.set(at);
    let mut members = Vec::new();
    let mut push = |m: Member| {
        if members.len() >= max_members {
            return Err(Error::TooManyMembers { member: m.name, max: max_members }.into());
        }
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

/// Appends the metadata and the footer to `f` (the temporary file `tmp` in `dir`, holding the
/// windows), then renames it to `name`.
fn save(f: &File, dir: &Path, tmp: &str, name: &str, id: &FileId, ix: &Index) -> Result<()> {
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
    std::fs::rename(dir.join(tmp), dir.join(name)).map_err(w)?;
    remove_older(dir, name, id);
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

/// The index `name` in `dir`, if it is there, intact and of the file `id`.
fn load(dir: &Path, name: &str, id: &FileId) -> Option<Index> {
    let f = open_private_file(dir, name).ok()?;
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
        log::warn!("{}: damaged index; rebuilding it", dir.join(name).display());
        return None;
    }
    let mut ix = decode(&mut FieldReader(&m), id)?;
    ix.windows = WindowStore::File(f);
    ix.cached = Some(dir.join(name));
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
    if n > MAX_MEMBERS as u64 {
        return None;
    }
    let mut members = Vec::with_capacity(n as usize);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    /// A source with a file identity, as a local file has.
    #[derive(Debug)]
    struct WithId(MemSource, FileId);

    impl Source for WithId {
        fn location(&self) -> &crate::source::Location {
            self.0.location()
        }
        fn len(&self) -> Result<u64> {
            self.0.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
            self.0.read_at(buf, offset)
        }
        fn id(&self) -> Option<FileId> {
            Some(self.1)
        }
    }

    fn archive() -> Arc<dyn Source> {
        let mut b = testkit::xva::XvaBuilder::xapi("vm");
        b.disk("d", testkit::pattern(1, 3 << 20), 3, 0);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b.to_bytes()).unwrap();
        let id = FileId { dev: 1, ino: 2, size: 3, mtime_ns: 4 };
        Arc::new(WithId(MemSource::new("vm.xva", gz.finish().unwrap()), id))
    }

    #[test]
    fn an_archive_of_more_members_than_the_bound_is_refused_while_indexing() {
        // 3 MiB in 1 MiB chunks: ova.xml, then 3 chunks and 3 checksums.
        let src = archive();
        let rec = || Recorder::memory();
        assert_eq!(build(&src, Codec::Gzip, rec(), &crate::progress::Silent, 7).unwrap().members.len(), 7);
        let e = build(&src, Codec::Gzip, rec(), &crate::progress::Silent, 6).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::Unsupported);
        assert!(e.to_string().contains("more than 6 tar members"), "{e}");
    }

    #[test]
    fn a_symlink_planted_at_the_temporary_name_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let src = archive();
        let name = index_name(&src.id().unwrap());
        std::fs::create_dir(&dir).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(tmp_name(&name, 0))).unwrap();
        std::os::unix::fs::symlink(t.path().join("created"), dir.join(tmp_name(&name, 1))).unwrap();
        let ix = open(&src, Codec::Gzip, Some(&dir), &crate::progress::Silent).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "the symlink's target is untouched");
        assert!(!t.path().join("created").exists());
        assert_eq!(ix.cached, Some(dir.join(&name)), "written under the next temporary name");
        let again = open(&src, Codec::Gzip, Some(&dir), &crate::progress::Silent).unwrap();
        assert_eq!((again.members, again.points, again.total), (ix.members, ix.points, ix.total));
    }

    #[test]
    fn an_index_name_that_is_a_symlink_is_not_read() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let src = archive();
        let name = index_name(&src.id().unwrap());
        let first = open(&src, Codec::Gzip, Some(&dir), &crate::progress::Silent).unwrap();
        assert!(first.cached.is_some());
        std::fs::rename(dir.join(&name), t.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(t.path().join("elsewhere"), dir.join(&name)).unwrap();
        assert!(load(&dir, &name, &src.id().unwrap()).is_none());
        // Rebuilt, and the symlink replaced by a file of our own.
        let ix = open(&src, Codec::Gzip, Some(&dir), &crate::progress::Silent).unwrap();
        assert_eq!(ix.members, first.members);
        assert!(!std::fs::symlink_metadata(dir.join(&name)).unwrap().file_type().is_symlink());
    }
}
