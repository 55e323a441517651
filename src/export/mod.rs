//! `vdiskfs export`: the merged disk (chain + overlay) written to a file or block device.
//!
//! Ranges are copied by several threads in 1 MiB pieces (`copy`). When the target is new or
//! known to be zeroed, holes and all-zero 4 KiB units are skipped; otherwise holes are zeroed with
//! `FALLOC_FL_ZERO_RANGE` or `PUNCH_HOLE` (files) or `BLKZEROOUT` (block devices), falling back
//! to writing zeros.
//! The target is checked first: a block device is opened exclusively (which fails if it is
//! mounted or held), a regular file must not be attached to a loop device, neither may be one of
//! the sources, and it must be at least as large as the disk.

pub mod copy;
mod target;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::disk::Disk;
use crate::error::{Error, ErrorKind, Kind, Result};
use crate::progress::Progress;
pub use copy::{CopyOptions, Job, push_jobs};
pub use target::{Create, Target};

/// Piece size of `--verify`.
const PIECE: u64 = 4 << 20;

/// What to do.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub target: PathBuf,
    /// The target already reads as zeros: holes need not be written.
    pub target_zeroed: bool,
    pub verify: bool,
    pub threads: usize,
}

/// What was done.
#[derive(Debug, Clone, Default)]
pub struct ExportStats {
    pub written: u64,
    pub skipped: u64,
    pub zeroed: u64,
    pub elapsed: Duration,
    pub verified: bool,
}

/// Why an export refuses its target or fails.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("target is neither a regular file nor a block device")]
    NotFileOrDevice,
    #[error("target is the source {0}; sources are never written")]
    IsSource(String),
    #[error("target is attached to {0}; detach it first")]
    LoopAttached(String),
    #[error("target is in use (mounted, or held by another program); refusing to write it")]
    InUse,
    #[error("target is {len} bytes, smaller than the disk ({size} bytes)")]
    TooSmall { len: u64, size: u64 },
    #[error("verify failed: the target differs from the disk at {at:#x}")]
    VerifyMismatch { at: u64 },
    /// A copy that stopped: says how much of the target is good.
    #[error(
        "the target is INCOMPLETE: everything below {complete:#x} was written ({written} bytes of data in all); export failed at {at:#x}"
    )]
    Incomplete {
        at: u64,
        complete: u64,
        written: u64,
        #[source]
        cause: Error,
    },
}

impl ErrorKind for ExportError {
    fn kind(&self) -> Kind {
        match self {
            ExportError::VerifyMismatch { .. } => Kind::Corrupt,
            ExportError::Incomplete { cause, .. } => cause.kind(),
            _ => Kind::Denied,
        }
    }
}

/// Data ranges of the disk, from SEEK_DATA/SEEK_HOLE on the merged view.
fn data_ranges(disk: &Disk) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(d) = disk.seek_data(pos)? {
        let h = disk.seek_hole(d)?.unwrap_or(disk.size());
        out.push((d, h - d));
        pos = h;
    }
    Ok(out)
}

/// Exports `disk` to `cfg.target`, reporting to `progress`. No file the disk reads may be the
/// target.
pub fn export(disk: &Disk, cfg: &ExportConfig, progress: &dyn Progress) -> Result<ExportStats> {
    let started = Instant::now();
    let target = Target::open(&cfg.target, disk.size(), &disk.source_paths(), Create::IfMissing)?;
    let zeroed = cfg.target_zeroed || target.created();
    let size = disk.size();
    // Plan: data ranges are copied; holes are zeroed unless the target is already zero.
    let mut jobs = Vec::new();
    let mut pos = 0;
    for (s, l) in data_ranges(disk)? {
        if s > pos && !zeroed {
            push_jobs(&mut jobs, pos, s - pos, false);
        }
        push_jobs(&mut jobs, s, l, true);
        pos = s + l;
    }
    if pos < size && !zeroed {
        push_jobs(&mut jobs, pos, size - pos, false);
    }
    progress.start("export", jobs.iter().map(Job::len).sum());
    let opts = CopyOptions { skip_zeros: zeroed, threads: cfg.threads };
    let r = copy::run(disk, &target, &jobs, opts, progress);
    progress.finish();
    let st = match r {
        Ok(st) => st,
        Err(f) => {
            let _ = target.flush();
            let e =
                ExportError::Incomplete { at: f.at, complete: f.complete, written: f.stats.written, cause: f.cause };
            return Err(Error::from(e).in_file(cfg.target.display()));
        }
    };
    target.flush()?;
    let mut stats = ExportStats {
        written: st.written,
        skipped: st.skipped,
        zeroed: st.zeroed,
        elapsed: started.elapsed(),
        verified: false,
    };
    if cfg.verify {
        verify(disk, &target, cfg, progress)?;
        stats.verified = true;
    }
    Ok(stats)
}

/// Re-reads the target and compares it with the disk, piece by piece, in parallel.
fn verify(disk: &Disk, target: &Target, cfg: &ExportConfig, progress: &dyn Progress) -> Result<()> {
    let size = disk.size();
    let pieces = size.div_ceil(PIECE);
    progress.start("verify", size);
    let next = AtomicU64::new(0);
    let bad: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..cfg.threads.max(1) {
            s.spawn(|| {
                let (mut a, mut b) = (Vec::new(), vec![0u8; PIECE as usize]);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= pieces || bad.lock().is_some() {
                        break;
                    }
                    let off = i * PIECE;
                    let n = (size - off).min(PIECE) as usize;
                    let r = disk.read_into(off, n, &mut a).and_then(|()| {
                        target
                            .read_exact_at(&mut b[..n], off)
                            .map_err(|e| Error::io(format!("re-reading {off:#x}"), e).in_file(cfg.target.display()))?;
                        match a.iter().zip(&b[..n]).position(|(x, y)| x != y) {
                            None => Ok(()),
                            Some(k) => Err(Error::from(ExportError::VerifyMismatch { at: off + k as u64 })
                                .in_file(cfg.target.display())),
                        }
                    });
                    match r {
                        Ok(()) => progress.advance(n as u64),
                        Err(e) => {
                            bad.lock().get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    progress.finish();
    match bad.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
