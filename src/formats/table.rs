//! Lazily loaded, bounded, read-only tables (VHD BAT, VHDX BAT, VMDK grain directories).
//!
//! A table is read in pages on first use and kept in a [`ByteCache`]. The cache's lock is held
//! only for the lookup and the insert; the page read itself runs unlocked, so a slow source never
//! makes other readers queue (two threads missing the same page may both read it; that is
//! harmless).

use std::sync::Arc;

use crate::cache::ByteCache;
use crate::error::Result;
use crate::source::Source;

/// Default bytes per page read from the source.
pub const PAGE_BYTES: usize = 64 << 10;
/// Default bound on the cached pages of one table (16 default pages).
pub const CACHE_BYTES: usize = 16 * PAGE_BYTES;

/// The byte order of a table's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endian {
    Little,
    Big,
}

/// How one entry is stored: its width and byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    U32(Endian),
    U64(Endian),
}

impl EntryType {
    /// Bytes per entry.
    pub fn size(self) -> usize {
        match self {
            EntryType::U32(_) => 4,
            EntryType::U64(_) => 8,
        }
    }

    fn decode(self, b: &[u8]) -> u64 {
        match self {
            EntryType::U32(Endian::Big) => u32::from_be_bytes(b.try_into().expect("4 bytes")) as u64,
            EntryType::U32(Endian::Little) => u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64,
            EntryType::U64(Endian::Big) => u64::from_be_bytes(b.try_into().expect("8 bytes")),
            EntryType::U64(Endian::Little) => u64::from_le_bytes(b.try_into().expect("8 bytes")),
        }
    }
}

/// A table of `entries` entries of one [`EntryType`] at `offset` in `src`.
///
/// ```text
/// let bat = PagedTable::new(src, offset, blocks, EntryType::U32(Endian::Big))
///     .with_page_bytes(4096)
///     .with_cache_bytes(256 << 10);
/// ```
#[derive(Debug)]
pub struct PagedTable {
    src: Arc<dyn Source>,
    offset: u64,
    entries: u64,
    entry: EntryType,
    page_bytes: usize,
    pages: ByteCache<u64, Arc<[u8]>>,
}

impl PagedTable {
    /// A table read in pages of [`PAGE_BYTES`], at most [`CACHE_BYTES`] of them cached.
    pub fn new(src: Arc<dyn Source>, offset: u64, entries: u64, entry: EntryType) -> Self {
        PagedTable { src, offset, entries, entry, page_bytes: PAGE_BYTES, pages: ByteCache::new(CACHE_BYTES) }
    }

    /// Pages of `page_bytes` (a power of two, at least 512): small pages suit random access to
    /// large tables, since a miss reads one page.
    pub fn with_page_bytes(mut self, page_bytes: usize) -> Self {
        assert!(page_bytes.is_power_of_two() && page_bytes >= 512);
        self.page_bytes = page_bytes;
        self
    }

    /// At most `cache_bytes` of pages stay cached (at least one page, whatever its size).
    pub fn with_cache_bytes(mut self, cache_bytes: usize) -> Self {
        self.pages = ByteCache::new(cache_bytes);
        self
    }

    pub fn len(&self) -> u64 {
        self.entries
    }
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn per_page(&self) -> u64 {
        (self.page_bytes / self.entry.size()) as u64
    }

    fn page(&self, p: u64) -> Result<Arc<[u8]>> {
        self.pages.get_or_load(p, || {
            let first = p * self.per_page();
            let n = self.per_page().min(self.entries - first) as usize;
            let size = self.entry.size();
            Ok(self.src.read_vec(self.offset + first * size as u64, n * size)?.into())
        })
    }

    /// Entry `i` (`i < len()`).
    pub fn get(&self, i: u64) -> Result<u64> {
        debug_assert!(i < self.entries);
        let pg = self.page(i / self.per_page())?;
        let size = self.entry.size();
        let at = (i % self.per_page()) as usize * size;
        Ok(self.entry.decode(&pg[at..at + size]))
    }

    /// How many consecutive entries from `i` (at most `max`, not past the end) satisfy `pred`,
    /// looking each page up once.
    pub fn run_len(&self, i: u64, max: u64, pred: impl Fn(u64) -> bool) -> Result<u64> {
        let end = i.saturating_add(max).min(self.entries);
        let size = self.entry.size();
        let mut j = i;
        while j < end {
            let pg = self.page(j / self.per_page())?;
            let page_end = ((j / self.per_page() + 1) * self.per_page()).min(end);
            while j < page_end {
                let at = (j % self.per_page()) as usize * size;
                if !pred(self.entry.decode(&pg[at..at + size])) {
                    return Ok(j - i);
                }
                j += 1;
            }
        }
        Ok(j - i)
    }

    /// Visits every entry in order, reading 64 KiB or more at a time without filling the cache
    /// (validation and statistics at open time keep memory bounded).
    pub fn for_each(&self, mut f: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let size = self.entry.size();
        let per = (self.page_bytes.max(PAGE_BYTES) / size) as u64;
        let mut first = 0;
        while first < self.entries {
            let n = per.min(self.entries - first) as usize;
            let bytes = self.src.read_vec(self.offset + first * size as u64, n * size)?;
            for (k, b) in bytes.chunks_exact(size).enumerate() {
                f(first + k as u64, self.entry.decode(b))?;
            }
            first += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    #[test]
    fn entries_decode_across_pages_in_both_orders() {
        let n = PAGE_BYTES as u64 / 4 * 2 + 3;
        let mut be = vec![0u8; 16];
        let mut le = vec![0u8; 16];
        for i in 0..n as u32 {
            be.extend_from_slice(&(i * 7).to_be_bytes());
            le.extend_from_slice(&(i * 7).to_le_bytes());
        }
        let one_page = PAGE_BYTES;
        let tb = PagedTable::new(Arc::new(MemSource::new("be", be)), 16, n, EntryType::U32(Endian::Big))
            .with_cache_bytes(one_page);
        let tl = PagedTable::new(Arc::new(MemSource::new("le", le)), 16, n, EntryType::U32(Endian::Little))
            .with_cache_bytes(one_page);
        for i in [0, 1, PAGE_BYTES as u64 / 4, n - 1, 5] {
            assert_eq!(tb.get(i).unwrap(), i * 7);
            assert_eq!(tl.get(i).unwrap(), i * 7);
        }
        assert_eq!(tb.run_len(3, n, |v| v % 7 == 0).unwrap(), n - 3);
        assert_eq!(tb.run_len(3, 10, |v| v < 5 * 7).unwrap(), 2);
        let mut count = 0;
        tb.for_each(|i, v| {
            assert_eq!(v, i * 7);
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(count, n);
    }

    #[test]
    fn small_pages_stay_within_the_byte_bound() {
        let n = 10_000u64;
        let bytes: Vec<u8> = (0..n).flat_map(|i| i.to_be_bytes()).collect();
        let t = PagedTable::new(Arc::new(MemSource::new("t", bytes)), 0, n, EntryType::U64(Endian::Big))
            .with_page_bytes(512)
            .with_cache_bytes(4 * 1024);
        for i in (0..n).step_by(61) {
            assert_eq!(t.get(i).unwrap(), i);
        }
        assert!(t.pages.bytes() <= 4 * 1024, "{}", t.pages.bytes());
        assert!(t.pages.len() >= 2);
    }
}
