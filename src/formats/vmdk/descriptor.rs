//! The text descriptor (Virtual Disk Format 5.0, "The Descriptor File"): a standalone file or the
//! text embedded in a hosted sparse extent at `descriptorOffset`.
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=fffffffe                      content id of this link (hex)
//! parentCID=ffffffff                CID the parent must carry; ffffffff = no parent
//! createType="vmfs"
//! parentFileNameHint="base.vmdk"    only in a child
//! RW 41943040 VMFS "base-flat.vmdk" extent lines: ACCESS SECTORS TYPE ["FILE" [OFFSET]]
//! ddb.adapterType = "lsilogic"      disk database, shown by `info`
//! ```
//!
//! Parsing is pure and lenient about layout (blank lines, comments, `key = "value"` or
//! `key=value`, CRLF), strict about the values that decide which bytes are read (CIDs, sector
//! counts, offsets, extent types).

use super::Error;

/// `parentCID` value meaning "no parent".
pub const NO_PARENT: u32 = 0xffff_ffff;
/// Descriptors larger than this are not descriptors.
pub const MAX_DESCRIPTOR: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // VMware's own words: RW, RDONLY, NOACCESS
pub enum Access {
    Rw,
    RdOnly,
    NoAccess,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Rw => "RW",
            Access::RdOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// The type word of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Raw data in a file at an offset (hosted products).
    Flat,
    /// Raw data in a file on VMFS (ESXi `-flat.vmdk`).
    Vmfs,
    /// Hosted sparse (`KDMV`), stream-optimized included.
    Sparse,
    /// ESX vmfsSparse redo log (`COWD`).
    VmfsSparse,
    /// ESXi 6.5+ space-efficient sparse.
    SeSparse,
    /// No file: reads as zeros.
    Zero,
}

impl ExtentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Vmfs => "VMFS",
            ExtentType::Sparse => "SPARSE",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::Zero => "ZERO",
        }
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: ExtentType,
    /// The file name as written (absent for ZERO).
    pub file: Option<String>,
    /// Start of the data in the file, in sectors (flat extents).
    pub offset: u64,
}

impl ExtentLine {
    /// The line as VMware writes it, for messages and `info`.
    pub fn display(&self) -> String {
        let mut s = format!("{} {} {}", self.access.as_str(), self.sectors, self.kind.as_str());
        if let Some(f) = &self.file {
            s.push_str(&format!(" \"{f}\""));
        }
        if matches!(self.kind, ExtentType::Flat) || self.offset != 0 {
            s.push_str(&format!(" {}", self.offset));
        }
        s
    }
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub version: Option<String>,
    pub encoding: Option<String>,
    pub cid: Option<u32>,
    /// `None` when the line is absent.
    pub parent_cid: Option<u32>,
    pub create_type: Option<String>,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
    /// Other `key = value` lines (the disk database), in file order.
    pub other: Vec<(String, String)>,
}

impl Descriptor {
    /// The parent's expected CID, if this descriptor names a parent.
    pub fn parent(&self) -> Option<u32> {
        self.parent_cid.filter(|&c| c != NO_PARENT)
    }

    /// A value from the disk database (`ddb.*`) or another unparsed key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.other.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Decodes descriptor bytes: UTF-8 when valid, else Latin-1 (older hosted products wrote the
/// system code page; Latin-1 keeps every byte and is right for ASCII file names).
pub fn decode_text(b: &[u8]) -> String {
    let b = match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    };
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => b.iter().map(|&c| c as char).collect(),
    }
}

/// True when `text` looks like a descriptor (what `detect` accepts, plus embedded texts).
pub fn looks_like_descriptor(text: &str) -> bool {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).any(|l| {
        l.starts_with("# Disk DescriptorFile")
            || l.starts_with("# Disk Descriptor File")
            || l.starts_with("createType")
            || l.starts_with("CID")
    })
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

fn parse_cid(key: &'static str, v: &str) -> Result<u32, Error> {
    let t = v.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    u32::from_str_radix(t, 16).map_err(|_| Error::BadCid { key, value: v.to_string() })
}

/// What is wrong with an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineDefect {
    #[error("unterminated file name")]
    UnterminatedName,
    #[error("the file name must be in double quotes")]
    UnquotedName,
    #[error("expected ACCESS SECTORS TYPE")]
    NotThreeWords,
    #[error("unknown access mode")]
    UnknownAccess,
    #[error("sector count is not a number")]
    SectorsNotANumber,
    #[error("sector count is 0")]
    NoSectors,
    #[error("offset is not a number")]
    OffsetNotANumber,
    #[error("unexpected words after the offset")]
    WordsAfterOffset,
    #[error("no file name")]
    NoFileName,
    #[error("empty file name")]
    EmptyFileName,
    #[error("only FLAT and VMFS extents take an offset")]
    OffsetNotAllowed,
}

/// Parses an extent line (the caller knows it starts with an access word).
fn parse_extent(line: &str) -> Result<ExtentLine, Error> {
    let bad = |defect| Error::BadExtentLine { line: line.to_string(), defect };
    let (head, quoted, tail) = match line.find('"') {
        Some(q) => {
            let rest = &line[q + 1..];
            let end = rest.find('"').ok_or_else(|| bad(LineDefect::UnterminatedName))?;
            (&line[..q], Some(&rest[..end]), &rest[end + 1..])
        }
        None => (line, None, ""),
    };
    let words: Vec<&str> = head.split_whitespace().collect();
    if words.len() > 3 && quoted.is_none() {
        return Err(bad(LineDefect::UnquotedName));
    }
    if words.len() != 3 {
        return Err(bad(LineDefect::NotThreeWords));
    }
    let access = match words[0] {
        "RW" => Access::Rw,
        "RDONLY" => Access::RdOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Err(bad(LineDefect::UnknownAccess)),
    };
    let sectors: u64 = words[1].parse().map_err(|_| bad(LineDefect::SectorsNotANumber))?;
    if sectors == 0 {
        return Err(bad(LineDefect::NoSectors));
    }
    let kind = match words[2] {
        "FLAT" => ExtentType::Flat,
        "VMFS" => ExtentType::Vmfs,
        "SPARSE" => ExtentType::Sparse,
        "VMFSSPARSE" => ExtentType::VmfsSparse,
        "SESPARSE" => ExtentType::SeSparse,
        "ZERO" => ExtentType::Zero,
        t @ ("VMFSRAW" | "VMFSRDM" | "VMFSRDMP" | "VMFSPASSTHROUGHRAW") => {
            return Err(Error::RawDeviceExtent(t.to_string()));
        }
        t => return Err(Error::UnknownExtentType { kind: t.to_string(), line: line.to_string() }),
    };
    let tail_words: Vec<&str> = tail.split_whitespace().collect();
    let offset = match tail_words.as_slice() {
        [] => 0,
        [o] => o.parse().map_err(|_| bad(LineDefect::OffsetNotANumber))?,
        _ => return Err(bad(LineDefect::WordsAfterOffset)),
    };
    match (kind, quoted) {
        (ExtentType::Zero, _) => {}
        (_, None) => return Err(bad(LineDefect::NoFileName)),
        (_, Some("")) => return Err(bad(LineDefect::EmptyFileName)),
        _ => {}
    }
    if offset != 0 && !matches!(kind, ExtentType::Flat | ExtentType::Vmfs) {
        return Err(bad(LineDefect::OffsetNotAllowed));
    }
    Ok(ExtentLine { access, sectors, kind, file: quoted.map(str::to_string), offset })
}

/// Parses descriptor text.
pub fn parse(text: &str) -> Result<Descriptor, Error> {
    let mut d = Descriptor::default();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") && !line.contains('=') {
            d.extents.push(parse_extent(line)?);
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue; // not a key: VMware ignores such lines too
        };
        let (k, v) = (k.trim(), unquote(v));
        match k {
            "version" => d.version = Some(v.to_string()),
            "encoding" => d.encoding = Some(v.to_string()),
            "CID" => d.cid = Some(parse_cid("CID", v)?),
            "parentCID" => d.parent_cid = Some(parse_cid("parentCID", v)?),
            "createType" => d.create_type = Some(v.to_string()),
            "parentFileNameHint" => d.parent_hint = Some(v.to_string()),
            _ => d.other.push((k.to_string(), v.to_string())),
        }
    }
    if d.parent_hint.is_some() && d.parent_cid.is_none() {
        return Err(Error::HintWithoutParentCid);
    }
    if d.parent().is_some() && d.parent_hint.as_deref().is_none_or(|h| h.trim().is_empty()) {
        return Err(Error::ParentWithoutHint { parent_cid: d.parent_cid.unwrap_or(0) });
    }
    Ok(d)
}

/// What a `createType` means for reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateType {
    /// A type vdiskfs reads (the extents say how).
    Known,
    /// Refused: the message says why.
    Refused(&'static str),
    Unknown,
}

/// Classifies a `createType` value.
pub fn classify_create_type(t: &str) -> CreateType {
    match t {
        "monolithicSparse"
        | "monolithicFlat"
        | "twoGbMaxExtentSparse"
        | "twoGbMaxExtentFlat"
        | "streamOptimized"
        | "vmfs"
        | "vmfsThin"
        | "vmfsPreallocated"
        | "vmfsEagerZeroedThick"
        | "vmfsSparse"
        | "seSparse" => CreateType::Known,
        "vmfsRaw" | "vmfsRawDeviceMap" | "vmfsPassthroughRawDeviceMap" => CreateType::Refused(
            "is a raw device mapping (RDM): the data lives on a LUN, not in a file; read the LUN itself",
        ),
        "fullDevice" | "partitionedDevice" => {
            CreateType::Refused("maps a physical disk of the host: read that device itself")
        }
        _ => CreateType::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ESXi 7 snapshot descriptor (SESparse child of a VMFS flat base).
    const ESXI_SNAPSHOT: &str = "# Disk DescriptorFile\r\n\
        version=1\r\n\
        encoding=\"UTF-8\"\r\n\
        CID=6e2c8a41\r\n\
        parentCID=fffffffe\r\n\
        isNativeSnapshot=\"no\"\r\n\
        createType=\"seSparse\"\r\n\
        parentFileNameHint=\"Windows-2019.vmdk\"\r\n\
        # Extent description\r\n\
        RW 41943040 SESPARSE \"Windows-2019-000001-sesparse.vmdk\"\r\n\
        \r\n\
        # The Disk Data Base \r\n\
        #DDB\r\n\
        \r\n\
        ddb.grain = \"8\"\r\n\
        ddb.longContentID = \"4b0c3f1e5d7a9c2b8e6f0a1d6e2c8a41\"\r\n";

    #[test]
    fn esxi_snapshot_descriptor_parses() {
        let d = parse(ESXI_SNAPSHOT).unwrap();
        assert_eq!(d.cid, Some(0x6e2c8a41));
        assert_eq!(d.parent(), Some(0xfffffffe));
        assert_eq!(d.create_type.as_deref(), Some("seSparse"));
        assert_eq!(d.parent_hint.as_deref(), Some("Windows-2019.vmdk"));
        assert_eq!(
            d.extents,
            [ExtentLine {
                access: Access::Rw,
                sectors: 41943040,
                kind: ExtentType::SeSparse,
                file: Some("Windows-2019-000001-sesparse.vmdk".into()),
                offset: 0
            }]
        );
        assert_eq!(d.get("ddb.grain"), Some("8"));
        assert_eq!(d.get("isNativeSnapshot"), Some("no"));
    }

    #[test]
    fn extent_lines_of_every_kind_parse() {
        let d = parse(
            "CID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\
             RW 4192256 FLAT \"my disk-f001.vmdk\" 0\n\
             RDONLY 2048 FLAT \"dev.img\" 128\n\
             NOACCESS 16 ZERO\n\
             RW 100 VMFS \"a-flat.vmdk\"\n\
             RW 100 VMFSSPARSE \"a-delta.vmdk\"\n",
        )
        .unwrap();
        assert_eq!(d.parent(), None);
        let k: Vec<_> = d.extents.iter().map(|e| (e.access, e.kind, e.file.as_deref(), e.offset)).collect();
        assert_eq!(
            k,
            [
                (Access::Rw, ExtentType::Flat, Some("my disk-f001.vmdk"), 0),
                (Access::RdOnly, ExtentType::Flat, Some("dev.img"), 128),
                (Access::NoAccess, ExtentType::Zero, None, 0),
                (Access::Rw, ExtentType::Vmfs, Some("a-flat.vmdk"), 0),
                (Access::Rw, ExtentType::VmfsSparse, Some("a-delta.vmdk"), 0),
            ]
        );
        assert_eq!(d.extents[1].display(), "RDONLY 2048 FLAT \"dev.img\" 128");
    }

    #[test]
    fn bad_values_are_refused_with_the_line() {
        let e = |t: &str| parse(t).unwrap_err().to_string();
        assert!(e("RW 0 FLAT \"a\" 0").contains("sector count is 0"));
        assert!(e("RW x FLAT \"a\" 0").contains("not a number"));
        assert!(e("RW 8 FLAT \"a").contains("unterminated"));
        assert!(e("RW 8 SPARSE").contains("no file name"));
        assert!(e("RW 8 VMFS x-flat.vmdk").contains("double quotes"));
        assert!(e("RW 8 SPARSE \"a\" 5").contains("only FLAT and VMFS"));
        assert!(e("RW 8 VMFSRDM \"a-rdm.vmdk\"").contains("raw device mapping"));
        assert!(e("RW 8 FOO \"a\"").contains("unknown extent type 'FOO'"));
        assert!(e("CID=zz").contains("CID 'zz'"));
        assert!(e("parentCID=12345678\nCID=1").contains("no parentFileNameHint"));
        assert!(e("parentFileNameHint=\"p.vmdk\"").contains("no parentCID"));
    }

    #[test]
    fn latin1_and_nul_terminated_text_decode() {
        assert_eq!(decode_text(b"CID=1\n\0\0garbage"), "CID=1\n");
        assert_eq!(decode_text(b"RW 1 FLAT \"d\xe9j\xe0.vmdk\" 0"), "RW 1 FLAT \"d\u{e9}j\u{e0}.vmdk\" 0");
    }

    #[test]
    fn create_types_are_classified() {
        assert_eq!(classify_create_type("vmfsThin"), CreateType::Known);
        assert!(matches!(classify_create_type("vmfsRawDeviceMap"), CreateType::Refused(_)));
        assert_eq!(classify_create_type("monolithicSparseX"), CreateType::Unknown);
    }
}
