//! Where each partition of a composed disk goes, and the table bytes that say so.
//!
//! The first partition starts at `--part-offset`, each later one at the next multiple of
//! `--part-align` after the previous one's end. A partition is its volume's size rounded up to
//! a whole sector. An MBR disk ends with its last partition; a GPT disk has the backup table
//! after it. Everything is checked here, before anything is mounted: offsets that are not whole
//! sectors, a first partition inside the table, more parts than the table holds, types the
//! table cannot store, partition numbers that do not exist, an MBR disk over 2 TiB.

use super::gpt::{self, Guid};
use super::mbr;
use super::{ComposeError, PartType, SECTOR, Spec, TableKind};

/// The largest MBR disk: every sector number must fit in 32 bits.
pub const MBR_MAX_BYTES: u64 = u32::MAX as u64 * SECTOR;

/// One partition's place on the composed disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Byte offset of the partition.
    pub start: u64,
    /// The volume's size in bytes; the partition is this rounded up to a sector.
    pub size: u64,
}

impl Placement {
    pub fn sectors(&self) -> u64 {
        self.size.div_ceil(SECTOR)
    }
    /// The byte after the partition's last sector.
    pub fn end(&self) -> u64 {
        self.start + self.sectors() * SECTOR
    }
}

/// Where everything goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub table: TableKind,
    pub parts: Vec<Placement>,
    /// Size of the whole disk in bytes.
    pub size: u64,
    /// Bytes of table at the start of the disk.
    pub head_len: u64,
    /// Where the backup table starts (GPT); `size` when there is none (MBR).
    pub tail_start: u64,
}

/// The table's bytes, and the identities written into it (for `info`).
#[derive(Debug, Clone)]
pub struct Generated {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    /// The GPT disk GUID, or the MBR disk signature in hex.
    pub disk_id: String,
    /// Each partition's GUID (GPT) or PARTUUID (`<signature>-<nn>`, MBR).
    pub part_ids: Vec<String>,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x / a * a)
}

impl Layout {
    /// Places volumes of `sizes` bytes (all non-zero) as `spec` says.
    pub fn plan(spec: &Spec, sizes: &[u64]) -> Result<Layout, ComposeError> {
        check_options(spec, sizes.len())?;
        let (head_len, tail_len) = match spec.table {
            TableKind::Mbr => (SECTOR, 0),
            TableKind::Gpt => (gpt::HEAD_SECTORS * SECTOR, gpt::TAIL_SECTORS * SECTOR),
        };
        if spec.part_offset < head_len {
            let hint = match spec.table {
                TableKind::Gpt if spec.part_offset >= SECTOR => {
                    " (protective MBR, header and 128 entries; a 16 KiB layout needs --compose mbr)"
                }
                TableKind::Gpt => " (protective MBR, header and 128 entries)",
                TableKind::Mbr => "",
            };
            return Err(ComposeError::OffsetTooSmall {
                offset: spec.part_offset,
                table: spec.table,
                need: head_len,
                hint,
            });
        }
        let mut parts = Vec::with_capacity(sizes.len());
        let mut at = spec.part_offset;
        for &size in sizes {
            let p = Placement { start: at, size };
            p.sectors().checked_mul(SECTOR).and_then(|n| p.start.checked_add(n)).ok_or(ComposeError::Overflow)?;
            parts.push(p);
            at = align_up(p.end(), spec.part_align).ok_or(ComposeError::Overflow)?;
        }
        let end = parts.last().map_or(spec.part_offset, |p| p.end());
        let size = end.checked_add(tail_len).filter(|s| *s <= i64::MAX as u64).ok_or(ComposeError::Overflow)?;
        if spec.table == TableKind::Mbr && size > MBR_MAX_BYTES {
            return Err(ComposeError::MbrTooLarge { size, max: MBR_MAX_BYTES });
        }
        Ok(Layout { table: spec.table, parts, size, head_len, tail_start: size - tail_len })
    }

    /// The table for these parts. `identities` name each part's content (they seed the GUIDs
    /// and the MBR signature); `names` become GPT partition names.
    pub fn generate(&self, spec: &Spec, identities: &[String], names: &[String]) -> Result<Generated, ComposeError> {
        let seed = |what: &str, ids: &[&String]| {
            let mut n = what.as_bytes().to_vec();
            for id in ids {
                n.push(b'\n');
                n.extend_from_slice(id.as_bytes());
            }
            Guid::v5(&n)
        };
        let all: Vec<&String> = identities.iter().collect();
        let part_guid = |i: usize| seed(&format!("part {}", i + 1), &[&identities[i]]);
        let sectors = self.size / SECTOR;
        match self.table {
            TableKind::Mbr => {
                let g = seed("mbr", &all).0;
                let signature = u32::from_le_bytes([g[0], g[1], g[2], g[3]]).max(1);
                let mut entries = Vec::new();
                for (i, p) in self.parts.iter().enumerate() {
                    entries.push(mbr::Entry {
                        bootable: spec.bootable.contains(&(i + 1)),
                        code: mbr_code(i + 1, spec.type_of(i + 1))?,
                        start_lba: (p.start / SECTOR) as u32,
                        sectors: p.sectors() as u32,
                    });
                }
                Ok(Generated {
                    head: mbr::sector(signature, &entries).to_vec(),
                    tail: Vec::new(),
                    disk_id: format!("{signature:08x}"),
                    part_ids: (1..=self.parts.len()).map(|n| format!("{signature:08x}-{n:02x}")).collect(),
                })
            }
            TableKind::Gpt => {
                let mut entries = Vec::new();
                for (i, p) in self.parts.iter().enumerate() {
                    let bootable = spec.bootable.contains(&(i + 1));
                    entries.push(gpt::Entry {
                        type_guid: gpt_type(i + 1, spec.type_of(i + 1))?,
                        guid: part_guid(i),
                        first_lba: p.start / SECTOR,
                        last_lba: p.start / SECTOR + p.sectors() - 1,
                        attributes: if bootable { gpt::LEGACY_BIOS_BOOTABLE } else { 0 },
                        name: names.get(i).cloned().unwrap_or_default(),
                    });
                }
                let disk = seed("disk", &all);
                let t = gpt::build(disk, sectors, &entries);
                Ok(Generated {
                    head: t.head,
                    tail: t.tail,
                    disk_id: disk.to_string(),
                    part_ids: entries.iter().map(|e| e.guid.to_string()).collect(),
                })
            }
        }
    }
}

/// Checks what does not depend on the volumes' sizes.
fn check_options(spec: &Spec, parts: usize) -> Result<(), ComposeError> {
    if parts == 0 {
        return Err(ComposeError::NoParts);
    }
    if !spec.part_offset.is_multiple_of(SECTOR) {
        return Err(ComposeError::NotSectorMultiple { what: "--part-offset", value: spec.part_offset });
    }
    if spec.part_align == 0 {
        return Err(ComposeError::ZeroAlign);
    }
    if !spec.part_align.is_multiple_of(SECTOR) {
        return Err(ComposeError::NotSectorMultiple { what: "--part-align", value: spec.part_align });
    }
    let (max, hint) = match spec.table {
        TableKind::Mbr => (4, " (four primary partitions; use --compose gpt for more)"),
        TableKind::Gpt => (gpt::ENTRIES, ""),
    };
    if parts > max {
        return Err(ComposeError::TooManyParts { parts, table: spec.table, max, hint });
    }
    for &(n, ty) in &spec.types {
        if n == 0 || n > parts {
            return Err(ComposeError::NoSuchPart { option: "--part-type", n, parts });
        }
        match spec.table {
            TableKind::Mbr => mbr_code(n, ty).map(drop)?,
            TableKind::Gpt => gpt_type(n, ty).map(drop)?,
        }
    }
    if let Some(&n) = spec.bootable.iter().find(|&&n| n == 0 || n > parts) {
        return Err(ComposeError::NoSuchPart { option: "--bootable", n, parts });
    }
    Ok(())
}

/// The well-known types as (MBR code, GPT GUID).
const KNOWN: [(PartType, u8, Guid); 4] = [
    (PartType::Linux, 0x83, Guid::LINUX),
    (PartType::Swap, 0x82, Guid::SWAP),
    (PartType::Efi, 0xef, Guid::EFI),
    (PartType::Lvm, 0x8e, Guid::LVM),
];

fn mbr_code(n: usize, ty: PartType) -> Result<u8, ComposeError> {
    let not = |hint| ComposeError::TypeNotInTable { n, ty, table: TableKind::Mbr, hint };
    match ty {
        PartType::Code(0) => Err(not(" (type 00 marks an empty entry)")),
        PartType::Code(c) => Ok(c),
        PartType::BiosBoot => Err(not(" (an MBR disk keeps GRUB's core image in the gap before the first partition)")),
        PartType::Guid(g) => KNOWN.iter().find(|k| k.2 == g).map(|k| k.1).ok_or_else(|| not("")),
        named => KNOWN.iter().find(|k| k.0 == named).map(|k| k.1).ok_or_else(|| not("")),
    }
}

fn gpt_type(n: usize, ty: PartType) -> Result<Guid, ComposeError> {
    let not = |hint| ComposeError::TypeNotInTable { n, ty, table: TableKind::Gpt, hint };
    match ty {
        PartType::Guid(g) if g.0 == [0; 16] => Err(not(" (the zero GUID marks an unused entry)")),
        PartType::Guid(g) => Ok(g),
        PartType::BiosBoot => Ok(Guid::BIOS_BOOT),
        PartType::Code(c) => {
            KNOWN.iter().find(|k| k.1 == c).map(|k| k.2).ok_or_else(|| not(" (give the GPT type GUID)"))
        }
        named => KNOWN.iter().find(|k| k.0 == named).map(|k| k.2).ok_or_else(|| not("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::MIB;

    fn spec(table: TableKind) -> Spec {
        Spec::new(table)
    }

    #[test]
    fn partitions_follow_offset_and_alignment_and_round_to_a_sector() {
        let mut s = spec(TableKind::Mbr);
        s.part_offset = 16 << 10;
        let l = Layout::plan(&s, &[MIB + 100, 3 * MIB]).unwrap();
        assert_eq!(l.parts[0], Placement { start: 16 << 10, size: MIB + 100 });
        assert_eq!(l.parts[0].end(), (16 << 10) + MIB + 512);
        assert_eq!(l.parts[1].start, 2 * MIB, "next 1 MiB boundary");
        assert_eq!(l.size, 5 * MIB, "an MBR disk ends with its last partition");
        assert_eq!((l.head_len, l.tail_start), (512, 5 * MIB));
        let g = Layout::plan(&spec(TableKind::Gpt), &[MIB]).unwrap();
        assert_eq!((g.parts[0].start, g.size, g.tail_start), (MIB, 2 * MIB + 33 * 512, 2 * MIB));
    }

    #[test]
    fn bad_layouts_are_refused() {
        let err = |s: &Spec, sizes: &[u64]| Layout::plan(s, sizes).unwrap_err().to_string();
        let mut s = spec(TableKind::Gpt);
        s.part_offset = 16 << 10;
        assert!(err(&s, &[MIB]).contains("smaller than the GPT partition table, which takes the first 17408 bytes"));
        s.part_offset = 0;
        let mut m = spec(TableKind::Mbr);
        m.part_offset = 0;
        assert!(err(&m, &[MIB]).contains("--part-offset 0 is smaller than the MBR"));
        m.part_offset = 1000;
        assert!(err(&m, &[MIB]).contains("not a multiple of 512"));
        let m = spec(TableKind::Mbr);
        assert!(err(&m, &[MIB; 5]).contains("5 parts, but an MBR holds at most 4"));
        assert!(err(&spec(TableKind::Gpt), &[MIB; 129]).contains("at most 128"));
        assert!(err(&m, &[1 << 40, 1 << 40]).contains("an MBR addresses at most"));
        assert!(Layout::plan(&spec(TableKind::Gpt), &[1 << 40, 1 << 40]).is_ok());
        let mut t = spec(TableKind::Mbr);
        t.types = vec![(3, PartType::Swap)];
        assert!(err(&t, &[MIB, MIB]).contains("--part-type 3: there is no part 3"));
        t.types = vec![(1, PartType::BiosBoot)];
        assert!(err(&t, &[MIB]).contains("has no MBR form"));
        t.types.clear();
        t.bootable = vec![2];
        assert!(err(&t, &[MIB]).contains("--bootable 2"));
        assert!(matches!(Layout::plan(&m, &[u64::MAX - 10]), Err(ComposeError::Overflow)));
    }

    #[test]
    fn the_same_parts_give_the_same_table_and_other_parts_another() {
        let mut s = spec(TableKind::Gpt);
        s.types = vec![(2, PartType::Swap)];
        s.bootable = vec![1];
        let l = Layout::plan(&s, &[MIB, MIB]).unwrap();
        let ids = ["raw:/dev/vg/root:1048576".to_string(), "raw:/dev/vg/swap:1048576".to_string()];
        let names = ["root".to_string(), "swap".to_string()];
        let a = l.generate(&s, &ids, &names).unwrap();
        let b = l.generate(&s, &ids, &names).unwrap();
        assert_eq!((&a.head, &a.tail, &a.disk_id), (&b.head, &b.tail, &b.disk_id));
        let other = ["raw:/dev/vg/root:1048576".to_string(), "raw:/dev/vg/other:1048576".to_string()];
        let c = l.generate(&s, &other, &names).unwrap();
        assert_ne!(a.disk_id, c.disk_id);
        assert_eq!(a.part_ids[0], c.part_ids[0], "a part's GUID depends on that part alone");
        assert_ne!(a.part_ids[1], c.part_ids[1]);
        let m = spec(TableKind::Mbr);
        let g = Layout::plan(&m, &[MIB]).unwrap().generate(&m, &ids[..1], &names[..1]).unwrap();
        assert_eq!(g.part_ids[0], format!("{}-01", g.disk_id));
        assert_eq!(&g.head[446 + 4], &0x83);
    }
}
