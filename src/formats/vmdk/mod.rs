//! VMDK: VMware "Virtual Disk Format 5.0" (and 1.1 for the ESX sparse extent), plus SESparse as
//! qemu's `block/vmdk.c` reads it.
//!
//! A layer is a descriptor and its extents, placed end to end:
//!
//! * the **descriptor** (`descriptor.rs`): standalone text (`name.vmdk`) or embedded in a hosted
//!   sparse file; `CID`, `parentCID`, `createType`, `parentFileNameHint` and extent lines
//!   `RW|RDONLY SECTORS FLAT|VMFS|SPARSE|VMFSSPARSE|SESPARSE|ZERO ["file" [offset]]`;
//! * **flat** extents (`FLAT`, `VMFS`: monolithicFlat, twoGbMaxExtentFlat, ESXi `vmfs`/`vmfsThin`
//!   `-flat.vmdk`), read in place at the line's offset;
//! * **hosted sparse** extents (`KDMV`, `hosted.rs`: monolithicSparse, twoGbMaxExtentSparse,
//!   streamOptimized with deflate grains and the grain directory found through the footer),
//!   zeroed-grain entries (1) read as zeros;
//! * **ESX sparse** extents (`COWD`, `cowd.rs`: vmfsSparse `-delta.vmdk`);
//! * **SESparse** extents (`sesparse.rs`: seSparse `-sesparse.vmdk`), whose unmapped and zero
//!   grains read as zeros;
//! * **ZERO** extents: zeros, masking the parent.
//!
//! Grain tables load lazily (`grains.rs`) into a byte-bounded cache per layer; compressed grains
//! are inflated once into another (`compressed_grains.rs`). Extent files resolve under the same confinement
//! rules as parents. A child names its parent by `parentFileNameHint` and must match the parent's
//! `CID` with its `parentCID` (ffffffff = no parent).
//!
//! Refused, with one line naming the file: an extent outside the allowed directories, a missing
//! extent, a flat extent shorter than its line, a sparse extent smaller than its line, a grain
//! directory or table entry past the end of the file (checked at open when the tables total at
//! most 16 MiB, otherwise when each table is first loaded: EIO and a log line), a grain size that
//! is 0, not a power of two or over 1 MiB, unknown header versions (SESparse other than 2.1,
//! `KDMV` over 3, `COWD` other than 1), a SESparse journal that needs replaying, `NOACCESS`
//! extents, raw device mappings (`vmfsRaw*`, `VMFSRDM`), device-backed and unknown createTypes, a
//! bare sparse extent with no descriptor, and compressed grains without markers. A compressed
//! grain that fails to inflate, inflates to the wrong size or carries the wrong lba is EIO at read
//! time. The parent CID mismatch and the missing parent are reported by the chain. Each refusal
//! is a variant of [`Error`] (`error.rs`), whose kind is Denied for an extent outside the allowed
//! directories, NotFound for a missing extent, Unsupported for a valid feature vdiskfs does not
//! read, and Corrupt for the rest.

pub mod compressed_grains;
pub mod cowd;
pub mod descriptor;
mod error;
pub mod extent;
pub mod grains;
pub mod hosted;
mod info;
mod link;
pub mod sesparse;

use std::sync::Arc;

pub use descriptor::{Descriptor, ExtentLine, ExtentType};
pub use error::Error;
pub use link::open_link_only;

use descriptor::{Access, CreateType, MAX_DESCRIPTOR};
use extent::{ExtentData, ExtentFiles, SparseExtent, SparseHeader, VmdkExtent};
use grains::{BufferCache, buffer_cache};
use hosted::SECTOR;

use crate::error::{Error as CrateError, Result};
use crate::gate::Gate;
use crate::layer::{Hint, Identity, Layer, LayerInfo, ParentRef, Span};
use crate::source::{Location, Source};

/// The largest virtual disk accepted (VMware's limit is 62 TiB).
pub const MAX_SIZE: u64 = 64 << 40;
/// Extents per layer: data and compressed views of each must fit the chain's u16 source index.
const MAX_EXTENTS: usize = 32767;
/// Grain tables cached per layer.
const TABLE_CACHE_BYTES: usize = 16 << 20;
/// Inflated grains cached per layer.
const INFLATED_CACHE_BYTES: usize = 32 << 20;
/// Grain tables are all read and checked at open when they total at most this.
const VALIDATE_AT_OPEN_BYTES: u64 = 16 << 20;

/// Where the descriptor came from.
#[derive(Debug, Clone, Copy)]
enum DescriptorAt {
    /// A text file of its own (the file opened).
    Standalone,
    /// Embedded in the hosted sparse file opened, at `sector`.
    Embedded { sector: u64, sectors: u64 },
}

/// One VMDK link: a descriptor and its extents.
#[derive(Debug)]
pub struct VmdkLayer {
    loc: Location,
    /// The descriptor's file, then every extent file.
    sources: Vec<Arc<dyn Source>>,
    desc: Descriptor,
    desc_at: DescriptorAt,
    create_type: String,
    extents: Vec<VmdkExtent>,
    size: u64,
    parent: Option<ParentRef>,
    /// Allocated bytes, when the tables were scanned at open.
    allocated: Option<u64>,
    inflated: BufferCache,
}

/// Opens one VMDK layer from its descriptor or monolithic sparse file.
pub fn open(src: Arc<dyn Source>, gate: &Gate) -> Result<Arc<dyn Layer>> {
    let loc = src.location().clone();
    Ok(Arc::new(VmdkLayer::open(src, gate).map_err(|e| e.in_file(&loc))?))
}

/// For a bare extent: the descriptor ESXi or qemu would have written next to it, if it is there.
fn descriptor_beside(loc: &Location, suffixes: &[&str]) -> Option<String> {
    let name = loc.file_name();
    let stem = name.strip_suffix(".vmdk").unwrap_or(&name);
    suffixes
        .iter()
        .filter_map(|s| stem.strip_suffix(s))
        .map(|base| format!("{base}.vmdk"))
        .find(|cand| loc.dir().join(cand).is_some_and(|l| l.exists()))
}

impl VmdkLayer {
    pub fn open(src: Arc<dyn Source>, gate: &Gate) -> Result<VmdkLayer> {
        let loc = src.location().clone();
        let len = src.len()?;
        let head = src.read_vec(0, len.min(512) as usize)?;
        let tables = Arc::new(buffer_cache(TABLE_CACHE_BYTES));
        let mut sources = vec![src.clone()];
        let (desc, desc_at, extents) = if head.starts_with(hosted::MAGIC) {
            Self::open_monolithic(src, &loc, gate, &tables, &mut sources)?
        } else if head.starts_with(cowd::MAGIC) {
            return Err(Error::BareCowd { descriptor: descriptor_beside(&loc, &["-delta"]) }.into());
        } else if head.starts_with(&sesparse::CONST_MAGIC.to_le_bytes()) {
            return Err(Error::BareSeSparse { descriptor: descriptor_beside(&loc, &["-sesparse"]) }.into());
        } else {
            if len > MAX_DESCRIPTOR as u64 {
                return Err(Error::DescriptorTooLarge { len }.into());
            }
            let text = descriptor::decode_text(&src.read_vec(0, len as usize)?);
            let desc = descriptor::parse(&text)?;
            let extents = Self::open_extents(&desc, &loc, gate, &tables, &mut sources)?;
            (desc, DescriptorAt::Standalone, extents)
        };
        let create_type = match desc.create_type.clone() {
            Some(t) => t,
            None if matches!(desc_at, DescriptorAt::Standalone) => return Err(Error::NoCreateType.into()),
            None => infer_create_type(&extents).to_string(),
        };
        match descriptor::classify_create_type(&create_type) {
            CreateType::Known => {}
            CreateType::Refused(why) => return Err(Error::CreateTypeRefused { create_type, why }.into()),
            CreateType::Unknown => return Err(Error::UnknownCreateType(create_type).into()),
        }
        let size = extents.last().map(|e| e.start + e.len).unwrap_or(0);
        if size == 0 {
            return Err(Error::NoExtents.into());
        }
        let parent = desc.parent().map(|pcid| ParentRef {
            hints: vec![Hint { kind: "parentFileNameHint".into(), path: desc.parent_hint.clone().unwrap_or_default() }],
            expect: vec![Identity::VmdkCid(pcid)],
        });
        let allocated = validate_small_tables(&extents)?;
        Ok(VmdkLayer {
            loc,
            sources,
            desc,
            desc_at,
            create_type,
            extents,
            size,
            parent,
            allocated,
            inflated: buffer_cache(INFLATED_CACHE_BYTES),
        })
    }

    /// A `KDMV` file opened directly: monolithicSparse or streamOptimized with an embedded
    /// descriptor (or, with capacity 0, a descriptor of other extents embedded in a sparse file).
    fn open_monolithic(
        src: Arc<dyn Source>,
        loc: &Location,
        gate: &Gate,
        tables: &Arc<BufferCache>,
        sources: &mut Vec<Arc<dyn Source>>,
    ) -> Result<(Descriptor, DescriptorAt, Vec<VmdkExtent>)> {
        let (h, footer) = extent::read_hosted_header(src.as_ref())?;
        let flen = src.len()?;
        let text = if h.desc_offset != 0 && h.desc_size != 0 {
            let at = h.desc_offset.saturating_mul(SECTOR);
            let n = h.desc_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR as u64);
            if at.checked_add(n).is_none_or(|e| e > flen) {
                return Err(Error::EmbeddedDescriptorPastEnd { at, len: n, file_len: flen }.into());
            }
            descriptor::decode_text(&src.read_vec(at, n as usize)?)
        } else {
            String::new()
        };
        if !descriptor::looks_like_descriptor(&text) {
            let descriptor = descriptor_beside(loc, &["-s001", "-s002", "-s003", "-s004"]);
            return Err(Error::BareSparsePiece { descriptor }.into());
        }
        let desc = descriptor::parse(&text)?;
        let desc_at = DescriptorAt::Embedded { sector: h.desc_offset, sectors: h.desc_size };
        if h.capacity == 0 {
            let extents = Self::open_extents(&desc, loc, gate, tables, sources)?;
            return Ok((desc, desc_at, extents));
        }
        let len =
            h.capacity.checked_mul(SECTOR).filter(|&l| l <= MAX_SIZE).ok_or(Error::CapacityTooLarge(h.capacity))?;
        let map = extent::hosted_map(src, &h, len, 0, tables)?;
        // The embedded extent line names the file as it was first called; show it as written.
        let line = match desc.extents.as_slice() {
            [l] => l.clone(),
            _ => ExtentLine {
                access: Access::Rw,
                sectors: h.capacity,
                kind: ExtentType::Sparse,
                file: Some(loc.file_name()),
                offset: 0,
            },
        };
        let data =
            ExtentData::Sparse(Box::new(SparseExtent { map, header: SparseHeader::Hosted { header: h, footer } }));
        Ok((desc, desc_at, vec![VmdkExtent { start: 0, len, line, path: Some(loc.clone()), data, found: None }]))
    }

    fn open_extents(
        desc: &Descriptor,
        loc: &Location,
        gate: &Gate,
        tables: &Arc<BufferCache>,
        sources: &mut Vec<Arc<dyn Source>>,
    ) -> Result<Vec<VmdkExtent>> {
        if desc.extents.len() > MAX_EXTENTS {
            return Err(Error::TooManyExtents { count: desc.extents.len(), max: MAX_EXTENTS }.into());
        }
        let mut files = ExtentFiles::new(gate, loc, tables.clone());
        let mut out = Vec::with_capacity(desc.extents.len());
        let mut start = 0u64;
        for (i, line) in desc.extents.iter().enumerate() {
            if line.access == Access::NoAccess {
                return Err(Error::NoAccessExtent { index: i, line: line.display() }.into());
            }
            let end = line.sectors.checked_mul(SECTOR).and_then(|l| l.checked_add(start)).filter(|&e| e <= MAX_SIZE);
            let Some(end) = end else {
                return Err(Error::ExtentsTooLarge.into());
            };
            out.push(files.open(i, start, line)?);
            start = end;
        }
        sources.extend(files.into_sources());
        Ok(out)
    }

    fn extent_at(&self, offset: u64) -> (usize, &VmdkExtent) {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset).min(self.extents.len() - 1);
        (i, &self.extents[i])
    }

    fn absent(&self, len: u64) -> Span {
        if self.parent.is_some() { Span::parent(len) } else { Span::zero(len) }
    }

    fn allocated_bytes(&self) -> Result<u64> {
        if let Some(a) = self.allocated {
            return Ok(a);
        }
        let mut total = 0;
        for e in &self.extents {
            total += match &e.data {
                ExtentData::Zero => 0,
                ExtentData::Flat { .. } => e.len,
                ExtentData::Sparse(s) => (s.map.validate_tables()? * s.map.grain).min(e.len),
            };
        }
        Ok(total)
    }
}

/// The createType a descriptor-less header implies.
fn infer_create_type(extents: &[VmdkExtent]) -> &'static str {
    match extents.first().map(|e| &e.data) {
        Some(ExtentData::Sparse(s)) if s.compressed() => "streamOptimized",
        _ => "monolithicSparse",
    }
}

/// Reads and checks every grain table when they are small enough in total, so that a bad entry
/// is refused at open; returns the allocated bytes then.
fn validate_small_tables(extents: &[VmdkExtent]) -> Result<Option<u64>> {
    let mut table_bytes = 0;
    for e in extents {
        if let ExtentData::Sparse(s) = &e.data {
            let (_, bytes) = s.map.scan_directory().map_err(|err| in_extent(err, e))?;
            table_bytes += bytes;
        }
    }
    if table_bytes > VALIDATE_AT_OPEN_BYTES {
        return Ok(None);
    }
    let mut total = 0;
    for e in extents {
        total += match &e.data {
            ExtentData::Zero => 0,
            ExtentData::Flat { .. } => e.len,
            ExtentData::Sparse(s) => {
                (s.map.validate_tables().map_err(|err| in_extent(err, e))? * s.map.grain).min(e.len)
            }
        };
    }
    Ok(Some(total))
}

fn in_extent(err: CrateError, e: &VmdkExtent) -> CrateError {
    match &e.path {
        Some(p) => err.in_file(p),
        None => err,
    }
}

impl Layer for VmdkLayer {
    fn sources(&self) -> Vec<Arc<dyn Source>> {
        self.sources.clone()
    }
    fn location(&self) -> &Location {
        &self.loc
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
        let (i, e) = self.extent_at(offset);
        let rel = offset - e.start;
        let max = max_len.min(e.len - rel);
        match &e.data {
            ExtentData::Zero => Ok(Span::zero(max)),
            ExtentData::Flat { offset: base, .. } => Ok(Span::data(max, i, base + rel)),
            ExtentData::Sparse(s) => {
                let (g, len) = s.map.run(rel, max).map_err(|err| in_extent(err, e))?;
                Ok(match g {
                    grains::Grain::Unallocated => self.absent(len),
                    grains::Grain::Zero => Span::zero(len),
                    grains::Grain::Data(at) => Span::data(len, i, at),
                    grains::Grain::Compressed(_) => Span::data(len, self.extents.len() + i, rel),
                })
            }
        }
    }

    fn read(&self, source: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = self.extents.len();
        let (i, compressed) = if source < n { (source, false) } else { (source - n, true) };
        let Some(e) = self.extents.get(i) else {
            return Err(CrateError::internal(format!("no extent for source {source}")).in_file(&self.loc));
        };
        match (&e.data, compressed) {
            (ExtentData::Flat { src, .. }, false) => src.read_exact_at(buf, offset),
            (ExtentData::Sparse(s), false) => s.map.src.read_exact_at(buf, offset),
            (ExtentData::Sparse(s), true) => {
                compressed_grains::read_compressed(&s.map, i as u32, &self.inflated, offset, buf)
                    .map_err(|err| in_extent(err, e))
            }
            _ => Err(CrateError::internal(format!("extent {i} has no data to read")).in_file(&self.loc)),
        }
    }

    fn parent(&self) -> Option<&ParentRef> {
        self.parent.as_ref()
    }

    fn identity(&self) -> Vec<Identity> {
        self.desc.cid.map(Identity::VmdkCid).into_iter().collect()
    }

    fn compressed(&self, source: usize) -> bool {
        source >= self.extents.len()
    }

    fn describe(&self) -> Result<LayerInfo> {
        info::describe(self)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;
    use crate::source::MemSource;

    /// A monolithic sparse disk of 32 KiB in memory: 4 KiB grains, 4 entries per grain table,
    /// header, descriptor at sector 1, GD at sector 2, tables at sectors 3 and 4, grains from
    /// sector 8. Grains 0, 1 and 6 hold data, grain 3 is a zeroed grain. With `compressed`, the
    /// grains are deflated behind grain markers.
    fn tiny(compressed: bool) -> Vec<u8> {
        let mut f = vec![0u8; 8 * 512];
        f[0..4].copy_from_slice(b"KDMV"); // magic
        f[4..8].copy_from_slice(&(if compressed { 3u32 } else { 2 }).to_le_bytes()); // version
        let flags: u32 = if compressed { 0x30005 } else { 0x5 }; // NL detect, zeroed grains (+ compression, markers)
        f[8..12].copy_from_slice(&flags.to_le_bytes());
        f[12..20].copy_from_slice(&64u64.to_le_bytes()); // capacity: 64 sectors
        f[20..28].copy_from_slice(&8u64.to_le_bytes()); // grain: 8 sectors
        f[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptor at sector 1
        f[36..44].copy_from_slice(&1u64.to_le_bytes()); // ... 1 sector
        f[44..48].copy_from_slice(&4u32.to_le_bytes()); // 4 entries per table
        f[56..64].copy_from_slice(&2u64.to_le_bytes()); // GD at sector 2
        f[64..72].copy_from_slice(&8u64.to_le_bytes()); // overhead
        f[73..77].copy_from_slice(b"\n \r\n");
        f[77..79].copy_from_slice(&(compressed as u16).to_le_bytes()); // deflate
        let desc = b"# Disk DescriptorFile\nCID=0000abcd\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 64 SPARSE \"t.vmdk\"\n";
        f[512..512 + desc.len()].copy_from_slice(desc);
        f[1024..1028].copy_from_slice(&3u32.to_le_bytes()); // GD[0] -> sector 3
        f[1028..1032].copy_from_slice(&4u32.to_le_bytes()); // GD[1] -> sector 4
        let mut gte = |g: usize, v: u32| {
            let at = 1536 + (g / 4) * 512 + (g % 4) * 4;
            f[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        gte(3, 1);
        let mut grains = Vec::new();
        for (g, seed) in [(0usize, 1u8), (1, 2), (6, 3)] {
            let sector = 8 + grains.len() as u32 / 512;
            gte(g, sector);
            let data = vec![seed; 4096];
            if compressed {
                let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                z.write_all(&data).unwrap();
                let z = z.finish().unwrap();
                grains.extend_from_slice(&(g as u64 * 8).to_le_bytes());
                grains.extend_from_slice(&(z.len() as u32).to_le_bytes());
                grains.extend_from_slice(&z);
                grains.resize(grains.len().next_multiple_of(512), 0);
            } else {
                grains.extend_from_slice(&data);
            }
        }
        f.extend_from_slice(&grains);
        f
    }

    fn read_all(bytes: Vec<u8>) -> Result<Vec<u8>> {
        let layer = VmdkLayer::open(Arc::new(MemSource::new("t.vmdk", bytes)), &Gate::new(Default::default()))?;
        let mut out = vec![0u8; layer.virtual_size() as usize];
        let mut pos = 0;
        while pos < layer.virtual_size() {
            let span = layer.map(pos, layer.virtual_size() - pos)?;
            let buf = &mut out[pos as usize..(pos + span.len) as usize];
            match span.kind {
                crate::layer::SpanKind::Data { source, offset } => layer.read(source, offset, buf)?,
                _ => buf.fill(0),
            }
            pos += span.len;
        }
        Ok(out)
    }

    #[test]
    fn tiny_sparse_disks_read_as_written() {
        for compressed in [false, true] {
            let got = read_all(tiny(compressed)).unwrap();
            let mut want = vec![0u8; 32768];
            want[..4096].fill(1);
            want[4096..8192].fill(2);
            want[6 * 4096..7 * 4096].fill(3);
            assert_eq!(got, want, "compressed: {compressed}");
        }
    }

    proptest! {
        /// Whatever bytes a damaged file holds, opening and reading it returns data or an error,
        /// never a panic or an unbounded allocation.
        #[test]
        fn damaged_sparse_files_never_panic(
            compressed: bool,
            edits in prop::collection::vec((0usize..6000, any::<u8>()), 1..12),
        ) {
            let mut f = tiny(compressed);
            for (at, v) in edits {
                let n = f.len();
                f[at % n] = v;
            }
            let _ = read_all(f);
        }
    }
}
