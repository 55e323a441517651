//! `--compose` and its options, shared by every command that opens IMAGEs.

use clap::{Args, ValueEnum};

use vdiskfs::Result;
use vdiskfs::compose::{self, PartType, Spec, TableKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableArg {
    Mbr,
    Gpt,
}

/// How the IMAGEs become one partitioned disk.
#[derive(Debug, Args, Clone)]
pub struct ComposeArgs {
    /// Show the IMAGEs as ONE disk: a partition table of this kind, then each IMAGE as a
    /// partition, in order. An IMAGE is a raw volume (raw:/dev/vg/lv) or any chain vdiskfs reads.
    #[arg(long, value_name = "TABLE", value_enum)]
    pub compose: Option<TableArg>,
    /// The composed disk's file name: <NAME>.raw [default: disk].
    #[arg(long, value_name = "NAME", requires = "compose")]
    pub name: Option<String>,
    /// Where the first partition starts (bytes, or 16KiB, 1MiB…): 16KiB is OnApp's DOS-compatible
    /// layout [default: 1MiB].
    #[arg(long, value_name = "BYTES", requires = "compose", value_parser = size)]
    pub part_offset: Option<u64>,
    /// Later partitions start at a multiple of this [default: 1MiB].
    #[arg(long, value_name = "BYTES", requires = "compose", value_parser = size)]
    pub part_align: Option<u64>,
    /// Type of partition N (1 = the first IMAGE): linux, swap, efi, lvm, bios (GPT), an MBR type
    /// in hex, or a GPT type GUID [default: linux]. Repeatable.
    #[arg(long, value_name = "N=TYPE", requires = "compose", value_parser = part_type)]
    pub part_type: Vec<(usize, PartType)>,
    /// Mark partition N bootable (MBR active flag; GPT legacy BIOS bootable). Repeatable.
    #[arg(long, value_name = "N", requires = "compose")]
    pub bootable: Vec<usize>,
}

fn size(s: &str) -> std::result::Result<u64, String> {
    compose::parse_size(s).map_err(|e| e.to_string())
}

fn part_type(s: &str) -> std::result::Result<(usize, PartType), String> {
    compose::parse_type_spec(s).map_err(|e| e.to_string())
}

impl ComposeArgs {
    /// The composition asked for, if any (checked against the parts when they are opened).
    pub fn spec(&self) -> Result<Option<Spec>> {
        let Some(t) = self.compose else { return Ok(None) };
        let mut spec = Spec::new(match t {
            TableArg::Mbr => TableKind::Mbr,
            TableArg::Gpt => TableKind::Gpt,
        });
        if let Some(n) = &self.name {
            if n.is_empty() || n.contains('/') || n == "." || n == ".." {
                return Err(vdiskfs::Error::usage(format!("--name {n:?}: not a file name")));
            }
            spec.name = n.clone();
        }
        spec.part_offset = self.part_offset.unwrap_or(spec.part_offset);
        spec.part_align = self.part_align.unwrap_or(spec.part_align);
        spec.types = self.part_type.clone();
        spec.bootable = self.bootable.clone();
        Ok(Some(spec))
    }
}
