//! The GUID partition table (UEFI 2.10 §5.3), for 512-byte sectors.
//!
//! A disk of `n` sectors holds: the protective MBR at LBA 0; the primary header at LBA 1 and its
//! 128-entry array (128 bytes each, 32 sectors) at LBA 2..34; the backup array at
//! `n - 33 .. n - 1` and the backup header at `n - 1`. Partitions lie in the usable range
//! `34 ..= n - 34`. Every header carries the CRC-32 of itself (92 bytes, with its CRC field
//! zero) and of the entry array. All numbers are little-endian; GUIDs are stored with their
//! first three fields little-endian ("mixed-endian").

use std::fmt;

use sha1::{Digest, Sha1};

use super::SECTOR;
use super::mbr;

/// Entries in each array (the minimum UEFI allows: 16 KiB).
pub const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
/// Sectors of one entry array.
pub const ARRAY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
/// Sectors at the start: protective MBR, header, array.
pub const HEAD_SECTORS: u64 = 2 + ARRAY_SECTORS;
/// Sectors at the end: backup array, backup header.
pub const TAIL_SECTORS: u64 = ARRAY_SECTORS + 1;
const HEADER_SIZE: usize = 92;
/// GPT attribute bit 2: legacy BIOS bootable.
pub const LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;

/// A GUID, held in RFC 4122 byte order (the order it is written in text).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

/// The namespace of vdiskfs's UUID v5 names (a random UUID, fixed forever: changing it would
/// change every composed disk's GUIDs).
const NAMESPACE: Guid =
    Guid([0x5d, 0x0c, 0x8a, 0x4e, 0x1f, 0x93, 0x4b, 0x7e, 0x9a, 0x61, 0x2c, 0xd4, 0x83, 0x0b, 0x57, 0xe2]);

impl Guid {
    pub const LINUX: Guid = Guid::from_u128(0x0FC63DAF_8483_4772_8E79_3D69D8477DE4);
    pub const SWAP: Guid = Guid::from_u128(0x0657FD6D_A4AB_43C4_84E5_0933C84B4F4F);
    pub const EFI: Guid = Guid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
    pub const LVM: Guid = Guid::from_u128(0xE6D6D379_F507_44C2_A23C_238F2A3DF928);
    pub const BIOS_BOOT: Guid = Guid::from_u128(0x21686148_6449_6E6F_744E_656564454649);

    pub const fn from_u128(v: u128) -> Guid {
        Guid(v.to_be_bytes())
    }

    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, any case.
    pub fn parse(s: &str) -> Option<Guid> {
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(&hex, 16).ok().map(Guid::from_u128)
    }

    /// A name-based UUID (RFC 4122 version 5: SHA-1 of the namespace and the name) in vdiskfs's
    /// namespace: the same name always gives the same GUID.
    pub fn v5(name: &[u8]) -> Guid {
        let mut h = Sha1::new();
        h.update(NAMESPACE.0);
        h.update(name);
        let d = h.finalize();
        let mut g = [0u8; 16];
        g.copy_from_slice(&d[..16]);
        g[6] = (g[6] & 0x0f) | 0x50;
        g[8] = (g[8] & 0x3f) | 0x80;
        Guid(g)
    }

    /// The 16 bytes as GPT stores them: the first three fields little-endian.
    pub fn to_disk(self) -> [u8; 16] {
        let mut u = self.0;
        u[0..4].reverse();
        u[4..6].reverse();
        u[6..8].reverse();
        u
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::layer::fmt_uuid(&self.0))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// One partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub type_guid: Guid,
    pub guid: Guid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    /// Up to 36 UTF-16 code units; longer names are cut.
    pub name: String,
}

/// The generated table: the sectors at the start and at the end of the disk.
#[derive(Debug, Clone)]
pub struct Table {
    /// Protective MBR, primary header, primary array: `HEAD_SECTORS` sectors.
    pub head: Vec<u8>,
    /// Backup array, backup header: `TAIL_SECTORS` sectors, at `disk_sectors - TAIL_SECTORS`.
    pub tail: Vec<u8>,
}

fn entry_array(entries: &[Entry]) -> Vec<u8> {
    let mut a = vec![0u8; ENTRIES * ENTRY_SIZE];
    for (e, b) in entries.iter().zip(a.chunks_exact_mut(ENTRY_SIZE)) {
        b[0..16].copy_from_slice(&e.type_guid.to_disk());
        b[16..32].copy_from_slice(&e.guid.to_disk());
        b[32..40].copy_from_slice(&e.first_lba.to_le_bytes());
        b[40..48].copy_from_slice(&e.last_lba.to_le_bytes());
        b[48..56].copy_from_slice(&e.attributes.to_le_bytes());
        for (i, u) in e.name.encode_utf16().take(36).enumerate() {
            b[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
    }
    a
}

/// A header sector: at `my_lba`, naming the other copy at `alternate_lba` and this copy's
/// array at `array_lba`.
fn header(disk: Guid, disk_sectors: u64, my_lba: u64, alternate_lba: u64, array_lba: u64, array_crc: u32) -> Vec<u8> {
    let mut h = vec![0u8; SECTOR as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    h[40..48].copy_from_slice(&HEAD_SECTORS.to_le_bytes());
    h[48..56].copy_from_slice(&(disk_sectors - TAIL_SECTORS - 1).to_le_bytes());
    h[56..72].copy_from_slice(&disk.to_disk());
    h[72..80].copy_from_slice(&array_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&array_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The whole table of a disk of `disk_sectors` holding `entries` (at most [`ENTRIES`], inside
/// the usable range: the caller's layout guarantees both).
pub fn build(disk: Guid, disk_sectors: u64, entries: &[Entry]) -> Table {
    debug_assert!(entries.len() <= ENTRIES && disk_sectors > HEAD_SECTORS + TAIL_SECTORS);
    let array = entry_array(entries);
    let array_crc = crc32fast::hash(&array);
    let last = disk_sectors - 1;
    let backup_array = disk_sectors - TAIL_SECTORS;
    let mut head = Vec::with_capacity((HEAD_SECTORS * SECTOR) as usize);
    head.extend_from_slice(&mbr::protective(disk_sectors));
    head.extend_from_slice(&header(disk, disk_sectors, 1, last, 2, array_crc));
    head.extend_from_slice(&array);
    let mut tail = array;
    tail.extend_from_slice(&header(disk, disk_sectors, last, 1, backup_array, array_crc));
    Table { head, tail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_parse_print_and_store_mixed_endian() {
        let g = Guid::parse("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap();
        assert_eq!(g, Guid::EFI);
        assert_eq!(g.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(
            g.to_disk(),
            [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b]
        );
        assert!(Guid::parse("C12A7328F81F11D2BA4B00A0C93EC93B").is_none());
        assert!(Guid::parse("C12A7328-F81F-11D2-BA4B-00A0C93EC93G").is_none());
    }

    #[test]
    fn v5_names_are_stable_and_carry_version_and_variant() {
        let a = Guid::v5(b"raw:/dev/vg/root:1073741824");
        assert_eq!(a, Guid::v5(b"raw:/dev/vg/root:1073741824"));
        assert_ne!(a, Guid::v5(b"raw:/dev/vg/swap:1073741824"));
        assert_eq!(a.0[6] >> 4, 5, "version 5");
        assert_eq!(a.0[8] >> 6, 2, "RFC 4122 variant");
    }

    #[test]
    fn headers_and_arrays_carry_correct_crcs() {
        let n = 204800;
        let e = Entry {
            type_guid: Guid::LINUX,
            guid: Guid::v5(b"p1"),
            first_lba: 2048,
            last_lba: 22527,
            attributes: LEGACY_BIOS_BOOTABLE,
            name: "root".into(),
        };
        let t = build(Guid::v5(b"d"), n, std::slice::from_ref(&e));
        assert_eq!(t.head.len() as u64, HEAD_SECTORS * SECTOR);
        assert_eq!(t.tail.len() as u64, TAIL_SECTORS * SECTOR);
        let check = |h: &[u8], my: u64, alt: u64, array: &[u8], array_lba: u64| {
            assert_eq!(&h[..8], b"EFI PART");
            let mut z = h[..92].to_vec();
            z[16..20].fill(0);
            assert_eq!(u32::from_le_bytes(h[16..20].try_into().unwrap()), crc32fast::hash(&z));
            assert_eq!(u32::from_le_bytes(h[88..92].try_into().unwrap()), crc32fast::hash(array));
            assert_eq!(u64::from_le_bytes(h[24..32].try_into().unwrap()), my);
            assert_eq!(u64::from_le_bytes(h[32..40].try_into().unwrap()), alt);
            assert_eq!(u64::from_le_bytes(h[40..48].try_into().unwrap()), 34);
            assert_eq!(u64::from_le_bytes(h[48..56].try_into().unwrap()), n - 34);
            assert_eq!(u64::from_le_bytes(h[72..80].try_into().unwrap()), array_lba);
            assert!(h[92..].iter().all(|&b| b == 0));
        };
        let s = SECTOR as usize;
        check(&t.head[s..2 * s], 1, n - 1, &t.head[2 * s..], 2);
        check(&t.tail[32 * s..], n - 1, 1, &t.tail[..32 * s], n - 33);
        assert_eq!(&t.head[2 * s..], &t.tail[..32 * s], "both arrays are the same");
        let a = &t.head[2 * s..2 * s + 128];
        assert_eq!(&a[0..16], &Guid::LINUX.to_disk());
        assert_eq!(u64::from_le_bytes(a[32..40].try_into().unwrap()), 2048);
        assert_eq!(u64::from_le_bytes(a[48..56].try_into().unwrap()), 4);
        assert_eq!(&a[56..64], &[b'r', 0, b'o', 0, b'o', 0, b't', 0]);
        assert_eq!(t.head[450], 0xee, "protective MBR");
    }
}
