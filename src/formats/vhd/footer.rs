//! The hard disk footer (VHD spec, "Hard Disk Footer Format"): 512 bytes, big-endian.

use byteorder::{BigEndian, ByteOrder};

use super::Error;

pub const COOKIE: &[u8; 8] = b"conectix";
/// blktap's "poisoned" cookie: a VHD caught in the middle of a coalesce.
pub const POISON_COOKIE: &[u8; 8] = b"v_poison";
pub const FIXED: u32 = 2;
pub const DYNAMIC: u32 = 3;
pub const DIFFERENCING: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    /// (cylinders, heads, sectors per track)
    pub geometry: (u16, u8, u8),
    pub disk_type: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    /// blktap's `hidden` flag (byte 85), set on snapshot parents.
    pub hidden: u8,
    /// True when the checksum only matched with `hidden` cleared (an early td-util bug).
    pub hidden_outside_checksum: bool,
}

/// One's complement of the byte sum, skipping the 4-byte checksum field at `skip`.
pub fn checksum(b: &[u8], skip: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32));
    !sum
}

impl Footer {
    pub fn parse(b: &[u8]) -> Result<Footer, Error> {
        let b = &b[..512];
        if &b[0..8] == POISON_COOKIE {
            return Err(Error::Poisoned);
        }
        if &b[0..8] != COOKIE {
            return Err(Error::BadCookie { what: "footer", found: b[0..8].to_vec() });
        }
        let stored = BigEndian::read_u32(&b[64..68]);
        let computed = checksum(b, 64);
        let creator_app: [u8; 4] = b[28..32].try_into().expect("4 bytes");
        let mut hidden_outside_checksum = false;
        if stored != computed {
            // libvhd accepts a footer whose checksum matches with `hidden` cleared: early td-util
            // set the flag without recomputing the checksum.
            let mut copy = b.to_vec();
            copy[85] = 0;
            if &creator_app == b"tap\0" && b[85] != 0 && checksum(&copy, 64) == stored {
                hidden_outside_checksum = true;
            } else {
                return Err(Error::Checksum { what: "footer", stored, computed });
            }
        }
        let version = BigEndian::read_u32(&b[12..16]);
        if version >> 16 != 1 {
            return Err(Error::Version { what: "footer", version });
        }
        let disk_type = BigEndian::read_u32(&b[60..64]);
        if !matches!(disk_type, FIXED | DYNAMIC | DIFFERENCING) {
            return Err(Error::DiskType(disk_type));
        }
        Ok(Footer {
            features: BigEndian::read_u32(&b[8..12]),
            version,
            data_offset: BigEndian::read_u64(&b[16..24]),
            timestamp: BigEndian::read_u32(&b[24..28]),
            creator_app,
            creator_version: BigEndian::read_u32(&b[32..36]),
            creator_os: BigEndian::read_u32(&b[36..40]),
            original_size: BigEndian::read_u64(&b[40..48]),
            current_size: BigEndian::read_u64(&b[48..56]),
            geometry: (BigEndian::read_u16(&b[56..58]), b[58], b[59]),
            disk_type,
            unique_id: b[68..84].try_into().expect("16 bytes"),
            saved_state: b[84],
            hidden: b[85],
            hidden_outside_checksum,
        })
    }

    /// The size CHS geometry implies (what qemu uses for Virtual PC images; shown in `info`).
    pub fn chs_size(&self) -> u64 {
        let (c, h, s) = self.geometry;
        c as u64 * h as u64 * s as u64 * 512
    }

    pub fn creator(&self) -> String {
        String::from_utf8_lossy(&self.creator_app).trim_end_matches(['\0', ' ']).to_string()
    }

    pub fn is_tap(&self) -> bool {
        &self.creator_app == b"tap\0"
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A footer as qemu writes it for a 4 MiB dynamic disk, one comment per field.
    pub fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..8].copy_from_slice(b"conectix"); // cookie
        b[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
        b[16..24].copy_from_slice(&0x200u64.to_be_bytes()); // data offset: dynamic header
        b[24..28].copy_from_slice(&0x288c_3827u32.to_be_bytes()); // timestamp
        b[28..32].copy_from_slice(b"qemu"); // creator application
        b[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes()); // creator version
        b[36..40].copy_from_slice(b"Wi2k"); // creator host OS
        b[40..48].copy_from_slice(&(4u64 << 20).to_be_bytes()); // original size
        b[48..56].copy_from_slice(&(4u64 << 20).to_be_bytes()); // current size
        b[56..60].copy_from_slice(&[0x00, 0x79, 0x04, 0x11]); // geometry 121/4/17
        b[60..64].copy_from_slice(&DYNAMIC.to_be_bytes()); // disk type
        b[68..84].copy_from_slice(&[0xab; 16]); // unique id
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes()); // checksum
        b
    }

    #[test]
    fn parses_a_valid_footer() {
        let f = Footer::parse(&sample()).unwrap();
        assert_eq!(f.current_size, 4 << 20);
        assert_eq!(f.disk_type, DYNAMIC);
        assert_eq!(f.data_offset, 0x200);
        assert_eq!(f.chs_size(), 121 * 4 * 17 * 512);
        assert_eq!(f.creator(), "qemu");
    }

    #[test]
    fn refuses_a_bad_checksum_with_both_values() {
        let mut b = sample();
        b[50] ^= 1;
        match Footer::parse(&b) {
            Err(Error::Checksum { what: "footer", stored, computed }) => assert_ne!(stored, computed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn accepts_tap_hidden_flag_outside_the_checksum() {
        let mut b = sample();
        b[28..32].copy_from_slice(b"tap\0");
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b[85] = 1; // set after the checksum, as early td-util did
        let f = Footer::parse(&b).unwrap();
        assert!(f.hidden_outside_checksum && f.hidden == 1);
        b[28..32].copy_from_slice(b"qemu"); // the allowance is blktap's only
        assert!(matches!(Footer::parse(&b), Err(Error::Checksum { .. })));
    }

    #[test]
    fn refuses_poisoned_and_unknown_types() {
        let mut b = sample();
        b[0..8].copy_from_slice(b"v_poison");
        assert!(matches!(Footer::parse(&b), Err(Error::Poisoned)));
        let mut b = sample();
        b[60..64].copy_from_slice(&5u32.to_be_bytes());
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        assert!(matches!(Footer::parse(&b), Err(Error::DiskType(5))));
    }
}
