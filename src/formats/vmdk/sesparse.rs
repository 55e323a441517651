//! SESparse (ESXi 6.5+ snapshots on VMFS6, `name-00000N-sesparse.vmdk`). VMware does not publish
//! this format; the layout is the one qemu's `block/vmdk.c` reads, with its strict checks.
//!
//! * Const header (sector 0, little-endian u64s): magic 0xcafebabe, version 0x0000000200000001,
//!   capacity, grain size 8 sectors, grain table size 64 sectors (4096 entries), flags 0, four
//!   reserved words 0, then {offset, size} in sectors of the volatile header, journal header,
//!   journal, grain directory, grain tables, free bitmap, back map and grains; 304 zero bytes.
//! * Volatile header: magic 0xcafecafe, free GT number, next transaction, `replay_journal`
//!   (non-zero: the journal must be replayed first; refused, as by qemu), 480 zero bytes.
//! * Grain directory entry: 0 = no table; `0x10000000_IIIIIIII` = grain table number I, at
//!   `grain_tables_offset + I * grain_table_size`; anything else is corrupt.
//! * Grain table entry, by its top nibble: 0 (the whole entry 0) not allocated here; 1 SCSI-unmapped
//!   and 2 zero grain, both read as zeros; 3 allocated, cluster number
//!   `((e & 0x0fff000000000000) >> 48) | ((e & 0x0000ffffffffffff) << 12)` at
//!   `grains_offset + cluster * grain_size`; anything else is corrupt.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::Error;
use super::hosted::check_grain;

pub const CONST_MAGIC: u64 = 0xcafe_babe;
pub const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
pub const VERSION: u64 = 0x0000_0002_0000_0001;
/// Sectors a region may end at: 2^54 sectors are 8 EiB, so byte offsets never wrap.
const MAX_SECTORS: u64 = 1 << 54;

/// The constant header. Offsets and sizes are in sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstHeader {
    pub capacity: u64,
    pub grain: u64,
    pub grain_table_size: u64,
    pub volatile_offset: u64,
    pub journal_offset: u64,
    pub journal_size: u64,
    pub gd_offset: u64,
    pub gd_size: u64,
    pub gt_offset: u64,
    pub gt_size: u64,
    pub grains_offset: u64,
    pub grains_size: u64,
}

impl ConstHeader {
    pub fn parse(b: &[u8]) -> Result<ConstHeader, Error> {
        let q = |i: usize| LE::read_u64(&b[i * 8..i * 8 + 8]);
        if b.len() < 512 || q(0) != CONST_MAGIC {
            return Err(Error::BadMagic { what: "SESparse const header", found: b[..b.len().min(8)].to_vec() });
        }
        if q(1) != VERSION {
            return Err(Error::SeSparseVersion(q(1)));
        }
        let h = ConstHeader {
            capacity: q(2),
            grain: q(3),
            grain_table_size: q(4),
            volatile_offset: q(10),
            journal_offset: q(14),
            journal_size: q(15),
            gd_offset: q(16),
            gd_size: q(17),
            gt_offset: q(18),
            gt_size: q(19),
            grains_offset: q(24),
            grains_size: q(25),
        };
        check_grain(h.grain)?;
        if h.grain != 8 {
            return Err(Error::SeSparseGrain(h.grain));
        }
        if h.grain_table_size != 64 {
            return Err(Error::SeSparseTableSize(h.grain_table_size));
        }
        if q(5) != 0 {
            return Err(Error::SeSparseFlags(q(5)));
        }
        if (6..10).any(|i| q(i) != 0) || b[208..512].iter().any(|&c| c != 0) {
            return Err(Error::SeSparseReserved);
        }
        if h.capacity == 0 || h.gd_offset == 0 || h.gt_offset == 0 || h.grains_offset == 0 {
            return Err(Error::SeSparseZeroField);
        }
        // Every region's end, in bytes, must be a number: no offset arithmetic can wrap then.
        let regions = [
            ("capacity", h.capacity, 0),
            ("volatile header", h.volatile_offset, 1),
            ("journal", h.journal_offset, h.journal_size),
            ("grain directory", h.gd_offset, h.gd_size),
            ("grain tables", h.gt_offset, h.gt_size),
            ("grains", h.grains_offset, h.grains_size),
        ];
        for (field, offset, size) in regions {
            if offset.checked_add(size).is_none_or(|end| end > MAX_SECTORS) {
                return Err(Error::SeSparseFieldTooLarge { field, value: offset.saturating_add(size) });
            }
        }
        let needed = h.capacity.div_ceil(h.grain * h.entries_per_table());
        if h.gd_size * 512 / 8 < needed {
            return Err(Error::SeSparseDirectoryShort { entries: h.gd_entries(), sectors: h.capacity, needed });
        }
        Ok(h)
    }

    pub fn entries_per_table(&self) -> u64 {
        self.grain_table_size * 512 / 8
    }
    pub fn gd_entries(&self) -> u64 {
        self.gd_size * 512 / 8
    }
    /// How many grain tables the grain table region holds.
    pub fn table_slots(&self) -> u64 {
        self.gt_size / self.grain_table_size
    }
}

/// Checks the volatile header (magic, journal state, padding).
pub fn check_volatile(b: &[u8]) -> Result<(), Error> {
    let q = |i: usize| LE::read_u64(&b[i * 8..i * 8 + 8]);
    if b.len() < 512 || q(0) != VOLATILE_MAGIC {
        return Err(Error::BadMagic { what: "SESparse volatile header", found: b[..b.len().min(8)].to_vec() });
    }
    if q(3) != 0 {
        return Err(Error::SeSparseJournal);
    }
    if b[32..512].iter().any(|&c| c != 0) {
        return Err(Error::SeSparseVolatilePadding);
    }
    Ok(())
}

/// A decoded grain directory entry.
pub fn decode_gd(e: u64) -> Option<Result<u64, ()>> {
    if e == 0 {
        return None;
    }
    if e >> 32 != 0x1000_0000 {
        return Some(Err(()));
    }
    Some(Ok(e & 0xffff_ffff))
}

/// A decoded grain table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gte {
    Unallocated,
    Unmapped,
    Zero,
    /// Cluster number in the grain region.
    Cluster(u64),
    Bad,
}

pub fn decode_gte(e: u64) -> Gte {
    match e >> 60 {
        0 if e == 0 => Gte::Unallocated,
        1 => Gte::Unmapped,
        2 => Gte::Zero,
        3 => Gte::Cluster(((e & 0x0fff_0000_0000_0000) >> 48) | ((e & 0x0000_ffff_ffff_ffff) << 12)),
        _ => Gte::Bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A const header like ESXi writes for a 20 GiB disk.
    fn esxi_header() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        let mut put = |i: usize, v: u64| b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        put(0, 0xcafebabe); // magic
        put(1, 0x0000000200000001); // version 2.1
        put(2, 41943040); // capacity: 20 GiB
        put(3, 8); // grain: 8 sectors
        put(4, 64); // grain table: 64 sectors
        put(5, 0); // flags
        // reserved1..4 (6..=9) zero
        put(10, 8); // volatile header at sector 8
        put(11, 8); // ... 8 sectors
        put(12, 16); // journal header
        put(13, 8);
        put(14, 2048); // journal
        put(15, 2048);
        put(16, 4096); // grain directory
        put(17, 32); // 32 sectors = 2048 entries
        put(18, 6144); // grain tables
        put(19, 81920); // 1280 tables
        put(20, 88064); // free bitmap
        put(21, 8);
        put(22, 90112); // back map
        put(23, 10240);
        put(24, 102400); // grains
        put(25, 41943040);
        b
    }

    #[test]
    fn esxi_const_header_parses() {
        let h = ConstHeader::parse(&esxi_header()).unwrap();
        assert_eq!((h.capacity, h.gd_offset, h.gt_offset, h.grains_offset), (41943040, 4096, 6144, 102400));
        assert_eq!((h.entries_per_table(), h.gd_entries(), h.table_slots()), (4096, 2048, 1280));
    }

    #[test]
    fn unknown_versions_and_layouts_are_refused() {
        let mut b = esxi_header();
        b[8..16].copy_from_slice(&0x0000000300000000u64.to_le_bytes());
        assert!(ConstHeader::parse(&b).unwrap_err().to_string().contains("version 3.0"));
        let mut b = esxi_header();
        b[24..32].copy_from_slice(&0u64.to_le_bytes());
        assert!(ConstHeader::parse(&b).unwrap_err().to_string().contains("grain size 0"));
        let mut b = esxi_header();
        b[24..32].copy_from_slice(&16u64.to_le_bytes());
        assert!(ConstHeader::parse(&b).unwrap_err().to_string().contains("only 8"));
        let mut b = esxi_header();
        b[300] = 1;
        assert!(ConstHeader::parse(&b).unwrap_err().to_string().contains("padding"));
    }

    /// Found by the `vmdk_sesparse` fuzz target: a grain directory size of 2^58 sectors or more
    /// overflowed `gd_size * 512` (a panic with overflow checks, a wrong size without).
    #[test]
    fn sector_fields_too_large_for_bytes_are_refused() {
        for field in [10, 14, 15, 16, 17, 18, 19, 24, 25] {
            let mut b = esxi_header();
            b[field * 8..field * 8 + 8].copy_from_slice(&(1u64 << 58).to_le_bytes());
            let e = ConstHeader::parse(&b).unwrap_err().to_string();
            assert!(e.contains("beyond any file"), "word {field}: {e}");
        }
    }

    #[test]
    fn offsets_whose_bytes_would_not_fit_in_64_bits_are_refused() {
        // gt_offset * 512 and gd_size * 512 used to wrap (or panic with overflow checks).
        for (field, i) in [("grain tables", 18), ("grain directory", 17), ("grains", 24), ("volatile header", 10)] {
            let mut b = esxi_header();
            b[i * 8..i * 8 + 8].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
            let e = ConstHeader::parse(&b).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("beyond any file"), "{e}");
        }
    }

    #[test]
    fn volatile_header_with_pending_journal_is_refused() {
        let mut v = vec![0u8; 512];
        v[0..8].copy_from_slice(&0xcafecafeu64.to_le_bytes()); // magic
        v[8..16].copy_from_slice(&3u64.to_le_bytes()); // free GT number
        assert!(check_volatile(&v).is_ok());
        v[24..32].copy_from_slice(&1u64.to_le_bytes()); // replay_journal
        assert!(check_volatile(&v).unwrap_err().to_string().contains("journal"));
    }

    #[test]
    fn entries_decode_with_qemus_bit_rotation() {
        assert_eq!(decode_gd(0), None);
        assert_eq!(decode_gd(0x10000000_0000002a), Some(Ok(42)));
        assert_eq!(decode_gd(0x20000000_00000001), Some(Err(())));
        assert_eq!(decode_gte(0), Gte::Unallocated);
        assert_eq!(decode_gte(0x0000_0000_0000_0001), Gte::Bad); // type 0 must be all zero
        assert_eq!(decode_gte(0x1000_0000_0000_0000), Gte::Unmapped);
        assert_eq!(decode_gte(0x2000_0000_0000_0000), Gte::Zero);
        // Cluster 0x12345: low 12 bits (0x345) in bits 48..60, the rest (0x12) in bits 0..48.
        assert_eq!(decode_gte(0x3345_0000_0000_0012), Gte::Cluster(0x12345));
        assert_eq!(decode_gte(0x4000_0000_0000_0000), Gte::Bad);
    }
}
