//! Extents: finding each extent file under the confinement rules, opening it, and checking its
//! header and size against the descriptor line that names it.

use std::sync::Arc;

use super::Error;
use super::cowd;
use super::descriptor::{ExtentLine, ExtentType};
use super::grains::{BufferCache, Flavor, GrainMap};
use super::hosted::{self, GD_AT_END, SECTOR};
use super::sesparse;
use crate::error::Result;
use crate::gate::{FoundBy, Gate};
use crate::layer::Hint;
use crate::source::{Location, Source};

/// One extent of a layer, placed in the layer's virtual disk.
#[derive(Debug)]
pub struct VmdkExtent {
    pub start: u64,
    pub len: u64,
    pub line: ExtentLine,
    /// The file, if the extent has one.
    pub path: Option<Location>,
    pub data: ExtentData,
    /// Set when the file was not where the descriptor says (found by file name instead).
    pub found: Option<FoundBy>,
}

/// What an extent's bytes are.
#[derive(Debug)]
pub enum ExtentData {
    /// Zeros (a `ZERO` extent), masking any parent.
    Zero,
    /// Raw data in `src` from byte `offset` (`FLAT`, `VMFS`).
    Flat { src: Arc<dyn Source>, offset: u64 },
    /// Grains found through a grain directory (`SPARSE`, `VMFSSPARSE`, `SESPARSE`).
    Sparse(Box<SparseExtent>),
}

/// What kind of sparse file an extent is, for `info`.
#[derive(Debug)]
pub enum SparseHeader {
    Hosted { header: hosted::Header, footer: bool },
    Cowd(cowd::Header),
    SeSparse(sesparse::ConstHeader),
}

/// A sparse extent file: its grain map and the header it was read from.
#[derive(Debug)]
pub struct SparseExtent {
    pub map: GrainMap,
    pub header: SparseHeader,
}

impl SparseExtent {
    pub fn compressed(&self) -> bool {
        matches!(&self.header, SparseHeader::Hosted { header, .. } if header.compressed())
    }
}

/// Reads a `KDMV` header, taking the footer's copy when the grain directory is at the end.
pub fn read_hosted_header(src: &dyn Source) -> Result<(hosted::Header, bool)> {
    let h = hosted::Header::parse(&src.read_vec(0, 512)?)?;
    if h.gd_offset != GD_AT_END {
        return Ok((h, false));
    }
    let len = src.len()?;
    if len < 2048 {
        return Err(Error::FooterTooShort { file_len: len }.into());
    }
    Ok((hosted::parse_footer(&src.read_vec(len - 1536, 1536)?)?, true))
}

/// The grain map of a hosted sparse extent.
pub fn hosted_map(
    src: Arc<dyn Source>,
    h: &hosted::Header,
    extent_bytes: u64,
    id: u32,
    tables: &Arc<BufferCache>,
) -> Result<GrainMap> {
    if h.compressed() && !h.markers() {
        return Err(Error::CompressedWithoutMarkers.into());
    }
    let per = h.gtes_per_gt as u64;
    let gd_entries = h.capacity.div_ceil(h.grain * per);
    let flavor = Flavor::Hosted { zero_grain: h.zero_grain(), compressed: h.compressed() };
    let gd = h.gd_offset.saturating_mul(SECTOR);
    GrainMap::new(src, flavor, h.grain * SECTOR, per, extent_bytes, gd, gd_entries, id, tables.clone())
}

fn cowd_map(
    src: Arc<dyn Source>,
    h: &cowd::Header,
    extent_bytes: u64,
    id: u32,
    tables: &Arc<BufferCache>,
) -> Result<GrainMap> {
    let gd_entries = h.sectors.div_ceil(cowd::GTES * h.grain);
    let grain = h.grain * SECTOR;
    GrainMap::new(
        src,
        Flavor::Cowd,
        grain,
        cowd::GTES,
        extent_bytes,
        h.gd_offset * SECTOR,
        gd_entries,
        id,
        tables.clone(),
    )
}

fn sesparse_map(
    src: Arc<dyn Source>,
    h: &sesparse::ConstHeader,
    extent_bytes: u64,
    id: u32,
    tables: &Arc<BufferCache>,
) -> Result<GrainMap> {
    let flavor = Flavor::SeSparse {
        gt_offset: h.gt_offset * SECTOR,
        gt_slots: h.table_slots(),
        grains_offset: h.grains_offset * SECTOR,
        grains_end: (h.grains_offset.saturating_add(h.grains_size)).saturating_mul(SECTOR),
    };
    let per = h.entries_per_table();
    let gd_entries = h.capacity.div_ceil(h.grain * per);
    GrainMap::new(
        src,
        flavor,
        h.grain * SECTOR,
        per,
        extent_bytes,
        h.gd_offset * SECTOR,
        gd_entries,
        id,
        tables.clone(),
    )
}

/// Finds and opens the files a descriptor's extent lines name, through the gate (the same
/// confinement and file-type rules as parents), each file once.
pub struct ExtentFiles<'a> {
    gate: &'a Gate,
    /// The descriptor file: extents resolve against its directory.
    pub desc: &'a Location,
    pub tables: Arc<BufferCache>,
    opened: Vec<(Location, Arc<dyn Source>)>,
}

impl<'a> ExtentFiles<'a> {
    pub fn new(gate: &'a Gate, desc: &'a Location, tables: Arc<BufferCache>) -> Self {
        ExtentFiles { gate, desc, tables, opened: Vec::new() }
    }

    /// Finds extent `i`'s file under the same rules as parents: relative to the descriptor,
    /// then by name in its directory and the `--parent-dir`s; never outside them unless trusted.
    fn resolve(&mut self, i: usize, file: &str) -> Result<(Location, Arc<dyn Source>, FoundBy)> {
        let hint = Hint { kind: "extent".into(), path: file.into() };
        let base = self.desc.dir();
        let lookup = self.gate.lookup(&base, std::slice::from_ref(&hint));
        for c in &lookup.candidates {
            if let Some((_, s)) = self.opened.iter().find(|(l, _)| *l == c.loc) {
                return Ok((c.loc.clone(), s.clone(), c.by.clone()));
            }
            if let Some(s) = self.gate.open_named(c, &base)? {
                self.opened.push((c.loc.clone(), s.clone()));
                return Ok((c.loc.clone(), s, c.by.clone()));
            }
        }
        let p = file.replace('\\', "/");
        let absolute = p.starts_with('/') || (p.len() >= 2 && p.as_bytes()[1] == b':');
        let (index, file) = (i, file.to_string());
        let looked = lookup.candidates.into_iter().map(|c| c.loc).collect();
        if (absolute && !self.gate.policy().trust_locators) || !lookup.refused.is_empty() {
            return Err(Error::ExtentRefused { index, file, looked }.into());
        }
        Err(Error::ExtentNotFound { index, file, looked }.into())
    }

    /// Every extent file opened, each once.
    pub fn into_sources(self) -> Vec<Arc<dyn Source>> {
        self.opened.into_iter().map(|(_, s)| s).collect()
    }

    /// Opens extent `i`, which covers `[start, start + line.sectors * 512)` of the disk.
    pub fn open(&mut self, i: usize, start: u64, line: &ExtentLine) -> Result<VmdkExtent> {
        let len = line.sectors * SECTOR;
        let mk = |path, data| VmdkExtent { start, len, line: line.clone(), path, data, found: None };
        let Some(file) = line.file.as_deref() else {
            return Ok(mk(None, ExtentData::Zero));
        };
        let (loc, src, found) = self.resolve(i, file)?;
        let elsewhere = (!found.as_stored()).then_some(found);
        let data = self.data(i as u32, line, src, elsewhere.as_ref()).map_err(|e| e.in_file(&loc))?;
        if let Some(by) = &elsewhere {
            let size = match &data {
                ExtentData::Flat { src, .. } => src.len().map(|l| format!("; it holds {l} bytes")).unwrap_or_default(),
                _ => String::new(),
            };
            log::warn!(
                "{}: extent {i} '{file}' found {}: {loc}{size}; only its size ties it to this descriptor",
                self.desc,
                by.describe()
            );
        }
        let mut e = mk(Some(loc), data);
        e.found = elsewhere;
        Ok(e)
    }

    /// What the bytes of extent `id`, in `src`, are. `elsewhere` says how the file was found
    /// when it was not where the line names it: a sparse header's capacity must then equal the
    /// line's, the one fact that can tie an extent to its descriptor.
    pub fn data(
        &self,
        id: u32,
        line: &ExtentLine,
        src: Arc<dyn Source>,
        elsewhere: Option<&FoundBy>,
    ) -> Result<ExtentData> {
        let sparse = |map, header| Ok(ExtentData::Sparse(Box::new(SparseExtent { map, header })));
        match line.kind {
            ExtentType::Zero => Ok(ExtentData::Zero),
            ExtentType::Flat | ExtentType::Vmfs => self.flat(line, src),
            ExtentType::Sparse | ExtentType::VmfsSparse => {
                let flen = src.len()?;
                let head = src.read_vec(0, flen.min(cowd::HEADER_LEN as u64) as usize)?;
                if head.starts_with(cowd::MAGIC) {
                    let h = cowd::Header::parse(&head)?;
                    self.check_capacity(h.sectors, line, elsewhere)?;
                    return sparse(cowd_map(src, &h, line.sectors * SECTOR, id, &self.tables)?, SparseHeader::Cowd(h));
                }
                if !head.starts_with(hosted::MAGIC) {
                    return Err(
                        Error::BadMagic { what: "sparse extent", found: head[..head.len().min(4)].to_vec() }.into()
                    );
                }
                let (h, footer) = read_hosted_header(src.as_ref())?;
                if h.capacity == 0 && h.desc_offset != 0 {
                    return Err(Error::NestedDescriptor.into());
                }
                self.check_capacity(h.capacity, line, elsewhere)?;
                let map = hosted_map(src, &h, line.sectors * SECTOR, id, &self.tables)?;
                sparse(map, SparseHeader::Hosted { header: h, footer })
            }
            ExtentType::SeSparse => {
                let flen = src.len()?;
                let h = sesparse::ConstHeader::parse(&src.read_vec(0, flen.min(512) as usize)?)?;
                let vo = h.volatile_offset.saturating_mul(SECTOR);
                if vo.checked_add(512).is_none_or(|e| e > flen) || vo == 0 {
                    return Err(Error::VolatileHeaderPastEnd { at: vo, file_len: flen }.into());
                }
                sesparse::check_volatile(&src.read_vec(vo, 512)?)?;
                self.check_capacity(h.capacity, line, elsewhere)?;
                let map = sesparse_map(src, &h, line.sectors * SECTOR, id, &self.tables)?;
                sparse(map, SparseHeader::SeSparse(h))
            }
        }
    }

    /// A flat extent's file must hold every sector its line claims, from the line's offset.
    fn flat(&self, line: &ExtentLine, src: Arc<dyn Source>) -> Result<ExtentData> {
        let file_len = src.len()?;
        let offset = line.offset.saturating_mul(SECTOR);
        let need = offset.saturating_add(line.sectors * SECTOR);
        if file_len < need {
            return Err(Error::FlatExtentShort {
                file_len,
                descriptor: self.desc.file_name(),
                sectors: line.sectors,
                start_sector: line.offset,
                need,
            }
            .into());
        }
        Ok(ExtentData::Flat { src, offset })
    }

    /// A sparse extent must hold at least as many sectors as its descriptor line claims, and
    /// exactly as many when it was found by file name elsewhere; never more than 64 TiB.
    fn check_capacity(&self, capacity: u64, line: &ExtentLine, elsewhere: Option<&FoundBy>) -> Result<(), Error> {
        if capacity.checked_mul(SECTOR).is_none_or(|b| b > super::MAX_SIZE) {
            return Err(Error::CapacityTooLarge(capacity));
        }
        if let Some(by) = elsewhere
            && capacity != line.sectors
        {
            return Err(Error::ExtentElsewhereMismatch {
                by: by.describe(),
                capacity,
                descriptor: self.desc.file_name(),
                sectors: line.sectors,
            });
        }
        if capacity < line.sectors {
            return Err(Error::SparseExtentShort {
                capacity,
                descriptor: self.desc.file_name(),
                sectors: line.sectors,
            });
        }
        Ok(())
    }
}
