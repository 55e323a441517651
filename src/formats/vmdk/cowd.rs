//! The ESX Server sparse extent (`COWD`, the `vmfsSparse` redo log `name-00000N-delta.vmdk`):
//! Virtual Disk Format 1.1/5.0, "ESX Server Sparse Extents". A 2048-byte little-endian header,
//! a grain directory of `numGDEntries` u32 sector offsets, grain tables of 4096 u32 entries, and
//! grains (one sector by default). Entry 0 means "not allocated here". There are no zeroed
//! grains in this format.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::Error;
use super::hosted::check_grain;

pub const MAGIC: &[u8; 4] = b"COWD";
pub const HEADER_LEN: usize = 2048;
/// Grain table entries per grain table (fixed by the format).
pub const GTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    /// Disk size in sectors.
    pub sectors: u64,
    /// Grain size in sectors.
    pub grain: u64,
    /// Grain directory offset in sectors.
    pub gd_offset: u64,
    pub gd_entries: u64,
    pub free_sector: u64,
    /// The parent file name of a child (informational: the descriptor's hint is what is used).
    pub parent_name: String,
    pub generation: u32,
    pub unclean_shutdown: bool,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        if b.len() < HEADER_LEN || &b[0..4] != MAGIC {
            return Err(Error::BadMagic { what: "COWD header", found: b[..b.len().min(4)].to_vec() });
        }
        let version = LE::read_u32(&b[4..8]);
        if version != 1 {
            return Err(Error::CowdVersion(version));
        }
        let name = &b[32..32 + 1024];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        let h = Header {
            version,
            flags: LE::read_u32(&b[8..12]),
            sectors: LE::read_u32(&b[12..16]) as u64,
            grain: LE::read_u32(&b[16..20]) as u64,
            gd_offset: LE::read_u32(&b[20..24]) as u64,
            gd_entries: LE::read_u32(&b[24..28]) as u64,
            free_sector: LE::read_u32(&b[28..32]) as u64,
            parent_name: String::from_utf8_lossy(name).into_owned(),
            generation: LE::read_u32(&b[1060..1064]),
            unclean_shutdown: LE::read_u32(&b[1648..1652]) != 0,
        };
        check_grain(h.grain)?;
        if h.sectors == 0 {
            return Err(Error::CowdNoSectors);
        }
        let needed = h.sectors.div_ceil(GTES * h.grain);
        if h.gd_entries < needed {
            return Err(Error::CowdDirectoryShort {
                entries: h.gd_entries,
                sectors: h.sectors,
                grain: h.grain,
                needed,
            });
        }
        if h.gd_offset < (HEADER_LEN as u64 / 512) {
            return Err(Error::CowdDirectoryInHeader(h.gd_offset));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header of an ESX redo log of a 20 GiB disk, one-sector grains.
    fn esx_header() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..4].copy_from_slice(b"COWD"); // magic
        b[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1
        b[8..12].copy_from_slice(&3u32.to_le_bytes()); // flags 3
        b[12..16].copy_from_slice(&41943040u32.to_le_bytes()); // 20 GiB in sectors
        b[16..20].copy_from_slice(&1u32.to_le_bytes()); // grain: 1 sector
        b[20..24].copy_from_slice(&4u32.to_le_bytes()); // GD at sector 4
        b[24..28].copy_from_slice(&10240u32.to_le_bytes()); // GD entries: 20 GiB / 2 MiB
        b[28..32].copy_from_slice(&84u32.to_le_bytes()); // free sector
        b[32..40].copy_from_slice(b"base.vmd"); // parentFileName (first bytes)
        b[1060..1064].copy_from_slice(&7u32.to_le_bytes()); // generation
        b
    }

    #[test]
    fn esx_redo_log_header_parses() {
        let h = Header::parse(&esx_header()).unwrap();
        assert_eq!((h.sectors, h.grain, h.gd_offset, h.gd_entries), (41943040, 1, 4, 10240));
        assert_eq!(h.parent_name, "base.vmd");
        assert_eq!(h.generation, 7);
        assert!(!h.unclean_shutdown);
    }

    #[test]
    fn bad_cowd_headers_are_refused() {
        let mut b = esx_header();
        b[4] = 3;
        assert!(Header::parse(&b).unwrap_err().to_string().contains("version 3"));
        let mut b = esx_header();
        b[24..28].copy_from_slice(&100u32.to_le_bytes());
        assert!(Header::parse(&b).unwrap_err().to_string().contains("need 10240"));
        let mut b = esx_header();
        b[16..20].copy_from_slice(&6u32.to_le_bytes());
        assert!(Header::parse(&b).unwrap_err().to_string().contains("grain size"));
    }
}
