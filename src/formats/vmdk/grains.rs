//! The two-level grain map shared by the three sparse extent kinds (hosted `KDMV`, ESX `COWD`,
//! SESparse): a grain directory (loaded in pages on demand) pointing at grain tables, which are
//! read whole on first use, validated entry by entry against the file, and kept in a byte-bounded
//! cache shared by all extents of a layer. No lock is held across a read.

use std::sync::Arc;

use super::Error;
use super::sesparse::{self, Gte};
use crate::cache::ByteCache;
use crate::error::Result;
use crate::formats::table::{Endian, EntryType, PAGE_BYTES, PagedTable};
use crate::source::Source;

/// Grain directory pages kept per extent (64 KiB each).
const GD_PAGES: usize = 8;
/// Grain directory entries per extent: the directory is read and checked at open, so this
/// bounds that pass (128 MiB of u32 entries, 256 MiB of SESparse u64 ones) whatever the header
/// claims. A 64 TiB disk with 4 KiB grains and 512-entry tables needs exactly this many.
pub const MAX_GD_ENTRIES: u64 = 1 << 25;
/// Bytes of grain tables a full validation may read beyond the file's own length: a file's
/// tables do not overlap, so they total at most its length (plus tables shared by consecutive
/// directory entries, read once).
const TABLES_SLACK: u64 = 16 << 20;
/// Locks each of a layer's buffer caches is spread over.
const CACHE_SHARDS: usize = 8;

/// A layer's cache of immutable buffers (grain tables, or inflated grains), keyed by extent
/// number and table or grain number.
pub type BufferCache = ByteCache<(u32, u64), Arc<[u8]>>;

/// A [`BufferCache`] of at most `max_bytes`.
pub fn buffer_cache(max_bytes: usize) -> BufferCache {
    ByteCache::sharded(max_bytes, CACHE_SHARDS)
}

/// What one grain holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated in this extent (the parent decides, or zeros without one).
    Unallocated,
    /// Zeros at this depth (zeroed grain, SESparse unmapped or zero grain).
    Zero,
    /// Stored at this byte offset of the extent file.
    Data(u64),
    /// A grain marker and compressed data at this byte offset.
    Compressed(u64),
}

/// How entries of a particular extent kind are decoded.
#[derive(Debug, Clone, Copy)]
pub enum Flavor {
    /// `KDMV`: u32 sector entries; 1 is a zeroed grain when the header enables it.
    Hosted { zero_grain: bool, compressed: bool },
    /// `COWD`: u32 sector entries; 0 unallocated.
    Cowd,
    /// SESparse: u64 typed entries (see `sesparse`). Offsets in bytes.
    SeSparse { gt_offset: u64, gt_slots: u64, grains_offset: u64, grains_end: u64 },
}

/// The grain map of one sparse extent.
#[derive(Debug)]
pub struct GrainMap {
    pub src: Arc<dyn Source>,
    pub file_len: u64,
    pub flavor: Flavor,
    /// Grain size in bytes.
    pub grain: u64,
    /// Grain table entries per table.
    pub per_table: u64,
    /// Bytes of the extent's virtual range that are read (the descriptor may use less than the
    /// header's capacity).
    pub extent_bytes: u64,
    gd: PagedTable,
    gd_offset: u64,
    /// Extent number within the layer: the key space in the shared table cache.
    id: u32,
    tables: Arc<BufferCache>,
}

impl GrainMap {
    /// A map whose grain directory holds `gd_entries` entries at byte `gd_offset`. Checks that the
    /// directory lies inside the file.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        src: Arc<dyn Source>,
        flavor: Flavor,
        grain: u64,
        per_table: u64,
        extent_bytes: u64,
        gd_offset: u64,
        gd_entries: u64,
        id: u32,
        tables: Arc<BufferCache>,
    ) -> Result<GrainMap> {
        let file_len = src.len()?;
        if gd_entries > MAX_GD_ENTRIES {
            return Err(Error::DirectoryTooLarge { entries: gd_entries, max: MAX_GD_ENTRIES }.into());
        }
        let gd_bytes = gd_entries * Self::gd_entry_size(&flavor) as u64;
        if gd_offset.checked_add(gd_bytes).is_none_or(|e| e > file_len) || gd_offset == 0 {
            return Err(
                Error::DirectoryPastEnd { at: gd_offset, entries: gd_entries, bytes: gd_bytes, file_len }.into()
            );
        }
        let entry = if Self::gd_entry_size(&flavor) == 8 {
            EntryType::U64(Endian::Little)
        } else {
            EntryType::U32(Endian::Little)
        };
        let gd = PagedTable::new(src.clone(), gd_offset, gd_entries, entry).with_cache_bytes(GD_PAGES * PAGE_BYTES);
        Ok(GrainMap { src, file_len, flavor, grain, per_table, extent_bytes, gd, gd_offset, id, tables })
    }

    fn gd_entry_size(f: &Flavor) -> usize {
        match f {
            Flavor::SeSparse { .. } => 8,
            _ => 4,
        }
    }
    fn gt_entry_size(&self) -> usize {
        Self::gd_entry_size(&self.flavor)
    }
    fn table_bytes(&self) -> u64 {
        self.per_table * self.gt_entry_size() as u64
    }
    pub fn gd_offset(&self) -> u64 {
        self.gd_offset
    }

    /// Where grain table `t` lives, from its directory entry.
    fn table_offset(&self, t: u64, e: u64) -> Result<Option<u64>, Error> {
        let at = match self.flavor {
            Flavor::SeSparse { gt_offset, gt_slots, .. } => match sesparse::decode_gd(e) {
                None => return Ok(None),
                Some(Err(())) => return Err(Error::BadDirectoryEntry { table: t, value: e }),
                Some(Ok(i)) if i >= gt_slots => {
                    return Err(Error::TableSlotOutOfRegion { table: t, slot: i, slots: gt_slots });
                }
                Some(Ok(i)) => i.checked_mul(self.table_bytes()).and_then(|o| o.checked_add(gt_offset)),
            },
            _ if e == 0 => return Ok(None),
            _ => Some(e * 512),
        };
        let end = at.and_then(|at| at.checked_add(self.table_bytes()));
        let (Some(at), Some(end)) = (at, end) else {
            return Err(Error::TablePastEnd { table: t, at: u64::MAX, file_len: self.file_len });
        };
        if end > self.file_len {
            return Err(Error::TablePastEnd { table: t, at, file_len: self.file_len });
        }
        Ok(Some(at))
    }

    /// Decodes entry `k` of table `t` (raw value `e`), checking it against the file.
    fn decode(&self, t: u64, k: u64, e: u64) -> Result<Grain, Error> {
        let g = t * self.per_table + k;
        let need = self.grain.min(self.extent_bytes.saturating_sub(g.saturating_mul(self.grain)));
        let in_file = |off: u64, n: u64| -> Result<u64, Error> {
            if off.checked_add(n).is_none_or(|end| end > self.file_len) {
                return Err(Error::GrainPastEnd { table: t, entry: k, grain: g, at: off, file_len: self.file_len });
            }
            Ok(off)
        };
        match self.flavor {
            Flavor::Hosted { zero_grain, compressed } => match e {
                0 => Ok(Grain::Unallocated),
                1 if zero_grain => Ok(Grain::Zero),
                1 => Err(Error::ZeroGrainNotEnabled { table: t, entry: k }),
                s if compressed => Ok(Grain::Compressed(in_file(s * 512, super::hosted::GRAIN_MARKER_LEN as u64)?)),
                s => Ok(Grain::Data(in_file(s * 512, need)?)),
            },
            Flavor::Cowd => match e {
                0 => Ok(Grain::Unallocated),
                s if s < 4 => Err(Error::GrainInHeader { table: t, entry: k, sector: s }),
                s => Ok(Grain::Data(in_file(s * 512, need)?)),
            },
            Flavor::SeSparse { grains_offset, grains_end, .. } => match sesparse::decode_gte(e) {
                Gte::Unallocated => Ok(Grain::Unallocated),
                Gte::Unmapped | Gte::Zero => Ok(Grain::Zero),
                Gte::Cluster(c) => {
                    let off = c.checked_mul(self.grain).and_then(|o| o.checked_add(grains_offset));
                    match off {
                        Some(off) if off < grains_end => Ok(Grain::Data(in_file(off, need)?)),
                        _ => Err(Error::ClusterOutOfRegion { table: t, entry: k, cluster: c }),
                    }
                }
                Gte::Bad => Err(Error::UnknownEntryType { table: t, entry: k, value: e }),
            },
        }
    }

    fn raw(&self, tab: &[u8], k: u64) -> u64 {
        let es = self.gt_entry_size();
        let b = &tab[k as usize * es..(k as usize + 1) * es];
        if es == 4 {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
        } else {
            u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        }
    }

    /// Entries of table `t` that lie inside the extent.
    fn live_entries(&self, t: u64) -> u64 {
        let first = t * self.per_table;
        self.per_table.min(self.extent_bytes.div_ceil(self.grain).saturating_sub(first))
    }

    /// Reads and validates table `t` at `at`, counting allocated grains.
    fn load(&self, t: u64, at: u64) -> Result<(Arc<[u8]>, u64)> {
        let tab: Arc<[u8]> = self.src.read_vec(at, self.table_bytes() as usize)?.into();
        let mut allocated = 0;
        for k in 0..self.live_entries(t) {
            if matches!(self.decode(t, k, self.raw(&tab, k))?, Grain::Data(_) | Grain::Compressed(_)) {
                allocated += 1;
            }
        }
        Ok((tab, allocated))
    }

    /// Grain table `t` (validated), or `None` when the directory has no table there.
    pub fn table(&self, t: u64) -> Result<Option<Arc<[u8]>>> {
        if let Some(tab) = self.tables.get(&(self.id, t)) {
            return Ok(Some(tab));
        }
        let Some(at) = self.table_offset(t, self.gd.get(t)?)? else {
            return Ok(None);
        };
        // Read and checked with no lock held; a concurrent miss may load the same table too.
        let (tab, _) = self.load(t, at)?;
        self.tables.insert((self.id, t), tab.clone());
        Ok(Some(tab))
    }

    /// What grain `g` holds.
    pub fn lookup(&self, g: u64) -> Result<Grain> {
        let t = g / self.per_table;
        match self.table(t)? {
            None => Ok(Grain::Unallocated),
            Some(tab) => Ok(self.decode(t, g % self.per_table, self.raw(&tab, g % self.per_table))?),
        }
    }

    /// The kind at byte `rel` of the extent and how many bytes (at most `max`) continue it:
    /// unallocated, zero and compressed runs of any length, data runs while the file offsets stay
    /// contiguous. Whole missing tables are skipped at once.
    pub fn run(&self, rel: u64, max: u64) -> Result<(Grain, u64)> {
        let gs = self.grain;
        let g0 = rel / gs;
        let first = self.lookup(g0)?;
        let first_at = match first {
            Grain::Data(o) => Grain::Data(o + rel % gs),
            k => k,
        };
        let mut len = gs - rel % gs;
        let mut g = g0 + 1;
        let end_grain = self.extent_bytes.div_ceil(gs);
        while len < max && g < end_grain {
            let t = g / self.per_table;
            let tab = self.table(t)?;
            let Some(tab) = tab else {
                if first != Grain::Unallocated {
                    break;
                }
                let next = (t + 1) * self.per_table;
                len += (next - g) * gs;
                g = next;
                continue;
            };
            let table_end = ((t + 1) * self.per_table).min(end_grain);
            while g < table_end && len < max {
                let k = self.decode(t, g % self.per_table, self.raw(&tab, g % self.per_table))?;
                let same = match (first, k) {
                    (Grain::Data(a), Grain::Data(b)) => b == a + (g - g0) * gs,
                    (Grain::Compressed(_), Grain::Compressed(_)) => true,
                    (a, b) => a == b,
                };
                if !same {
                    return Ok((first_at, len.min(max)));
                }
                len += gs;
                g += 1;
            }
        }
        Ok((first_at, len.min(max)))
    }

    /// Grain tables the directory points at, and their total size in bytes (checks every entry).
    pub fn scan_directory(&self) -> Result<(u64, u64)> {
        let mut n = 0;
        self.gd.for_each(|t, e| {
            if self.table_offset(t, e)?.is_some() {
                n += 1;
            }
            Ok(())
        })?;
        Ok((n, n * self.table_bytes()))
    }

    /// Reads and validates every grain table (without filling the cache); returns the number of
    /// allocated grains. The tables read total at most the file's length plus
    /// [`TABLES_SLACK`]: directory entries naming overlapping tables again and again (which
    /// could make this read the same table billions of times) are refused. Consecutive entries
    /// naming one table (a shared all-empty table) read it once.
    pub fn validate_tables(&self) -> Result<u64> {
        let limit = self.file_len.saturating_add(TABLES_SLACK);
        let (mut allocated, mut read) = (0u64, 0u64);
        let mut last: Option<(u64, u64)> = None;
        // for_each holds no lock and reads the directory page by page: memory stays bounded.
        self.gd.for_each(|t, e| {
            let Some(at) = self.table_offset(t, e)? else { return Ok(()) };
            // A whole table of whole grains validates alike wherever it is used.
            let whole = (t + 1) * self.per_table * self.grain <= self.extent_bytes;
            match last {
                Some((last_at, n)) if last_at == at && whole => allocated += n,
                _ => {
                    read += self.table_bytes();
                    if read > limit {
                        return Err(Error::TablesOverlap { limit, file_len: self.file_len }.into());
                    }
                    let n = self.load(t, at)?.1;
                    allocated += n;
                    last = whole.then_some((at, n));
                }
            }
            Ok(())
        })?;
        Ok(allocated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    /// A hosted extent: 4 grains of 1 KiB, 2 entries per table; GD at 512, tables at 1024 and
    /// 1536, grains from 2048.
    fn hosted(entries: [u32; 4], zero_grain: bool) -> GrainMap {
        let mut f = vec![0u8; 8192];
        f[512..516].copy_from_slice(&2u32.to_le_bytes()); // GD[0] -> sector 2
        f[516..520].copy_from_slice(&3u32.to_le_bytes()); // GD[1] -> sector 3
        for (i, e) in entries.iter().enumerate() {
            let at = 1024 + (i / 2) * 512 + (i % 2) * 4;
            f[at..at + 4].copy_from_slice(&e.to_le_bytes());
        }
        let src = Arc::new(MemSource::new("h.vmdk", f));
        let flavor = Flavor::Hosted { zero_grain, compressed: false };
        GrainMap::new(src, flavor, 1024, 2, 4096, 512, 2, 0, Arc::new(buffer_cache(1 << 20))).unwrap()
    }

    #[test]
    fn runs_merge_contiguous_grains_and_stop_at_changes() {
        let m = hosted([4, 6, 0, 1], true);
        assert_eq!(m.run(0, 8192).unwrap(), (Grain::Data(2048), 2048));
        assert_eq!(m.run(1536, 8192).unwrap(), (Grain::Data(3584), 512));
        assert_eq!(m.run(2048, 8192).unwrap(), (Grain::Unallocated, 1024));
        assert_eq!(m.run(3072, 8192).unwrap(), (Grain::Zero, 1024));
        assert_eq!(m.run(0, 100).unwrap(), (Grain::Data(2048), 100));
        assert_eq!(m.validate_tables().unwrap(), 2);
    }

    #[test]
    fn directories_larger_than_the_bound_are_refused_before_any_read() {
        let src = Arc::new(MemSource::new("h.vmdk", vec![0u8; 4096]));
        let flavor = Flavor::Hosted { zero_grain: false, compressed: false };
        let tables = Arc::new(buffer_cache(1 << 20));
        // 2^62 entries would overflow the directory's byte size (4 bytes each) as well.
        for entries in [MAX_GD_ENTRIES + 1, 1 << 62, u64::MAX] {
            let e = GrainMap::new(src.clone(), flavor, 512, 1, u64::MAX, 512, entries, 0, tables.clone()).unwrap_err();
            assert!(e.to_string().contains("vdiskfs reads at most 33554432"), "{e}");
        }
    }

    #[test]
    fn validating_tables_reads_no_more_than_the_file_holds() {
        // 4096 directory entries naming two 16 KiB tables in turn: 64 MiB of reads from a file
        // of 64 KiB. The same two tables named by runs of consecutive entries read each once.
        let mut f = vec![0u8; 64 << 10];
        let map = |f: &[u8], alternate: bool| {
            let mut f = f.to_vec();
            for t in 0..4096u32 {
                let sector = if alternate { 64 + (t % 2) * 32 } else { 64 + (t / 2048) * 32 };
                f[512 + 4 * t as usize..516 + 4 * t as usize].copy_from_slice(&sector.to_le_bytes());
            }
            let src = Arc::new(MemSource::new("h.vmdk", f));
            let flavor = Flavor::Hosted { zero_grain: false, compressed: false };
            GrainMap::new(src, flavor, 512, 4096, 4096 * 4096 * 512, 512, 4096, 0, Arc::new(buffer_cache(1 << 20)))
                .unwrap()
        };
        f[49152..49156].copy_from_slice(&90u32.to_le_bytes()); // one allocated grain in the second table
        let e = map(&f, true).validate_tables().unwrap_err();
        assert!(e.to_string().contains("grain tables overlap"), "{e}");
        assert_eq!(map(&f, false).validate_tables().unwrap(), 2048, "runs of one table read it once");
    }

    #[test]
    fn bad_entries_are_reported_not_followed() {
        let m = hosted([4, 5, 0, 1], false);
        let e = m.lookup(3).unwrap_err().to_string();
        assert!(e.contains("does not enable zeroed grains"), "{e}");
        let m = hosted([4, 99, 0, 0], true);
        let e = m.lookup(1).unwrap_err().to_string();
        assert!(e.contains("past the end of the file"), "{e}");
        assert!(m.validate_tables().is_err());
    }
}
