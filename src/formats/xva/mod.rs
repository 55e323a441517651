//! XVA: XenServer / XCP-ng VM exports (`xe vm-export`), read in place, plain or compressed.
//!
//! Sources: xapi `ocaml/xapi/stream_vdi.ml` (how chunks are written and how the importer places
//! them), `export.ml`/`import.ml` (ova.xml), the xapi document "The XenServer VM import/export
//! format", xva-img, and the FORMAT-NOTES XVA section.
//!
//! An export is a tar stream ([`tar`]), optionally gzip- (`compress=true`) or zstd-compressed
//! (`compress=zstd`), detected by magic bytes. Its first member `ova.xml` ([`ovaxml`]) describes
//! the VM; each exported VDI's data follows as chunk members `Ref:N/%08d`, each with a
//! `.checksum` (SHA-1) or `.xxhash` (XXH64) member, placed on the disk as xapi's importer places
//! them ([`chunks`]). Each VDI with chunks in the archive becomes one disk `<name_label>.raw`
//! (the suspend image of a suspended VM is listed by `info` but not mounted; CD VDIs carry no
//! data in an export and are listed only). Disks come in the order of the VM's `userdevice`,
//! then in archive order. Nothing is extracted: the member index ([`index`]) and, for compressed
//! exports, the restart points ([`stream`]) are kept in the cache directory under the archive's
//! identity, and data is read from the archive itself.
//!
//! A chunk's checksum is verified the first time any part of it is read and remembered; a
//! mismatch gives EIO and a log line naming the archive and the member (`--no-verify` skips).
//!
//! Refused, each with one line naming the archive and the member: a truncated tar, a header
//! checksum mismatch, a missing or malformed `ova.xml`, the pre-tar "appliance" layout, a chunk
//! outside every exported VDI's directory, chunk numbers going backwards, a chunk longer than
//! the chunk size or reaching past `virtual_size`, a missing or garbage checksum member, a
//! compressed stream that ends early or fails its CRC, a disk VDI with no data in the archive.

pub mod chunks;
mod gzip;
pub mod index;
pub mod ovaxml;
pub mod stream;
pub mod tar;
mod zstd;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;

use chunks::{Chunk, Layout};
use ovaxml::Export;
use stream::{Codec, Compressed};

use crate::error::{Error as CrateError, Kind, Result};
use crate::layer::{Identity, Layer, LayerInfo, ParentRef, Span};
use crate::progress::Progress;
use crate::source::{Location, Source};

/// Bound on the size of `ova.xml` read into memory.
pub const MAX_OVA_XML: u64 = 64 << 20;
/// Verified chunks kept in memory per disk (8 MiB with 1 MiB chunks).
const RECENT_CHUNKS: NonZeroUsize = NonZeroUsize::new(8).unwrap();
/// Default bound of the on-disk block cache for streams without restart points.
pub const DEFAULT_BLOCK_CACHE: u64 = 4 << 30;

/// What can be wrong with an XVA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{member}: truncated: the archive ends at {end:#x} but the member needs bytes up to {need:#x}")]
    Truncated { member: String, need: u64, end: u64 },
    #[error("tar header at {at:#x} ('{name}'): checksum mismatch (stored {stored:?}, computed {computed:o})")]
    HeaderChecksum { at: u64, name: String, stored: String, computed: u64 },
    #[error("tar header at {at:#x} ('{name}'): {what}")]
    BadHeader { at: u64, name: String, what: String },
    #[error("{member}: {what}")]
    Member { member: String, what: String },
    #[error("ova.xml: {0}")]
    OvaXml(String),
}

impl From<Error> for CrateError {
    fn from(e: Error) -> Self {
        CrateError::corrupt(e.to_string())
    }
}

/// The data of the (decompressed) tar stream.
#[derive(Debug)]
enum Data {
    Plain(Arc<dyn Source>),
    Compressed(Box<Compressed>),
}

/// One opened export, shared by its disks.
#[derive(Debug)]
pub struct Archive {
    src: Arc<dyn Source>,
    codec: Codec,
    data: Data,
    export: Export,
    unit: u64,
    index_note: String,
    /// VDIs shown as disks.
    mounted: Vec<String>,
}

impl Archive {
    fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.data {
            Data::Plain(s) => s.read_exact_at(buf, off),
            Data::Compressed(c) => c.read_exact_at(off, buf),
        }
    }
    pub fn location(&self) -> &Location {
        self.src.location()
    }
    pub fn export(&self) -> &Export {
        &self.export
    }
    /// Decompressed bytes decoded so far (for benchmarks and tests).
    pub fn decoded(&self) -> u64 {
        match &self.data {
            Data::Compressed(c) => c.decoded.load(Ordering::Relaxed),
            Data::Plain(_) => 0,
        }
    }
}

/// How exports are read.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where indexes of archives (tar member index, compressed-stream restart points) are kept.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Verify chunk checksums on first read.
    pub verify: bool,
    /// Bound of the on-disk block cache for compressed streams without restart points.
    pub block_cache_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { cache_dir: None, verify: true, block_cache_bytes: DEFAULT_BLOCK_CACHE }
    }
}

/// Opens every disk of an XVA export as `(<name>.raw, layer)`.
pub fn open_disks(
    src: Arc<dyn Source>,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Vec<(String, Arc<dyn Layer>)>> {
    let loc = src.location().clone();
    let disks = open(src, opts, progress).map_err(|e| e.in_file(&loc))?;
    Ok(disks.into_iter().map(|(name, d)| (name, Arc::new(d) as Arc<dyn Layer>)).collect())
}

/// Opens the archive and returns its disks, named and in order.
pub fn open(src: Arc<dyn Source>, opts: &Options, progress: &dyn Progress) -> Result<Vec<(String, XvaDisk)>> {
    let head = src.read_vec(0, src.len()?.min(512) as usize)?;
    let codec = Codec::detect(&head);
    if codec == Codec::Plain && !looks_like_tar(&head) {
        let what = if head.starts_with(b"<?xml") || head.windows(10).any(|w| w == b"<appliance") {
            "this is an XML file, not an XVA archive (an old pre-tar XVA is a directory with ova.xml and \
             per-disk chunk-*.gz files; vdiskfs reads only the tar layout of XenServer 4.1 and later)"
        } else {
            "neither a tar archive nor gzip/zstd-compressed (not an XVA)"
        };
        return Err(CrateError::unsupported(what));
    }
    let ix = index::open(&src, codec, opts.cache_dir.as_deref(), progress)?;
    let first = ix.members.first();
    let ova = match first {
        Some(m) if m.name == "ova.xml" => m,
        Some(m) if m.name.contains("/chunk-") || m.name.ends_with(".gz") => {
            return Err(CrateError::unsupported(format!(
                "{}: an old pre-tar-era XVA layout (chunk-*.gz members); only the tar layout of XenServer 4.1+ is supported",
                m.name
            )));
        }
        Some(m) => {
            return Err(Error::OvaXml(format!("missing: the first member is '{}' (not an XVA export)", m.name)).into());
        }
        None => return Err(Error::OvaXml("missing: the archive has no members".into()).into()),
    };
    let text = ova.content.as_deref().ok_or_else(|| Error::OvaXml(format!("{} bytes, too large", ova.size)))?;
    let text = std::str::from_utf8(text).map_err(|_| Error::OvaXml("not UTF-8 text".into()))?;
    let export = Export::parse(text).map_err(|e| match e {
        ovaxml::ParseError::Appliance => CrateError::unsupported(
            "ova.xml: an <appliance> description of the old pre-tar XVA layout (XenServer < 4.1); not supported",
        ),
        ovaxml::ParseError::Malformed(m) => Error::OvaXml(format!("malformed: {m}")).into(),
    })?;
    let vdis: Vec<(String, u64)> = export.vdis.iter().map(|v| (v.id.clone(), v.virtual_size)).collect();
    let Layout { unit, disks } = chunks::place(&ix.members[1..], &vdis, export.export_vsn > 0)?;
    // Without the end-of-archive blocks, a disk whose data stops short may be a cut-off file.
    if ix.end == tar::End::Eof
        && let Some(d) = disks.iter().find(|d| d.data_end() < vdis[d.vdi].1)
    {
        let last = d.chunks.last().map_or(format!("{}/", vdis[d.vdi].0), |c| chunk_name(&vdis[d.vdi].0, c, d.digits));
        return Err(Error::Member {
            member: last,
            what: format!(
                "truncated: the archive stops after this chunk without tar's end-of-archive blocks, and the disk's data ends at {:#x} of its virtual_size {:#x}",
                d.data_end(),
                vdis[d.vdi].1
            ),
        }
        .into());
    }
    let suspend: Vec<String> = export.vms.iter().map(|v| v.suspend_vdi.clone()).collect();
    for v in &export.vdis {
        let is_disk = export.vbds_of(&v.id).any(|b| b.ty == "Disk");
        if is_disk && v.virtual_size > 0 && !disks.iter().any(|d| vdis[d.vdi].0 == v.id) {
            return Err(Error::Member {
                member: format!("{}/", v.id),
                what: format!(
                    "VDI '{}' is a disk of the VM but the archive holds no data for it (a metadata-only export?)",
                    v.name_label
                ),
            }
            .into());
        }
    }
    let index_note = match &ix.cached {
        Some(p) => format!("{} members, cached in {}", ix.members.len(), p.display()),
        None => format!("{} members, in memory", ix.members.len()),
    };
    let data = match codec {
        Codec::Plain => Data::Plain(src.clone()),
        _ => Data::Compressed(Box::new(Compressed::new(
            src.clone(),
            codec,
            ix.points,
            ix.windows,
            ix.total,
            opts.cache_dir.as_deref(),
            opts.block_cache_bytes,
        )?)),
    };
    let mounted: Vec<String> = disks.iter().map(|d| vdis[d.vdi].0.clone()).filter(|id| !suspend.contains(id)).collect();
    let archive = Arc::new(Archive { src, codec, data, export, unit, index_note, mounted });
    let ex = &archive.export;
    let vm_id = ex.vm().map(|v| v.id.clone()).unwrap_or_default();
    let mut out: Vec<(u64, usize, XvaDisk)> = Vec::new();
    for (order, d) in disks.into_iter().enumerate() {
        let vdi = &ex.vdis[d.vdi];
        if suspend.contains(&vdi.id) {
            log::info!("{}: {} is the VM's suspend image; not mounted", archive.location(), vdi.id);
            continue;
        }
        let vbd = ex.vbds_of(&vdi.id).find(|b| b.vm == vm_id).or_else(|| ex.vbds_of(&vdi.id).next());
        let userdevice = vbd.and_then(|b| b.userdevice.parse::<u64>().ok()).unwrap_or(u64::MAX);
        let n = d.chunks.len();
        out.push((
            userdevice,
            order,
            XvaDisk {
                archive: archive.clone(),
                vdi: d.vdi,
                vbd: vbd.map(|b| (b.ty.clone(), b.userdevice.clone())),
                chunks: d.chunks.into(),
                verified: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
                verify: opts.verify,
                digits: d.digits,
                keepalives: d.keepalives,
                recent: Mutex::new(LruCache::new(RECENT_CHUNKS)),
            },
        ));
    }
    out.sort_by_key(|(u, o, _)| (*u, *o));
    let mut named: Vec<(String, XvaDisk)> = Vec::new();
    for (_, _, d) in out {
        let base = sanitize(&ex.vdis[d.vdi].name_label);
        let mut name = format!("{base}.raw");
        let mut i = 2;
        while named.iter().any(|(n, _)| *n == name) {
            name = format!("{base}-{i}.raw");
            i += 1;
        }
        named.push((name, d));
    }
    if named.is_empty() {
        return Err(CrateError::new(Kind::NotFound, "the export holds no disk data (a metadata-only export?)"));
    }
    Ok(named)
}

/// A valid first header, or a ustar one whose checksum is wrong (the index pass reports that).
fn looks_like_tar(head: &[u8]) -> bool {
    head.get(..512).and_then(|b| b.try_into().ok()).is_some_and(|b| tar::is_header(b) || &b[257..262] == b"ustar")
}

/// A VDI label as a file name: no `/`, no control characters, not empty, not `.`/`..`.
pub fn sanitize(label: &str) -> String {
    let s: String = label.chars().map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c }).collect();
    let s = s.trim().chars().take(200).collect::<String>();
    if s.is_empty() || s == "." || s == ".." { "disk".into() } else { s }
}

fn chunk_name(dir: &str, c: &Chunk, digits: usize) -> String {
    format!("{dir}/{:0digits$}", c.number)
}

/// One disk of an export: a single layer with no parent.
#[derive(Debug)]
pub struct XvaDisk {
    archive: Arc<Archive>,
    vdi: usize,
    vbd: Option<(String, String)>,
    chunks: Box<[Chunk]>,
    verified: Box<[AtomicU64]>,
    verify: bool,
    digits: usize,
    keepalives: u64,
    /// Chunks just verified by a partial read, for the reads of their other parts.
    recent: Mutex<LruCache<usize, Arc<[u8]>>>,
}

impl XvaDisk {
    fn vdi(&self) -> &ovaxml::Vdi {
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
        if let Some(d) = self.recent.lock().get(&i) {
            buf.copy_from_slice(&d[at]);
            return Ok(());
        }
        let sum = match c.sum {
            Some(s) if self.verify && !self.is_verified(i) => s,
            _ => return self.archive.read_exact_at(c.data + within, buf),
        };
        let whole = within == 0 && buf.len() as u64 == c.len;
        let mut tmp = if whole { Vec::new() } else { vec![0u8; c.len as usize] };
        let data: &mut [u8] = if whole { buf } else { &mut tmp };
        self.archive.read_exact_at(c.data, data)?;
        let got = sum.compute(data);
        if got != sum {
            let member = self.member(i);
            log::error!(
                "{}: {member}: {} checksum mismatch (stored {sum}, computed {got}); returning EIO",
                self.archive.location(),
                sum.kind()
            );
            return Err(CrateError::corrupt(format!(
                "{member}: {} checksum mismatch (stored {sum}, computed {got})",
                sum.kind()
            ))
            .in_file(self.archive.location()));
        }
        self.set_verified(i);
        if !whole {
            buf.copy_from_slice(&tmp[at]);
            // The rest of this chunk is likely read next; keep it rather than read it again
            // (for a compressed archive that would restart a decoder behind this point).
            self.recent.lock().put(i, tmp.into());
        }
        Ok(())
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
                CrateError::corrupt(format!("internal: no chunk holds archive offset {off:#x}"))
                    .in_file(self.location())
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
        self.archive.codec != Codec::Plain
    }

    fn describe(&self) -> Result<LayerInfo> {
        let a = &self.archive;
        let ex = &a.export;
        let v = self.vdi();
        let mut details: Vec<(String, String)> = Vec::new();
        let mut d = |k: &str, v: String| details.push((k.to_string(), v));
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
        let sums = self.chunks.iter().find_map(|c| c.sum).map_or("none (export_vsn 0)", |s| s.kind());
        d(
            "checksums",
            format!("{sums}, verified on first read{}", if self.verify { "" } else { " (off: --no-verify)" }),
        );
        d("chunks", format!("{} stored, {} keep-alive, chunk size {}", self.chunks.len(), self.keepalives, a.unit));
        d("compression", a.codec.name().to_string());
        if let Data::Compressed(c) = &a.data {
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
        let others: Vec<String> = ex
            .vdis
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
            .collect();
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
    use super::*;
    use crate::source::MemSource;
    use testkit::{pattern, xva::XvaBuilder};

    fn open_mem(bytes: Vec<u8>) -> Vec<(String, XvaDisk)> {
        let src: Arc<dyn Source> = Arc::new(MemSource::new("vm.xva", bytes));
        open(src, &Options::default(), &crate::progress::Silent).unwrap()
    }

    #[test]
    fn a_random_read_in_a_gzip_export_decodes_at_most_one_interval() {
        let size = 48u64 << 20;
        let data = pattern(3, size as usize);
        let mut b = XvaBuilder::xapi("vm");
        b.disk("d", data.clone(), 3, 0);
        let tmp = std::env::temp_dir().join(format!("vdiskfs-unit-{}.xva.gz", std::process::id()));
        b.build_gzip(&tmp).unwrap();
        let bytes = std::fs::read(&tmp).unwrap();
        let _ = std::fs::remove_file(&tmp);
        let disks = open_mem(bytes);
        let d = &disks[0].1;
        let mut buf = vec![0u8; 4096];
        for off in [40u64 << 20, 7 << 20, 30 << 20] {
            let before = d.archive().decoded();
            let Span { kind: crate::layer::SpanKind::Data { offset, .. }, .. } = d.map(off + 1234, 4096).unwrap()
            else {
                panic!("data expected")
            };
            d.read(0, offset, &mut buf).unwrap();
            assert_eq!(buf, data[(off + 1234) as usize..(off + 1234) as usize + 4096]);
            let cost = d.archive().decoded() - before;
            // One restart interval, plus the whole 1 MiB chunk verified on its first read.
            assert!(cost <= gzip::SPAN + (2 << 20), "decoded {cost} bytes for a 4 KiB read");
        }
    }

    #[test]
    fn disks_are_named_from_labels_and_ordered_by_userdevice() {
        let mut b = XvaBuilder::xapi("vm");
        b.disk("data/2", vec![1u8; 4096], 9, 1).disk("", vec![2u8; 4096], 12, 0).disk("data/2", vec![3u8; 512], 15, 2);
        let names: Vec<String> = open_mem(b.to_bytes()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["disk.raw", "data_2.raw", "data_2-2.raw"]);
        assert_eq!(sanitize(".."), "disk");
    }
}
