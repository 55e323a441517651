//! An in-memory source, for parser tests and fuzzing, with optional fault injection.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Location, Source};
use crate::error::{Error, Result};

/// Bytes in memory posing as a file.
#[derive(Debug)]
pub struct MemSource {
    data: Vec<u8>,
    loc: Location,
    /// Reads touching `[fail_from, fail_to)` fail with EIO (fault injection). Empty by default.
    fail_from: AtomicU64,
    fail_to: AtomicU64,
}

impl MemSource {
    pub fn new(name: &str, data: Vec<u8>) -> Self {
        MemSource { data, loc: Location::local(name), fail_from: AtomicU64::new(0), fail_to: AtomicU64::new(0) }
    }

    /// Makes reads that touch `[from, to)` fail with an I/O error.
    pub fn fail_range(&self, from: u64, to: u64) {
        self.fail_from.store(from, Ordering::SeqCst);
        self.fail_to.store(to, Ordering::SeqCst);
    }
}

impl Source for MemSource {
    fn location(&self) -> &Location {
        &self.loc
    }
    fn len(&self) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let (ff, ft) = (self.fail_from.load(Ordering::SeqCst), self.fail_to.load(Ordering::SeqCst));
        if offset < ft && offset + buf.len() as u64 > ff {
            return Err(Error::io(
                format!("injected fault at {offset:#x}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            )
            .in_file(&self.loc));
        }
        let len = self.data.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let n = buf.len().min((len - offset) as usize);
        buf[..n].copy_from_slice(&self.data[offset as usize..offset as usize + n]);
        Ok(n)
    }
}
