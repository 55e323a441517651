//! A source that fails on purpose, for tests: it wraps another [`Source`] and, once told to,
//! fails reads of a range with EIO, answers them short, delays them, or acts as if the file had
//! shrunk. Nothing in vdiskfs opens one; tests wrap an image's source in it to check that a
//! failing disk gives an error at the reader and never zeros or a hang.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{FileId, Location, Source};
use crate::error::{Error, Result};

/// What the wrapped source does to reads touching a byte range `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with EIO.
    Eio,
    /// Return half of what was asked (at least one byte): a short read before the end.
    Short,
    /// Wait this long, then read.
    Delay(Duration),
}

#[derive(Debug, Default)]
struct Faults {
    ranges: Vec<(u64, u64, Fault)>,
    /// Reads end here, as if the file had been truncated; `len()` keeps the size at open.
    shrunk_to: Option<u64>,
}

/// A [`Source`] with injected faults.
#[derive(Debug)]
pub struct FaultySource {
    inner: Arc<dyn Source>,
    faults: Mutex<Faults>,
}

impl FaultySource {
    pub fn new(inner: Arc<dyn Source>) -> Self {
        FaultySource { inner, faults: Mutex::new(Faults::default()) }
    }

    /// Reads touching `[from, to)` get `fault` from now on.
    pub fn inject(&self, from: u64, to: u64, fault: Fault) {
        self.faults.lock().ranges.push((from, to, fault));
    }

    /// The file ends at `len` from now on.
    pub fn shrink(&self, len: u64) {
        self.faults.lock().shrunk_to = Some(len);
    }

    /// No faults any more.
    pub fn heal(&self) {
        *self.faults.lock() = Faults::default();
    }
}

impl Source for FaultySource {
    fn location(&self) -> &Location {
        self.inner.location()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn id(&self) -> Option<FileId> {
        self.inner.id()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let end = offset.saturating_add(buf.len() as u64);
        // The lock covers only the lookup; a delay or the read itself runs without it.
        let (hits, shrunk_to) = {
            let f = self.faults.lock();
            let hits: Vec<Fault> =
                f.ranges.iter().filter(|(from, to, _)| offset < *to && end > *from).map(|r| r.2).collect();
            (hits, f.shrunk_to)
        };
        let mut n = buf.len();
        for fault in hits {
            match fault {
                Fault::Eio => {
                    let e = std::io::Error::from_raw_os_error(libc::EIO);
                    return Err(
                        Error::io(format!("read of {n} bytes at {offset:#x} failed"), e).in_file(self.location())
                    );
                }
                Fault::Short => n = (n / 2).max(1).min(n),
                Fault::Delay(d) => std::thread::sleep(d),
            }
        }
        if let Some(len) = shrunk_to {
            n = n.min(len.saturating_sub(offset) as usize);
        }
        if n == 0 {
            return Ok(0);
        }
        self.inner.read_at(&mut buf[..n], offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    #[test]
    fn faults_apply_to_their_range_and_heal() {
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let f = FaultySource::new(Arc::new(MemSource::new("f", data.clone())));
        f.inject(4096, 4097, Fault::Eio);
        let e = f.read_vec(4000, 200).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(e.to_string(), "f: read of 200 bytes at 0xfa0 failed: Input/output error (os error 5)");
        assert_eq!(f.read_vec(0, 4096).unwrap(), &data[..4096]);
        f.heal();
        f.inject(0, 8192, Fault::Short);
        let mut b = vec![0u8; 1000];
        assert_eq!(f.read_at(&mut b, 100).unwrap(), 500, "short");
        assert_eq!(f.read_vec(100, 5000).unwrap(), &data[100..5100], "read_exact_at loops over short reads");
        f.heal();
        f.shrink(1000);
        assert_eq!(f.len().unwrap(), 8192, "the size at open is kept, as a local file's is");
        let e = f.read_vec(900, 200).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
