//! A VMDK read for its parent link only, for a chain that leaves its top out (`--exclude-top`).
//!
//! The top of a running ESXi VM is a small descriptor (`vm-000002.vmdk`) naming a `-sesparse` or
//! `-delta` extent that ESXi keeps locked: opening it fails with "Device or resource busy", while
//! the descriptor reads fine. So only the descriptor is read (standalone, or embedded in a
//! hosted sparse file's header): its CID, parentCID, parentFileNameHint and the size its extent
//! lines add up to. No extent is opened. The layer this gives maps nothing; the chain uses it to
//! find the parent and then leaves it out.

use std::sync::Arc;

use super::descriptor::{self, Descriptor, MAX_DESCRIPTOR};
use super::{extent, hosted};
use crate::error::{Error, ErrorKind, Kind, Result};
use crate::gate::Gate;
use crate::layer::{Hint, Identity, Layer, LayerInfo, ParentInfo, ParentRef, Span};
use crate::source::{Location, Source};

/// A VMDK descriptor whose extents were not opened.
#[derive(Debug)]
pub struct LinkOnly {
    src: Arc<dyn Source>,
    desc: Descriptor,
    size: u64,
    parent: Option<ParentRef>,
}

/// Opens `src` for its parent link only. A bare sparse extent, which has no descriptor, is
/// opened as usual so that the user gets the same error as without `--exclude-top`.
pub fn open_link_only(src: Arc<dyn Source>, gate: &Gate) -> Result<Arc<dyn Layer>> {
    let loc = src.location().clone();
    let len = src.len()?;
    let head = src.read_vec(0, len.min(512) as usize)?;
    let text = if head.starts_with(hosted::MAGIC) {
        let (h, _) = extent::read_hosted_header(src.as_ref()).map_err(|e| e.in_file(&loc))?;
        let at = h.desc_offset.saturating_mul(hosted::SECTOR);
        let n = h.desc_size.saturating_mul(hosted::SECTOR).min(MAX_DESCRIPTOR as u64);
        if h.desc_offset == 0 || at.checked_add(n).is_none_or(|e| e > len) {
            return super::open(src, gate);
        }
        descriptor::decode_text(&src.read_vec(at, n as usize)?)
    } else if len <= MAX_DESCRIPTOR as u64 && descriptor::looks_like_descriptor(&descriptor::decode_text(&head)) {
        descriptor::decode_text(&src.read_vec(0, len as usize)?)
    } else {
        return super::open(src, gate);
    };
    let desc = descriptor::parse(&text).map_err(|e| Error::from(e).in_file(&loc))?;
    let size = desc.extents.iter().fold(0u64, |a, e| a.saturating_add(e.sectors.saturating_mul(hosted::SECTOR)));
    let parent = desc.parent().map(|pcid| ParentRef {
        hints: vec![Hint { kind: "parentFileNameHint".into(), path: desc.parent_hint.clone().unwrap_or_default() }],
        expect: vec![Identity::VmdkCid(pcid)],
    });
    Ok(Arc::new(LinkOnly { src, desc, size, parent }))
}

/// Why a descriptor-only layer serves no read.
#[derive(Debug, thiserror::Error)]
enum LinkOnlyError {
    #[error("only the descriptor of this image was read (--exclude-top); its extents are not opened")]
    NotOpened,
}

impl ErrorKind for LinkOnlyError {
    fn kind(&self) -> Kind {
        Kind::Unsupported
    }
}

impl LinkOnly {
    fn not_opened(&self) -> Error {
        Error::from(LinkOnlyError::NotOpened).in_file(self.src.location())
    }
}

impl Layer for LinkOnly {
    fn location(&self) -> &Location {
        self.src.location()
    }
    fn sources(&self) -> Vec<Arc<dyn Source>> {
        vec![self.src.clone()]
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, _offset: u64, _max_len: u64) -> Result<Span> {
        Err(self.not_opened())
    }
    fn read(&self, _source: usize, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(self.not_opened())
    }
    fn parent(&self) -> Option<&ParentRef> {
        self.parent.as_ref()
    }
    fn identity(&self) -> Vec<Identity> {
        self.desc.cid.map(Identity::VmdkCid).into_iter().collect()
    }
    fn describe(&self) -> Result<LayerInfo> {
        let d = &self.desc;
        let mut details = vec![("extents".to_string(), "not opened (only the descriptor was read)".to_string())];
        details.extend(d.extents.iter().enumerate().map(|(i, e)| (format!("extent {i}"), e.display())));
        Ok(LayerInfo {
            path: self.src.location().to_string(),
            format: "vmdk",
            subformat: d.create_type.clone().unwrap_or_default(),
            virtual_size: self.size,
            block_size: 0,
            identity: d.cid.map(|c| format!("{c:08x}")).unwrap_or_default(),
            parent: self.parent.as_ref().map(ParentInfo::from_ref),
            allocated_bytes: 0,
            details,
        })
    }
}
