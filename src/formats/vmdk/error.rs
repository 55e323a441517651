//! What can be wrong with a VMDK, one variant per defect, and the [`Kind`] of each.

use crate::error::{ErrorKind, Kind};
use crate::source::Location;

use super::descriptor::LineDefect;
use super::hosted::{FooterDefect, MAX_GTES};

/// What can be wrong with a VMDK's descriptor, headers, tables or grains.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The file opened directly.
    #[error("a {len}-byte file is too large to be a VMDK descriptor")]
    DescriptorTooLarge { len: u64 },
    #[error(
        "a vmfsSparse (COWD) delta extent has no parent or size information of its own: open the descriptor that names it{}",
        beside(.descriptor)
    )]
    BareCowd { descriptor: Option<String> },
    #[error(
        "a SESparse extent has no parent or size information of its own: open the descriptor that names it{}",
        beside(.descriptor)
    )]
    BareSeSparse { descriptor: Option<String> },
    #[error(
        "a sparse extent without an embedded descriptor is one piece of a split disk: open the descriptor that names it{}",
        beside(.descriptor)
    )]
    BareSparsePiece { descriptor: Option<String> },
    #[error("embedded descriptor at {at:#x} ({len} bytes), past the end of the file ({file_len:#x})")]
    EmbeddedDescriptorPastEnd { at: u64, len: u64, file_len: u64 },

    // The descriptor.
    #[error("descriptor: no createType line")]
    NoCreateType,
    #[error("createType \"{create_type}\" {why}")]
    CreateTypeRefused { create_type: String, why: &'static str },
    #[error("unknown createType \"{0}\"")]
    UnknownCreateType(String),
    #[error("descriptor: no extents")]
    NoExtents,
    #[error("descriptor: {key} '{value}' is not a 32-bit hexadecimal number")]
    BadCid { key: &'static str, value: String },
    #[error("descriptor: bad extent line '{line}': {defect}")]
    BadExtentLine { line: String, defect: LineDefect },
    #[error(
        "extent type {0} is a raw device mapping (RDM): the data lives on a LUN, not in a file; read the LUN itself"
    )]
    RawDeviceExtent(String),
    #[error("unknown extent type '{kind}' in line '{line}'")]
    UnknownExtentType { kind: String, line: String },
    #[error("descriptor: has a parentFileNameHint but no parentCID to check the parent with")]
    HintWithoutParentCid,
    #[error("descriptor: names a parent (parentCID={parent_cid:08x}) but has no parentFileNameHint saying where it is")]
    ParentWithoutHint { parent_cid: u32 },

    // The extents a descriptor names.
    #[error("{count} extents (at most {max} are supported: 64 TiB in 2 GiB pieces)")]
    TooManyExtents { count: usize, max: usize },
    #[error("extent {index} ({line}) is NOACCESS: its data may not be read")]
    NoAccessExtent { index: usize, line: String },
    #[error("the extents add up to more than the 64 TiB limit")]
    ExtentsTooLarge,
    #[error(
        "extent {index} file '{file}' is outside the descriptor's directory and every --parent-dir: refused to follow it (--trust-locators allows it); not found by name either (looked for {})",
        looked_for(.looked)
    )]
    ExtentRefused { index: usize, file: String, looked: Vec<Location> },
    #[error("extent {index} file '{file}' not found (looked for {})", looked_for(.looked))]
    ExtentNotFound { index: usize, file: String, looked: Vec<Location> },
    #[error(
        "flat extent holds {file_len} bytes but {descriptor} declares {sectors} sectors from sector {start_sector} ({need} bytes): truncated or wrong file"
    )]
    FlatExtentShort { file_len: u64, descriptor: String, sectors: u64, start_sector: u64, need: u64 },
    #[error("sparse extent holds {capacity} sectors but {descriptor} declares {sectors}")]
    SparseExtentShort { capacity: u64, descriptor: String, sectors: u64 },
    #[error("{what} has bad magic {found:02x?}")]
    BadMagic { what: &'static str, found: Vec<u8> },
    #[error("this sparse extent is itself a descriptor of other extents (nested descriptors are not supported)")]
    NestedDescriptor,

    // Hosted sparse (`KDMV`) headers and the stream-optimized footer.
    #[error("hosted sparse extent version {0} is not supported (1, 2 and 3 are)")]
    HostedVersion(u32),
    #[error(
        "newline-detection bytes are {found:02x?} instead of 0a 20 0d 0a: the file was altered by a text-mode transfer"
    )]
    NewlineDetection { found: [u8; 4] },
    #[error("grain size {0} sectors is impossible (must be a power of two from 1 sector to 1 MiB)")]
    GrainSize(u64),
    #[error("{0} grain table entries per grain table (must be 1 to {max}; VMware writes 512)", max = MAX_GTES)]
    GtesPerTable(u32),
    #[error("compression algorithm {0} (only deflate is defined)")]
    CompressAlgorithm(u16),
    #[error("compressed grains without grain markers")]
    CompressedWithoutMarkers,
    #[error("capacity of {0} sectors exceeds the 64 TiB limit")]
    CapacityTooLarge(u64),
    #[error("stream-optimized file too short to hold its footer")]
    FooterTooShort { file_len: u64 },
    #[error("stream-optimized footer at the end of the file is invalid: {0}")]
    BadFooter(FooterDefect),
    /// The footer's copy of the header does not parse.
    #[error("stream-optimized footer at the end of the file is invalid")]
    FooterHeader(#[source] Box<Error>),

    // ESX sparse (`COWD`) headers.
    #[error("COWD version {0} is not supported (ESX redo logs are version 1; version 3 is VMware Workstation 3)")]
    CowdVersion(u32),
    #[error("COWD header says the disk has 0 sectors")]
    CowdNoSectors,
    #[error(
        "COWD grain directory has {entries} entries but {sectors} sectors with {grain}-sector grains need {needed}"
    )]
    CowdDirectoryShort { entries: u64, sectors: u64, grain: u64, needed: u64 },
    #[error("COWD grain directory at sector {0} overlaps the header")]
    CowdDirectoryInHeader(u64),

    // SESparse headers.
    #[error("SESparse version {} is not supported (only 2.1 is)", sesparse_version(.0))]
    SeSparseVersion(u64),
    #[error("SESparse grain of {0} sectors (only 8 is known)")]
    SeSparseGrain(u64),
    #[error("SESparse grain table of {0} sectors (only 64 is known)")]
    SeSparseTableSize(u64),
    #[error("SESparse flags {0:#x} (only 0 is known)")]
    SeSparseFlags(u64),
    #[error("SESparse const header has non-zero reserved fields or padding")]
    SeSparseReserved,
    #[error("SESparse const header has a zero capacity or region offset")]
    SeSparseZeroField,
    #[error("SESparse grain directory holds {entries} entries but {sectors} sectors need {needed}")]
    SeSparseDirectoryShort { entries: u64, sectors: u64, needed: u64 },
    #[error("SESparse const header {field} of {sectors} sectors is past any file")]
    SeSparseFieldTooLarge { field: &'static str, sectors: u64 },
    #[error("SESparse volatile header at {at:#x}, past the end of the file ({file_len:#x})")]
    VolatileHeaderPastEnd { at: u64, file_len: u64 },
    #[error(
        "SESparse journal needs replaying (the snapshot was not closed cleanly; power the VM on and off in ESXi, or consolidate)"
    )]
    SeSparseJournal,
    #[error("SESparse volatile header has non-zero padding")]
    SeSparseVolatilePadding,

    // The grain directory and grain tables.
    #[error("grain directory at {at:#x} ({entries} entries, {bytes} bytes), past the end of the file ({file_len:#x})")]
    DirectoryPastEnd { at: u64, entries: u64, bytes: u64, file_len: u64 },
    #[error("grain directory entry {table} is invalid ({value:#018x})")]
    BadDirectoryEntry { table: u64, value: u64 },
    #[error("grain directory entry {table} names grain table {slot}, but the table region holds {slots}")]
    TableSlotOutOfRegion { table: u64, slot: u64, slots: u64 },
    #[error("grain directory entry {table} puts its grain table at {at:#x}, past the end of the file ({file_len:#x})")]
    TablePastEnd { table: u64, at: u64, file_len: u64 },
    #[error(
        "grain table {table} entry {entry} puts grain {grain} at {at:#x}, past the end of the file ({file_len:#x})"
    )]
    GrainPastEnd { table: u64, entry: u64, grain: u64, at: u64, file_len: u64 },
    #[error("grain table {table} entry {entry} is 1 (a zeroed grain) but the header does not enable zeroed grains")]
    ZeroGrainNotEnabled { table: u64, entry: u64 },
    #[error("grain table {table} entry {entry} points into the header (sector {sector})")]
    GrainInHeader { table: u64, entry: u64, sector: u64 },
    #[error("grain table {table} entry {entry} names cluster {cluster}, outside the grain region")]
    ClusterOutOfRegion { table: u64, entry: u64, cluster: u64 },
    #[error("grain table {table} entry {entry} has an unknown type ({value:#018x})")]
    UnknownEntryType { table: u64, entry: u64, value: u64 },

    // Compressed grains, found bad when read.
    #[error("compressed grain {grain} at {at:#x} is unreadable: {defect}")]
    CompressedGrain { grain: u64, at: u64, defect: GrainDefect },
    #[error("compressed grain {grain} at {at:#x} is unreadable: inflate failed")]
    InflateFailed {
        grain: u64,
        at: u64,
        #[source]
        source: flate2::DecompressError,
    },
}

/// What is wrong with a compressed grain and its marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrainDefect {
    #[error("its marker names sector {found} instead of {expected}")]
    WrongLba { found: u64, expected: u64 },
    #[error("its marker gives an impossible compressed size of {0} bytes")]
    ImpossibleSize(u32),
    #[error("its {0} compressed bytes run past the end of the file")]
    PastEnd(u32),
    #[error("it inflates to more than {0} bytes")]
    TooLong(u64),
    #[error("the deflate stream is truncated")]
    Truncated,
    #[error("it inflates to {got} bytes instead of {expected}")]
    TooShort { got: usize, expected: usize },
}

impl ErrorKind for Error {
    fn kind(&self) -> Kind {
        use Error::*;
        match self {
            ExtentRefused { .. } => Kind::Denied,
            ExtentNotFound { .. } => Kind::NotFound,
            BareCowd { .. }
            | BareSeSparse { .. }
            | BareSparsePiece { .. }
            | CreateTypeRefused { .. }
            | UnknownCreateType(_)
            | RawDeviceExtent(_)
            | UnknownExtentType { .. }
            | TooManyExtents { .. }
            | NoAccessExtent { .. }
            | NestedDescriptor
            | HostedVersion(_)
            | CompressAlgorithm(_)
            | CompressedWithoutMarkers
            | CowdVersion(_)
            | SeSparseVersion(_)
            | SeSparseGrain(_)
            | SeSparseTableSize(_)
            | SeSparseFlags(_)
            | SeSparseReserved
            | SeSparseJournal
            | SeSparseVolatilePadding => Kind::Unsupported,
            DescriptorTooLarge { .. }
            | EmbeddedDescriptorPastEnd { .. }
            | NoCreateType
            | NoExtents
            | BadCid { .. }
            | BadExtentLine { .. }
            | HintWithoutParentCid
            | ParentWithoutHint { .. }
            | ExtentsTooLarge
            | FlatExtentShort { .. }
            | SparseExtentShort { .. }
            | BadMagic { .. }
            | NewlineDetection { .. }
            | GrainSize(_)
            | GtesPerTable(_)
            | CapacityTooLarge(_)
            | FooterTooShort { .. }
            | BadFooter(_)
            // A footer whose header copy does not parse is a damaged footer, whatever the copy says.
            | FooterHeader(_)
            | CowdNoSectors
            | CowdDirectoryShort { .. }
            | CowdDirectoryInHeader(_)
            | SeSparseZeroField
            | SeSparseDirectoryShort { .. }
            | SeSparseFieldTooLarge { .. }
            | VolatileHeaderPastEnd { .. }
            | DirectoryPastEnd { .. }
            | BadDirectoryEntry { .. }
            | TableSlotOutOfRegion { .. }
            | TablePastEnd { .. }
            | GrainPastEnd { .. }
            | ZeroGrainNotEnabled { .. }
            | GrainInHeader { .. }
            | ClusterOutOfRegion { .. }
            | UnknownEntryType { .. }
            | CompressedGrain { .. }
            | InflateFailed { .. } => Kind::Corrupt,
        }
    }
}

/// " (NAME here)" when the descriptor of a bare extent was found beside it.
fn beside(descriptor: &Option<String>) -> String {
    descriptor.as_ref().map(|d| format!(" ({d} here)")).unwrap_or_default()
}

fn looked_for(looked: &[Location]) -> String {
    if looked.is_empty() {
        return "nowhere".to_string();
    }
    looked.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ")
}

/// A SESparse version the way VMware's tools print it (major.minor).
fn sesparse_version(v: &u64) -> String {
    format!("{}.{} ({v:#018x})", v >> 32, v & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_their_own_kinds_and_keep_their_text() {
        let e = crate::Error::from(Error::ExtentRefused { index: 0, file: "/etc/shadow".into(), looked: vec![] });
        assert_eq!(e.kind(), Kind::Denied);
        assert!(e.to_string().ends_with("(looked for nowhere)"), "{e}");
        let e = crate::Error::from(Error::ExtentNotFound {
            index: 2,
            file: "a-flat.vmdk".into(),
            looked: vec![Location::local("/d/a-flat.vmdk"), Location::local("/p/a-flat.vmdk")],
        });
        assert_eq!(e.kind(), Kind::NotFound);
        assert_eq!(e.to_string(), "extent 2 file 'a-flat.vmdk' not found (looked for /d/a-flat.vmdk, /p/a-flat.vmdk)");
        let e = crate::Error::from(Error::BareCowd { descriptor: Some("vm-000001.vmdk".into()) });
        assert_eq!(e.kind(), Kind::Unsupported);
        assert!(e.to_string().ends_with("open the descriptor that names it (vm-000001.vmdk here)"), "{e}");
        let e = crate::Error::from(Error::FooterHeader(Box::new(Error::HostedVersion(4))));
        assert_eq!(e.kind(), Kind::Corrupt);
        assert_eq!(
            e.to_string(),
            "stream-optimized footer at the end of the file is invalid: hosted sparse extent version 4 is not supported (1, 2 and 3 are)"
        );
    }
}
