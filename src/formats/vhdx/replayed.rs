//! The file as a replayed log makes it: the log's writes ([`ReplayedWrites`]), kept in memory
//! and keyed by file offset, layered over the file ([`ReplayedFile`]), which is never written.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::log_entries::LogWrite;
use crate::error::Result;
use crate::source::{FileId, Location, Source};

/// One replayed write: zeros, or one 4 KiB sector.
#[derive(Debug)]
enum Piece {
    Zero(u64),
    Data(Box<[u8]>),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Zero(n) => *n,
            Piece::Data(d) => d.len() as u64,
        }
    }
}

/// Writes replayed from the log, keyed by file offset. All offsets and lengths are multiples of
/// 4 KiB, so a data sector is either wholly replaced or untouched by a later write.
#[derive(Debug, Default)]
pub struct ReplayedWrites {
    map: BTreeMap<u64, Piece>,
}

impl ReplayedWrites {
    fn put(&mut self, start: u64, piece: Piece) {
        let end = start + piece.len();
        if piece.len() == 0 {
            return;
        }
        // A zero run starting before `start` keeps its head; a tail past `end` is put back.
        if let Some((&s, p)) = self.map.range(..start).next_back()
            && s + p.len() > start
        {
            let old_end = s + p.len();
            self.map.insert(s, Piece::Zero(start - s));
            if old_end > end {
                self.map.insert(end, Piece::Zero(old_end - end));
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(s, _)| *s).collect();
        for s in inside {
            if let Some(p) = self.map.remove(&s) {
                let old_end = s + p.len();
                if old_end > end {
                    self.map.insert(end, Piece::Zero(old_end - end));
                }
            }
        }
        self.map.insert(start, piece);
    }

    pub fn apply(&mut self, w: LogWrite) {
        match w {
            LogWrite::Data { file_offset, sector: Some(d) } => self.put(file_offset, Piece::Data(d)),
            LogWrite::Data { sector: None, .. } => {}
            LogWrite::Zero { file_offset, length } => self.put(file_offset, Piece::Zero(length)),
        }
    }

    /// End of the furthest write.
    pub fn end(&self) -> u64 {
        self.map.iter().next_back().map_or(0, |(s, p)| s + p.len())
    }
}

/// The file as the replayed log makes it: replayed writes first, then the file, then zeros up to
/// the extended length. Reads of the file below its length at open time must succeed in full,
/// so a file truncated later gives an error, never zeros.
#[derive(Debug)]
pub struct ReplayedFile {
    inner: Arc<dyn Source>,
    writes: ReplayedWrites,
    inner_len: u64,
    len: u64,
}

impl ReplayedFile {
    pub fn new(inner: Arc<dyn Source>, writes: ReplayedWrites, inner_len: u64, len: u64) -> Self {
        ReplayedFile { inner, writes, inner_len, len }
    }

    fn fill_from_file(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let real = (self.inner_len.saturating_sub(pos) as usize).min(buf.len());
        self.inner.read_exact_at(&mut buf[..real], pos)?;
        buf[real..].fill(0);
        Ok(())
    }
}

impl Source for ReplayedFile {
    fn location(&self) -> &Location {
        self.inner.location()
    }
    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn id(&self) -> Option<FileId> {
        self.inner.id()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = buf.len().min((self.len - offset) as usize);
        let end = offset + n as u64;
        let mut pos = offset;
        while pos < end {
            let at = (pos - offset) as usize;
            if let Some((&s, p)) = self.writes.map.range(..=pos).next_back()
                && s + p.len() > pos
            {
                let take = ((s + p.len()).min(end) - pos) as usize;
                match p {
                    Piece::Zero(_) => buf[at..at + take].fill(0),
                    Piece::Data(d) => {
                        let from = (pos - s) as usize;
                        buf[at..at + take].copy_from_slice(&d[from..from + take]);
                    }
                }
                pos += take as u64;
                continue;
            }
            let next = self.writes.map.range(pos..).next().map_or(end, |(s, _)| (*s).min(end));
            self.fill_from_file(&mut buf[at..at + (next - pos) as usize], pos)?;
            pos = next;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    const SECTOR: u64 = 4096;

    #[test]
    fn the_replayed_view_layers_writes_over_the_file_and_zeros_past_its_end() {
        let file: Vec<u8> = (0..0x6000u32).map(|i| (i % 251) as u8 + 1).collect();
        let inner: Arc<dyn Source> = Arc::new(MemSource::new("f", file.clone()));
        let mut ov = ReplayedWrites::default();
        ov.apply(LogWrite::Zero { file_offset: 0x1000, length: 0x3000 });
        ov.apply(LogWrite::Data { file_offset: 0x2000, sector: Some(vec![7u8; 4096].into()) });
        ov.apply(LogWrite::Data { file_offset: 0x8000, sector: Some(vec![8u8; 4096].into()) });
        let v = ReplayedFile::new(inner, ov, 0x6000, 0xA000);
        let got = v.read_vec(0, 0xA000).unwrap();
        assert_eq!(&got[..0x1000], &file[..0x1000]);
        assert!(got[0x1000..0x2000].iter().all(|&x| x == 0));
        assert!(got[0x2000..0x3000].iter().all(|&x| x == 7));
        assert!(got[0x3000..0x4000].iter().all(|&x| x == 0));
        assert_eq!(&got[0x4000..0x6000], &file[0x4000..0x6000]);
        assert!(got[0x6000..0x8000].iter().all(|&x| x == 0), "extension reads zeros");
        assert!(got[0x8000..0x9000].iter().all(|&x| x == 8));
        let mut small = [0u8; 10];
        v.read_exact_at(&mut small, 0x1FFB).unwrap();
        assert_eq!(small, [0, 0, 0, 0, 0, 7, 7, 7, 7, 7]);
    }

    #[test]
    fn a_file_truncated_after_open_is_an_error_not_zeros() {
        let inner: Arc<dyn Source> = Arc::new(MemSource::new("f", vec![1u8; 0x2000]));
        let v = ReplayedFile::new(inner, ReplayedWrites::default(), 0x4000, 0x4000);
        assert!(v.read_vec(0x1000, 0x2000).is_err());
    }

    proptest::proptest! {
        /// The writes read through [`ReplayedFile`] equal applying the same writes to a plain buffer.
        #[test]
        fn replayed_reads_equal_a_buffer_model(
            ops in proptest::collection::vec((proptest::bool::ANY, 0u64..40, 1u64..6), 0..24),
            reads in proptest::collection::vec((0u64..(48 * 4096), 1usize..20000), 1..8),
        ) {
            let file: Vec<u8> = (0..32 * 4096u32).map(|i| (i % 249) as u8 + 1).collect();
            let mut model = file.clone();
            model.resize(48 * 4096, 0);
            let mut ov = ReplayedWrites::default();
            for (i, (zero, page, n)) in ops.iter().enumerate() {
                let at = page * SECTOR;
                if *zero {
                    ov.apply(LogWrite::Zero { file_offset: at, length: n * SECTOR });
                    model[at as usize..((page + n) * SECTOR) as usize].fill(0);
                } else {
                    let d = vec![i as u8 + 100; SECTOR as usize];
                    model[at as usize..(at + SECTOR) as usize].copy_from_slice(&d);
                    ov.apply(LogWrite::Data { file_offset: at, sector: Some(d.into()) });
                }
            }
            let v = ReplayedFile::new(Arc::new(MemSource::new("f", file)), ov, 32 * 4096, 48 * 4096);
            proptest::prop_assert_eq!(v.read_vec(0, 48 * 4096).unwrap(), model.clone());
            for (off, len) in reads {
                let len = len.min((48 * 4096 - off) as usize);
                proptest::prop_assert_eq!(v.read_vec(off, len).unwrap(), model[off as usize..off as usize + len].to_vec());
            }
        }
    }
}
