//! One image in a chain: what it maps each virtual range to, and how to reach its parent.

use std::fmt;

use serde::Serialize;

use crate::error::Result;
use std::sync::Arc;

use crate::source::{Location, Source};

/// What a range of a layer's virtual disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Bytes stored in this layer: `source` is the layer's own source index (VMDK extents,
    /// XVA members), `offset` the position there. Read with [`Layer::read`].
    Data { source: usize, offset: u64 },
    /// Zeros at this depth: do not ask the parent (VHDX ZERO/UNMAPPED, VMDK zero grains,
    /// an unallocated block in a disk without parent).
    Zero,
    /// Not allocated here: the parent decides.
    Parent,
}

/// `len` bytes (at least 1) of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub len: u64,
    pub kind: SpanKind,
}

impl Span {
    pub fn data(len: u64, source: usize, offset: u64) -> Self {
        Span { len, kind: SpanKind::Data { source, offset } }
    }
    pub fn zero(len: u64) -> Self {
        Span { len, kind: SpanKind::Zero }
    }
    pub fn parent(len: u64) -> Self {
        Span { len, kind: SpanKind::Parent }
    }
}

/// How a layer can be named by a child. Comparison is exact and typed, so a VHD's parent UUID
/// can never match a VMDK CID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// VHD footer unique id.
    VhdUuid([u8; 16]),
    /// VHDX DataWriteGuid.
    VhdxDataWrite([u8; 16]),
    /// VMDK content id.
    VmdkCid(u32),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::VhdUuid(u) => write!(f, "{}", fmt_uuid(u)),
            Identity::VhdxDataWrite(g) => write!(f, "{}", fmt_guid_le(g)),
            Identity::VmdkCid(c) => write!(f, "{c:08x}"),
        }
    }
}

/// A UUID stored in big-endian (RFC 4122) byte order.
pub fn fmt_uuid(u: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]
    )
}

/// A Microsoft GUID: the first three fields little-endian.
pub fn fmt_guid_le(g: &[u8; 16]) -> String {
    let mut u = *g;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    fmt_uuid(&u)
}

/// One way a child names its parent, as stored in the child (decoded to text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hint {
    /// Where it came from, e.g. `W2ku`, `MacX`, `relative_path`, `parentFileNameHint`.
    pub kind: String,
    /// The path as stored (Windows separators and drive letters kept).
    pub path: String,
}

/// A parsed but not yet opened parent link.
#[derive(Debug, Clone)]
pub struct ParentRef {
    /// Path hints in the order they should be tried.
    pub hints: Vec<Hint>,
    /// The parent must carry one of these identities.
    pub expect: Vec<Identity>,
}

/// What `vdiskfs info` shows about one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub path: String,
    pub format: &'static str,
    pub subformat: String,
    pub virtual_size: u64,
    pub block_size: u64,
    pub identity: String,
    pub parent: Option<ParentInfo>,
    /// Bytes this layer stores data for (allocated blocks times block size).
    pub allocated_bytes: u64,
    /// Format-specific facts, in display order.
    pub details: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParentInfo {
    pub expected_identity: String,
    pub hints: Vec<Hint>,
    /// Filled in by the chain once the parent is found.
    pub resolved: Option<String>,
    /// Set when the parent was not where the child names it (found by file name instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found_by: Option<String>,
}

impl ParentInfo {
    /// What a layer says of its parent link before the chain resolves it.
    pub fn from_ref(p: &ParentRef) -> Self {
        ParentInfo {
            expected_identity: p.expect.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" or "),
            hints: p.hints.clone(),
            resolved: None,
            found_by: None,
        }
    }
}

/// One image. Immutable after open; `map` does no data I/O (only table I/O, cached).
pub trait Layer: Send + Sync + fmt::Debug {
    /// The main file of this layer (parents and extents resolve relative to it).
    fn location(&self) -> &Location;
    /// Every source this layer reads (the main file first; VMDK extents follow). Nothing any
    /// of them names may ever be written (an export target, an overlay).
    fn sources(&self) -> Vec<Arc<dyn Source>>;
    /// Size of the virtual disk, as the format stores it.
    fn virtual_size(&self) -> u64;
    /// What `[offset, offset + n)` holds for the largest `1 <= n <= max_len` of one kind.
    /// `offset < virtual_size()` and `max_len >= 1` are guaranteed by the caller.
    fn map(&self, offset: u64, max_len: u64) -> Result<Span>;
    /// Reads data that `map` returned as `Data { source, offset }`.
    fn read(&self, source: usize, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// The parent link, if this is a differencing image.
    fn parent(&self) -> Option<&ParentRef>;
    /// The identities a child may use to name this layer.
    fn identity(&self) -> Vec<Identity>;
    /// What `info` shows.
    fn describe(&self) -> Result<LayerInfo>;
    /// True when `Data` spans of `source` are stored compressed (`map` reports it; the offset is
    /// then the layer's own addressing, not a byte offset in a file).
    fn compressed(&self, _source: usize) -> bool {
        false
    }
    /// What `map` names as the place of `Data { source, .. }`: the layer's file, unless the
    /// layer reads several (a composed disk's table and parts).
    fn source_name(&self, _source: usize) -> String {
        self.location().to_string()
    }
}
