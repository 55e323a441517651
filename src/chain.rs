//! A chain: top → base list of layers, with parent identity checked, resolving virtual ranges
//! to extents through a cached, merged block map.
//!
//! Resolution walks down only for `Parent` spans, so a block fully owned by the top layer never
//! touches its parents. The result for each 1 MiB map block is cached (sharded LRU, bounded by
//! bytes), so a repeated read costs one hash lookup however deep the chain is. The cache lock is
//! held only for lookup and insert, never across a table or data read.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use crate::error::{Error, Kind, Result};
use crate::formats;
use crate::layer::{Hint, Identity, Layer, LayerInfo, SpanKind};
use crate::source::{self, FileId, Location, Source};

/// Granularity of the merged block map.
pub const MAP_BLOCK: u64 = 1 << 20;
/// Default bound on the chain length; a loop in crafted images is caught long before.
pub const DEFAULT_MAX_DEPTH: usize = 256;
/// The hard limit on `--max-depth` (depths are stored as u16).
pub const MAX_DEPTH_LIMIT: usize = 4096;

/// How images are opened: where parents may come from and how strictly they are checked.
#[derive(Debug, Clone)]
pub struct OpenConfig {
    /// Extra directories searched for parents (by file name) and allowed as parent locations.
    pub parent_dirs: Vec<PathBuf>,
    /// Follow absolute or out-of-tree locators stored in images.
    pub trust_locators: bool,
    /// Accept a parent whose identity does not match what the child expects.
    pub skip_identity_check: bool,
    pub max_depth: usize,
    /// Bound on the merged block map cache of each chain.
    pub map_cache_bytes: usize,
    /// Where indexes of archives (XVA tar and compressed-stream indexes) are kept.
    pub cache_dir: Option<PathBuf>,
    /// Verify checksums stored in images (XVA chunk checksums) on first read.
    pub verify: bool,
}

impl Default for OpenConfig {
    fn default() -> Self {
        OpenConfig {
            parent_dirs: Vec::new(),
            trust_locators: false,
            skip_identity_check: false,
            max_depth: DEFAULT_MAX_DEPTH,
            map_cache_bytes: 64 << 20,
            cache_dir: None,
            verify: true,
        }
    }
}

impl OpenConfig {
    /// The places a file named by `hints` (written inside an image living in `base_dir`) may be
    /// looked for, in order: each relative hint against `base_dir`; each hint's file name in
    /// `base_dir`; then in every `--parent-dir`. The second list holds hints refused by the
    /// confinement rules, for the error message.
    pub fn candidates(&self, base_dir: &Location, hints: &[Hint]) -> (Vec<Location>, Vec<String>) {
        let dirs: Vec<Location> = self.parent_dirs.iter().map(Location::local).collect();
        let mut out: Vec<Location> = Vec::new();
        let mut refused = Vec::new();
        let push = |l: Location, out: &mut Vec<Location>| {
            if !out.contains(&l) {
                out.push(l)
            }
        };
        for h in hints {
            let p = unixify(&h.path);
            if p.is_empty() {
                continue;
            }
            if is_absolute(&p) {
                if self.trust_locators && p.starts_with('/') {
                    push(Location::local(&p), &mut out);
                }
                continue;
            }
            match base_dir.join(&p) {
                Some(l) if self.trust_locators || l.is_within(base_dir) || dirs.iter().any(|d| l.is_within(d)) => {
                    push(l, &mut out)
                }
                _ => refused.push(format!("{} {}", h.kind, h.path)),
            }
        }
        let names: Vec<String> = hints.iter().filter_map(|h| base_name(&unixify(&h.path))).collect();
        for dir in std::iter::once(base_dir).chain(dirs.iter()) {
            for n in &names {
                if let Some(l) = dir.join(n) {
                    push(l, &mut out);
                }
            }
        }
        (out, refused)
    }
}

/// Windows separators to `/`, `file://` URLs to paths.
fn unixify(p: &str) -> String {
    let p = p.trim_end_matches('\0').trim();
    let p = p.strip_prefix("file://").unwrap_or(p);
    p.replace('\\', "/")
}

fn is_absolute(p: &str) -> bool {
    let b = p.as_bytes();
    p.starts_with('/') || (b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic())
}

fn base_name(p: &str) -> Option<String> {
    let n = p.rsplit('/').next()?;
    let n = if n.len() >= 2 && n.as_bytes()[1] == b':' { &n[2..] } else { n };
    (!n.is_empty() && n != "." && n != "..").then(|| n.to_string())
}

/// Where a range of the chain's virtual disk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored by layer `depth` (0 = top) in its source `source` at `offset`.
    Data { depth: u16, source: u32, offset: u64 },
    /// Zeros decided at `depth`; `depth == layers.len()` means no layer allocates it.
    Zero { depth: u16 },
}

/// A resolved range of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    pub fn is_data(&self) -> bool {
        matches!(self.kind, ExtentKind::Data { .. })
    }
}

/// Appends `e`, merging it with the last extent when they continue each other.
fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut()
        && last.end() == e.start
    {
        let merged = match (last.kind, e.kind) {
            (ExtentKind::Zero { depth: a }, ExtentKind::Zero { depth: b }) => a == b,
            (
                ExtentKind::Data { depth: a, source: s, offset: o },
                ExtentKind::Data { depth: b, source: t, offset: p },
            ) => a == b && s == t && o + last.len == p,
            _ => false,
        };
        if merged {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

const SHARDS: usize = 16;

struct Shard {
    lru: LruCache<u64, Arc<[Extent]>>,
    bytes: usize,
}

/// The merged block map cache: block index → extents of that block.
struct MapCache {
    shards: Vec<Mutex<Shard>>,
    max_bytes_per_shard: usize,
}

impl MapCache {
    fn new(max_bytes: usize) -> Self {
        MapCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard { lru: LruCache::unbounded(), bytes: 0 })).collect(),
            max_bytes_per_shard: (max_bytes / SHARDS).max(4096),
        }
    }
    fn shard(&self, block: u64) -> &Mutex<Shard> {
        // Fibonacci hashing spreads sequential block numbers over the shards.
        let i = (block.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS;
        &self.shards[i]
    }
    fn weight(e: &[Extent]) -> usize {
        64 + std::mem::size_of_val(e)
    }
    fn get(&self, block: u64) -> Option<Arc<[Extent]>> {
        self.shard(block).lock().lru.get(&block).cloned()
    }
    fn insert(&self, block: u64, exts: Arc<[Extent]>) {
        let mut s = self.shard(block).lock();
        let w = Self::weight(&exts);
        if let Some(old) = s.lru.put(block, exts) {
            s.bytes -= Self::weight(&old);
        }
        s.bytes += w;
        while s.bytes > self.max_bytes_per_shard {
            match s.lru.pop_lru() {
                Some((_, old)) => s.bytes -= Self::weight(&old),
                None => break,
            }
        }
    }
    fn entries(&self) -> usize {
        self.shards.iter().map(|s| s.lock().lru.len()).sum()
    }
}

/// A chain of layers, top first.
pub struct Chain {
    layers: Vec<Arc<dyn Layer>>,
    size: u64,
    cache: MapCache,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain").field("layers", &self.layers).field("size", &self.size).finish()
    }
}

impl Chain {
    /// Opens the image at `top` and every parent it names, checking identities.
    pub fn open(top: &Location, cfg: &OpenConfig) -> Result<Chain> {
        let src = source::open(top)?;
        let layer = formats::open_layer(src.clone(), cfg)?;
        Self::open_from(layer, src.id(), cfg)
    }

    /// Builds the chain under an already opened top layer.
    pub fn open_from(top: Arc<dyn Layer>, top_id: Option<FileId>, cfg: &OpenConfig) -> Result<Chain> {
        let mut layers = vec![top];
        let mut ids: Vec<(Option<FileId>, Location)> = vec![(top_id, layers[0].location().clone())];
        loop {
            let child = layers.last().expect("chain has a top").clone();
            let Some(pref) = child.parent() else { break };
            if layers.len() >= cfg.max_depth {
                return Err(Error::corrupt(format!(
                    "chain is deeper than {} layers (use --max-depth to allow more)",
                    cfg.max_depth
                ))
                .in_file(layers[0].location()));
            }
            let (parent, id) = resolve_parent(child.as_ref(), &pref.hints, &pref.expect, &ids, cfg)?;
            ids.push((id, parent.location().clone()));
            layers.push(parent);
        }
        Ok(Self::from_layers(layers, cfg))
    }

    /// A chain over layers that were linked by the caller (top first).
    pub fn from_layers(layers: Vec<Arc<dyn Layer>>, cfg: &OpenConfig) -> Chain {
        let size = layers[0].virtual_size();
        Chain { layers, size, cache: MapCache::new(cfg.map_cache_bytes) }
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
    /// Number of map blocks currently cached (for tests and statistics).
    pub fn cached_blocks(&self) -> usize {
        self.cache.entries()
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

    /// `info` for every layer, top first, with resolved parent paths.
    pub fn describe(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let mut info = l.describe()?;
            if let (Some(p), Some(parent)) = (info.parent.as_mut(), self.layers.get(i + 1)) {
                p.resolved = Some(parent.location().to_string());
            }
            out.push(info);
        }
        Ok(out)
    }

    /// Resolves `[start, start + len)` without the cache, merging adjacent extents. Layers return
    /// long spans for long unallocated runs, so this is cheap for large windows (map, SEEK_DATA).
    pub fn extents(&self, start: u64, len: u64) -> Result<Vec<Extent>> {
        let end = start.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        if start < end {
            self.resolve(0, start, end, &mut out)?;
        }
        Ok(out)
    }

    fn resolve(&self, depth: usize, start: u64, end: u64, out: &mut Vec<Extent>) -> Result<()> {
        let n = self.layers.len();
        let Some(layer) = self.layers.get(depth) else {
            push_merged(out, Extent { start, len: end - start, kind: ExtentKind::Zero { depth: n as u16 } });
            return Ok(());
        };
        let vsize = layer.virtual_size();
        let mut pos = start;
        while pos < end {
            if pos >= vsize {
                // A parent smaller than its child: nothing below can hold this range.
                push_merged(out, Extent { start: pos, len: end - pos, kind: ExtentKind::Zero { depth: n as u16 } });
                break;
            }
            let want = end.min(vsize) - pos;
            let span = layer.map(pos, want)?;
            if span.len == 0 || span.len > want {
                return Err(Error::corrupt(format!(
                    "internal: layer returned a span of {} bytes for a request of {want} at {pos:#x}",
                    span.len
                ))
                .in_file(layer.location()));
            }
            let kind = match span.kind {
                SpanKind::Data { source, offset } => ExtentKind::Data {
                    depth: depth as u16,
                    source: u32::try_from(source).map_err(|_| Error::corrupt("internal: source index out of range"))?,
                    offset,
                },
                SpanKind::Zero => ExtentKind::Zero { depth: depth as u16 },
                SpanKind::Parent => {
                    self.resolve(depth + 1, pos, pos + span.len, out)?;
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
        if let Some(e) = self.cache.get(block) {
            return Ok(e);
        }
        let start = block * MAP_BLOCK;
        let exts: Arc<[Extent]> = self.extents(start, MAP_BLOCK)?.into();
        self.cache.insert(block, exts.clone());
        Ok(exts)
    }

    /// Fills `buf` with the virtual disk's bytes at `offset`. The range must lie inside the disk.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        debug_assert!(end <= self.size);
        // A data run waiting to be read: (depth, source, file offset, buffer start, length).
        let mut pending: Option<(u16, u32, u64, usize, usize)> = None;
        let mut block = offset / MAP_BLOCK;
        while block * MAP_BLOCK < end {
            let exts = self.block_extents(block)?;
            for e in exts.iter() {
                let s = e.start.max(offset);
                let t = e.end().min(end);
                if s >= t {
                    continue;
                }
                let (bs, bl) = ((s - offset) as usize, (t - s) as usize);
                match e.kind {
                    ExtentKind::Data { depth, source, offset: fo } => {
                        let fo = fo + (s - e.start);
                        if let Some((d, src, po, pb, pl)) = pending {
                            if d == depth && src == source && po + pl as u64 == fo && pb + pl == bs {
                                pending = Some((d, src, po, pb, pl + bl));
                                continue;
                            }
                            self.read_run(d, src, po, &mut buf[pb..pb + pl])?;
                        }
                        pending = Some((depth, source, fo, bs, bl));
                    }
                    ExtentKind::Zero { .. } => buf[bs..bs + bl].fill(0),
                }
            }
            block += 1;
        }
        if let Some((d, src, po, pb, pl)) = pending {
            self.read_run(d, src, po, &mut buf[pb..pb + pl])?;
        }
        Ok(())
    }

    fn read_run(&self, depth: u16, source: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        self.layers[depth as usize].read(source as usize, off, buf)
    }

    /// First offset `>= from` holding data, or `None` if only holes follow.
    pub fn next_data(&self, from: u64) -> Result<Option<u64>> {
        self.scan(from, true)
    }
    /// First offset `>= from` in a hole (zeros or unallocated); the disk end counts as a hole.
    pub fn next_hole(&self, from: u64) -> Result<u64> {
        Ok(self.scan(from, false)?.unwrap_or(self.size))
    }

    fn scan(&self, from: u64, want_data: bool) -> Result<Option<u64>> {
        // Callers (qemu-img, cp) seek extent by extent: start with a small window so the common
        // case resolves little, and double it across long runs.
        let mut window = MAP_BLOCK;
        let mut pos = from;
        while pos < self.size {
            for e in self.extents(pos, window)? {
                if e.is_data() == want_data {
                    return Ok(Some(e.start.max(pos)));
                }
            }
            pos = pos.saturating_add(window);
            window = (window * 2).min(1 << 30);
        }
        Ok(None)
    }

    /// Bytes of the virtual disk that some layer stores data for.
    pub fn allocated_bytes(&self) -> Result<u64> {
        const WINDOW: u64 = 1 << 30;
        let mut total = 0;
        let mut pos = 0;
        while pos < self.size {
            total += self.extents(pos, WINDOW)?.iter().filter(|e| e.is_data()).map(|e| e.len).sum::<u64>();
            pos = pos.saturating_add(WINDOW);
        }
        Ok(total)
    }
}

/// Finds, opens and checks the parent of `child`.
fn resolve_parent(
    child: &dyn Layer,
    hints: &[Hint],
    expect: &[Identity],
    chain: &[(Option<FileId>, Location)],
    cfg: &OpenConfig,
) -> Result<(Arc<dyn Layer>, Option<FileId>)> {
    let here = child.location();
    let (cands, refused) = cfg.candidates(&here.dir(), hints);
    let mut mismatch: Option<Error> = None;
    let mut failure: Option<Error> = None;
    for cand in cands.iter().filter(|c| c.exists()) {
        let src: Arc<dyn Source> = match source::open(cand) {
            Ok(s) => s,
            Err(e) => {
                failure.get_or_insert(e);
                continue;
            }
        };
        if let Some(id) = src.id()
            && let Some((_, loc)) = chain.iter().find(|(i, _)| i.is_some_and(|i| i.same_object(&id)))
        {
            return Err(Error::corrupt(format!(
                "parent cycle: its parent {cand} is {loc}, which is already in the chain"
            ))
            .in_file(here));
        }
        let layer = match formats::open_layer(src.clone(), cfg) {
            Ok(l) => l,
            Err(e) => {
                failure.get_or_insert(e);
                continue;
            }
        };
        let ids = layer.identity();
        if cfg.skip_identity_check || expect.iter().any(|e| ids.contains(e)) {
            return Ok((layer, src.id()));
        }
        mismatch.get_or_insert_with(|| {
            let want: Vec<String> = expect.iter().map(|e| e.to_string()).collect();
            let have: Vec<String> = ids.iter().map(|e| e.to_string()).collect();
            Error::new(
                Kind::Mismatch,
                format!(
                    "parent {cand} has identity {} but this image expects {} (wrong or modified parent; --ignore-parent-id overrides)",
                    if have.is_empty() { "none".into() } else { have.join("/") },
                    want.join(" or ")
                ),
            )
            .in_file(here)
        });
    }
    if let Some(e) = mismatch.or(failure) {
        return Err(e);
    }
    let looked: Vec<String> = cands.iter().map(|c| c.to_string()).collect();
    let named: Vec<String> = hints.iter().map(|h| format!("{} '{}'", h.kind, h.path)).collect();
    let mut msg = format!(
        "parent not found: the image names {}; looked for {}",
        if named.is_empty() { "no path".into() } else { named.join(", ") },
        if looked.is_empty() { "nothing".into() } else { looked.join(", ") }
    );
    if !refused.is_empty() {
        msg.push_str(&format!(
            "; refused to follow {} (outside the image's directory and --parent-dir; --trust-locators allows it)",
            refused.join(", ")
        ));
    }
    msg.push_str("; use --parent-dir DIR to say where the parent is");
    Err(Error::not_found(msg).in_file(here))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(kind: &str, path: &str) -> Hint {
        Hint { kind: kind.into(), path: path.into() }
    }

    #[test]
    fn candidates_follow_relative_then_names_then_parent_dirs() {
        let cfg = OpenConfig { parent_dirs: vec!["/pd".into()], ..Default::default() };
        let (c, refused) = cfg
            .candidates(&Location::local("/img"), &[hint("W2ku", r"C:\VMs\base.vhd"), hint("W2ru", r".\sub\base.vhd")]);
        let c: Vec<String> = c.iter().map(|l| l.to_string()).collect();
        assert_eq!(c, ["/img/sub/base.vhd", "/img/base.vhd", "/pd/base.vhd"]);
        assert!(refused.is_empty());
    }

    #[test]
    fn candidates_refuse_climbing_out_unless_trusted() {
        let cfg = OpenConfig::default();
        let hints = [hint("MacX", "file://../../etc/shadow"), hint("W2ku", "/dev/sda")];
        let (c, refused) = cfg.candidates(&Location::local("/srv/img"), &hints);
        let c: Vec<String> = c.iter().map(|l| l.to_string()).collect();
        assert_eq!(c, ["/srv/img/shadow", "/srv/img/sda"]);
        assert_eq!(refused, ["MacX file://../../etc/shadow"]);
        let trusted = OpenConfig { trust_locators: true, ..Default::default() };
        let (c, _) = trusted.candidates(&Location::local("/srv/img"), &hints);
        assert!(c.contains(&Location::local("/etc/shadow")) && c.contains(&Location::local("/dev/sda")));
    }

    #[test]
    fn merged_extents_join_only_contiguous_runs() {
        let mut v = Vec::new();
        let d = |start, len, off| Extent { start, len, kind: ExtentKind::Data { depth: 0, source: 0, offset: off } };
        push_merged(&mut v, d(0, 512, 4096));
        push_merged(&mut v, d(512, 512, 4608));
        push_merged(&mut v, d(1024, 512, 9999));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len, 1024);
    }
}
