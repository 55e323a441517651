//! The metadata region (MS-VHDX 2.6): the metadata table, the known system items, and the VHDX
//! parent locator's key/value entries.

use std::fmt;

use byteorder::{ByteOrder, LittleEndian};

use super::Error;
use super::header::{Guid, guid};
use crate::layer::fmt_guid_le;

pub const FILE_PARAMETERS: Guid = guid(0xCAA16737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]);
pub const VIRTUAL_DISK_SIZE: Guid = guid(0x2FA54224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]);
pub const VIRTUAL_DISK_ID: Guid = guid(0xBECA12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]);
pub const LOGICAL_SECTOR_SIZE: Guid =
    guid(0x8141BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]);
pub const PHYSICAL_SECTOR_SIZE: Guid =
    guid(0xCDA348C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]);
pub const PARENT_LOCATOR: Guid = guid(0xA8D35F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C]);
/// The only parent locator type the spec defines: another VHDX file.
pub const VHDX_LOCATOR_TYPE: Guid = guid(0xB04AEFB7, 0xD19E, 0x4A81, [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13]);

/// Size of the metadata table at the start of the region.
pub const TABLE_SIZE: usize = 64 << 10;
const MAX_ENTRIES: u16 = 2047;
/// Items are at most 1 MiB (spec).
pub const MAX_ITEM: u32 = 1 << 20;
/// The spec's maximum virtual disk size.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// A metadata table entry (MS-VHDX 2.6.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataEntry {
    pub id: Guid,
    /// Relative to the start of the metadata region.
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_required: bool,
}

impl MetadataEntry {
    /// True for a system item this module understands.
    pub fn known(&self) -> bool {
        !self.is_user
            && [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                VIRTUAL_DISK_ID,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ]
            .contains(&self.id)
    }
}

/// Parses the 64 KiB metadata table; every item must lie inside a region of `region_len` bytes.
pub fn parse_table(b: &[u8], region_len: u64) -> Result<Vec<MetadataEntry>, Error> {
    let b = &b[..TABLE_SIZE];
    if &b[0..8] != b"metadata" {
        return Err(Error::Signature { what: "metadata table", found: b[0..8].to_vec() });
    }
    let count = LittleEndian::read_u16(&b[10..12]);
    if count > MAX_ENTRIES {
        return Err(Error::TooMany { what: "metadata table entries", count: count as u64, max: MAX_ENTRIES as u64 });
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let e = &b[32 + 32 * i..64 + 32 * i];
        let flags = LittleEndian::read_u32(&e[24..28]);
        let entry = MetadataEntry {
            id: e[0..16].try_into().expect("16 bytes"),
            offset: LittleEndian::read_u32(&e[16..20]),
            length: LittleEndian::read_u32(&e[20..24]),
            is_user: flags & 1 != 0,
            is_required: flags & 4 != 0,
        };
        if entry.length > 0
            && (entry.offset < TABLE_SIZE as u32
                || entry.length > MAX_ITEM
                || entry.offset as u64 + entry.length as u64 > region_len)
        {
            return Err(Error::Item {
                item: ItemName(entry.id),
                problem: ItemProblem::Outside { offset: entry.offset, length: entry.length, region_len },
            });
        }
        out.push(entry);
    }
    Ok(out)
}

/// A metadata item, shown by its readable name ("Virtual Disk Size"), or by its GUID when it is
/// not one of the system items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemName(pub Guid);

impl fmt::Display for ItemName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            FILE_PARAMETERS => f.write_str("File Parameters"),
            VIRTUAL_DISK_SIZE => f.write_str("Virtual Disk Size"),
            VIRTUAL_DISK_ID => f.write_str("Virtual Disk ID"),
            LOGICAL_SECTOR_SIZE => f.write_str("Logical Sector Size"),
            PHYSICAL_SECTOR_SIZE => f.write_str("Physical Sector Size"),
            PARENT_LOCATOR => f.write_str("Parent Locator"),
            id => write!(f, "{{{}}}", fmt_guid_le(&id)),
        }
    }
}

/// What is wrong with one metadata item (the message follows the item's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemProblem {
    #[error(
        "lies at {offset:#x}+{length:#x}, outside the metadata region's item space ({:#x}..{region_len:#x}, items at most 1 MiB)",
        TABLE_SIZE
    )]
    Outside { offset: u32, length: u32, region_len: u64 },
    #[error("is {len} bytes long, needs {min}")]
    TooShort { len: usize, min: usize },
    #[error("{size} is not a multiple of the logical sector size {sector}")]
    NotSectorMultiple { size: u64, sector: u32 },
    #[error("has {count} entries but only {len} bytes")]
    LocatorEntries { count: usize, len: usize },
    #[error("{what} at {offset:#x}+{len} is outside the item or not UTF-16")]
    LocatorText { what: &'static str, offset: usize, len: usize },
}

/// What the known items say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_block_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector: u32,
    /// `None` when the item is missing (tolerated; the spec requires it).
    pub physical_sector: Option<u32>,
    /// The page 83 identifier of the virtual disk.
    pub disk_id: Option<Guid>,
    /// Key/value entries of the parent locator, in stored order.
    pub locator: Option<Vec<(String, String)>>,
}

impl Metadata {
    /// Interprets the items: `items` pairs each table entry with its bytes (empty for items this
    /// module does not read).
    pub fn from_items(items: &[(MetadataEntry, Vec<u8>)]) -> Result<Metadata, Error> {
        if let Some((e, _)) = items.iter().find(|(e, _)| e.is_required && !e.known()) {
            return Err(Error::UnknownRequired { what: "metadata item", guid: e.id });
        }
        let get = |id: Guid, min: usize| -> Result<Option<&[u8]>, Error> {
            match items.iter().find(|(e, _)| !e.is_user && e.id == id) {
                None => Ok(None),
                Some((_, b)) if b.len() < min => {
                    Err(Error::Item { item: ItemName(id), problem: ItemProblem::TooShort { len: b.len(), min } })
                }
                Some((_, b)) => Ok(Some(b)),
            }
        };
        let need = |id: Guid, min: usize| get(id, min)?.ok_or(Error::MissingItem(ItemName(id)));

        let fp = need(FILE_PARAMETERS, 8)?;
        let block_size = LittleEndian::read_u32(&fp[0..4]);
        let flags = LittleEndian::read_u32(&fp[4..8]);
        if !block_size.is_power_of_two() || !(1 << 20..=256 << 20).contains(&block_size) {
            return Err(Error::BlockSize(block_size));
        }
        let logical_sector = LittleEndian::read_u32(need(LOGICAL_SECTOR_SIZE, 4)?);
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(Error::LogicalSectorSize(logical_sector));
        }
        let physical_sector = get(PHYSICAL_SECTOR_SIZE, 4)?.map(LittleEndian::read_u32);
        if let Some(p) = physical_sector
            && p != 512
            && p != 4096
        {
            return Err(Error::PhysicalSectorSize(p));
        }
        let virtual_size = LittleEndian::read_u64(need(VIRTUAL_DISK_SIZE, 8)?);
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::VirtualSize(virtual_size));
        }
        if !virtual_size.is_multiple_of(logical_sector as u64) {
            return Err(Error::Item {
                item: ItemName(VIRTUAL_DISK_SIZE),
                problem: ItemProblem::NotSectorMultiple { size: virtual_size, sector: logical_sector },
            });
        }
        let disk_id = get(VIRTUAL_DISK_ID, 16)?.map(|b| b[0..16].try_into().expect("16 bytes"));
        let has_parent = flags & 2 != 0;
        let locator = match get(PARENT_LOCATOR, 20)? {
            Some(b) => Some(parse_locator(b)?),
            None if has_parent => return Err(Error::MissingItem(ItemName(PARENT_LOCATOR))),
            None => None,
        };
        Ok(Metadata {
            block_size,
            leave_block_allocated: flags & 1 != 0,
            has_parent,
            virtual_size,
            logical_sector,
            physical_sector,
            disk_id,
            locator,
        })
    }
}

/// The parent locator item (MS-VHDX 2.6.2.6): type GUID, then key/value pairs of UTF-16LE text.
pub fn parse_locator(b: &[u8]) -> Result<Vec<(String, String)>, Error> {
    let bad = |problem: ItemProblem| Error::Item { item: ItemName(PARENT_LOCATOR), problem };
    let ty: Guid = b[0..16].try_into().expect("16 bytes");
    if ty != VHDX_LOCATOR_TYPE {
        return Err(Error::LocatorType(ty));
    }
    let count = LittleEndian::read_u16(&b[18..20]) as usize;
    if 20 + 12 * count > b.len() {
        return Err(bad(ItemProblem::LocatorEntries { count, len: b.len() }));
    }
    let text = |off: u32, len: u16, what: &'static str| -> Result<String, Error> {
        let (off, len) = (off as usize, len as usize);
        if len == 0 || !len.is_multiple_of(2) || off.checked_add(len).is_none_or(|e| e > b.len()) {
            return Err(bad(ItemProblem::LocatorText { what, offset: off, len }));
        }
        let u: Vec<u16> = b[off..off + len].chunks_exact(2).map(LittleEndian::read_u16).collect();
        Ok(String::from_utf16_lossy(&u).trim_end_matches('\0').to_string())
    };
    (0..count)
        .map(|i| {
            let e = &b[20 + 12 * i..32 + 12 * i];
            let key = text(LittleEndian::read_u32(&e[0..4]), LittleEndian::read_u16(&e[8..10]), "key")?;
            let value = text(LittleEndian::read_u32(&e[4..8]), LittleEndian::read_u16(&e[10..12]), "value")?;
            Ok((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(|c| c.to_le_bytes()).collect()
    }

    fn entry(id: Guid, len: usize) -> MetadataEntry {
        MetadataEntry { id, offset: 0x10000, length: len as u32, is_user: false, is_required: true }
    }

    fn items(bs: u32, lss: u32, size: u64, flags: u32) -> Vec<(MetadataEntry, Vec<u8>)> {
        let mut fp = bs.to_le_bytes().to_vec(); // block size
        fp.extend_from_slice(&flags.to_le_bytes()); // leave allocated (bit 0), has parent (bit 1)
        vec![
            (entry(FILE_PARAMETERS, 8), fp),
            (entry(VIRTUAL_DISK_SIZE, 8), size.to_le_bytes().to_vec()), // virtual disk size
            (entry(LOGICAL_SECTOR_SIZE, 4), lss.to_le_bytes().to_vec()), // logical sector size
            (entry(PHYSICAL_SECTOR_SIZE, 4), 4096u32.to_le_bytes().to_vec()), // physical sector size
            (entry(VIRTUAL_DISK_ID, 16), vec![0x83; 16]),               // page 83 id
        ]
    }

    #[test]
    fn guids_have_their_spec_text() {
        assert_eq!(fmt_guid_le(&FILE_PARAMETERS), "caa16737-fa36-4d43-b3b6-33f0aa44e76b");
        assert_eq!(fmt_guid_le(&PARENT_LOCATOR), "a8d35f2d-b30b-454d-abf7-d3d84834ab0c");
        assert_eq!(&VIRTUAL_DISK_SIZE[0..4], &[0x24, 0x42, 0xA5, 0x2F]);
    }

    #[test]
    fn parses_the_table_and_bounds_items() {
        let mut b = vec![0u8; TABLE_SIZE];
        b[0..8].copy_from_slice(b"metadata"); // signature
        b[10..12].copy_from_slice(&1u16.to_le_bytes()); // entry count
        b[32..48].copy_from_slice(&FILE_PARAMETERS); // entry 0: item id
        b[48..52].copy_from_slice(&0x10000u32.to_le_bytes()); // entry 0: offset
        b[52..56].copy_from_slice(&8u32.to_le_bytes()); // entry 0: length
        b[56..60].copy_from_slice(&4u32.to_le_bytes()); // entry 0: flags (is required)
        let t = parse_table(&b, 1 << 20).unwrap();
        assert_eq!(t, vec![entry(FILE_PARAMETERS, 8)]);
        b[48..52].copy_from_slice(&0x100u32.to_le_bytes()); // inside the table itself
        assert!(matches!(parse_table(&b, 1 << 20), Err(Error::Item { .. })));
        b[48..52].copy_from_slice(&0xFFFFCu32.to_le_bytes()); // runs past the region
        assert!(matches!(parse_table(&b, 1 << 20), Err(Error::Item { .. })));
        // An item larger than any the format defines, even inside a huge region.
        b[48..52].copy_from_slice(&0x10000u32.to_le_bytes());
        b[52..56].copy_from_slice(&(MAX_ITEM + 1).to_le_bytes());
        assert!(matches!(parse_table(&b, 1 << 40), Err(Error::Item { .. })));
        // More entries than the table can hold.
        b[10..12].copy_from_slice(&(MAX_ENTRIES + 1).to_le_bytes());
        assert!(matches!(parse_table(&b, 1 << 40), Err(Error::TooMany { count: 2048, .. })));
    }

    #[test]
    fn interprets_known_items() {
        let m = Metadata::from_items(&items(32 << 20, 4096, 10 << 30, 0)).unwrap();
        assert_eq!(m.block_size, 32 << 20);
        assert_eq!(m.logical_sector, 4096);
        assert_eq!(m.physical_sector, Some(4096));
        assert_eq!(m.virtual_size, 10 << 30);
        assert_eq!(m.disk_id, Some([0x83; 16]));
        assert!(!m.has_parent && m.locator.is_none());
    }

    #[test]
    fn refuses_impossible_values() {
        for bs in [0, 512 << 10, 3 << 20, 512 << 20] {
            assert!(matches!(Metadata::from_items(&items(bs, 512, 1 << 30, 0)), Err(Error::BlockSize(x)) if x == bs));
        }
        assert!(matches!(Metadata::from_items(&items(1 << 20, 1024, 1 << 30, 0)), Err(Error::LogicalSectorSize(1024))));
        let too_big = (64u64 << 40) + 4096;
        assert!(matches!(Metadata::from_items(&items(1 << 20, 512, too_big, 0)), Err(Error::VirtualSize(_))));
        assert!(matches!(Metadata::from_items(&items(1 << 20, 4096, 1001 * 512, 0)), Err(Error::Item { .. })));
        // A differencing disk needs its parent locator.
        assert!(matches!(Metadata::from_items(&items(1 << 20, 512, 1 << 30, 2)), Err(Error::MissingItem(_))));
        let mut unknown = items(1 << 20, 512, 1 << 30, 0);
        unknown.push((entry([9; 16], 4), vec![]));
        assert!(matches!(Metadata::from_items(&unknown), Err(Error::UnknownRequired { .. })));
        unknown.last_mut().unwrap().0.is_required = false;
        assert!(Metadata::from_items(&unknown).is_ok());
    }

    #[test]
    fn parses_hyper_v_parent_locators() {
        let pairs = [("parent_linkage", "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}"), ("relative_path", r"..\base.vhdx")];
        let mut b = VHDX_LOCATOR_TYPE.to_vec(); // locator type
        b.extend_from_slice(&0u16.to_le_bytes()); // reserved
        b.extend_from_slice(&(pairs.len() as u16).to_le_bytes()); // key/value count
        let mut strings = Vec::new();
        let base = 20 + 12 * pairs.len();
        for (k, v) in pairs {
            let (k, v) = (utf16(k), utf16(v));
            let ko = base + strings.len();
            strings.extend_from_slice(&k);
            let vo = base + strings.len();
            strings.extend_from_slice(&v);
            b.extend_from_slice(&(ko as u32).to_le_bytes()); // key offset
            b.extend_from_slice(&(vo as u32).to_le_bytes()); // value offset
            b.extend_from_slice(&(k.len() as u16).to_le_bytes()); // key length
            b.extend_from_slice(&(v.len() as u16).to_le_bytes()); // value length
        }
        b.extend_from_slice(&strings);
        let l = parse_locator(&b).unwrap();
        assert_eq!(l[0], ("parent_linkage".into(), "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}".into()));
        assert_eq!(l[1], ("relative_path".into(), r"..\base.vhdx".into()));
        let mut other = b.clone();
        other[0] ^= 1;
        assert!(matches!(parse_locator(&other), Err(Error::LocatorType(_))));
        let mut wild = b.clone();
        wild[24..28].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(matches!(parse_locator(&wild), Err(Error::Item { .. })));
    }
}
