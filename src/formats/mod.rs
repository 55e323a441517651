//! Image formats: detection by magic bytes and opening one layer.

pub mod bitset;
pub mod raw;
pub mod table;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;
pub mod xva;

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Kind, Result};
use crate::gate::Gate;
use crate::layer::Layer;
use crate::progress::Progress;
use crate::source::Source;

/// What a format may need besides its source: the gate for files the image names (VMDK
/// extents), XVA's settings, and where to report progress of long scans.
#[derive(Clone, Copy)]
pub struct FormatContext<'a> {
    pub gate: &'a Gate,
    pub xva: &'a xva::Options,
    pub progress: &'a dyn Progress,
}

/// What one source turned out to hold.
pub enum Opened {
    /// One layer of a chain (VHD, VHDX, VMDK); its parents are the chain's business.
    Layer(Arc<dyn Layer>),
    /// Whole disks, each a single layer without parent, named (XVA).
    Disks(Vec<(String, Arc<dyn Layer>)>),
}

/// What detection refuses.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Unrecognised(&'static str),
    #[error("an XVA export holds whole disks and cannot be the parent of another image")]
    XvaAsParent,
}

impl ErrorKind for FormatError {
    fn kind(&self) -> Kind {
        Kind::Unsupported
    }
}

/// What a file's magic bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Vhd,
    Vhdx,
    Vmdk,
    Xva,
}

/// Detects the format from the first and last sectors.
pub fn detect(src: &dyn Source) -> Result<Format> {
    let len = src.len()?;
    let n = len.min(512) as usize;
    let head = src.read_vec(0, n)?;
    let tail = if len >= 512 { src.read_vec(len - 512, 512)? } else { Vec::new() };
    if head.starts_with(b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"COWD") || head.starts_with(&0xcafebabe_u64.to_le_bytes()) {
        return Ok(Format::Vmdk);
    }
    if head.starts_with(b"# Disk DescriptorFile") || head.starts_with(b"# Disk Descriptor File") {
        return Ok(Format::Vmdk);
    }
    if vhd::detect(&head, &tail) {
        return Ok(Format::Vhd);
    }
    if head.starts_with(&[0x1f, 0x8b]) || xva::compressed::is_zstd(&head) || is_tar(&head) {
        return Ok(Format::Xva);
    }
    // An old pre-tar XVA's ova.xml: the XVA module says what it is and that it is not supported.
    if head.starts_with(b"<?xml") && head.windows(10).any(|w| w == b"<appliance") {
        return Ok(Format::Xva);
    }
    let ext = src.location().file_name().rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    let msg = match ext.as_str() {
        "vhd" | "avhd" => "no VHD footer in the last sector nor at offset 0 (truncated, or not a VHD)",
        "vhdx" | "avhdx" => "no VHDX file identifier at offset 0 (not a VHDX)",
        "vmdk" => "no VMDK magic or descriptor at offset 0 (not a VMDK)",
        "xva" => "neither a tar archive nor gzip/zstd-compressed (not an XVA)",
        _ => "not a recognised disk image (no VHD footer, VHDX, VMDK or XVA signature); a raw disk needs no vdiskfs",
    };
    Err(Error::from(FormatError::Unrecognised(msg)).in_file(src.location()))
}

fn is_tar(head: &[u8]) -> bool {
    head.len() >= 512 && (&head[257..262] == b"ustar" || tar_checksum_ok(head))
}

fn tar_checksum_ok(h: &[u8]) -> bool {
    let field = String::from_utf8_lossy(&h[148..156]);
    let Ok(stored) = u32::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8) else {
        return false;
    };
    let sum: u32 = h[..512].iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u32 }).sum();
    sum == stored && h[0] != 0
}

/// Opens what `src` holds.
pub fn open(src: Arc<dyn Source>, ctx: &FormatContext) -> Result<Opened> {
    let format = detect(src.as_ref())?;
    open_as(format, src, ctx)
}

fn open_as(format: Format, src: Arc<dyn Source>, ctx: &FormatContext) -> Result<Opened> {
    Ok(match format {
        Format::Vhd => Opened::Layer(Arc::new(vhd::VhdLayer::open(src)?)),
        Format::Vhdx => Opened::Layer(vhdx::open(src)?),
        Format::Vmdk => Opened::Layer(vmdk::open(src, ctx.gate)?),
        Format::Xva => Opened::Disks(xva::open_disks(src, ctx.xva, ctx.progress)?),
    })
}

/// Opens one layer of a chain (a parent): not an XVA, which holds whole disks, not layers.
pub fn open_layer(src: Arc<dyn Source>, ctx: &FormatContext) -> Result<Arc<dyn Layer>> {
    match detect(src.as_ref())? {
        Format::Xva => Err(Error::from(FormatError::XvaAsParent).in_file(src.location())),
        format => match open_as(format, src, ctx)? {
            Opened::Layer(l) => Ok(l),
            Opened::Disks(_) => Err(Error::internal("a layer format opened as disks")),
        },
    }
}

/// Opens the top of a chain that is to be left out (`--exclude-top`: a running VM's active
/// image), for what it says of its parent. A VMDK reads its descriptor only and never opens its
/// extents, which ESXi keeps locked while the VM runs. VHD and VHDX open as usual: their headers
/// and tables read fine while Hyper-V or XenServer writes, and none of their data is read.
/// `None` for an XVA, which holds whole disks: no layer, no parent.
pub fn open_parent_link(src: Arc<dyn Source>, ctx: &FormatContext) -> Result<Option<Arc<dyn Layer>>> {
    match detect(src.as_ref())? {
        Format::Vmdk => vmdk::open_link_only(src, ctx.gate).map(Some),
        Format::Xva => Ok(None),
        _ => open_layer(src, ctx).map(Some),
    }
}

/// `<stem>.raw` for a file name: the name without its last extension.
pub fn raw_name(file_name: &str) -> String {
    let stem = match file_name.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s,
        _ => file_name,
    };
    format!("{}.raw", if stem.is_empty() { "disk" } else { stem })
}
