//! Restart points of a compressed stream: where a decoder can start, and for gzip the 32 KiB
//! window of output before that place, which later back-references may reach.
//!
//! The index pass records them ([`Recorder`], fed by `gzip.rs` and `zstd.rs`); the index file
//! keeps them (`index.rs`); a read starts a decoder at the nearest one (`compressed.rs`).
//! Windows are stored deflated, in memory or in the index file ([`WindowStore`]). They come back
//! from a file vdiskfs wrote, but are still bounded when read: a deflated window longer than
//! [`MAX_STORED_WINDOW`] or inflating to more than the 32 KiB window is a damaged index.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use super::Error;
use super::gzip::WINDOW;
use crate::error::{Error as CrateError, Result};

/// Largest deflated window accepted (deflate's worst case for 32 KiB is a few bytes over it).
pub const MAX_STORED_WINDOW: u32 = 64 << 10;

/// A place where decoding can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestartPoint {
    /// Offset in the decompressed stream.
    pub out: u64,
    /// Offset in the compressed file (a gzip member header or a zstd frame when `member_start`).
    pub inp: u64,
    /// gzip: bits of the byte before `inp` that belong to the next block.
    pub bits: u8,
    pub member_start: bool,
    /// The deflated 32 KiB window, in the window store.
    pub win_off: u64,
    pub win_len: u32,
}

impl RestartPoint {
    pub fn new(out: u64, inp: u64, bits: u8, member_start: bool) -> Self {
        RestartPoint { out, inp, bits, member_start, win_off: 0, win_len: 0 }
    }
}

/// Where gzip windows are kept: memory (no cache directory) or the index file.
#[derive(Debug)]
pub enum WindowStore {
    Mem(Vec<u8>),
    File(File),
}

impl WindowStore {
    fn read(&self, off: u64, len: u32) -> Result<Vec<u8>> {
        if len > MAX_STORED_WINDOW {
            return Err(Error::IndexWindowRange { off, len }.into());
        }
        let mut v = vec![0u8; len as usize];
        match self {
            WindowStore::Mem(m) => {
                let at = usize::try_from(off).ok().and_then(|o| m.get(o..o.checked_add(len as usize)?));
                v.copy_from_slice(at.ok_or(Error::IndexWindowRange { off, len })?);
            }
            WindowStore::File(f) => f.read_exact_at(&mut v, off).map_err(|e| CrateError::io("reading the index", e))?,
        }
        Ok(v)
    }

    /// The inflated window of `p` (empty for a point that needs none).
    pub fn window(&self, p: &RestartPoint) -> Result<Vec<u8>> {
        if p.win_len == 0 {
            return Ok(Vec::new());
        }
        let z = self.read(p.win_off, p.win_len)?;
        let mut out = Vec::with_capacity(WINDOW);
        flate2::read::DeflateDecoder::new(&z[..])
            .take(WINDOW as u64 + 1)
            .read_to_end(&mut out)
            .map_err(Error::IndexWindowDamaged)?;
        if out.len() > WINDOW {
            return Err(Error::IndexWindowTooLong { off: p.win_off }.into());
        }
        Ok(out)
    }
}

/// Collects restart points (and deflated windows) during the index pass.
#[derive(Debug)]
pub struct Recorder {
    pub points: Vec<RestartPoint>,
    pub windows: WindowStore,
    /// Where the next window goes in `windows`.
    end: u64,
}

impl Recorder {
    pub fn memory() -> Self {
        Recorder { points: Vec::new(), windows: WindowStore::Mem(Vec::new()), end: 0 }
    }
    /// Windows are appended to `f` at its current position (the start of a new index file).
    pub fn file(f: File) -> Self {
        Recorder { points: Vec::new(), windows: WindowStore::File(f), end: 0 }
    }

    pub fn last_out(&self) -> u64 {
        self.points.last().map_or(0, |p| p.out)
    }

    pub fn point(&mut self, mut p: RestartPoint, window: &[u8]) -> Result<()> {
        if self.points.last().is_some_and(|l| l.out == p.out && l.inp == p.inp) {
            return Ok(());
        }
        if !window.is_empty() {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            let z =
                e.write_all(window).and_then(|_| e.finish()).map_err(|e| CrateError::io("deflating a window", e))?;
            match &mut self.windows {
                WindowStore::Mem(m) => m.extend_from_slice(&z),
                WindowStore::File(f) => f.write_all(&z).map_err(|e| CrateError::io("writing the index", e))?,
            }
            p.win_off = self.end;
            p.win_len = u32::try_from(z.len()).map_err(|_| CrateError::internal("a deflated window over 4 GiB"))?;
            self.end += z.len() as u64;
        }
        self.points.push(p);
        Ok(())
    }

    /// The inflated window of `p`.
    pub fn window(&self, p: &RestartPoint) -> Result<Vec<u8>> {
        self.windows.window(p)
    }

    pub fn windows_len(&self) -> u64 {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_round_trip_and_damaged_ones_are_refused() {
        let mut r = Recorder::memory();
        let w: Vec<u8> = (0..WINDOW).map(|i| (i * 7 % 251) as u8).collect();
        r.point(RestartPoint::new(1 << 20, 4096, 3, false), &w).unwrap();
        let p = r.points[0];
        assert_eq!(r.window(&p).unwrap(), w);
        let past = RestartPoint { win_off: r.windows_len(), ..p };
        assert!(r.window(&past).unwrap_err().to_string().contains("out of range"));
        let huge = RestartPoint { win_len: MAX_STORED_WINDOW + 1, ..p };
        assert!(r.window(&huge).is_err());
        // A window that inflates to more than 32 KiB.
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&vec![0u8; 4 * WINDOW]).unwrap();
        let z = e.finish().unwrap();
        let bomb = RestartPoint { win_off: 0, win_len: z.len() as u32, ..p };
        assert!(WindowStore::Mem(z).window(&bomb).unwrap_err().to_string().contains("longer"));
    }
}
