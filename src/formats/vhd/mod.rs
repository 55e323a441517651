//! VHD: Microsoft "Virtual Hard Disk Image Format Specification" (October 2006), fixed, dynamic
//! and differencing disks, in both the Windows and the XenServer (blktap) dialect.
//!
//! Supported: the footer (the copy at offset 0 is used when the last sector is not a valid footer,
//! as for a VHD on a larger logical volume), the dynamic header, the BAT (which blktap preallocates
//! beyond the disk; reads are bounded by `current_size`), per-sector bitmaps (MSB first; a clear bit
//! means zeros in a dynamic disk and "ask the parent" in a differencing disk), blktap's batmap
//! (a set bit lets a fully allocated block skip its bitmap), and the parent locators `W2ru`, `W2ku`,
//! `MacX` and the deprecated `Wi2r`/`Wi2k`, whose data is read by `data_len` (Windows and blktap
//! write `data_space` in bytes, the spec in sectors).
//!
//! Virtual size is `current_size`, never CHS geometry. Refused, with the [`Error`] variant named:
//! a bad cookie or checksum in both footer copies ([`Error::BothFooters`]), a bad dynamic-header
//! checksum ([`Error::Header`]), a format version other than 1.x ([`Error::Version`]), a block size
//! that is not a power of two in 512 B–256 MiB ([`Error::BlockSize`]), a virtual size over 2 TiB
//! ([`Error::VirtualSize`]), more than 2^24 blocks ([`Error::TooManyBlocks`]), a BAT smaller than
//! the disk ([`Error::BatTooSmall`]), a BAT entry whose block runs past the end of the file
//! ([`Error::BlockPastEnd`]), a poisoned (mid-coalesce) blktap
//! VHD ([`Error::Poisoned`]), and blktap 0.1 files (little-endian bitmaps, refused by blktap
//! itself: [`Error::Blktap01`]).

pub mod footer;
pub mod header;

use std::sync::Arc;

pub use footer::{Footer, checksum};
pub use header::{BatmapHeader, DynHeader};

use super::bitset::{BitOrder, BitSet, bitmap_run};
use super::table::{Endian, EntryType, PagedTable};
use crate::cache::ByteCache;
use crate::error::{Error as CrateError, ErrorKind, Kind, Result};
use crate::layer::{Hint, Identity, Layer, LayerInfo, ParentInfo, ParentRef, Span, fmt_uuid};
use crate::source::{Location, Source};

/// What can be wrong with a VHD's structures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} has bad cookie {found:02x?}")]
    BadCookie { what: &'static str, found: Vec<u8> },
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { what: &'static str, stored: u32, computed: u32 },
    #[error("{what} has unsupported version {version:#010x}")]
    Version { what: &'static str, version: u32 },
    #[error("unknown disk type {0}")]
    DiskType(u32),
    #[error("impossible block size {0} (must be a power of two from 512 B to 256 MiB)")]
    BlockSize(u32),
    #[error("poisoned VHD (v_poison cookie): blktap was coalescing it and its contents are incomplete")]
    Poisoned,
    #[error("too small to be a VHD ({len} bytes)")]
    TooSmall { len: u64 },
    /// The footer at the end is invalid and the copy at offset 0 describes a fixed disk, which
    /// has no such copy.
    #[error("footer at {offset:#x}")]
    Footer {
        offset: u64,
        #[source]
        cause: Box<Error>,
    },
    #[error("footer at {offset:#x}: {at_end}; the copy at offset 0 is also invalid")]
    BothFooters {
        offset: u64,
        at_end: Box<Error>,
        #[source]
        at_start: Box<Error>,
    },
    #[error("footer virtual size {0} exceeds the VHD maximum of 2 TiB")]
    VirtualSize(u64),
    #[error("truncated: fixed disk of {size} bytes but the file holds only {data_len} bytes of data")]
    FixedTruncated { size: u64, data_len: u64 },
    #[error("blktap 0.1 VHD (little-endian sector bitmaps) is not supported, as by blktap itself")]
    Blktap01,
    #[error("dynamic header offset {offset:#x} is past the end of the file ({len:#x})")]
    HeaderPastEnd { offset: u64, len: u64 },
    /// The dynamic header at `offset` does not parse. The message names the defect first and
    /// the offset last ("dynamic header checksum mismatch (…) at 0x200"), so `inner` is part of
    /// it rather than a separate cause.
    #[error("{inner} at {offset:#x}")]
    Header { offset: u64, inner: Box<Error> },
    #[error("BAT has {entries} entries but a disk of {size} bytes with {block_size}-byte blocks needs {needed}")]
    BatTooSmall { entries: u32, size: u64, block_size: u64, needed: u64 },
    #[error(
        "a disk of {size} bytes in {block_size}-byte blocks has {blocks} blocks; vdiskfs reads at most {} (2 MiB blocks, as every VHD writer uses, need at most 1048576)",
        MAX_BLOCKS
    )]
    TooManyBlocks { size: u64, block_size: u64, blocks: u64 },
    #[error("BAT at {offset:#x} runs past the end of the file ({len:#x})")]
    BatPastEnd { offset: u64, len: u64 },
    #[error(
        "BAT entry {index} (sector {sector:#x}) puts block data up to {end:#x}, past the end of the data at {data_end:#x}"
    )]
    BlockPastEnd { index: u64, sector: u64, end: u64, data_end: u64 },
    #[error("parent locator {code} data at {offset:#x} (+{len}) is past the end of the file")]
    LocatorPastEnd { code: String, offset: u64, len: u32 },
    /// A BAT entry that was allocated when the BAT was validated at open reads as unused now.
    #[error("BAT entry {0} changed since the image was opened")]
    BatEntryChanged(u64),
}

impl ErrorKind for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::BadCookie { .. }
            | Error::Checksum { .. }
            | Error::DiskType(_)
            | Error::BlockSize(_)
            | Error::Poisoned
            | Error::TooSmall { .. }
            | Error::VirtualSize(_)
            | Error::FixedTruncated { .. }
            | Error::HeaderPastEnd { .. }
            | Error::BatTooSmall { .. }
            | Error::BatPastEnd { .. }
            | Error::BlockPastEnd { .. }
            | Error::LocatorPastEnd { .. } => Kind::Corrupt,
            Error::Version { .. } | Error::Blktap01 | Error::TooManyBlocks { .. } => Kind::Unsupported,
            Error::BatEntryChanged(_) => Kind::Stale,
            // A located error is what it wraps; of two bad footers, the one at the end decides.
            Error::Footer { cause: inner, .. }
            | Error::Header { inner, .. }
            | Error::BothFooters { at_end: inner, .. } => inner.kind(),
        }
    }
}

/// The VHD maximum virtual size (the spec allows 2040 GiB; blktap and qemu allow 2 TiB).
pub const MAX_SIZE: u64 = 2 << 40;
/// Blocks per disk: the allocation bitmap costs 1 bit each (2 MiB at most) and the BAT read at
/// open 4 bytes each (64 MiB at most), whatever block size a header claims. A 2 TiB disk needs
/// 128 KiB blocks or larger; Virtual PC, Hyper-V, blktap and qemu write 2 MiB blocks.
pub const MAX_BLOCKS: u64 = 1 << 24;
const SECTOR: u64 = 512;
const UNUSED: u64 = 0xFFFF_FFFF;
/// Bytes of sector bitmaps cached per layer (1024 bitmaps of a 2 MiB-block disk, less the
/// cache's bookkeeping). The chain's merged block map caches resolved blocks, so this only
/// serves first touches. At least 16 bitmaps are kept, whatever the block size.
const BITMAP_CACHE_BYTES: u64 = 512 << 10;
const MIN_BITMAPS: u64 = 16;
/// BAT pages (4 KiB: 2 GiB of a 2 MiB-block disk each) and how many bytes of them are cached per
/// layer (64 pages). Small pages keep a random read's miss cheap; unallocated blocks never reach
/// the BAT (see `Dynamic::alloc`).
const BAT_PAGE_BYTES: usize = 4096;
const BAT_CACHE_BYTES: usize = 64 * BAT_PAGE_BYTES;
/// Parent locator payloads larger than this are not paths.
const MAX_LOCATOR: u32 = 64 << 10;

/// Where the footer that was used came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FooterAt {
    End,
    Start,
}

/// A VHD of any type.
#[derive(Debug)]
pub struct VhdLayer {
    src: Arc<dyn Source>,
    footer: Footer,
    footer_at: FooterAt,
    dynamic: Option<Dynamic>,
    parent: Option<ParentRef>,
}

#[derive(Debug)]
struct Dynamic {
    header: DynHeader,
    bat: PagedTable,
    block_size: u64,
    /// Bytes of the sector bitmap in front of each block (whole sectors).
    bitmap_bytes: u64,
    blocks: u64,
    /// One bit per block: allocated in this file. Built while the BAT is validated at open,
    /// 128 KiB for a 2 TiB disk, so unallocated runs are answered without reading the BAT.
    alloc: BitSet,
    allocated_blocks: u64,
    /// blktap batmap: bit set = block fully allocated.
    batmap: Option<Vec<u8>>,
    bitmaps: ByteCache<u64, Arc<[u8]>>,
}

/// True when the file looks like a VHD (cookie in the last sector or the first).
pub fn detect(head: &[u8], tail: &[u8]) -> bool {
    let vhd = |b: &[u8]| b.len() >= 8 && (&b[0..8] == footer::COOKIE || &b[0..8] == footer::POISON_COOKIE);
    vhd(tail) || vhd(head)
}

impl VhdLayer {
    pub fn open(src: Arc<dyn Source>) -> Result<VhdLayer> {
        let loc = src.location().clone();
        Self::open_inner(src).map_err(|e| e.in_file(&loc))
    }

    fn open_inner(src: Arc<dyn Source>) -> Result<VhdLayer> {
        let len = src.len()?;
        if len < 512 {
            return Err(Error::TooSmall { len }.into());
        }
        let (footer, footer_at) = read_footer(src.as_ref(), len)?;
        if footer.current_size > MAX_SIZE {
            return Err(Error::VirtualSize(footer.current_size).into());
        }
        let data_end = if footer_at == FooterAt::End { len - 512 } else { len };
        if footer.disk_type == footer::FIXED {
            if footer.current_size > data_end {
                return Err(Error::FixedTruncated { size: footer.current_size, data_len: data_end }.into());
            }
            return Ok(VhdLayer { src, footer, footer_at, dynamic: None, parent: None });
        }
        if footer.is_tap() && footer.creator_version == 0x0000_0001 {
            return Err(Error::Blktap01.into());
        }
        let header = read_header(src.as_ref(), &footer, len)?;
        let dynamic = Dynamic::open(&src, &footer, header, len, data_end)?;
        let parent = match footer.disk_type {
            footer::DIFFERENCING => Some(parent_ref(src.as_ref(), &dynamic.header, len)?),
            _ => None,
        };
        Ok(VhdLayer { src, footer, footer_at, dynamic: Some(dynamic), parent })
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    fn bitmap(&self, d: &Dynamic, block: u64, entry: u64) -> Result<Arc<[u8]>> {
        d.bitmaps.get_or_load(block, || Ok(self.src.read_vec(entry * SECTOR, d.bitmap_bytes as usize)?.into()))
    }

    fn absent(&self) -> fn(u64) -> Span {
        if self.parent.is_some() { Span::parent } else { Span::zero }
    }
}

impl Dynamic {
    /// Checks the BAT against the disk and the file, and builds the allocation summary.
    fn open(src: &Arc<dyn Source>, footer: &Footer, header: DynHeader, len: u64, data_end: u64) -> Result<Dynamic> {
        let bs = header.block_size as u64;
        let blocks = footer.current_size.div_ceil(bs);
        if blocks > MAX_BLOCKS {
            return Err(Error::TooManyBlocks { size: footer.current_size, block_size: bs, blocks }.into());
        }
        if (header.max_table_entries as u64) < blocks {
            return Err(Error::BatTooSmall {
                entries: header.max_table_entries,
                size: footer.current_size,
                block_size: bs,
                needed: blocks,
            }
            .into());
        }
        let to = header.table_offset;
        if to.checked_add(blocks * 4).is_none_or(|e| e > len) {
            return Err(Error::BatPastEnd { offset: to, len }.into());
        }
        let bitmap_bytes = (bs / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
        let bat = PagedTable::new(src.clone(), to, blocks, EntryType::U32(Endian::Big))
            .with_page_bytes(BAT_PAGE_BYTES)
            .with_cache_bytes(BAT_CACHE_BYTES);
        // One streaming pass: every entry must point inside the file (bounded memory).
        let mut allocated_blocks = 0;
        let mut alloc = BitSet::new(blocks);
        bat.for_each(|i, e| {
            if e == UNUSED {
                return Ok(());
            }
            let end = e * SECTOR + bitmap_bytes + bs;
            if end > data_end {
                return Err(Error::BlockPastEnd { index: i, sector: e, end, data_end }.into());
            }
            allocated_blocks += 1;
            alloc.set(i);
            Ok(())
        })?;
        let batmap = read_batmap(src.as_ref(), footer, &header, blocks, len);
        let cache_bytes = BITMAP_CACHE_BYTES.max(MIN_BITMAPS * bitmap_bytes) as usize;
        Ok(Dynamic {
            header,
            bat,
            block_size: bs,
            bitmap_bytes,
            blocks,
            alloc,
            allocated_blocks,
            batmap,
            bitmaps: ByteCache::new(cache_bytes),
        })
    }
}

/// Reads the footer at the end, falling back to the copy at offset 0 (dynamic disks only).
fn read_footer(src: &dyn Source, len: u64) -> Result<(Footer, FooterAt)> {
    let tail = src.read_vec(len - 512, 512)?;
    let end_err = match Footer::parse(&tail) {
        Ok(f) => return Ok((f, FooterAt::End)),
        Err(e) => e,
    };
    let head = src.read_vec(0, 512)?;
    match Footer::parse(&head) {
        Ok(f) if f.disk_type != footer::FIXED => {
            log::info!("{}: footer at the end is invalid ({end_err}); using the copy at offset 0", src.location());
            Ok((f, FooterAt::Start))
        }
        Ok(_) => Err(Error::Footer { offset: len - 512, cause: Box::new(end_err) }.into()),
        Err(start_err) => {
            if matches!(end_err, Error::Poisoned) || matches!(start_err, Error::Poisoned) {
                return Err(Error::Poisoned.into());
            }
            Err(Error::BothFooters { offset: len - 512, at_end: Box::new(end_err), at_start: Box::new(start_err) }
                .into())
        }
    }
}

/// Reads and parses the dynamic header the footer points at.
fn read_header(src: &dyn Source, footer: &Footer, len: u64) -> Result<DynHeader> {
    let ho = footer.data_offset;
    if ho.checked_add(header::HEADER_SIZE as u64).is_none_or(|e| e > len) {
        return Err(Error::HeaderPastEnd { offset: ho, len }.into());
    }
    let bytes = src.read_vec(ho, header::HEADER_SIZE)?;
    Ok(DynHeader::parse(&bytes).map_err(|e| Error::Header { offset: ho, inner: Box::new(e) })?)
}

/// blktap's batmap, if present and valid. Any inconsistency just means "not used".
fn read_batmap(src: &dyn Source, f: &Footer, h: &DynHeader, blocks: u64, len: u64) -> Option<Vec<u8>> {
    if !f.is_tap() || f.creator_version < 0x0001_0001 {
        return None;
    }
    let at = h.table_offset + (h.max_table_entries as u64 * 4).next_multiple_of(SECTOR);
    if at + 512 > len {
        return None;
    }
    let bh = BatmapHeader::parse(&src.read_vec(at, 512).ok()?)?;
    let size = bh.size as u64 * SECTOR;
    if size < blocks.div_ceil(8) || size > 64 << 20 || bh.offset.checked_add(size)? > len {
        return None;
    }
    let map = src.read_vec(bh.offset, size as usize).ok()?;
    if !bh.verify(&map) {
        log::warn!("{}: batmap checksum mismatch; ignoring the batmap", src.location());
        return None;
    }
    Some(map)
}

fn parent_ref(src: &dyn Source, h: &DynHeader, len: u64) -> Result<ParentRef> {
    use header::*;
    // Relative locators first, then absolute ones, then the header's unicode name.
    let order = [PLAT_W2RU, PLAT_MACX, PLAT_WI2R, PLAT_W2KU, PLAT_WI2K];
    let mut hints = Vec::new();
    for code in order {
        for l in h.locators.iter().filter(|l| l.code == code) {
            if l.data_len == 0 || l.data_len > MAX_LOCATOR {
                continue;
            }
            if l.data_offset.checked_add(l.data_len as u64).is_none_or(|e| e > len) {
                let e = Error::LocatorPastEnd { code: l.code_str(), offset: l.data_offset, len: l.data_len };
                return Err(e.into());
            }
            let data = src.read_vec(l.data_offset, l.data_len as usize)?;
            if let Some(path) = decode_locator(code, &data) {
                hints.push(Hint { kind: l.code_str(), path });
            }
        }
    }
    if !h.parent_name.is_empty() {
        hints.push(Hint { kind: "parent_name".into(), path: h.parent_name.clone() });
    }
    Ok(ParentRef { hints, expect: vec![Identity::VhdUuid(h.parent_uuid)] })
}

impl Layer for VhdLayer {
    fn sources(&self) -> Vec<Arc<dyn Source>> {
        vec![self.src.clone()]
    }
    fn location(&self) -> &Location {
        self.src.location()
    }

    fn virtual_size(&self) -> u64 {
        self.footer.current_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
        let Some(d) = &self.dynamic else {
            return Ok(Span::data(max_len, 0, offset));
        };
        let absent = self.absent();
        let block = offset / d.block_size;
        let in_blk = offset % d.block_size;
        let to_blk_end = d.block_size - in_blk;
        if !d.alloc.get(block) {
            let more = (max_len.saturating_sub(to_blk_end)).div_ceil(d.block_size);
            let run = d.alloc.run_len(block + 1, more, false);
            return Ok(absent((to_blk_end + run * d.block_size).min(max_len)));
        }
        let entry = d.bat.get(block)?;
        if entry == UNUSED {
            // The file changed since it was validated.
            return Err(CrateError::from(Error::BatEntryChanged(block)).in_file(self.location()));
        }
        let data = entry * SECTOR + d.bitmap_bytes;
        let full = d.batmap.as_ref().is_some_and(|m| m[(block / 8) as usize] & (0x80 >> (block % 8)) != 0);
        if full {
            return Ok(Span::data(to_blk_end.min(max_len), 0, data + in_blk));
        }
        let bitmap = self.bitmap(d, block, entry).map_err(|e| e.in_file(self.location()))?;
        let sectors = d.block_size / SECTOR;
        let (set, run) = bitmap_run(&bitmap, in_blk / SECTOR, sectors, BitOrder::MsbFirst);
        let len = ((in_blk / SECTOR + run) * SECTOR - in_blk).min(max_len);
        Ok(if set { Span::data(len, 0, data + in_blk) } else { absent(len) })
    }

    fn read(&self, _source: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.src.read_exact_at(buf, offset)
    }

    fn parent(&self) -> Option<&ParentRef> {
        self.parent.as_ref()
    }

    fn identity(&self) -> Vec<Identity> {
        vec![Identity::VhdUuid(self.footer.unique_id)]
    }

    fn describe(&self) -> Result<LayerInfo> {
        let f = &self.footer;
        let subformat = match f.disk_type {
            footer::FIXED => "fixed",
            footer::DYNAMIC => "dynamic",
            _ => "differencing",
        };
        let os = f.creator_os.to_be_bytes();
        let os = if f.creator_os == 0 { "0".to_string() } else { String::from_utf8_lossy(&os).into_owned() };
        let mut details = vec![
            (
                "creator".to_string(),
                format!("{} {}.{} on {os}", f.creator(), f.creator_version >> 16, f.creator_version & 0xffff),
            ),
            ("size_source".to_string(), "current_size (footer)".to_string()),
            (
                "chs_geometry".to_string(),
                format!("{}/{}/{} = {} bytes (not used)", f.geometry.0, f.geometry.1, f.geometry.2, f.chs_size()),
            ),
            (
                "footer".to_string(),
                match self.footer_at {
                    FooterAt::End => "at end of file".to_string(),
                    FooterAt::Start => "copy at offset 0 (no valid footer at end)".to_string(),
                },
            ),
        ];
        if f.is_tap() {
            details.push(("hidden".into(), f.hidden.to_string()));
        }
        let (block_size, allocated) = match &self.dynamic {
            None => (0, f.current_size),
            Some(d) => {
                details.push((
                    "bat_entries".into(),
                    format!(
                        "{} ({} used by the disk, {} allocated)",
                        d.header.max_table_entries, d.blocks, d.allocated_blocks
                    ),
                ));
                details
                    .push(("batmap".into(), if d.batmap.is_some() { "present, valid".into() } else { "none".into() }));
                if self.parent.is_some() {
                    details.push(("parent_name".into(), d.header.parent_name.clone()));
                }
                (d.block_size, d.allocated_blocks * d.block_size)
            }
        };
        let parent = self.parent.as_ref().map(ParentInfo::from_ref);
        Ok(LayerInfo {
            path: self.location().to_string(),
            format: "vhd",
            subformat: subformat.into(),
            virtual_size: f.current_size,
            block_size,
            identity: fmt_uuid(&f.unique_id),
            parent,
            allocated_bytes: allocated,
            details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn located_errors_read_as_before_and_take_the_kind_of_their_cause() {
        let checksum = Error::Checksum { what: "dynamic header", stored: 1, computed: 2 };
        let e = CrateError::from(Error::Header { offset: 0x200, inner: Box::new(checksum) }).in_file("d.vhd");
        assert_eq!(
            e.to_string(),
            "d.vhd: dynamic header checksum mismatch (stored 0x00000001, computed 0x00000002) at 0x200"
        );
        assert_eq!(e.kind(), Kind::Corrupt);
        let e = CrateError::from(Error::BothFooters {
            offset: 0x1000,
            at_end: Box::new(Error::Version { what: "footer", version: 0x0002_0000 }),
            at_start: Box::new(Error::BadCookie { what: "footer", found: vec![0; 2] }),
        });
        assert_eq!(
            e.to_string(),
            "footer at 0x1000: footer has unsupported version 0x00020000; the copy at offset 0 is also invalid: footer has bad cookie [00, 00]"
        );
        assert_eq!(e.kind(), Kind::Unsupported, "the footer at the end decides");
        assert!(e.downcast_ref::<Error>().is_some());
        assert_eq!(CrateError::from(Error::BatEntryChanged(3)).kind(), Kind::Stale);
        assert_eq!(CrateError::from(Error::Blktap01).kind(), Kind::Unsupported);
    }
}
