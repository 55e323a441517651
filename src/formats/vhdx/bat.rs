//! The BAT (MS-VHDX 2.4, 2.5): payload entries interleaved with sector bitmap entries by the chunk
//! ratio, entry states, the open-time validation pass, and sector bitmap runs.

use super::Error;
use super::error::Structure;
use super::header::HEADER_SECTION;
use crate::error::Result;
use crate::formats::table::PagedTable;

pub const NOT_PRESENT: u8 = 0;
pub const UNDEFINED: u8 = 1;
pub const ZERO: u8 = 2;
pub const UNMAPPED: u8 = 3;
pub const FULLY_PRESENT: u8 = 6;
pub const PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap entry state meaning "allocated".
pub const SB_PRESENT: u8 = 6;
/// Sector bitmap blocks are always 1 MiB; each covers 2^23 sectors (one chunk).
pub const BITMAP_BLOCK: u64 = 1 << 20;
const SECTORS_PER_CHUNK: u64 = 1 << 23;

/// The state field of an entry (bits 0-2).
pub fn state(e: u64) -> u8 {
    (e & 7) as u8
}

/// The file offset of an entry (FileOffsetMB, bits 20-63, in MiB).
pub fn file_offset(e: u64) -> u64 {
    (e >> 20) << 20
}

pub fn state_name(s: u8) -> &'static str {
    match s {
        NOT_PRESENT => "NOT_PRESENT",
        UNDEFINED => "UNDEFINED",
        ZERO => "ZERO",
        UNMAPPED => "UNMAPPED",
        FULLY_PRESENT => "FULLY_PRESENT",
        PARTIALLY_PRESENT => "PARTIALLY_PRESENT",
        _ => "reserved",
    }
}

/// How the BAT is laid out for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    pub virtual_size: u64,
    pub has_parent: bool,
    /// Payload blocks per sector bitmap block: 2^23 × logical sector size / block size.
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub bitmap_blocks: u64,
}

/// Which block an entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Payload(u64),
    Bitmap(u64),
}

impl Geometry {
    /// `block_size` (1–256 MiB, power of two) and `logical_sector` (512 or 4096) were checked.
    pub fn new(block_size: u64, logical_sector: u64, virtual_size: u64, has_parent: bool) -> Geometry {
        let chunk_ratio = SECTORS_PER_CHUNK * logical_sector / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        Geometry {
            block_size,
            logical_sector,
            virtual_size,
            has_parent,
            chunk_ratio,
            data_blocks,
            bitmap_blocks: data_blocks.div_ceil(chunk_ratio),
        }
    }

    /// Entries the BAT must hold (MS-VHDX 2.5): up to the last payload entry for a disk without
    /// parent, up to the last sector bitmap entry for a differencing disk.
    pub fn entries(&self) -> u64 {
        if self.data_blocks == 0 {
            0
        } else if self.has_parent {
            self.bitmap_blocks * (self.chunk_ratio + 1)
        } else {
            self.data_blocks + (self.data_blocks - 1) / self.chunk_ratio
        }
    }

    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    pub fn role(&self, index: u64) -> Role {
        let per = self.chunk_ratio + 1;
        if index % per == self.chunk_ratio { Role::Bitmap(index / per) } else { Role::Payload(index - index / per) }
    }

    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }

    /// Bytes of a sector bitmap block that describe one payload block, and where they start.
    pub fn bitmap_slice(&self, block: u64) -> (u64, usize) {
        let n = self.sectors_per_block() / 8;
        ((block % self.chunk_ratio) * n, n as usize)
    }

    /// Bytes of virtual disk block `block` actually holds (the last one may be short).
    pub fn block_bytes(&self, block: u64) -> u64 {
        self.block_size.min(self.virtual_size - block * self.block_size)
    }
}

/// How many blocks are in each state, from the validation pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub not_present: u64,
    pub undefined: u64,
    pub zero: u64,
    pub unmapped: u64,
    pub fully_present: u64,
    pub partially_present: u64,
    pub bitmaps: u64,
}

impl Stats {
    pub fn allocated(&self) -> u64 {
        self.fully_present + self.partially_present
    }
}

/// A file range no block may overlap, with its name for messages.
pub type Reserved = (u64, u64, &'static str);

/// Checks that `what`, `len` bytes at `off`, lies inside the file (`file_len`, after log replay)
/// and clear of the header section and of every `reserved` range.
fn check_place(what: Structure, off: u64, len: u64, file_len: u64, reserved: &[Reserved]) -> Result<(), Error> {
    let end = off.saturating_add(len);
    if off < HEADER_SECTION {
        return Err(Error::InHeaderSection { what, start: off });
    }
    if end > file_len {
        return Err(Error::PastEnd { what, start: off, end, file_len });
    }
    if let Some(&(s, e, other)) = reserved.iter().find(|(s, e, _)| off < *e && *s < end) {
        return Err(Error::Overlap { what, start: off, end, other, other_start: s, other_end: e });
    }
    Ok(())
}

/// Checks every entry in one streaming pass: states valid for the disk type, allocated blocks
/// inside the file (`file_len`, after log replay) and clear of the header section and `reserved`,
/// and a present sector bitmap for every chunk holding a partially present block.
pub fn validate(bat: &PagedTable, g: &Geometry, file_len: u64, reserved: &[Reserved]) -> Result<Stats> {
    let mut st = Stats::default();
    let mut chunk_partial: Option<u64> = None;
    let place = |what: Structure, off: u64, len: u64| check_place(what, off, len, file_len, reserved);
    bat.for_each(|i, e| {
        let s = state(e);
        match g.role(i) {
            Role::Payload(b) if b < g.data_blocks => {
                let what = Structure::Block { index: i, block: b, state: s };
                match s {
                    NOT_PRESENT => st.not_present += 1,
                    UNDEFINED => st.undefined += 1,
                    ZERO => st.zero += 1,
                    UNMAPPED => st.unmapped += 1,
                    FULLY_PRESENT => {
                        place(what, file_offset(e), g.block_bytes(b))?;
                        st.fully_present += 1;
                    }
                    PARTIALLY_PRESENT if g.has_parent => {
                        place(what, file_offset(e), g.block_bytes(b))?;
                        chunk_partial.get_or_insert(b);
                        st.partially_present += 1;
                    }
                    PARTIALLY_PRESENT => return Err(Error::PartialWithoutParent(what).into()),
                    _ => return Err(Error::ReservedBlockState { index: i, block: b, state: s }.into()),
                }
            }
            // Entries past the disk's last block (padding of the last chunk) are not used.
            Role::Payload(_) => {}
            // A disk without parent has no sector bitmaps; its bitmap entries are never read.
            Role::Bitmap(_) if !g.has_parent => {}
            Role::Bitmap(c) => {
                let partial = chunk_partial.take();
                match s {
                    NOT_PRESENT => {
                        if let Some(b) = partial {
                            return Err(Error::ChunkBitmapMissing { block: b, chunk: c, index: i }.into());
                        }
                    }
                    SB_PRESENT => {
                        place(Structure::SectorBitmap { index: i, chunk: c }, file_offset(e), BITMAP_BLOCK)?;
                        st.bitmaps += 1;
                    }
                    _ => return Err(Error::ReservedBitmapState { index: i, chunk: c, state: s }.into()),
                }
            }
        }
        Ok(())
    })?;
    Ok(st)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::formats::table::{Endian, EntryType};
    use crate::source::MemSource;

    #[test]
    fn chunk_ratio_and_entry_counts_follow_the_spec() {
        // 512-byte sectors, 32 MiB blocks: chunk = 4 GiB, ratio 128.
        let g = Geometry::new(32 << 20, 512, 127 << 30, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 127 * 32);
        assert_eq!(g.entries(), 4064 + 4063 / 128);
        // 4096-byte sectors, 1 MiB blocks: ratio 32768; a differencing disk ends on a bitmap entry.
        let d = Geometry::new(1 << 20, 4096, 100 << 20, true);
        assert_eq!(d.chunk_ratio, 32768);
        assert_eq!(d.entries(), 32769);
        assert_eq!(d.role(32768), Role::Bitmap(0));
        // 256 MiB blocks, 512-byte sectors: ratio 16.
        let g = Geometry::new(256 << 20, 512, 10 << 30, true);
        assert_eq!(g.chunk_ratio, 16);
        assert_eq!(g.payload_index(16), 17);
        assert_eq!(g.bitmap_index(1), 33);
        assert_eq!(g.role(17), Role::Payload(16));
        assert_eq!(g.role(16), Role::Bitmap(0));
        assert_eq!(Geometry::new(1 << 20, 512, 0, false).entries(), 0);
    }

    #[test]
    fn bitmap_slices_locate_a_block_inside_its_chunk() {
        let g = Geometry::new(2 << 20, 512, 8 << 30, true);
        // 4096 sectors per block = 512 bytes of bitmap; ratio 2048.
        assert_eq!(g.bitmap_slice(0), (0, 512));
        assert_eq!(g.bitmap_slice(3), (1536, 512));
        assert_eq!(g.bitmap_slice(2048 + 1), (512, 512));
    }

    fn table(entries: &[u64]) -> PagedTable {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        let entry = EntryType::U64(Endian::Little);
        PagedTable::new(Arc::new(MemSource::new("bat", bytes)), 0, entries.len() as u64, entry).with_cache_bytes(1)
    }

    #[test]
    fn validation_counts_states_and_refuses_bad_entries() {
        // 1 MiB blocks, 4 GiB chunk ratio 4096 with 512-byte sectors: 4 payload entries.
        let g = Geometry::new(1 << 20, 512, 4 << 20, false);
        let mb = |n: u64| n << 20;
        let ok = [mb(3) | 6, 2, 3, 0];
        let st = validate(&table(&ok), &g, mb(8), &[(mb(1), mb(2), "metadata region")]).unwrap();
        assert_eq!((st.fully_present, st.zero, st.unmapped, st.not_present), (1, 1, 1, 1));
        let past = [mb(8) | 6, 0, 0, 0];
        let e = validate(&table(&past), &g, mb(8), &[]).unwrap_err();
        assert!(e.message().contains("BAT entry 0 (block 0, FULLY_PRESENT)") && e.message().contains("past the end"));
        let meta = [0, mb(1) | 6, 0, 0];
        let e = validate(&table(&meta), &g, mb(8), &[(mb(1), mb(2), "metadata region")]).unwrap_err();
        assert!(e.message().contains("overlaps the metadata region"), "{e}");
        let partial = [mb(3) | 7, 0, 0, 0];
        assert!(validate(&table(&partial), &g, mb(8), &[]).unwrap_err().message().contains("without parent"));
        let reserved = [4, 0, 0, 0];
        assert!(validate(&table(&reserved), &g, mb(8), &[]).unwrap_err().message().contains("reserved state 4"));
    }

    #[test]
    fn partially_present_blocks_need_their_chunk_bitmap() {
        // 256 MiB blocks with 512-byte sectors: chunk ratio 16, bitmap entry at index 16.
        let g = Geometry::new(256 << 20, 512, 512 << 20, true);
        let mut e = vec![0u64; 17];
        e[0] = (1 << 20) | 7;
        let len = 2 << 30;
        let err = validate(&table(&e), &g, len, &[]).unwrap_err();
        assert!(err.message().contains("sector bitmap of its chunk 0"), "{err}");
        e[16] = (300 << 20) | 6;
        assert_eq!(validate(&table(&e), &g, len, &[]).unwrap().bitmaps, 1);
    }
}
