//! The header section (MS-VHDX 2.2): file type identifier, the two headers, the region table.
//! All little-endian; checksums are CRC-32C with the checksum field taken as zero.

use byteorder::{ByteOrder, LittleEndian};

use super::Error;

pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offsets of header 1 and header 2; each is a 4 KiB structure in a 64 KiB slot.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
pub const HEADER_SIZE: usize = 4096;
/// Offsets of the two region table copies; each table is 64 KiB.
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
pub const REGION_SIZE: usize = 64 << 10;
/// The header section: nothing else may live below 1 MiB.
pub const HEADER_SECTION: u64 = 1 << 20;
const MAX_REGIONS: u32 = 2047;

/// A GUID in its on-disk (Microsoft, mixed-endian) byte order.
pub type Guid = [u8; 16];

/// Builds the on-disk bytes of GUID `a-b-c-d[0..2]-d[2..8]`.
pub const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

/// Parses `{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}` (braces optional, any case) into on-disk bytes.
pub fn parse_guid(s: &str) -> Option<Guid> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if parts.len() != 5
        || parts.iter().zip(lens).any(|(p, l)| p.len() != l || !p.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return None;
    }
    let a = u32::from_str_radix(parts[0], 16).ok()?;
    let b = u16::from_str_radix(parts[1], 16).ok()?;
    let c = u16::from_str_radix(parts[2], 16).ok()?;
    let mut d = [0u8; 8];
    let tail = format!("{}{}", parts[3], parts[4]);
    for (i, x) in d.iter_mut().enumerate() {
        *x = u8::from_str_radix(&tail[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(guid(a, b, c, d))
}

/// CRC-32C of `b` with the 4-byte checksum field at `at` taken as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// The file type identifier at offset 0: signature and the creator's UTF-16 name.
pub fn parse_file_id(b: &[u8]) -> Result<String, Error> {
    if b.len() < 8 + 512 || &b[0..8] != FILE_ID_SIGNATURE {
        return Err(Error::Signature { what: "file type identifier", found: b[..b.len().min(8)].to_vec() });
    }
    let name: Vec<u16> = b[8..520].chunks_exact(2).map(LittleEndian::read_u16).take_while(|&c| c != 0).collect();
    Ok(String::from_utf16_lossy(&name))
}

/// One of the two headers (MS-VHDX 2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxHeader {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl VhdxHeader {
    /// Validates signature and checksum (what makes a header "valid" in the spec); the version
    /// is checked by the caller on the current header only.
    pub fn parse(b: &[u8]) -> Result<VhdxHeader, Error> {
        let b = &b[..HEADER_SIZE];
        if &b[0..4] != b"head" {
            return Err(Error::Signature { what: "header", found: b[0..4].to_vec() });
        }
        let stored = LittleEndian::read_u32(&b[4..8]);
        let computed = checksum(b, 4);
        if stored != computed {
            return Err(Error::Checksum { what: "header", stored, computed });
        }
        Ok(VhdxHeader {
            sequence: LittleEndian::read_u64(&b[8..16]),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: LittleEndian::read_u16(&b[64..66]),
            version: LittleEndian::read_u16(&b[66..68]),
            log_length: LittleEndian::read_u32(&b[68..72]),
            log_offset: LittleEndian::read_u64(&b[72..80]),
        })
    }

    /// True when the header announces a log that must be replayed.
    pub fn has_log(&self) -> bool {
        self.log_guid != [0; 16] && self.log_length > 0
    }
}

/// Picks the current header: the only valid one, or the valid one with the higher sequence
/// number. Returns its index (0 or 1).
pub fn current(h: &[Result<VhdxHeader, Error>; 2]) -> Option<usize> {
    match (&h[0], &h[1]) {
        (Ok(a), Ok(b)) => Some(if b.sequence > a.sequence { 1 } else { 0 }),
        (Ok(_), Err(_)) => Some(0),
        (Err(_), Ok(_)) => Some(1),
        _ => None,
    }
}

/// A region table entry (MS-VHDX 2.2.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

/// The region table (MS-VHDX 2.2.3): signature, checksum over the whole 64 KiB, entries.
pub fn parse_regions(b: &[u8]) -> Result<Vec<Region>, Error> {
    let b = &b[..REGION_SIZE];
    if &b[0..4] != b"regi" {
        return Err(Error::Signature { what: "region table", found: b[0..4].to_vec() });
    }
    let stored = LittleEndian::read_u32(&b[4..8]);
    let computed = checksum(b, 4);
    if stored != computed {
        return Err(Error::Checksum { what: "region table", stored, computed });
    }
    let count = LittleEndian::read_u32(&b[8..12]);
    if count > MAX_REGIONS {
        return Err(Error::TooMany { what: "region table entries", count: count as u64, max: MAX_REGIONS as u64 });
    }
    Ok((0..count as usize)
        .map(|i| {
            let e = &b[16 + 32 * i..48 + 32 * i];
            Region {
                guid: guid_at(e, 0),
                offset: LittleEndian::read_u64(&e[16..24]),
                length: LittleEndian::read_u32(&e[24..28]),
                required: LittleEndian::read_u32(&e[28..32]) & 1 != 0,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn header_bytes(seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head"); // signature
        b[8..16].copy_from_slice(&seq.to_le_bytes()); // sequence number
        b[16..32].copy_from_slice(&[0x11; 16]); // file write guid
        b[32..48].copy_from_slice(&[0x22; 16]); // data write guid
        b[48..64].copy_from_slice(&[0; 16]); // log guid (no log)
        b[64..66].copy_from_slice(&0u16.to_le_bytes()); // log version
        b[66..68].copy_from_slice(&1u16.to_le_bytes()); // version
        b[68..72].copy_from_slice(&(1u32 << 20).to_le_bytes()); // log length
        b[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes()); // log offset
        let c = checksum(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes()); // checksum
        b
    }

    #[test]
    fn guid_text_round_trips_through_the_on_disk_order() {
        let g = parse_guid("{B04AEFB7-D19E-4A81-B789-25B8E9445913}").unwrap();
        assert_eq!(g, guid(0xB04AEFB7, 0xD19E, 0x4A81, [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13]));
        assert_eq!(&g[0..4], &[0xB7, 0xEF, 0x4A, 0xB0]);
        assert_eq!(crate::layer::fmt_guid_le(&g), "b04aefb7-d19e-4a81-b789-25b8e9445913");
        assert_eq!(parse_guid("b04aefb7-d19e-4a81-b789-25b8e9445913"), Some(g));
        assert_eq!(parse_guid("{b04aefb7-d19e-4a81-b789-25b8e94459}"), None);
        assert_eq!(parse_guid("{b04aefb7-d19e-4a81-b789-25b8e94459zz}"), None);
    }

    #[test]
    fn crc32c_matches_the_castagnoli_check_value() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let mut b = b"1234XXXX56789".to_vec();
        b[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(checksum(&b, 4), crc32c::crc32c(&b));
    }

    #[test]
    fn parses_a_header_and_refuses_a_torn_one() {
        let b = header_bytes(7);
        let h = VhdxHeader::parse(&b).unwrap();
        assert_eq!(h.sequence, 7);
        assert_eq!(h.version, 1);
        assert!(!h.has_log());
        let mut torn = b.clone();
        torn[2000] ^= 1;
        assert!(matches!(VhdxHeader::parse(&torn), Err(Error::Checksum { what: "header", .. })));
    }

    #[test]
    fn current_header_is_the_valid_one_with_the_higher_sequence() {
        let ok = |s| VhdxHeader::parse(&header_bytes(s));
        let bad = || VhdxHeader::parse(&[0u8; HEADER_SIZE]);
        assert_eq!(current(&[ok(1), ok(2)]), Some(1));
        assert_eq!(current(&[ok(5), ok(2)]), Some(0));
        assert_eq!(current(&[bad(), ok(2)]), Some(1));
        assert_eq!(current(&[ok(9), bad()]), Some(0));
        assert_eq!(current(&[bad(), bad()]), None);
    }

    #[test]
    fn parses_the_region_table() {
        let mut b = vec![0u8; REGION_SIZE];
        b[0..4].copy_from_slice(b"regi"); // signature
        b[8..12].copy_from_slice(&1u32.to_le_bytes()); // entry count
        b[16..32].copy_from_slice(&[0x66; 16]); // entry 0: guid
        b[32..40].copy_from_slice(&(3u64 << 20).to_le_bytes()); // entry 0: file offset
        b[40..44].copy_from_slice(&(1u32 << 20).to_le_bytes()); // entry 0: length
        b[44..48].copy_from_slice(&1u32.to_le_bytes()); // entry 0: required
        let c = checksum(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes()); // checksum
        let r = parse_regions(&b).unwrap();
        assert_eq!(r, vec![Region { guid: [0x66; 16], offset: 3 << 20, length: 1 << 20, required: true }]);
        b[100] = 1;
        assert!(matches!(parse_regions(&b), Err(Error::Checksum { what: "region table", .. })));
    }
}
