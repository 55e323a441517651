//! The dynamic disk header (VHD spec, "Dynamic Disk Header Format"), its parent locator entries,
//! and blktap's batmap header. 1024 bytes, big-endian.

use byteorder::{BigEndian, ByteOrder};

use super::Error;
use super::footer::checksum;

pub const COOKIE: &[u8; 8] = b"cxsparse";
pub const HEADER_SIZE: usize = 1024;

pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");
pub const PLAT_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
pub const PLAT_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatorEntry {
    pub code: u32,
    /// Sectors per the spec, bytes per blktap and Windows: never used to size a read.
    pub data_space: u32,
    pub data_len: u32,
    pub data_offset: u64,
}

impl LocatorEntry {
    pub fn code_str(&self) -> String {
        String::from_utf8_lossy(&self.code.to_be_bytes()).into_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    /// Parent unicode name (UTF-16BE), decoded.
    pub parent_name: String,
    pub locators: Vec<LocatorEntry>,
}

impl DynHeader {
    pub fn parse(b: &[u8]) -> Result<DynHeader, Error> {
        let b = &b[..HEADER_SIZE];
        if &b[0..8] != COOKIE {
            return Err(Error::BadCookie { what: "dynamic header", found: b[0..8].to_vec() });
        }
        let stored = BigEndian::read_u32(&b[36..40]);
        let computed = checksum(b, 36);
        if stored != computed {
            return Err(Error::Checksum { what: "dynamic header", stored, computed });
        }
        let version = BigEndian::read_u32(&b[24..28]);
        if version >> 16 != 1 {
            return Err(Error::Version { what: "dynamic header", version });
        }
        let block_size = BigEndian::read_u32(&b[32..36]);
        if !block_size.is_power_of_two() || !(512..=256 << 20).contains(&block_size) {
            return Err(Error::BlockSize(block_size));
        }
        let name: Vec<u16> = b[64..576].chunks_exact(2).map(BigEndian::read_u16).take_while(|&c| c != 0).collect();
        let locators = b[576..768]
            .chunks_exact(24)
            .map(|e| LocatorEntry {
                code: BigEndian::read_u32(&e[0..4]),
                data_space: BigEndian::read_u32(&e[4..8]),
                data_len: BigEndian::read_u32(&e[8..12]),
                data_offset: BigEndian::read_u64(&e[16..24]),
            })
            .filter(|l| l.code != 0)
            .collect();
        Ok(DynHeader {
            table_offset: BigEndian::read_u64(&b[16..24]),
            version,
            max_table_entries: BigEndian::read_u32(&b[28..32]),
            block_size,
            parent_uuid: b[40..56].try_into().expect("16 bytes"),
            parent_timestamp: BigEndian::read_u32(&b[56..60]),
            parent_name: String::from_utf16_lossy(&name),
            locators,
        })
    }
}

/// Decodes a locator's bytes by platform code. `None` for codes that carry no usable path
/// (the Mac alias blob `Mac `).
pub fn decode_locator(code: u32, data: &[u8]) -> Option<String> {
    let s = match code {
        PLAT_W2KU | PLAT_W2RU => {
            let u: Vec<u16> = data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            String::from_utf16_lossy(&u)
        }
        // MacX is a UTF-8 file URL; Wi2r/Wi2k are deprecated ANSI paths.
        PLAT_MACX | PLAT_WI2R | PLAT_WI2K => String::from_utf8_lossy(data).into_owned(),
        _ => return None,
    };
    let s = s.trim_end_matches('\0').to_string();
    (!s.is_empty()).then_some(s)
}

/// blktap's batmap header (`tdbatmap`), found at `table_offset + round_up_512(max_bat_size * 4)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatmapHeader {
    pub offset: u64,
    /// In sectors.
    pub size: u32,
    pub version: u32,
    pub checksum: u32,
}

impl BatmapHeader {
    pub fn parse(b: &[u8]) -> Option<BatmapHeader> {
        if &b[0..8] != b"tdbatmap" {
            return None;
        }
        Some(BatmapHeader {
            offset: BigEndian::read_u64(&b[8..16]),
            size: BigEndian::read_u32(&b[16..20]),
            version: BigEndian::read_u32(&b[20..24]),
            checksum: BigEndian::read_u32(&b[24..28]),
        })
    }
    /// The batmap checksum: one's complement of the byte sum of the map.
    pub fn verify(&self, map: &[u8]) -> bool {
        !map.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32)) == self.checksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0..8].copy_from_slice(b"cxsparse"); // cookie
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset (unused)
        b[16..24].copy_from_slice(&0x600u64.to_be_bytes()); // table offset
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // header version
        b[28..32].copy_from_slice(&2u32.to_be_bytes()); // max table entries
        b[32..36].copy_from_slice(&(2u32 << 20).to_be_bytes()); // block size
        b[40..56].copy_from_slice(&[0x11; 16]); // parent unique id
        for (i, c) in "base.vhd".encode_utf16().enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes()); // parent unicode name
        }
        b[576..580].copy_from_slice(b"W2ku"); // locator 0: platform code
        b[580..584].copy_from_slice(&512u32.to_be_bytes()); // data space
        b[584..588].copy_from_slice(&16u32.to_be_bytes()); // data length
        b[592..600].copy_from_slice(&0x1000u64.to_be_bytes()); // data offset
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes()); // checksum
        b
    }

    #[test]
    fn parses_header_and_locators() {
        let h = DynHeader::parse(&sample()).unwrap();
        assert_eq!(h.table_offset, 0x600);
        assert_eq!(h.block_size, 2 << 20);
        assert_eq!(h.parent_name, "base.vhd");
        assert_eq!(h.locators.len(), 1);
        assert_eq!(h.locators[0].code_str(), "W2ku");
        assert_eq!(h.locators[0].data_offset, 0x1000);
    }

    #[test]
    fn refuses_impossible_block_sizes() {
        for bs in [0u32, 3 << 20, 512 << 20] {
            let mut b = sample();
            b[32..36].copy_from_slice(&bs.to_be_bytes());
            let c = checksum(&b, 36);
            b[36..40].copy_from_slice(&c.to_be_bytes());
            assert!(matches!(DynHeader::parse(&b), Err(Error::BlockSize(x)) if x == bs));
        }
    }

    #[test]
    fn decodes_locators_by_platform() {
        let w: Vec<u8> = r"C:\VMs\base.vhd".encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
        assert_eq!(decode_locator(PLAT_W2KU, &w).as_deref(), Some(r"C:\VMs\base.vhd"));
        assert_eq!(decode_locator(PLAT_MACX, b"file://./base.vhd\0").as_deref(), Some("file://./base.vhd"));
        assert_eq!(decode_locator(u32::from_be_bytes(*b"Mac "), b"alias"), None);
    }
}
