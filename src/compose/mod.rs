//! Composed disks: a partition table generated in memory, followed by volumes as partitions.
//!
//! Xen guests often have no partitioned disk of their own: xen-tools serves each partition as
//! its own logical volume, and OnApp's Xen disks are raw filesystems. KVM wants one disk with a
//! partition table. A composed disk is that disk, made virtually: no byte is copied and no
//! volume is written.
//!
//! A composed disk is one [`Layer`](crate::layer::Layer) ([`ComposedLayer`]) over parts, each
//! part a [`Chain`](crate::chain::Chain) of its own (a raw volume, or any chain vdiskfs reads).
//! So everything above a layer (the overlay, export, SEEK_DATA/SEEK_HOLE, `map`, `info`) works
//! unchanged. Its map says:
//! - the table's sectors are data from an in-memory source (source 0);
//! - a part's range is what that part's own chain says (source `1 + i`, offset in the part): its
//!   data as data, its holes and zeros as zeros;
//! - the gap before the first part, between parts, and the padding of a part to a whole sector
//!   read as zeros.
//!
//! Layout ([`layout`]): the first partition starts at `--part-offset` (default 1 MiB; OnApp's
//! DOS-compatible layout is 16 KiB), each later one at the next multiple of `--part-align`
//! (default 1 MiB). A partition is exactly its volume's size rounded up to a 512-byte sector.
//!
//! Tables:
//! - MBR ([`mbr`]): up to four primary partitions, with CHS fields as sfdisk writes them for a
//!   disk without a geometry (255 heads, 63 sectors, `fe ff ff` past cylinder 1023), types and
//!   the active flag. A disk over 2 TiB is refused: 32-bit sector numbers cannot address it.
//! - GPT ([`gpt`], UEFI 2.10 §5.3): a protective MBR, the primary header and 128-entry array at
//!   LBA 1 and 2, the backup array and header in the last 33 sectors, every CRC-32 right.
//!
//! Identity: the disk GUID (GPT), the partition GUIDs and the MBR disk signature are UUID v5
//! names of the parts' identities (a chain's layer identities, a raw volume's location and
//! size), so the same parts always give the same disk. An overlay records the composed
//! layer's identity, a digest of the generated table and every part's identity, and so refuses
//! a different composition.

pub mod gpt;
pub mod layer;
pub mod layout;
pub mod mbr;

use std::fmt;
use std::str::FromStr;

pub use gpt::Guid;
pub use layer::{ComposedLayer, Part};
pub use layout::Layout;

use crate::error::{ErrorKind, Kind};

/// Bytes per sector of a composed disk.
pub const SECTOR: u64 = 512;
/// The default `--part-offset` and `--part-align`.
pub const MIB: u64 = 1 << 20;

/// Which partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Mbr,
    Gpt,
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::Mbr => "MBR",
            TableKind::Gpt => "GPT",
        })
    }
}

/// A partition type, by name or as the table stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartType {
    Linux,
    Swap,
    Efi,
    Lvm,
    /// GPT's BIOS boot partition (where GRUB embeds its core image on a GPT disk).
    BiosBoot,
    /// An MBR type byte.
    Code(u8),
    /// A GPT type GUID.
    Guid(Guid),
}

impl FromStr for PartType {
    type Err = ComposeError;

    /// `linux`, `swap`, `efi`, `lvm`, `bios`, an MBR type in hex (`83`, `0x8e`) or a GPT type
    /// GUID.
    fn from_str(s: &str) -> Result<Self, ComposeError> {
        let t = s.trim();
        Ok(match t.to_ascii_lowercase().as_str() {
            "linux" => PartType::Linux,
            "swap" => PartType::Swap,
            "efi" | "esp" => PartType::Efi,
            "lvm" => PartType::Lvm,
            "bios" => PartType::BiosBoot,
            l => {
                let hex = l.strip_prefix("0x").unwrap_or(l);
                if (1..=2).contains(&hex.len())
                    && let Ok(b) = u8::from_str_radix(hex, 16)
                {
                    PartType::Code(b)
                } else if let Some(g) = Guid::parse(t) {
                    PartType::Guid(g)
                } else {
                    return Err(ComposeError::BadType(s.to_string()));
                }
            }
        })
    }
}

impl fmt::Display for PartType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartType::Linux => f.write_str("linux"),
            PartType::Swap => f.write_str("swap"),
            PartType::Efi => f.write_str("efi"),
            PartType::Lvm => f.write_str("lvm"),
            PartType::BiosBoot => f.write_str("bios"),
            PartType::Code(c) => write!(f, "{c:02x}"),
            PartType::Guid(g) => write!(f, "{g}"),
        }
    }
}

/// How to compose: the table, where partitions go, their types and flags, the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub table: TableKind,
    /// `<name>.raw` in the mount.
    pub name: String,
    /// Where the first partition starts, in bytes.
    pub part_offset: u64,
    /// Later partitions start at a multiple of this, in bytes.
    pub part_align: u64,
    /// Types by partition number (1-based); `linux` where none is given.
    pub types: Vec<(usize, PartType)>,
    /// Partitions (1-based) marked bootable: the MBR active flag, GPT's legacy BIOS bootable
    /// attribute.
    pub bootable: Vec<usize>,
}

impl Spec {
    /// The defaults: `disk`, first partition at 1 MiB, 1 MiB alignment, every part `linux`.
    pub fn new(table: TableKind) -> Spec {
        Spec { table, name: "disk".into(), part_offset: MIB, part_align: MIB, types: Vec::new(), bootable: Vec::new() }
    }

    /// The file name in the mount: `<name>.raw`.
    pub fn file_name(&self) -> String {
        if self.name.ends_with(".raw") { self.name.clone() } else { format!("{}.raw", self.name) }
    }

    /// The type of partition `n` (1-based); the last `--part-type` for it wins.
    pub fn type_of(&self, n: usize) -> PartType {
        self.types.iter().rev().find(|(i, _)| *i == n).map_or(PartType::Linux, |(_, t)| *t)
    }
}

/// What cannot be composed.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("{0:?} is not a size (bytes, or a number with K, KiB, M, MiB, G, GiB, T or TiB)")]
    BadSize(String),
    #[error("{0:?} is not a partition type (linux, swap, efi, lvm, bios, an MBR type in hex, or a GPT type GUID)")]
    BadType(String),
    #[error("{0:?} is not N=TYPE (a partition number, =, a type)")]
    BadTypeSpec(String),
    #[error("{what} {value} is not a multiple of 512 bytes (a sector)")]
    NotSectorMultiple { what: &'static str, value: u64 },
    #[error("--part-align must be at least 512 bytes")]
    ZeroAlign,
    #[error(
        "--part-offset {offset} is smaller than the {table} partition table, which takes the first {need} bytes{hint}"
    )]
    OffsetTooSmall { offset: u64, table: TableKind, need: u64, hint: &'static str },
    #[error("{parts} parts, but an {table} holds at most {max} partitions{hint}")]
    TooManyParts { parts: usize, table: TableKind, max: usize, hint: &'static str },
    #[error("{option} {n}: there is no part {n} (the parts are numbered 1 to {parts}, in the order given)")]
    NoSuchPart { option: &'static str, n: usize, parts: usize },
    #[error("partition {n}: type {ty} has no {table} form{hint}")]
    TypeNotInTable { n: usize, ty: PartType, table: TableKind, hint: &'static str },
    #[error(
        "the composed disk would be {size} bytes, but an MBR addresses at most {max} bytes (2 TiB): use --compose gpt"
    )]
    MbrTooLarge { size: u64, max: u64 },
    #[error("the composed disk would be larger than vdiskfs can address")]
    Overflow,
    #[error("is empty: a partition needs at least one sector")]
    EmptyPart,
    #[error("holds {0} disks; a part of a composed disk must be one disk")]
    SeveralDisks(usize),
    #[error("--compose needs at least one IMAGE")]
    NoParts,
}

impl ErrorKind for ComposeError {
    fn kind(&self) -> Kind {
        match self {
            ComposeError::Overflow | ComposeError::EmptyPart => Kind::Unsupported,
            _ => Kind::Usage,
        }
    }
}

/// A size as people write it: `16384`, `16KiB`, `16K`, `1MiB`, `1M`, `2GiB`, `1TiB`. Binary
/// multiples only (`K` is KiB, as sfdisk reads it); a `B` suffix is allowed.
pub fn parse_size(s: &str) -> Result<u64, ComposeError> {
    let bad = || ComposeError::BadSize(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// `N=TYPE` of `--part-type`.
pub fn parse_type_spec(s: &str) -> Result<(usize, PartType), ComposeError> {
    let (n, t) = s.split_once('=').ok_or_else(|| ComposeError::BadTypeSpec(s.to_string()))?;
    let n: usize = n.trim().parse().map_err(|_| ComposeError::BadTypeSpec(s.to_string()))?;
    Ok((n, t.parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("16384").unwrap(), 16384);
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("16k").unwrap(), 16384);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512B").unwrap(), 512);
        for bad in ["", "KiB", "1.5M", "16KB", "-1", "99999999999999999999", "20000000TiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn types_by_name_code_or_guid() {
        assert_eq!("swap".parse::<PartType>().unwrap(), PartType::Swap);
        assert_eq!("8e".parse::<PartType>().unwrap(), PartType::Code(0x8e));
        assert_eq!("0x7".parse::<PartType>().unwrap(), PartType::Code(7));
        let g = "0FC63DAF-8483-4772-8E79-3D69D8477DE4".parse::<PartType>().unwrap();
        assert_eq!(g.to_string(), "0fc63daf-8483-4772-8e79-3d69d8477de4");
        assert!("ntfsish".parse::<PartType>().is_err());
        assert!("123".parse::<PartType>().is_err());
        assert_eq!(parse_type_spec("2=swap").unwrap(), (2, PartType::Swap));
        assert!(parse_type_spec("swap").is_err());
        let mut s = Spec::new(TableKind::Mbr);
        s.types = vec![(2, PartType::Swap), (2, PartType::Lvm)];
        assert_eq!((s.type_of(1), s.type_of(2)), (PartType::Linux, PartType::Lvm));
    }
}
