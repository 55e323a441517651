//! The composed disk as one [`Layer`]: the generated table, then each part through its own chain.
//!
//! Sources: 0 is the table (in memory; its offsets are the disk's own), `1 + i` is part `i`
//! (offsets within the part's virtual disk, read through the part's chain). A part's map is its
//! chain's: data stays data, holes and zeros stay zeros, so SEEK_HOLE and `export` skip a
//! part's holes as they would on the part itself.

use std::fmt;
use std::sync::Arc;

use sha1::{Digest, Sha1};

use super::layout::{Generated, Layout};
use super::{ComposeError, SECTOR, Spec, TableKind};
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::layer::{Identity, Layer, LayerInfo, ParentRef, Span};
use crate::source::{Location, Source};

/// First window asked of a part's chain by `map`; it doubles while the run continues, so long
/// runs take few steps and short ones resolve little.
const FIRST_WINDOW: u64 = 64 << 10;

/// One volume of a composed disk.
#[derive(Debug)]
pub struct Part {
    /// How the user named it (`raw:/dev/vg/root`, `/srv/vm/disk.vhd`), for messages and `info`.
    pub name: String,
    /// The GPT partition name (the file name).
    pub label: String,
    pub chain: Arc<Chain>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Table,
    Zero,
    Part(usize),
}

/// A range of the composed disk and what fills it.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: u64,
    end: u64,
    what: What,
}

/// A partition table followed by parts, as one layer without parent.
pub struct ComposedLayer {
    loc: Location,
    spec: Spec,
    layout: Layout,
    parts: Vec<Part>,
    table: Generated,
    pieces: Vec<Piece>,
    identity: String,
}

impl fmt::Debug for ComposedLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComposedLayer").field("name", &self.loc).field("layout", &self.layout).finish()
    }
}

impl ComposedLayer {
    /// Lays out `parts` as `spec` says and generates the table. Refuses an empty part and every
    /// layout [`Layout::plan`] refuses.
    pub fn new(spec: &Spec, parts: Vec<Part>) -> Result<ComposedLayer> {
        if let Some(p) = parts.iter().find(|p| p.chain.size() == 0) {
            return Err(Error::from(ComposeError::EmptyPart).in_file(&p.name));
        }
        let sizes: Vec<u64> = parts.iter().map(|p| p.chain.size()).collect();
        let layout = Layout::plan(spec, &sizes)?;
        let ids = parts.iter().map(|p| p.chain.identity_text()).collect::<Result<Vec<_>>>()?;
        let labels: Vec<String> = parts.iter().map(|p| p.label.clone()).collect();
        let table = layout.generate(spec, &ids, &labels)?;
        let identity = identity(spec.table, &table, &ids);
        let pieces = pieces(&layout);
        let loc = Location::local(spec.file_name());
        Ok(ComposedLayer { loc, spec: spec.clone(), layout, parts, table, pieces, identity })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Whether `[rel, rel + n)` of part `k` starts with data, and the largest `n <= lim` of one
    /// kind (data from any depth counts as data: the part's chain reads it).
    fn part_run(&self, k: usize, rel: u64, lim: u64) -> Result<(bool, u64)> {
        let chain = &self.parts[k].chain;
        let mut window = lim.min(FIRST_WINDOW);
        loop {
            let exts = chain.extents(rel, window)?;
            let data = exts.first().ok_or_else(|| Error::internal("a part's chain returned no extent"))?.is_data();
            let run: u64 = exts.iter().take_while(|e| e.is_data() == data).map(|e| e.len).sum();
            if run < window || window == lim {
                return Ok((data, run.min(lim)));
            }
            window = window.saturating_mul(2).min(lim);
        }
    }

    fn table_bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len as u64)?;
        if end <= self.table.head.len() as u64 {
            return Some(&self.table.head[offset as usize..end as usize]);
        }
        let t = self.layout.tail_start;
        (offset >= t && end <= self.layout.size).then(|| &self.table.tail[(offset - t) as usize..(end - t) as usize])
    }
}

/// A digest of the whole composition: the table's bytes and every part's identity. An overlay
/// records it, so it refuses another composition of other or changed parts.
fn identity(table: TableKind, g: &Generated, ids: &[String]) -> String {
    let mut h = Sha1::new();
    h.update(&g.head);
    h.update(&g.tail);
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    let d = h.finalize();
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", table.to_string().to_lowercase())
}

/// The disk from start to end: table, zeros, parts (a part's padding joins the zeros after it).
fn pieces(l: &Layout) -> Vec<Piece> {
    let mut v = vec![Piece { start: 0, end: l.head_len, what: What::Table }];
    let mut at = l.head_len;
    let mut push = |v: &mut Vec<Piece>, start: u64, end: u64, what: What| {
        if start > at {
            v.push(Piece { start: at, end: start, what: What::Zero });
        }
        if end > start {
            v.push(Piece { start, end, what });
        }
        at = end;
    };
    for (i, p) in l.parts.iter().enumerate() {
        push(&mut v, p.start, p.start + p.size, What::Part(i));
    }
    push(&mut v, l.tail_start, l.size, What::Table);
    v
}

impl Layer for ComposedLayer {
    fn location(&self) -> &Location {
        &self.loc
    }

    fn sources(&self) -> Vec<Arc<dyn Source>> {
        self.parts.iter().flat_map(|p| p.chain.layers().iter().flat_map(|l| l.sources())).collect()
    }

    fn virtual_size(&self) -> u64 {
        self.layout.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
        let i = self.pieces.partition_point(|p| p.end <= offset);
        let p = self.pieces.get(i).ok_or_else(|| Error::internal("map past the end of a composed disk"))?;
        let lim = (p.end - offset).min(max_len);
        Ok(match p.what {
            What::Table => Span::data(lim, 0, offset),
            What::Zero => Span::zero(lim),
            What::Part(k) => {
                let rel = offset - p.start;
                match self.part_run(k, rel, lim)? {
                    (true, n) => Span::data(n, 1 + k, rel),
                    (false, n) => Span::zero(n),
                }
            }
        })
    }

    fn read(&self, source: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        if source == 0 {
            let b = self.table_bytes(offset, buf.len()).ok_or_else(|| {
                Error::internal(format!("table read at {offset:#x}+{} outside the table", buf.len())).in_file(&self.loc)
            })?;
            buf.copy_from_slice(b);
            return Ok(());
        }
        let part = self.parts.get(source - 1).ok_or_else(|| Error::internal("no such part").in_file(&self.loc))?;
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > part.chain.size()) {
            return Err(
                Error::internal(format!("read at {offset:#x} past the end of part {source}")).in_file(&part.name)
            );
        }
        part.chain.read(offset, buf)
    }

    fn parent(&self) -> Option<&ParentRef> {
        None
    }

    fn identity(&self) -> Vec<Identity> {
        Vec::new()
    }

    fn describe(&self) -> Result<LayerInfo> {
        let l = &self.layout;
        let table = match l.table {
            TableKind::Mbr => format!("MBR, disk signature 0x{}", self.table.disk_id),
            TableKind::Gpt => {
                format!("GPT, disk GUID {}, 128 entries; backup at {:#x}", self.table.disk_id, l.tail_start)
            }
        };
        let mut details = vec![
            ("table".to_string(), table),
            ("part_offset".to_string(), self.spec.part_offset.to_string()),
            ("part_align".to_string(), self.spec.part_align.to_string()),
        ];
        let mut allocated = l.head_len + (l.size - l.tail_start);
        for (i, (p, at)) in self.parts.iter().zip(&l.parts).enumerate() {
            let n = i + 1;
            let boot = if self.spec.bootable.contains(&n) { ", bootable" } else { "" };
            let id = match l.table {
                TableKind::Mbr => "PARTUUID",
                TableKind::Gpt => "GUID",
            };
            details.push((
                format!("part{n}"),
                format!(
                    "{}: start {} (sector {}), {} bytes ({} sectors), type {}{boot}, {id} {}",
                    p.name,
                    at.start,
                    at.start / SECTOR,
                    at.size,
                    at.sectors(),
                    self.spec.type_of(n),
                    self.table.part_ids[i]
                ),
            ));
            details.push((format!("part{n}_layers"), p.chain.identity_text()?));
            allocated += p.chain.allocated_bytes()?;
        }
        Ok(LayerInfo {
            path: self.loc.to_string(),
            format: "composed",
            subformat: l.table.to_string().to_lowercase(),
            virtual_size: l.size,
            block_size: 0,
            identity: self.identity.clone(),
            parent: None,
            allocated_bytes: allocated,
            details,
        })
    }

    fn source_name(&self, source: usize) -> String {
        match source {
            0 => format!("{} partition table", self.layout.table),
            s => self.parts.get(s - 1).map_or_else(String::new, |p| format!("part {s}: {}", p.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::PartType;
    use crate::layer::SpanKind;
    use crate::source::MemSource;

    /// A raw-like layer over memory: data where bytes are non-zero in 4 KiB blocks, zero elsewhere.
    #[derive(Debug)]
    struct Mem(Arc<MemSource>, Vec<u8>);

    impl Layer for Mem {
        fn location(&self) -> &Location {
            self.0.location()
        }
        fn sources(&self) -> Vec<Arc<dyn Source>> {
            vec![self.0.clone()]
        }
        fn virtual_size(&self) -> u64 {
            self.1.len() as u64
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
            let blk = |o: u64| {
                self.1[o as usize..((o / 4096 + 1) * 4096).min(self.1.len() as u64) as usize].iter().any(|&b| b != 0)
            };
            let data = blk(offset);
            let mut end = (offset / 4096 + 1) * 4096;
            while end < offset + max_len && blk(end) == data {
                end += 4096;
            }
            let len = end.min(offset + max_len) - offset;
            Ok(if data { Span::data(len, 0, offset) } else { Span::zero(len) })
        }
        fn read(&self, _s: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.copy_from_slice(&self.1[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn parent(&self) -> Option<&ParentRef> {
            None
        }
        fn identity(&self) -> Vec<Identity> {
            Vec::new()
        }
        fn describe(&self) -> Result<LayerInfo> {
            Ok(LayerInfo {
                path: String::new(),
                format: "mem",
                subformat: String::new(),
                virtual_size: self.1.len() as u64,
                block_size: 0,
                identity: format!("{:?}", &self.1[..self.1.len().min(16)]),
                parent: None,
                allocated_bytes: 0,
                details: Vec::new(),
            })
        }
    }

    fn part(name: &str, bytes: Vec<u8>) -> Part {
        let src = Arc::new(MemSource::new(name, bytes.clone()));
        let layer: Arc<dyn Layer> = Arc::new(Mem(src, bytes));
        Part { name: name.into(), label: name.into(), chain: Arc::new(Chain::from_layers(vec![layer], 1 << 20)) }
    }

    fn vol(len: usize, seed: u8) -> Vec<u8> {
        // Data in the first and the last 4 KiB block, a hole between.
        let mut v = vec![0u8; len];
        v[..4096].iter_mut().enumerate().for_each(|(i, b)| *b = seed.wrapping_add(i as u8) | 1);
        let n = v.len();
        v[n - 100..].fill(seed);
        v
    }

    #[test]
    fn reads_match_a_model_of_table_zeros_and_parts() {
        let mut spec = Spec::new(TableKind::Gpt);
        spec.part_offset = 64 << 10;
        spec.part_align = 64 << 10;
        spec.types = vec![(2, PartType::Swap)];
        let (a, b) = (vol(100_000, 3), vol(300_001, 9));
        let layer = ComposedLayer::new(&spec, vec![part("a", a.clone()), part("b", b.clone())]).unwrap();
        let l = layer.layout().clone();
        assert_eq!((l.parts[0].start, l.parts[1].start), (64 << 10, 192 << 10));
        let chain = Chain::from_layers(vec![Arc::new(layer) as Arc<dyn Layer>], 1 << 20);
        let mut model = vec![0u8; l.size as usize];
        let c = &chain.layers()[0];
        let mut head = vec![0u8; l.head_len as usize];
        c.read(0, 0, &mut head).unwrap();
        model[..head.len()].copy_from_slice(&head);
        let mut tail = vec![0u8; (l.size - l.tail_start) as usize];
        c.read(0, l.tail_start, &mut tail).unwrap();
        model[l.tail_start as usize..].copy_from_slice(&tail);
        model[l.parts[0].start as usize..][..a.len()].copy_from_slice(&a);
        model[l.parts[1].start as usize..][..b.len()].copy_from_slice(&b);
        let mut all = vec![0u8; l.size as usize];
        chain.read(0, &mut all).unwrap();
        assert!(all == model, "whole disk");
        for (off, len) in [(0, 1), (511, 2), (64 << 10, 5000), (163_800, 40_000), (l.tail_start - 3, 10)] {
            let mut buf = vec![0xaa; len];
            chain.read(off, &mut buf).unwrap();
            assert_eq!(buf, model[off as usize..off as usize + len], "at {off:#x}");
        }
        assert_eq!(&all[512..520], b"EFI PART");
        assert_eq!(&all[l.size as usize - 512..][..8], b"EFI PART");
    }

    #[test]
    fn holes_of_a_part_stay_holes_and_padding_is_zero() {
        let spec = Spec::new(TableKind::Mbr);
        let a = vol(3 << 20, 1);
        let layer = ComposedLayer::new(&spec, vec![part("a", a)]).unwrap();
        let chain = Chain::from_layers(vec![Arc::new(layer) as Arc<dyn Layer>], 1 << 20);
        let ext = chain.extents(0, chain.size()).unwrap();
        let kinds: Vec<(u64, u64, bool)> = ext.iter().map(|e| (e.start, e.len, e.is_data())).collect();
        let m = 1u64 << 20;
        assert_eq!(
            kinds,
            [
                (0, 512, true),
                (512, m - 512, false),
                (m, 4096, true),
                (m + 4096, 3 * m - 8192, false),
                (4 * m - 4096, 4096, true)
            ]
        );
        let c = &chain.layers()[0];
        assert_eq!(c.map(m + 10, 100).unwrap().kind, SpanKind::Data { source: 1, offset: 10 });
        assert_eq!(c.source_name(1), "part 1: a");
        assert!(chain.next_hole(m).unwrap() == m + 4096);
    }

    #[test]
    fn an_empty_part_is_refused_with_its_name() {
        let e = ComposedLayer::new(&Spec::new(TableKind::Mbr), vec![part("a", vec![1; 512]), part("empty", vec![])])
            .unwrap_err();
        assert_eq!(e.to_string(), "empty: is empty: a partition needs at least one sector");
    }
}
