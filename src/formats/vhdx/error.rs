//! What can be wrong with a VHDX, one variant per defect, and the [`Kind`] of each.

use std::fmt;

use super::bat::state_name;
use super::header::{Guid, HEADER_OFFSETS, HEADER_SECTION, REGION_OFFSETS};
use super::log_entries::{Consequence, EntryDefect, MAX_LOG, NoSequence};
use super::metadata::{ItemName, ItemProblem};
use crate::error::{ErrorKind, Kind};
use crate::layer::fmt_guid_le;

/// What can be wrong with a VHDX's structures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too small to be a VHDX ({len} bytes; the header section alone is 1 MiB)")]
    TooSmall { len: u64 },
    #[error("{what} has bad signature {found:02x?}")]
    Signature { what: &'static str, found: Vec<u8> },
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { what: &'static str, stored: u32, computed: u32 },
    #[error("{what}: {count} is more than the {max} allowed")]
    TooMany { what: &'static str, count: u64, max: u64 },
    #[error("unsupported {what} version {found} (vdiskfs reads version {supported})")]
    Version { what: &'static str, found: u16, supported: u16 },
    #[error("both headers are invalid: header 1 at {:#x}: {first}; header 2 at {:#x}", HEADER_OFFSETS[0], HEADER_OFFSETS[1])]
    BothHeaders {
        first: Box<Error>,
        #[source]
        second: Box<Error>,
    },
    #[error("{first} at {:#x}; the copy at {:#x} is also invalid", REGION_OFFSETS[0], REGION_OFFSETS[1])]
    BothRegionTables {
        first: Box<Error>,
        #[source]
        second: Box<Error>,
    },
    #[error("unknown required {what} {{{}}}", fmt_guid_le(.guid))]
    UnknownRequired { what: &'static str, guid: Guid },
    #[error("region table has no {0}")]
    MissingRegion(&'static str),
    #[error("{name} at {start:#x}..{end:#x} is outside the file's data area ({:#x}..{file_len:#x})", HEADER_SECTION)]
    RegionOutside { name: &'static str, start: u64, end: u64, file_len: u64 },
    #[error("{what} at {start:#x}..{end:#x} overlaps the {other} at {other_start:#x}..{other_end:#x}")]
    Overlap { what: Structure, start: u64, end: u64, other: &'static str, other_start: u64, other_end: u64 },
    #[error("{what} at {start:#x} lies in the header section (below 1 MiB)")]
    InHeaderSection { what: Structure, start: u64 },
    #[error("{what} at {start:#x}..{end:#x} is past the end of the file ({file_len:#x})")]
    PastEnd { what: Structure, start: u64, end: u64, file_len: u64 },

    #[error("metadata region at {offset:#x} is only {len} bytes")]
    MetadataTooSmall { offset: u64, len: u32 },
    /// A defect inside the metadata region at `offset`.
    #[error("metadata region at {offset:#x}")]
    Metadata {
        offset: u64,
        #[source]
        cause: Box<Error>,
    },
    #[error("metadata item {0} is missing")]
    MissingItem(ItemName),
    #[error("metadata item {item} {problem}")]
    Item { item: ItemName, problem: ItemProblem },
    #[error("impossible block size {0} (must be a power of two from 1 MiB to 256 MiB)")]
    BlockSize(u32),
    #[error("unsupported logical sector size {0} (must be 512 or 4096)")]
    LogicalSectorSize(u32),
    #[error("unsupported physical sector size {0} (must be 512 or 4096)")]
    PhysicalSectorSize(u32),
    #[error("virtual disk size {0} exceeds the VHDX maximum of 64 TiB")]
    VirtualSize(u64),
    #[error(
        "unsupported parent locator type {{{}}} (only the VHDX locator b04aefb7-d19e-4a81-b789-25b8e9445913)",
        fmt_guid_le(.0)
    )]
    LocatorType(Guid),
    #[error("parent locator has no valid parent_linkage ({})", linkage_text(.found))]
    NoParentLinkage { found: Option<String> },

    #[error(
        "BAT region at {offset:#x} holds {entries} entries but a disk of {size} bytes with {block_size}-byte blocks needs {needed}"
    )]
    BatTooSmall { offset: u64, entries: u32, size: u64, block_size: u32, needed: u64 },
    #[error("{0} is not allowed in a disk without parent")]
    PartialWithoutParent(Structure),
    #[error("BAT entry {index} (block {block}) has reserved state {state}")]
    ReservedBlockState { index: u64, block: u64, state: u8 },
    #[error("BAT entry {index} (sector bitmap of chunk {chunk}) has reserved state {state}")]
    ReservedBitmapState { index: u64, chunk: u64, state: u8 },
    /// Found at open, by the validation pass.
    #[error(
        "block {block} is PARTIALLY_PRESENT but the sector bitmap of its chunk {chunk} (BAT entry {index}) is not present"
    )]
    ChunkBitmapMissing { block: u64, chunk: u64, index: u64 },
    /// Found while reading: the BAT changed since it was validated.
    #[error("block {block} is PARTIALLY_PRESENT but the sector bitmap of chunk {chunk} is not present")]
    SectorBitmapNotPresent { block: u64, chunk: u64 },
    #[error("BAT entry for block {block} has state {state} ({}), not valid here", state_name(*.state))]
    StateNotValidHere { block: u64, state: u8 },

    #[error("log at {offset:#x} (+{len:#x}) is not a 1 MiB-aligned area after the header section")]
    LogPlacement { offset: u64, len: u64 },
    #[error("the log to replay is {} MiB; vdiskfs replays logs of at most {} MiB", .len >> 20, MAX_LOG >> 20)]
    LogTooLarge { len: u64 },
    #[error("log at {offset:#x}..{end:#x} is past the end of the file ({len:#x})")]
    LogPastEnd { offset: u64, end: u64, len: u64 },
    /// A defect inside the log at `offset`.
    #[error("log at {offset:#x}")]
    Log {
        offset: u64,
        #[source]
        cause: Box<Error>,
    },
    #[error("log entry at log offset {at:#x} (sequence {sequence}): {defect}; {consequence}")]
    LogEntry { at: u64, sequence: u64, defect: EntryDefect, consequence: Consequence },
    #[error("the header announces a log but it holds no valid sequence: {0}")]
    NoLogSequence(NoSequence),
    #[error("log says the file was at least {flushed:#x} bytes but it is {len:#x}: truncated")]
    LogTruncated { flushed: u64, len: u64 },
    /// The entries' headers claim more bytes to check than a log writer can leave behind.
    #[error(
        "log entries overlap: with the entry at log offset {at:#x} they claim more than {limit:#x} bytes to checksum, more than entries written around the log can hold"
    )]
    LogEntriesOverlap { at: u64, limit: u64 },
}

impl ErrorKind for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::TooSmall { .. }
            | Error::Signature { .. }
            | Error::Checksum { .. }
            | Error::TooMany { .. }
            | Error::BothHeaders { .. }
            | Error::BothRegionTables { .. }
            | Error::MissingRegion(_)
            | Error::RegionOutside { .. }
            | Error::Overlap { .. }
            | Error::InHeaderSection { .. }
            | Error::PastEnd { .. }
            | Error::MetadataTooSmall { .. }
            | Error::MissingItem(_)
            | Error::Item { .. }
            | Error::BlockSize(_)
            | Error::VirtualSize(_)
            | Error::NoParentLinkage { .. }
            | Error::BatTooSmall { .. }
            | Error::PartialWithoutParent(_)
            | Error::ReservedBlockState { .. }
            | Error::ReservedBitmapState { .. }
            | Error::ChunkBitmapMissing { .. }
            | Error::SectorBitmapNotPresent { .. }
            | Error::StateNotValidHere { .. }
            | Error::LogPlacement { .. }
            | Error::LogPastEnd { .. }
            | Error::LogEntry { .. }
            | Error::NoLogSequence(_)
            | Error::LogTruncated { .. }
            | Error::LogEntriesOverlap { .. } => Kind::Corrupt,
            Error::Version { .. }
            | Error::UnknownRequired { .. }
            | Error::LogicalSectorSize(_)
            | Error::PhysicalSectorSize(_)
            | Error::LocatorType(_)
            | Error::LogTooLarge { .. } => Kind::Unsupported,
            Error::Metadata { cause, .. } | Error::Log { cause, .. } => cause.kind(),
        }
    }
}

/// A structure of the file, named for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    /// A region: "metadata region", "BAT region", "log".
    Region(&'static str),
    /// A payload block's BAT entry: "BAT entry 4 (block 4, FULLY_PRESENT)".
    Block { index: u64, block: u64, state: u8 },
    /// A sector bitmap block's BAT entry: "BAT entry 16 (sector bitmap of chunk 0)".
    SectorBitmap { index: u64, chunk: u64 },
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Structure::Region(name) => f.write_str(name),
            Structure::Block { index, block, state } => {
                write!(f, "BAT entry {index} (block {block}, {})", state_name(state))
            }
            Structure::SectorBitmap { index, chunk } => write!(f, "BAT entry {index} (sector bitmap of chunk {chunk})"),
        }
    }
}

fn linkage_text(found: &Option<String>) -> String {
    found.as_ref().map_or("missing".to_string(), |v| format!("'{v}'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error as CrateError;

    #[test]
    fn located_errors_keep_their_cause_and_its_kind() {
        let cause = Box::new(Error::LogicalSectorSize(1024));
        let e = CrateError::from(Error::Metadata { offset: 0x20_0000, cause }).in_file("d.vhdx");
        assert_eq!(
            e.to_string(),
            "d.vhdx: metadata region at 0x200000: unsupported logical sector size 1024 (must be 512 or 4096)"
        );
        assert_eq!(e.kind(), Kind::Unsupported);
        let e = CrateError::from(Error::BothRegionTables {
            first: Box::new(Error::Checksum { what: "region table", stored: 1, computed: 2 }),
            second: Box::new(Error::Signature { what: "region table", found: b"xxxx".to_vec() }),
        });
        assert_eq!(
            e.to_string(),
            "region table checksum mismatch (stored 0x00000001, computed 0x00000002) at 0x30000; the copy at 0x40000 is also invalid: region table has bad signature [78, 78, 78, 78]"
        );
        assert_eq!(e.kind(), Kind::Corrupt);
        let what = Structure::Block { index: 4, block: 4, state: 6 };
        let e = Error::PastEnd { what, start: 0x50_0000, end: 0x60_0000, file_len: 0x50_0000 };
        assert_eq!(
            e.to_string(),
            "BAT entry 4 (block 4, FULLY_PRESENT) at 0x500000..0x600000 is past the end of the file (0x500000)"
        );
    }
}
