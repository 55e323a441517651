//! The MBR partition table: one sector, four primary entries, little-endian.
//!
//! Layout (as every PC BIOS and partitioning tool reads it): bytes 440..444 the disk signature,
//! 446..510 four 16-byte entries (status `0x80` = active, start CHS, type, end CHS, start LBA,
//! sector count), 510..512 the boot signature `55 aa`. The boot code area (0..440) is left zero
//! for a bootloader to fill, through an overlay.
//!
//! CHS fields are written as sfdisk writes them for a disk without a geometry of its own:
//! 255 heads and 63 sectors per track, and `fe ff ff` (cylinder 1023, head 254, sector 63) for
//! any address past cylinder 1023.

/// Heads and sectors per track of the LBA-only geometry sfdisk and gdisk assume.
const HEADS: u64 = 255;
const SECTORS: u64 = 63;

/// One primary partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub bootable: bool,
    pub code: u8,
    pub start_lba: u32,
    pub sectors: u32,
}

/// The CHS address of `lba` in the three bytes an entry stores: head, sector (bits 0-5) with
/// cylinder bits 8-9 (bits 6-7), cylinder bits 0-7.
pub fn chs(lba: u64) -> [u8; 3] {
    let cyl = lba / (HEADS * SECTORS);
    if cyl > 1023 {
        return [0xfe, 0xff, 0xff];
    }
    let head = (lba / SECTORS) % HEADS;
    let sector = lba % SECTORS + 1;
    [head as u8, (sector as u8) | (((cyl >> 2) & 0xc0) as u8), (cyl & 0xff) as u8]
}

fn put_entry(b: &mut [u8], e: &Entry) {
    b[0] = if e.bootable { 0x80 } else { 0 };
    b[1..4].copy_from_slice(&chs(e.start_lba as u64));
    b[4] = e.code;
    let last = e.start_lba as u64 + e.sectors as u64 - 1;
    b[5..8].copy_from_slice(&chs(last));
    b[8..12].copy_from_slice(&e.start_lba.to_le_bytes());
    b[12..16].copy_from_slice(&e.sectors.to_le_bytes());
}

/// The MBR sector with `entries` (at most four; an entry with zero sectors is left empty).
pub fn sector(signature: u32, entries: &[Entry]) -> [u8; 512] {
    debug_assert!(entries.len() <= 4);
    let mut b = [0u8; 512];
    b[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, e) in entries.iter().take(4).enumerate().filter(|(_, e)| e.sectors > 0) {
        put_entry(&mut b[446 + 16 * i..462 + 16 * i], e);
    }
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

/// GPT's protective MBR for a disk of `disk_sectors`: one `ee` entry from LBA 1 over the whole
/// disk (capped at 2^32 - 1 sectors), as gdisk writes it.
pub fn protective(disk_sectors: u64) -> [u8; 512] {
    let sectors = (disk_sectors - 1).min(u32::MAX as u64) as u32;
    sector(0, &[Entry { bootable: false, code: 0xee, start_lba: 1, sectors }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_what_sfdisk_writes() {
        // sfdisk on a 100 MiB file: start=32 → 00 21 00, end 2079 → 21 01 00;
        // start=4096 → 41 02 00, end 14095 → df 2f 00.
        assert_eq!(chs(32), [0x00, 0x21, 0x00]);
        assert_eq!(chs(2079), [0x21, 0x01, 0x00]);
        assert_eq!(chs(4096), [0x41, 0x02, 0x00]);
        assert_eq!(chs(14095), [0xdf, 0x2f, 0x00]);
        // start=2048 → 20 21 00; past cylinder 1023 → fe ff ff.
        assert_eq!(chs(2048), [0x20, 0x21, 0x00]);
        assert_eq!(chs(40_000_000), [0xfe, 0xff, 0xff]);
        // The last addressable sector: cylinder 1023, head 254, sector 63.
        assert_eq!(chs(1024 * 255 * 63 - 1), [0xfe, 0xff, 0xff]);
        assert_eq!(chs(1024 * 255 * 63), [0xfe, 0xff, 0xff]);
        // Cylinder 256: its bits 8-9 go to the sector byte's top bits.
        assert_eq!(chs(256 * 255 * 63), [0x00, 0x41, 0x00]);
    }

    #[test]
    fn sector_bytes_match_sfdisk() {
        // `printf 'start=32, size=2048, type=83, bootable\nstart=4096, size=10000, type=82\n' |
        //  sfdisk --label dos` on a 100 MiB file, bytes 440..512 (signature 0xbbee85a7).
        let b = sector(
            0xbbee85a7,
            &[
                Entry { bootable: true, code: 0x83, start_lba: 32, sectors: 2048 },
                Entry { bootable: false, code: 0x82, start_lba: 4096, sectors: 10000 },
            ],
        );
        assert_eq!(&b[440..446], &[0xa7, 0x85, 0xee, 0xbb, 0, 0]);
        // status, start CHS, type, end CHS, start LBA, sectors
        let one = [0x80, 0x00, 0x21, 0x00, 0x83, 0x21, 0x01, 0x00, 0x20, 0, 0, 0, 0x00, 0x08, 0, 0];
        let two = [0x00, 0x41, 0x02, 0x00, 0x82, 0xdf, 0x2f, 0x00, 0x00, 0x10, 0, 0, 0x10, 0x27, 0, 0];
        assert_eq!(&b[446..462], &one);
        assert_eq!(&b[462..478], &two);
        assert!(b[478..510].iter().all(|&x| x == 0));
        assert_eq!(&b[510..], &[0x55, 0xaa]);
        assert!(b[..440].iter().all(|&x| x == 0), "boot code is left for a bootloader");
    }

    #[test]
    fn protective_mbr_matches_gdisk() {
        // sgdisk on a 100 MiB file (204800 sectors): 00 | 00 02 00 | ee | be 32 0c | 1 | 204799.
        let b = protective(204800);
        assert_eq!(
            &b[446..462],
            &[0x00, 0x00, 0x02, 0x00, 0xee, 0xbe, 0x32, 0x0c, 0x01, 0, 0, 0, 0xff, 0x1f, 0x03, 0x00]
        );
        assert_eq!(&protective(1 << 40)[458..462], &[0xff; 4], "capped at 2^32 - 1 sectors");
    }
}
