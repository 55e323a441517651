//! One disk of an export ([`XvaDisk`]): a layer with no parent whose data are the VDI's chunks,
//! read from the archive in place and verified against their checksums on first read.
//!
//! A chunk is verified whole, whatever part of it is read first. A read of part of a chunk of up
//! to [`MAX_KEPT_CHUNK`] reads the chunk into a buffer, verifies it and keeps it in a per-disk
//! cache of [`RECENT_BYTES`], because the rest of it is likely read next (for a compressed
//! archive, reading it again would restart a decoder behind this point). A larger chunk (xapi
//! writes 1 MiB chunks, but the format allows up to 1 GiB) is never held whole: it is hashed in
//! pieces of [`HASH_PIECE`] and the part asked for is copied out on the way.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::chunks::{Chunk, ChunkChecksum, Placed};
use super::{Archive, Error, TarStream, chunk_name, ovaxml};
use crate::cache::ByteCache;
use crate::error::{Error as CrateError, Result};
use crate::layer::{Identity, Layer, LayerInfo, ParentRef, Span};
use crate::source::{Location, Source};

/// Verified chunks kept in memory per disk: 16 of xapi's 1 MiB chunks.
pub const RECENT_BYTES: usize = 16 << 20;
/// The largest chunk kept whole after a partial read verified it.
pub const MAX_KEPT_CHUNK: u64 = 4 << 20;
/// The piece in which a larger chunk is read and hashed.
pub const HASH_PIECE: u64 = 1 << 20;

/// One disk of an export: a single layer with no parent.
#[derive(Debug)]
pub struct XvaDisk {
    archive: Arc<Archive>,
    vdi: usize,
    vbd: Option<(String, String)>,
    chunks: Box<[Chunk]>,
    verified: Box<[AtomicU64]>,
    /// Chunks whose checksum failed, with the sum computed: a later read fails at once (the
    /// archive does not change under a mount), instead of hashing up to 1 GiB again.
    bad: Mutex<HashMap<usize, ChunkChecksum>>,
    verify: bool,
    digits: usize,
    keepalives: u64,
    /// Chunks just verified by a partial read, for the reads of their other parts.
    recent: ByteCache<usize, Arc<[u8]>>,
}

impl XvaDisk {
    /// The disk of the placed VDI `d`; `vbd` is the (type, userdevice) of the VBD using it.
    pub(super) fn new(archive: Arc<Archive>, d: Placed, vbd: Option<(String, String)>, verify: bool) -> Self {
        let n = d.chunks.len();
        XvaDisk {
            archive,
            vdi: d.vdi,
            vbd,
            chunks: d.chunks.into(),
            verified: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            bad: Mutex::new(HashMap::new()),
            verify,
            digits: d.digits,
            keepalives: d.keepalives,
            recent: ByteCache::new(RECENT_BYTES),
        }
    }

    pub(super) fn vdi(&self) -> &ovaxml::Vdi {
        &self.archive.export.vdis[self.vdi]
    }
    pub fn archive(&self) -> &Arc<Archive> {
        &self.archive
    }
    pub fn member(&self, i: usize) -> String {
        chunk_name(&self.vdi().id, &self.chunks[i], self.digits)
    }
    fn is_verified(&self, i: usize) -> bool {
        self.verified[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }
    fn set_verified(&self, i: usize) {
        self.verified[i / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
    }

    /// Reads `buf` from chunk `i` at `within`, verifying the whole chunk on first use.
    fn read_chunk(&self, i: usize, within: u64, buf: &mut [u8]) -> Result<()> {
        let c = self.chunks[i];
        let at = within as usize..within as usize + buf.len();
        if let Some(d) = self.recent.get(&i) {
            buf.copy_from_slice(&d[at]);
            return Ok(());
        }
        let sum = match c.sum {
            Some(s) if self.verify && !self.is_verified(i) => s,
            _ => return self.archive.read_exact_at(c.data + within, buf),
        };
        if let Some(&computed) = self.bad.lock().get(&i) {
            return Err(self.mismatch(i, sum, computed, false));
        }
        let mut keep: Option<Vec<u8>> = None;
        let computed = if within == 0 && buf.len() as u64 == c.len {
            self.archive.read_exact_at(c.data, buf)?;
            sum.compute(buf)
        } else if c.len <= MAX_KEPT_CHUNK {
            let data = keep.insert(vec![0u8; c.len as usize]);
            self.archive.read_exact_at(c.data, data)?;
            buf.copy_from_slice(&data[at]);
            sum.compute(data)
        } else {
            self.hash_in_pieces(&c, sum, within, buf)?
        };
        if computed != sum {
            self.bad.lock().insert(i, computed);
            return Err(self.mismatch(i, sum, computed, true));
        }
        self.set_verified(i);
        if let Some(data) = keep {
            self.recent.insert(i, data.into());
        }
        Ok(())
    }

    /// Hashes chunk `c`, too large to keep, piece by piece, copying the part at `within` into
    /// `buf` on the way; only one piece is held at a time.
    fn hash_in_pieces(&self, c: &Chunk, sum: ChunkChecksum, within: u64, buf: &mut [u8]) -> Result<ChunkChecksum> {
        let mut h = sum.hasher();
        let mut piece = vec![0u8; HASH_PIECE.min(c.len) as usize];
        let (want_lo, want_hi) = (within, within + buf.len() as u64);
        let mut at = 0u64;
        while at < c.len {
            let p = &mut piece[..(c.len - at).min(HASH_PIECE) as usize];
            self.archive.read_exact_at(c.data + at, p)?;
            h.update(p);
            let (lo, hi) = (at.max(want_lo), (at + p.len() as u64).min(want_hi));
            if lo < hi {
                buf[(lo - want_lo) as usize..(hi - want_lo) as usize]
                    .copy_from_slice(&p[(lo - at) as usize..(hi - at) as usize]);
            }
            at += p.len() as u64;
        }
        Ok(h.finish())
    }

    /// The error of chunk `i`'s failed checksum, logged as an error when `first` found, later
    /// (remembered, not hashed again) at debug level.
    fn mismatch(&self, i: usize, stored: ChunkChecksum, computed: ChunkChecksum, first: bool) -> CrateError {
        let member = self.member(i);
        let kind = stored.kind();
        let level = if first { log::Level::Error } else { log::Level::Debug };
        log::log!(
            level,
            "{}: {member}: {kind} checksum mismatch (stored {stored}, computed {computed}); returning EIO",
            self.archive.location(),
        );
        CrateError::from(Error::ChecksumMismatch { member, kind, stored, computed }).in_file(self.archive.location())
    }

    /// What `info` says about the export this disk came from.
    fn export_details(&self, d: &mut impl FnMut(&str, String)) {
        let ex = &self.archive.export;
        if let Some(vm) = ex.vm() {
            let uuid = if vm.uuid.is_empty() { String::new() } else { format!(" (uuid {})", vm.uuid) };
            d("vm", format!("{}{uuid}", vm.name_label));
        }
        let ver: Vec<String> = ["product_brand", "product_version", "hostname", "date"]
            .iter()
            .filter_map(|k| ex.get_version(k).map(str::to_string))
            .collect();
        if !ver.is_empty() {
            d("exported_by", ver.join(" "));
        }
        d("export_vsn", ex.export_vsn.to_string());
        let v = self.vdi();
        let mut vd = format!("{} '{}'", v.id, v.name_label);
        for (k, x) in [("type", &v.ty), ("uuid", &v.uuid)] {
            if !x.is_empty() {
                vd.push_str(&format!(", {k} {x}"));
            }
        }
        d("vdi", vd);
        if let Some((ty, dev)) = &self.vbd {
            d("vbd", format!("{ty}, userdevice {dev}"));
        }
    }

    /// What `info` says about how the data is stored and read.
    fn storage_details(&self, d: &mut impl FnMut(&str, String)) {
        let a = &self.archive;
        let sums = self.chunks.iter().find_map(|c| c.sum).map_or("none (export_vsn 0)", |s| s.kind());
        d(
            "checksums",
            format!("{sums}, verified on first read{}", if self.verify { "" } else { " (off: --no-verify)" }),
        );
        d("chunks", format!("{} stored, {} keep-alive, chunk size {}", self.chunks.len(), self.keepalives, a.unit));
        d("compression", a.codec.name().to_string());
        if let TarStream::Compressed(c) = &a.data {
            let mut s = format!("{} restart points, longest interval {} bytes", c.points(), c.longest_interval());
            if let Some(b) = c.block_cache() {
                s.push_str(&format!(
                    "; no restart points inside frames: reads go through a {} MiB block cache",
                    b >> 20
                ));
            }
            d("random_access", s);
        }
        d("index", a.index_note.clone());
    }

    /// The VDIs of the export that are not mounted, and why.
    fn other_vdis(&self) -> Vec<String> {
        let a = &self.archive;
        let ex = &a.export;
        ex.vdis
            .iter()
            .filter(|o| !a.mounted.contains(&o.id))
            .map(|o| {
                let role = if ex.vms.iter().any(|vm| vm.suspend_vdi == o.id) {
                    "suspend image"
                } else if ex.vbds_of(&o.id).any(|b| b.ty == "CD") {
                    "CD"
                } else {
                    "no VBD"
                };
                format!("{} '{}' ({role}, not mounted)", o.id, o.name_label)
            })
            .collect()
    }
}

impl Layer for XvaDisk {
    fn sources(&self) -> Vec<Arc<dyn Source>> {
        vec![self.archive.src.clone()]
    }
    fn location(&self) -> &Location {
        self.archive.location()
    }

    fn virtual_size(&self) -> u64 {
        self.vdi().virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
        let i = self.chunks.partition_point(|c| c.vstart + c.len <= offset);
        match self.chunks.get(i) {
            Some(c) if c.vstart <= offset => {
                let within = offset - c.vstart;
                Ok(Span::data((c.len - within).min(max_len), 0, c.data + within))
            }
            Some(c) => Ok(Span::zero((c.vstart - offset).min(max_len))),
            None => Ok(Span::zero(max_len)),
        }
    }

    fn read(&self, _source: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let i = self.chunks.partition_point(|c| c.data + c.len <= off);
            let c = self.chunks.get(i).filter(|c| c.data <= off).ok_or_else(|| {
                CrateError::internal(format!("no chunk holds archive offset {off:#x}")).in_file(self.location())
            })?;
            let within = off - c.data;
            let n = ((c.len - within) as usize).min(buf.len() - done);
            self.read_chunk(i, within, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn parent(&self) -> Option<&ParentRef> {
        None
    }

    fn identity(&self) -> Vec<Identity> {
        Vec::new()
    }

    fn compressed(&self, _source: usize) -> bool {
        self.archive.codec != super::Codec::Plain
    }

    fn describe(&self) -> Result<LayerInfo> {
        let a = &self.archive;
        let v = self.vdi();
        let mut details: Vec<(String, String)> = Vec::new();
        let mut d = |k: &str, v: String| details.push((k.to_string(), v));
        self.export_details(&mut d);
        self.storage_details(&mut d);
        let others = self.other_vdis();
        if !others.is_empty() {
            d("other_vdis", others.join("; "));
        }
        Ok(LayerInfo {
            path: self.location().to_string(),
            format: "xva",
            subformat: a.codec.name().to_string(),
            virtual_size: v.virtual_size,
            block_size: a.unit,
            identity: if v.uuid.is_empty() { format!("{} (no uuid in ova.xml)", v.id) } else { v.uuid.clone() },
            parent: None,
            allocated_bytes: self.chunks.iter().map(|c| c.len).sum(),
            details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::open_mem;
    use super::*;
    use crate::layer::SpanKind;
    use testkit::{pattern, xva::XvaBuilder};

    /// Reads `len` bytes of disk `d` at virtual offset `off` (inside one chunk).
    fn read_at(d: &XvaDisk, off: u64, len: usize) -> Result<Vec<u8>> {
        let Span { len: n, kind: SpanKind::Data { offset, .. } } = d.map(off, len as u64).unwrap() else {
            panic!("data expected at {off:#x}")
        };
        assert_eq!(n, len as u64, "the read at {off:#x} stays in one chunk");
        let mut buf = vec![0u8; len];
        d.read(0, offset, &mut buf)?;
        Ok(buf)
    }

    #[test]
    fn a_random_read_in_a_gzip_export_decodes_at_most_one_interval() {
        let size = 48u64 << 20;
        let data = pattern(3, size as usize);
        let mut b = XvaBuilder::xapi("vm");
        b.disk("d", data.clone(), 3, 0);
        let tmp = tempfile::tempdir().unwrap();
        let gz = tmp.path().join("vm.xva.gz");
        b.build_gzip(&gz).unwrap();
        let disks = open_mem(std::fs::read(&gz).unwrap());
        let d = &disks[0].1;
        for off in [40u64 << 20, 7 << 20, 30 << 20] {
            let before = d.archive().decoded();
            let at = off + 1234;
            assert_eq!(read_at(d, at, 4096).unwrap(), data[at as usize..at as usize + 4096]);
            let cost = d.archive().decoded() - before;
            // One restart interval, plus the whole 1 MiB chunk verified on its first read.
            assert!(cost <= super::super::gzip::SPAN + (2 << 20), "decoded {cost} bytes for a 4 KiB read");
        }
    }

    #[test]
    fn small_chunks_are_kept_after_a_partial_read_and_large_ones_never_are() {
        for (chunk, kept) in [(1u64 << 20, true), (8 << 20, false)] {
            let data = pattern(5, (3 * chunk) as usize);
            let mut b = XvaBuilder::xapi("vm");
            b.disk("d", data.clone(), 3, 0).chunk_size(chunk);
            let disks = open_mem(b.to_bytes());
            let d = &disks[0].1;
            // Inside the second chunk; in a large one, across a boundary of the pieces hashed.
            let at = chunk + HASH_PIECE.min(chunk / 2) - 100;
            assert_eq!(read_at(d, at, 300).unwrap(), data[at as usize..at as usize + 300]);
            assert!(d.is_verified(1));
            assert_eq!(d.recent.len(), kept as usize, "chunk of {chunk} bytes");
            assert!(d.recent.bytes() <= RECENT_BYTES);
            // A verified chunk is read directly afterwards.
            let at = 2 * chunk - 5000;
            assert_eq!(read_at(d, at, 5000).unwrap(), data[at as usize..at as usize + 5000]);
        }
    }

    #[test]
    fn a_corrupted_large_chunk_is_caught_by_the_piecewise_hash_and_never_hashed_again() {
        let chunk = 8u64 << 20;
        let data = pattern(6, (2 * chunk) as usize);
        let mut b = XvaBuilder::xapi("vm");
        b.disk("d", data.clone(), 3, 0).chunk_size(chunk);
        let mut bytes = b.to_bytes();
        // The second chunk's data: flip a byte near its end, far from the part read.
        let name = b"Ref:3/00000001\0";
        let hdr = bytes.windows(name.len()).position(|w| w == name).unwrap();
        bytes[hdr + 512 + (chunk as usize) - 10] ^= 0xff;
        let src = Arc::new(Counting(crate::source::MemSource::new("vm.xva", bytes), AtomicU64::new(0)));
        let disks = super::super::open(src.clone(), &Default::default(), &crate::progress::Silent).unwrap();
        let d = &disks[0].1;
        for round in 0..3 {
            let before = src.1.load(Ordering::Relaxed);
            let e = read_at(d, chunk + 10 + round * 4096, 100).unwrap_err();
            assert!(e.to_string().contains("Ref:3/00000001: XXH64 (.xxhash) checksum mismatch"), "{e}");
            assert_eq!(e.errno(), libc::EIO);
            // The first read hashes the whole chunk; later ones fail at once, reading nothing.
            let read = src.1.load(Ordering::Relaxed) - before;
            assert_eq!(read, if round == 0 { chunk } else { 0 }, "round {round}");
        }
        assert!(d.recent.is_empty());
        // The good chunk beside it still reads.
        assert_eq!(read_at(d, 4096, 100).unwrap(), data[4096..4196]);
    }

    /// A source that counts the bytes read from it.
    #[derive(Debug)]
    struct Counting(crate::source::MemSource, AtomicU64);

    impl Source for Counting {
        fn location(&self) -> &Location {
            self.0.location()
        }
        fn len(&self) -> Result<u64> {
            self.0.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
            let n = self.0.read_at(buf, offset)?;
            self.1.fetch_add(n as u64, Ordering::Relaxed);
            Ok(n)
        }
    }
}
