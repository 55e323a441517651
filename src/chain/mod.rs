//! A chain: top → base list of layers, with parent identity checked, resolving virtual ranges
//! to extents through a cached, merged block map.
//!
//! Resolution walks down only for `Parent` spans, so a block fully owned by the top layer never
//! touches its parents. The result for each 1 MiB map block is cached in a byte-bounded
//! [`ByteCache`], so a repeated read costs one hash lookup however deep the chain is. The cache
//! lock is held only for lookup and insert, never across a table or data read.
//!
//! - [`parents`]: following parent links (depth limit, cycles, identity), through a resolver;
//! - [`extent`]: resolved extents and the one iterator over them.

mod extent;
mod parents;

use std::fmt;
use std::sync::Arc;

pub use extent::{Extent, ExtentKind, Extents};
pub use parents::{ChainError, DEFAULT_MAX_DEPTH, Limits, Link, MAX_DEPTH_LIMIT, ParentResolver};

use crate::cache::ByteCache;
use crate::error::{Error, Result};
use crate::gate::FoundBy;
use crate::layer::{Layer, LayerInfo, SpanKind};
use extent::push_merged;

/// Granularity of the merged block map.
pub const MAP_BLOCK: u64 = 1 << 20;
/// Shards of the merged block map cache (FUSE threads read in parallel).
const MAP_SHARDS: usize = 16;

/// A chain of layers, top first.
pub struct Chain {
    layers: Vec<Arc<dyn Layer>>,
    /// The top the user named but asked to leave out (`--exclude-top`), opened for its parent
    /// link only.
    excluded: Option<Arc<dyn Layer>>,
    /// How each parent was found (index 0, the top, is `None`).
    found: Vec<Option<FoundBy>>,
    size: u64,
    cache: ByteCache<u64, Arc<[Extent]>>,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain").field("layers", &self.layers).field("size", &self.size).finish()
    }
}

/// A run of data waiting to be read in one go by [`Chain::read`].
struct PendingRun {
    depth: u16,
    source: u32,
    file_offset: u64,
    buf_start: usize,
    len: usize,
}

impl Chain {
    /// Follows `top`'s parents through `resolver`, checking depth, cycles and identities.
    pub fn open(top: Link, resolver: &dyn ParentResolver, limits: Limits, map_cache_bytes: usize) -> Result<Chain> {
        let links = parents::follow(top, resolver, limits)?;
        let found = links.iter().map(|l| l.found.clone()).collect();
        let layers = links.into_iter().map(|l| l.layer).collect();
        let mut chain = Self::from_layers(layers, map_cache_bytes);
        chain.found = found;
        Ok(chain)
    }

    /// The chain below `top`, as if `top` were absent: its parent becomes the top. `top` is
    /// used only to find and check its parent (a running VM's active image, which may not be
    /// readable beyond its header or descriptor).
    pub fn open_below(
        top: Link,
        resolver: &dyn ParentResolver,
        limits: Limits,
        map_cache_bytes: usize,
    ) -> Result<Chain> {
        if top.layer.parent().is_none() {
            return Err(Error::from(ChainError::NothingBelow).in_file(top.layer.location()));
        }
        let mut chain = Self::open(top, resolver, limits, map_cache_bytes)?;
        let top = chain.layers.remove(0);
        chain.found.remove(0);
        chain.size = chain.layers[0].virtual_size();
        chain.excluded = Some(top);
        Ok(chain)
    }

    /// A chain over layers that were linked by the caller (top first; at least one).
    pub fn from_layers(layers: Vec<Arc<dyn Layer>>, map_cache_bytes: usize) -> Chain {
        let size = layers.first().map_or(0, |l| l.virtual_size());
        let found = vec![None; layers.len()];
        Chain { layers, excluded: None, found, size, cache: ByteCache::sharded(map_cache_bytes, MAP_SHARDS) }
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }
    pub fn depth(&self) -> usize {
        self.layers.len()
    }
    /// The top left out by [`Chain::open_below`], if any.
    pub fn excluded_top(&self) -> Option<&Arc<dyn Layer>> {
        self.excluded.as_ref()
    }
    /// Number of map blocks currently cached (for tests and statistics).
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Text naming this chain's content: format, identity and size of every layer, top first.
    /// An overlay records it and refuses to attach to anything else.
    pub fn identity_text(&self) -> Result<String> {
        let mut parts = Vec::new();
        for l in &self.layers {
            let d = l.describe()?;
            let id = if d.identity.is_empty() { l.location().file_name() } else { d.identity };
            parts.push(format!("{}:{}:{}", d.format, id, d.virtual_size));
        }
        Ok(parts.join(" > "))
    }

    /// `info` for every layer, top first, with resolved parent paths and how they were found.
    pub fn describe(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let mut info = l.describe()?;
            if let (Some(p), Some(parent)) = (info.parent.as_mut(), self.layers.get(i + 1)) {
                p.resolved = Some(parent.location().to_string());
                if let Some(by) = self.found.get(i + 1).cloned().flatten()
                    && !by.as_stored()
                {
                    p.found_by = Some(by.describe().to_string());
                }
            }
            out.push(info);
        }
        Ok(out)
    }

    /// The extents of `[from, size)`, in order, merged: the one walk over the chain's map.
    pub fn walk(&self, from: u64) -> Extents<'_> {
        Extents::new(self, from, self.size, self.layers.len())
    }

    /// Like [`Chain::walk`], but the layers from depth `limit` down are never asked: whatever
    /// the layers above leave to them comes as `Zero { depth: limit }` ("decided at or below
    /// `limit`"). A sync needs only what the newer layers decide, and so reads no table of the
    /// layers the target already holds.
    pub fn walk_above(&self, from: u64, limit: usize) -> Extents<'_> {
        Extents::new(self, from, self.size, limit.min(self.layers.len()))
    }

    /// Resolves `[start, start + len)` without the cache, merging adjacent extents. Layers return
    /// long spans for long unallocated runs, so this is cheap for large windows.
    pub fn extents(&self, start: u64, len: u64) -> Result<Vec<Extent>> {
        self.extents_above(start, len, self.layers.len())
    }

    /// [`Chain::extents`] asking only the layers above depth `limit` (see [`Chain::walk_above`]).
    pub fn extents_above(&self, start: u64, len: u64, limit: usize) -> Result<Vec<Extent>> {
        let end = start.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        if start < end {
            self.resolve(0, start, end, limit, &mut out)?;
        }
        Ok(out)
    }

    fn resolve(&self, depth: usize, start: u64, end: u64, limit: usize, out: &mut Vec<Extent>) -> Result<()> {
        let n = self.layers.len().min(limit) as u16;
        let Some(layer) = self.layers.get(depth).filter(|_| depth < limit) else {
            push_merged(out, Extent { start, len: end - start, kind: ExtentKind::Zero { depth: n } });
            return Ok(());
        };
        let vsize = layer.virtual_size();
        let mut pos = start;
        while pos < end {
            if pos >= vsize {
                // A parent smaller than its child: nothing below can hold this range.
                push_merged(out, Extent { start: pos, len: end - pos, kind: ExtentKind::Zero { depth: n } });
                break;
            }
            let want = end.min(vsize) - pos;
            let span = layer.map(pos, want)?;
            if span.len == 0 || span.len > want {
                return Err(Error::internal(format!(
                    "layer returned a span of {} bytes for a request of {want} at {pos:#x}",
                    span.len
                ))
                .in_file(layer.location()));
            }
            let kind = match span.kind {
                SpanKind::Data { source, offset } => ExtentKind::Data {
                    depth: depth as u16,
                    source: u32::try_from(source).map_err(|_| Error::internal("source index out of range"))?,
                    offset,
                },
                SpanKind::Zero => ExtentKind::Zero { depth: depth as u16 },
                SpanKind::Parent => {
                    self.resolve(depth + 1, pos, pos + span.len, limit, out)?;
                    pos += span.len;
                    continue;
                }
            };
            push_merged(out, Extent { start: pos, len: span.len, kind });
            pos += span.len;
        }
        Ok(())
    }

    /// The extents of map block `block`, from the cache or resolved and cached.
    pub fn block_extents(&self, block: u64) -> Result<Arc<[Extent]>> {
        self.cache.get_or_load(block, || Ok(self.extents(block * MAP_BLOCK, MAP_BLOCK)?.into()))
    }

    /// Fills `buf` with the virtual disk's bytes at `offset`. The range must lie inside the disk.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        debug_assert!(end <= self.size);
        let mut pending: Option<PendingRun> = None;
        let mut block = offset / MAP_BLOCK;
        while block * MAP_BLOCK < end {
            let exts = self.block_extents(block)?;
            // A block of a sector-granular differencing disk can hold thousands of extents:
            // start at the first one the read reaches, stop after the last.
            let first = exts.partition_point(|e| e.end() <= offset);
            for e in &exts[first..] {
                if e.start >= end {
                    break;
                }
                let s = e.start.max(offset);
                let t = e.end().min(end);
                if s >= t {
                    continue;
                }
                let (bs, bl) = ((s - offset) as usize, (t - s) as usize);
                match e.kind {
                    ExtentKind::Data { depth, source, offset: fo } => {
                        let fo = fo + (s - e.start);
                        if let Some(p) = &mut pending {
                            if p.depth == depth
                                && p.source == source
                                && p.file_offset + p.len as u64 == fo
                                && p.buf_start + p.len == bs
                            {
                                p.len += bl;
                                continue;
                            }
                            self.read_run(p, buf)?;
                        }
                        pending = Some(PendingRun { depth, source, file_offset: fo, buf_start: bs, len: bl });
                    }
                    ExtentKind::Zero { .. } => buf[bs..bs + bl].fill(0),
                }
            }
            block += 1;
        }
        if let Some(p) = &pending {
            self.read_run(p, buf)?;
        }
        Ok(())
    }

    fn read_run(&self, p: &PendingRun, buf: &mut [u8]) -> Result<()> {
        self.layers[p.depth as usize].read(p.source as usize, p.file_offset, &mut buf[p.buf_start..p.buf_start + p.len])
    }

    /// First offset `>= from` holding data, or `None` if only holes follow.
    pub fn next_data(&self, from: u64) -> Result<Option<u64>> {
        for e in self.walk(from) {
            let e = e?;
            if e.is_data() {
                return Ok(Some(e.start));
            }
        }
        Ok(None)
    }

    /// First offset `>= from` in a hole (zeros or unallocated); the disk end counts as a hole.
    pub fn next_hole(&self, from: u64) -> Result<u64> {
        for e in self.walk(from) {
            let e = e?;
            if !e.is_data() {
                return Ok(e.start);
            }
        }
        Ok(self.size)
    }

    /// Bytes of the virtual disk that some layer stores data for.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for e in self.walk(0) {
            let e = e?;
            if e.is_data() {
                total += e.len;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Identity, LayerInfo, ParentRef, Span};
    use crate::source::{Location, Source};

    /// The parts of [`Layer`] these tests never ask for.
    macro_rules! unused_layer_parts {
        () => {
            fn sources(&self) -> Vec<Arc<dyn Source>> {
                Vec::new()
            }
            fn parent(&self) -> Option<&ParentRef> {
                None
            }
            fn identity(&self) -> Vec<Identity> {
                Vec::new()
            }
            fn describe(&self) -> Result<LayerInfo> {
                Err(Error::internal("not needed"))
            }
        };
    }

    /// A layer of fixed spans; `None` fails every `map` (a layer that must not be asked).
    #[derive(Debug)]
    struct Spans {
        loc: Location,
        spans: Option<Vec<Span>>,
    }

    impl Layer for Spans {
        fn location(&self) -> &Location {
            &self.loc
        }
        fn virtual_size(&self) -> u64 {
            4096
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
            let spans = self.spans.as_ref().ok_or_else(|| Error::internal("asked a layer below the limit"))?;
            let mut at = 0;
            for s in spans {
                if offset < at + s.len {
                    return Ok(Span { len: (at + s.len - offset).min(max_len), kind: s.kind });
                }
                at += s.len;
            }
            Err(Error::internal("past the end"))
        }
        fn read(&self, _: usize, _: u64, _: &mut [u8]) -> Result<()> {
            Ok(())
        }
        unused_layer_parts!();
    }

    #[test]
    fn walk_above_never_asks_the_layers_below_the_limit() {
        let top = Spans {
            loc: Location::local("/top"),
            spans: Some(vec![Span::data(1024, 0, 0), Span::parent(1024), Span::zero(2048)]),
        };
        let mid = Spans { loc: Location::local("/mid"), spans: Some(vec![Span::parent(1536), Span::data(2560, 0, 0)]) };
        let base = Spans { loc: Location::local("/base"), spans: None };
        let chain = Chain::from_layers(vec![Arc::new(top), Arc::new(mid), Arc::new(base)], 1 << 20);
        let kinds = |limit| -> Vec<(u64, u64, usize, bool)> {
            chain
                .walk_above(0, limit)
                .map(|e| e.map(|e| (e.start, e.len, e.depth(), e.is_data())))
                .collect::<Result<_>>()
                .unwrap()
        };
        assert_eq!(kinds(1), vec![(0, 1024, 0, true), (1024, 1024, 1, false), (2048, 2048, 0, false)]);
        assert_eq!(
            kinds(2),
            vec![(0, 1024, 0, true), (1024, 512, 2, false), (1536, 512, 1, true), (2048, 2048, 0, false)]
        );
        assert!(chain.walk(0).any(|e| e.is_err()), "the full walk asks the base");
    }

    /// Sector-granular layer: 512-byte runs alternating between data (whose bytes are a
    /// function of the file offset) and zeros, thousands of extents in one map block.
    #[derive(Debug)]
    struct Striped(Location);

    const STRIPED_SIZE: u64 = 3 << 20;

    fn striped_byte(file_offset: u64) -> u8 {
        (file_offset % 251) as u8 + 1
    }

    impl Layer for Striped {
        fn location(&self) -> &Location {
            &self.0
        }
        fn virtual_size(&self) -> u64 {
            STRIPED_SIZE
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
            let len = (512 - offset % 512).min(max_len);
            // The data runs' file offsets are shifted, so that merging them would be wrong.
            Ok(if (offset / 512).is_multiple_of(2) { Span::data(len, 0, offset + 7) } else { Span::zero(len) })
        }
        fn read(&self, _: usize, at: u64, buf: &mut [u8]) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = striped_byte(at + i as u64);
            }
            Ok(())
        }
        unused_layer_parts!();
    }

    #[test]
    fn reads_anywhere_in_blocks_of_thousands_of_extents_match_the_model() {
        let chain = Chain::from_layers(vec![Arc::new(Striped(Location::local("/striped")))], 1 << 20);
        let model = |at: u64| if (at / 512).is_multiple_of(2) { striped_byte(at + 7) } else { 0 };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // Block edges, extent edges and random places, reads of 1 byte to more than a block.
        let mut cases = vec![(0, 1), (511, 2), (MAP_BLOCK - 1, 2), (MAP_BLOCK - 300, MAP_BLOCK + 600)];
        cases.push((STRIPED_SIZE - 1, 1));
        for _ in 0..300 {
            let at = next(STRIPED_SIZE);
            let longest = if next(4) == 0 { 3 << 19 } else { 4096 };
            let len = 1 + next((STRIPED_SIZE - at).min(longest));
            cases.push((at, len));
        }
        for (at, len) in cases {
            let mut buf = vec![0xeeu8; len as usize];
            chain.read(at, &mut buf).unwrap();
            let bad = (0..len).find(|&i| buf[i as usize] != model(at + i));
            assert_eq!(bad, None, "read of {len} bytes at {at}: first wrong byte");
        }
    }
}
