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
//! ([`disk`]; the suspend image of a suspended VM is listed by `info` but not mounted; CD VDIs
//! carry no data in an export and are listed only). Disks come in the order of the VM's
//! `userdevice`, then in archive order. Nothing is extracted: the member index ([`index`]) and,
//! for compressed exports, the restart points ([`restart`]) are kept in the cache directory under
//! the archive's identity, and data is read from the archive itself ([`compressed`] for random
//! access into a compressed stream).
//!
//! A chunk's checksum is verified the first time any part of it is read and remembered; a
//! mismatch gives EIO and a log line naming the archive and the member (`--no-verify` skips).
//!
//! Memory is bounded whatever the archive claims: the member index at [`index::MAX_MEMBERS`]
//! members, `ova.xml` at [`MAX_OVA_XML`], a disk's
//! `virtual_size` at [`MAX_VIRTUAL_SIZE`], the chunk size at [`chunks::MAX_UNIT`], verified
//! chunks kept per disk at [`disk::RECENT_BYTES`] (a chunk larger than [`disk::MAX_KEPT_CHUNK`]
//! is verified piece by piece and never held whole), decoded blocks per compressed archive at
//! [`compressed::MEM_CACHE_BYTES`].
//!
//! Refused, each with one line naming the archive and the member ([`Error`] and the enums of
//! the files named): a truncated tar, a header checksum mismatch, a missing or malformed
//! `ova.xml`, the pre-tar "appliance" layout, a chunk outside every exported VDI's directory,
//! chunk numbers going backwards, a chunk longer than the chunk size or reaching past
//! `virtual_size`, a `virtual_size` over 64 TiB, a missing or garbage checksum member, a
//! compressed stream that ends early or fails its CRC, a disk VDI with no data in the archive.

pub mod chunks;
pub mod compressed;
pub mod disk;
pub mod gzip;
pub mod index;
pub mod ovaxml;
pub mod restart;
pub mod tar;
pub mod zstd;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chunks::{Chunk, Layout, Placed};
use compressed::{Codec, CompressedTar};
use ovaxml::{Export, OvaXmlError};

pub use disk::XvaDisk;

use crate::error::{Error as CrateError, ErrorKind, Kind, Result};
use crate::layer::Layer;
use crate::progress::Progress;
use crate::source::{Location, Source};

/// Bound on the size of `ova.xml` read into memory.
pub const MAX_OVA_XML: u64 = 64 << 20;
/// The largest `virtual_size` accepted, as for VMDK and VHDX. xapi's own limit is lower (2 TiB
/// for VHD-based storage); this one keeps a whole-disk scan to 64 Ki steps of 1 GiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Default bound of the on-disk block cache for streams without restart points.
pub const DEFAULT_BLOCK_CACHE: u64 = 4 << 30;

/// What can be wrong with an XVA as a whole; the tar container, the chunks and the compressed
/// streams have their own enums ([`tar::TarError`], [`chunks::ChunkError`], `gzip::GzipError`,
/// `zstd::ZstdError`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("neither a tar archive nor gzip/zstd-compressed (not an XVA)")]
    NotXva,
    #[error(
        "this is an XML file, not an XVA archive (an old pre-tar XVA is a directory with ova.xml and per-disk chunk-*.gz files; vdiskfs reads only the tar layout of XenServer 4.1 and later)"
    )]
    XmlNotXva,
    #[error(
        "{member}: an old pre-tar-era XVA layout (chunk-*.gz members); only the tar layout of XenServer 4.1+ is supported"
    )]
    PreTarLayout { member: String },
    #[error("ova.xml: missing: the first member is '{first}' (not an XVA export)")]
    OvaXmlNotFirst { first: String },
    #[error("ova.xml: missing: the archive has no members")]
    NoMembers,
    /// `member` is the first member over the bound.
    #[error(
        "{member}: more than {max} tar members (the chunks and checksums of {} TiB of disk data in 1 MiB chunks); vdiskfs indexes at most that many",
        (*.max as u64) >> 21
    )]
    TooManyMembers { member: String, max: usize },
    #[error("ova.xml: {size} bytes, too large")]
    OvaXmlTooLarge { size: u64 },
    #[error("ova.xml: not UTF-8 text")]
    OvaXmlNotUtf8,
    #[error("ova.xml: malformed")]
    OvaXml(#[source] OvaXmlError),
    #[error("ova.xml: an <appliance> description of the old pre-tar XVA layout (XenServer < 4.1); not supported")]
    Appliance,
    #[error("ova.xml: VDI {vdi} has virtual_size {size:#x}, over the {} TiB vdiskfs supports", MAX_VIRTUAL_SIZE >> 40)]
    VirtualSizeTooLarge { vdi: String, size: u64 },
    /// `member` is the disk's last chunk (or its directory when it has none).
    #[error(
        "{member}: truncated: the archive stops after this chunk without tar's end-of-archive blocks, and the disk's data ends at {data_end:#x} of its virtual_size {virtual_size:#x}"
    )]
    CutShort { member: String, data_end: u64, virtual_size: u64 },
    #[error(
        "{member}: VDI '{label}' is a disk of the VM but the archive holds no data for it (a metadata-only export?)"
    )]
    NoData { member: String, label: String },
    #[error("the export holds no disk data (a metadata-only export?)")]
    NoDisks,
    /// `kind` names the algorithm and the member type (`SHA-1 (.checksum)`).
    #[error("{member}: {kind} checksum mismatch (stored {stored}, computed {computed})")]
    ChecksumMismatch {
        member: String,
        kind: &'static str,
        stored: chunks::ChunkChecksum,
        computed: chunks::ChunkChecksum,
    },
    #[error("{codec} stream ends early: no data at decompressed offset {at:#x}")]
    StreamEndsEarly { codec: &'static str, at: u64 },
    #[error("index window out of range ({len} bytes at {off:#x})")]
    IndexWindowRange { off: u64, len: u32 },
    #[error("index window is damaged")]
    IndexWindowDamaged(#[source] std::io::Error),
    #[error("index window at {off:#x} is longer than the 32 KiB deflate window")]
    IndexWindowTooLong { off: u64 },
    /// The compressed stream fails after the tar's end-of-archive blocks.
    #[error("after the end of the tar archive")]
    AfterTar(#[source] CrateError),
}

impl ErrorKind for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::NotXva
            | Error::XmlNotXva
            | Error::PreTarLayout { .. }
            | Error::Appliance
            | Error::VirtualSizeTooLarge { .. }
            | Error::TooManyMembers { .. } => Kind::Unsupported,
            Error::NoDisks => Kind::NotFound,
            Error::AfterTar(e) => e.kind(),
            Error::OvaXmlNotFirst { .. }
            | Error::NoMembers
            | Error::OvaXmlTooLarge { .. }
            | Error::OvaXmlNotUtf8
            | Error::OvaXml(_)
            | Error::CutShort { .. }
            | Error::NoData { .. }
            | Error::ChecksumMismatch { .. }
            | Error::StreamEndsEarly { .. }
            | Error::IndexWindowRange { .. }
            | Error::IndexWindowDamaged(_)
            | Error::IndexWindowTooLong { .. } => Kind::Corrupt,
        }
    }
}

/// The (decompressed) tar stream of an archive.
#[derive(Debug)]
enum TarStream {
    Plain(Arc<dyn Source>),
    Compressed(Box<CompressedTar>),
}

/// One opened export, shared by its disks.
#[derive(Debug)]
pub struct Archive {
    src: Arc<dyn Source>,
    codec: Codec,
    data: TarStream,
    export: Export,
    unit: u64,
    index_note: String,
    /// VDIs shown as disks.
    mounted: Vec<String>,
}

impl Archive {
    fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.data {
            TarStream::Plain(s) => s.read_exact_at(buf, off),
            TarStream::Compressed(c) => c.read_exact_at(off, buf),
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
            TarStream::Compressed(c) => c.decoded.load(Ordering::Relaxed),
            TarStream::Plain(_) => 0,
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
    let codec = detect(&head)?;
    let ix = index::open(&src, codec, opts.cache_dir.as_deref(), progress)?;
    let export = read_ova_xml(&ix.members)?;
    let vdis: Vec<(String, u64)> = export.vdis.iter().map(|v| (v.id.clone(), v.virtual_size)).collect();
    let Layout { unit, disks } = chunks::place(&ix.members[1..], &vdis, export.export_vsn > 0)?;
    check_disks(&export, &disks, ix.end)?;
    let index_note = match &ix.cached {
        Some(p) => format!("{} members, cached in {}", ix.members.len(), p.display()),
        None => format!("{} members, in memory", ix.members.len()),
    };
    let data = match codec {
        Codec::Plain => TarStream::Plain(src.clone()),
        _ => TarStream::Compressed(Box::new(CompressedTar::new(
            src.clone(),
            codec,
            ix.points,
            ix.windows,
            ix.total,
            opts.cache_dir.as_deref(),
            opts.block_cache_bytes,
        )?)),
    };
    let suspend: Vec<&str> = export.vms.iter().map(|v| v.suspend_vdi.as_str()).collect();
    let mounted: Vec<String> =
        disks.iter().map(|d| vdis[d.vdi].0.clone()).filter(|id| !suspend.contains(&id.as_str())).collect();
    let archive = Arc::new(Archive { src, codec, data, export, unit, index_note, mounted });
    let named = name_disks(&archive, disks, opts.verify);
    if named.is_empty() {
        return Err(Error::NoDisks.into());
    }
    Ok(named)
}

/// The codec of an archive starting with `head`, or why it is not an XVA.
fn detect(head: &[u8]) -> Result<Codec> {
    let codec = Codec::detect(head);
    if codec == Codec::Plain && !looks_like_tar(head) {
        let xml = head.starts_with(b"<?xml") || head.windows(10).any(|w| w == b"<appliance");
        return Err(if xml { Error::XmlNotXva } else { Error::NotXva }.into());
    }
    Ok(codec)
}

/// A valid first header, or a ustar one whose checksum is wrong (the index pass reports that).
fn looks_like_tar(head: &[u8]) -> bool {
    head.get(..512).and_then(|b| b.try_into().ok()).is_some_and(|b| tar::is_header(b) || &b[257..262] == b"ustar")
}

/// The first member, `ova.xml`, parsed.
fn read_ova_xml(members: &[tar::Member]) -> Result<Export> {
    let ova = match members.first() {
        Some(m) if m.name == "ova.xml" => m,
        Some(m) if m.name.contains("/chunk-") || m.name.ends_with(".gz") => {
            return Err(Error::PreTarLayout { member: m.name.clone() }.into());
        }
        Some(m) => return Err(Error::OvaXmlNotFirst { first: m.name.clone() }.into()),
        None => return Err(Error::NoMembers.into()),
    };
    let text = ova.content.as_deref().ok_or(Error::OvaXmlTooLarge { size: ova.size })?;
    let text = std::str::from_utf8(text).map_err(|_| Error::OvaXmlNotUtf8)?;
    let export = Export::parse(text).map_err(|e| match e {
        OvaXmlError::Appliance => Error::Appliance,
        e => Error::OvaXml(e),
    })?;
    if let Some(v) = export.vdis.iter().find(|v| v.virtual_size > MAX_VIRTUAL_SIZE) {
        return Err(Error::VirtualSizeTooLarge { vdi: v.id.clone(), size: v.virtual_size }.into());
    }
    Ok(export)
}

/// Every disk of the VM has its data, and, without the end-of-archive blocks, a disk whose data
/// stops short is taken for a cut-off file.
fn check_disks(export: &Export, disks: &[Placed], end: tar::End) -> Result<()> {
    if end == tar::End::Eof
        && let Some(d) = disks.iter().find(|d| d.data_end() < export.vdis[d.vdi].virtual_size)
    {
        let v = &export.vdis[d.vdi];
        let member = d.chunks.last().map_or(format!("{}/", v.id), |c| chunk_name(&v.id, c, d.digits));
        return Err(Error::CutShort { member, data_end: d.data_end(), virtual_size: v.virtual_size }.into());
    }
    for v in &export.vdis {
        let is_disk = export.vbds_of(&v.id).any(|b| b.ty == "Disk");
        if is_disk && v.virtual_size > 0 && !disks.iter().any(|d| export.vdis[d.vdi].id == v.id) {
            return Err(Error::NoData { member: format!("{}/", v.id), label: v.name_label.clone() }.into());
        }
    }
    Ok(())
}

/// The disks to mount (not a suspend image), in `userdevice` order then archive order, named
/// after their labels and made unique.
fn name_disks(archive: &Arc<Archive>, disks: Vec<Placed>, verify: bool) -> Vec<(String, XvaDisk)> {
    let ex = &archive.export;
    let vm_id = ex.vm().map(|v| v.id.clone()).unwrap_or_default();
    let mut out: Vec<(u64, usize, XvaDisk)> = Vec::new();
    for (order, d) in disks.into_iter().enumerate() {
        let vdi = &ex.vdis[d.vdi];
        if ex.vms.iter().any(|vm| vm.suspend_vdi == vdi.id) {
            log::info!("{}: {} is the VM's suspend image; not mounted", archive.location(), vdi.id);
            continue;
        }
        let vbd = ex.vbds_of(&vdi.id).find(|b| b.vm == vm_id).or_else(|| ex.vbds_of(&vdi.id).next());
        let userdevice = vbd.and_then(|b| b.userdevice.parse::<u64>().ok()).unwrap_or(u64::MAX);
        let vbd = vbd.map(|b| (b.ty.clone(), b.userdevice.clone()));
        out.push((userdevice, order, XvaDisk::new(archive.clone(), d, vbd, verify)));
    }
    out.sort_by_key(|(u, o, _)| (*u, *o));
    let mut named: Vec<(String, XvaDisk)> = Vec::new();
    for (_, _, d) in out {
        let base = sanitize(&d.vdi().name_label);
        let mut name = format!("{base}.raw");
        let mut i = 2;
        while named.iter().any(|(n, _)| *n == name) {
            name = format!("{base}-{i}.raw");
            i += 1;
        }
        named.push((name, d));
    }
    named
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;
    use testkit::xva::XvaBuilder;

    pub(super) fn open_mem(bytes: Vec<u8>) -> Vec<(String, XvaDisk)> {
        let src: Arc<dyn Source> = Arc::new(MemSource::new("vm.xva", bytes));
        open(src, &Options::default(), &crate::progress::Silent).unwrap()
    }

    fn open_err(bytes: Vec<u8>) -> CrateError {
        let src: Arc<dyn Source> = Arc::new(MemSource::new("vm.xva", bytes));
        open_disks(src, &Options::default(), &crate::progress::Silent).map(|_| ()).unwrap_err()
    }

    #[test]
    fn disks_are_named_from_labels_and_ordered_by_userdevice() {
        let mut b = XvaBuilder::xapi("vm");
        b.disk("data/2", vec![1u8; 4096], 9, 1).disk("", vec![2u8; 4096], 12, 0).disk("data/2", vec![3u8; 512], 15, 2);
        let names: Vec<String> = open_mem(b.to_bytes()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["disk.raw", "data_2.raw", "data_2-2.raw"]);
        assert_eq!(sanitize(".."), "disk");
    }

    /// A plain tar of `members` as xapi writes it, with the end-of-archive blocks.
    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, d) in members {
            out.extend_from_slice(&testkit::xva::header(n, d.len() as u64, testkit::xva::Dialect::Xapi));
            out.extend_from_slice(d);
            out.resize(out.len().next_multiple_of(512), 0);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn a_virtual_size_over_64_tib_is_refused_before_anything_is_sized_by_it() {
        let mut b = XvaBuilder::xapi("vm");
        b.disk("d", vec![1u8; 4096], 3, 0);
        let xml = b.ova_xml();
        let needle = "<name>virtual_size</name><value>4096</value>";
        assert!(xml.contains(needle), "{xml}");
        let huge = xml.replace(needle, &format!("<name>virtual_size</name><value>{}</value>", u64::MAX));
        let e = open_err(tar_of(&[("ova.xml", huge.as_bytes())]));
        assert_eq!(e.kind(), Kind::Unsupported);
        assert!(e.to_string().starts_with("vm.xva: ova.xml: VDI Ref:3 has virtual_size 0xffffffffffffffff"), "{e}");
        assert!(e.to_string().contains("64 TiB"), "{e}");
    }

    #[test]
    fn errors_keep_their_kind_and_name_archive_and_member() {
        let e = open_err(testkit::pattern(8, 4096));
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (Kind::Unsupported, "vm.xva: neither a tar archive nor gzip/zstd-compressed (not an XVA)")
        );
        let mut b = XvaBuilder::xapi("vm");
        b.disk("d", vec![1u8; 4096], 3, 0);
        let e = open_err(b.to_bytes()[..1024].to_vec());
        assert_eq!(e.kind(), Kind::Corrupt);
        assert!(e.downcast_ref::<tar::TarError>().is_some(), "{e:?}");
    }
}
