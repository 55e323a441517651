//! Lazily loaded, bounded, read-only tables (VHD BAT, VHDX BAT, VMDK grain tables).
//!
//! A table is read in pages on first use and kept in a small LRU. The lock is held only for the
//! lookup and the insert; the page read itself runs unlocked, so a slow source never makes other
//! readers queue (two threads missing the same page may both read it; that is harmless).

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use crate::error::Result;
use crate::source::Source;

/// Default bytes per page read from the source.
pub const PAGE_BYTES: usize = 64 << 10;

/// A table of fixed-size little- or big-endian entries at `offset` in `src`.
#[derive(Debug)]
pub struct PagedTable {
    src: Arc<dyn Source>,
    offset: u64,
    entries: u64,
    entry_size: usize,
    big_endian: bool,
    page_bytes: usize,
    pages: Mutex<LruCache<u64, Arc<[u8]>>>,
}

impl PagedTable {
    /// `entries` entries of `entry_size` (4 or 8) bytes; at most `max_pages` pages stay cached.
    pub fn new(
        src: Arc<dyn Source>,
        offset: u64,
        entries: u64,
        entry_size: usize,
        big_endian: bool,
        max_pages: usize,
    ) -> Self {
        Self::with_page_size(src, offset, entries, entry_size, big_endian, PAGE_BYTES, max_pages)
    }

    /// Like [`PagedTable::new`] with pages of `page_bytes` (a power of two, at least 512): small
    /// pages suit random access to large tables, since a miss reads one page.
    pub fn with_page_size(
        src: Arc<dyn Source>,
        offset: u64,
        entries: u64,
        entry_size: usize,
        big_endian: bool,
        page_bytes: usize,
        max_pages: usize,
    ) -> Self {
        assert!(entry_size == 4 || entry_size == 8);
        assert!(page_bytes.is_power_of_two() && page_bytes >= 512);
        PagedTable {
            src,
            offset,
            entries,
            entry_size,
            big_endian,
            page_bytes,
            pages: Mutex::new(LruCache::new(NonZeroUsize::new(max_pages.max(1)).expect("max(1) is non-zero"))),
        }
    }

    pub fn len(&self) -> u64 {
        self.entries
    }
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn per_page(&self) -> u64 {
        (self.page_bytes / self.entry_size) as u64
    }

    fn page(&self, p: u64) -> Result<Arc<[u8]>> {
        if let Some(pg) = self.pages.lock().get(&p).cloned() {
            return Ok(pg);
        }
        let first = p * self.per_page();
        let n = self.per_page().min(self.entries - first) as usize;
        let bytes: Arc<[u8]> =
            self.src.read_vec(self.offset + first * self.entry_size as u64, n * self.entry_size)?.into();
        self.pages.lock().put(p, bytes.clone());
        Ok(bytes)
    }

    fn decode(&self, b: &[u8]) -> u64 {
        match (self.entry_size, self.big_endian) {
            (4, true) => u32::from_be_bytes(b.try_into().expect("4 bytes")) as u64,
            (4, false) => u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64,
            (_, true) => u64::from_be_bytes(b.try_into().expect("8 bytes")),
            (_, false) => u64::from_le_bytes(b.try_into().expect("8 bytes")),
        }
    }

    /// Entry `i` (`i < len()`).
    pub fn get(&self, i: u64) -> Result<u64> {
        debug_assert!(i < self.entries);
        let pg = self.page(i / self.per_page())?;
        let at = (i % self.per_page()) as usize * self.entry_size;
        Ok(self.decode(&pg[at..at + self.entry_size]))
    }

    /// How many consecutive entries from `i` (at most `max`, not past the end) satisfy `pred`,
    /// looking each page up once.
    pub fn run_len(&self, i: u64, max: u64, pred: impl Fn(u64) -> bool) -> Result<u64> {
        let end = i.saturating_add(max).min(self.entries);
        let mut j = i;
        while j < end {
            let pg = self.page(j / self.per_page())?;
            let page_end = ((j / self.per_page() + 1) * self.per_page()).min(end);
            while j < page_end {
                let at = (j % self.per_page()) as usize * self.entry_size;
                if !pred(self.decode(&pg[at..at + self.entry_size])) {
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
        let per = (self.page_bytes.max(PAGE_BYTES) / self.entry_size) as u64;
        let mut first = 0;
        while first < self.entries {
            let n = per.min(self.entries - first) as usize;
            let bytes = self.src.read_vec(self.offset + first * self.entry_size as u64, n * self.entry_size)?;
            for (k, b) in bytes.chunks_exact(self.entry_size).enumerate() {
                f(first + k as u64, self.decode(b))?;
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
        let tb = PagedTable::new(Arc::new(MemSource::new("be", be)), 16, n, 4, true, 1);
        let tl = PagedTable::new(Arc::new(MemSource::new("le", le)), 16, n, 4, false, 1);
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
}
