//! `vdiskfs export`: the merged disk (chain + overlay) written to a file or block device.
//!
//! Ranges are copied by several threads in 4 MiB pieces. When the target is new or known to be
//! zeroed, holes and all-zero pieces are skipped; otherwise holes are zeroed with
//! `FALLOC_FL_ZERO_RANGE` (files) or `BLKZEROOUT` (block devices), falling back to writing zeros.
//! The target is checked first: a block device is opened exclusively (which fails if it is
//! mounted or held), a regular file must not be attached to a loop device, neither may be one of
//! the sources, and it must be at least as large as the disk.

mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::disk::Disk;
use crate::error::{Error, ErrorKind, Kind, Result};
use crate::progress::Progress;
pub use target::{Create, Target};

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

#[derive(Debug, Clone, Copy)]
enum Job {
    /// Copy (a piece of) a data range.
    Copy(u64, u64),
    /// Make a hole read as zeros on a target that is not known to be zeroed.
    Zero(u64, u64),
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

/// Granularity of zero detection on zeroed targets (as `qemu-img convert -S 4k`).
const ZERO_UNIT: usize = 4096;

/// The runs of `buf` that are not all zeros, in units of [`ZERO_UNIT`], merged.
fn nonzero_runs(buf: &[u8], zeros: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (k, unit) in buf.chunks(ZERO_UNIT).enumerate() {
        if unit == &zeros[..unit.len()] {
            continue;
        }
        let s = k * ZERO_UNIT;
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += unit.len(),
            _ => runs.push((s, unit.len())),
        }
    }
    runs
}

/// Exports `disk` to `cfg.target`, reporting to `progress`. No file the disk reads may be the
/// target.
pub fn export(disk: &Disk, cfg: &ExportConfig, progress: &dyn Progress) -> Result<ExportStats> {
    let started = Instant::now();
    let target = Target::open(&cfg.target, disk.size(), &disk.source_paths(), Create::IfMissing)?;
    let zeroed = cfg.target_zeroed || target.created();
    let size = disk.size();
    // Plan: data ranges are copied; holes are zeroed unless the target is already zero.
    let data = data_ranges(disk)?;
    let mut jobs = Vec::new();
    let mut pos = 0;
    for &(s, l) in &data {
        if s > pos && !zeroed {
            jobs.push(Job::Zero(pos, s - pos));
        }
        let mut p = s;
        while p < s + l {
            let n = (s + l - p).min(PIECE);
            jobs.push(Job::Copy(p, n));
            p += n;
        }
        pos = s + l;
    }
    if pos < size && !zeroed {
        jobs.push(Job::Zero(pos, size - pos));
    }
    let total: u64 = jobs
        .iter()
        .map(|j| match j {
            Job::Copy(_, n) | Job::Zero(_, n) => *n,
        })
        .sum();
    progress.start("export", total);
    // Readers (several threads) read pieces of the disk; one writer puts them on the target. A
    // file system serializes buffered writes to one file on its inode lock, so parallel writers
    // only spin on each other; parallel reads are what pays (remote and deep chains).
    let (job_tx, job_rx) = crossbeam::channel::unbounded::<(usize, Job)>();
    for (i, j) in jobs.iter().enumerate() {
        let _ = job_tx.send((i, *j));
    }
    drop(job_tx);
    let readers = cfg.threads.max(1);
    // (job index, job, data, its non-zero runs (all of it when the target is not zeroed))
    type Piece = (usize, Job, Option<Vec<u8>>, Vec<(usize, usize)>);
    let (out_tx, out_rx) = crossbeam::channel::bounded::<Piece>(readers * 2);
    let (pool_tx, pool_rx) = crossbeam::channel::unbounded::<Vec<u8>>();
    let done: Vec<AtomicBool> = (0..jobs.len()).map(|_| AtomicBool::new(false)).collect();
    let (written, skipped, zeroed_bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<(u64, Error)>> = Mutex::new(None);
    let fail = |at: u64, e: Error| {
        stop.store(true, Ordering::Relaxed);
        let mut f = failure.lock();
        if f.as_ref().is_none_or(|(o, _)| at < *o) {
            *f = Some((at, e));
        }
    };
    let zero_piece = vec![0u8; PIECE as usize];
    let target = Arc::new(target);
    std::thread::scope(|s| {
        for _ in 0..readers {
            let out_tx = out_tx.clone();
            s.spawn(|| {
                let out_tx = out_tx;
                while let Ok((i, job)) = job_rx.recv() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Job::Copy(off, n) = job else {
                        let _ = out_tx.send((i, job, None, Vec::new()));
                        continue;
                    };
                    let mut buf = pool_rx.try_recv().unwrap_or_default();
                    match disk.read_into(off, n as usize, &mut buf) {
                        // Compared with a zero buffer: memcmp is vectorized, a byte loop is not.
                        Ok(()) if zeroed && buf[..] == zero_piece[..buf.len()] => {
                            // Nothing to write at all.
                            skipped.fetch_add(n, Ordering::Relaxed);
                            done[i].store(true, Ordering::Release);
                            progress.advance(n);
                            let _ = pool_tx.send(buf);
                        }
                        Ok(()) => {
                            let runs = if zeroed { nonzero_runs(&buf, &zero_piece) } else { vec![(0, buf.len())] };
                            let kept: usize = runs.iter().map(|r| r.1).sum();
                            skipped.fetch_add(n - kept as u64, Ordering::Relaxed);
                            let _ = out_tx.send((i, job, Some(buf), runs));
                        }
                        Err(e) => fail(off, e),
                    }
                }
            });
        }
        drop(out_tx);
        s.spawn(|| {
            while let Ok((i, job, buf, runs)) = out_rx.recv() {
                if stop.load(Ordering::Relaxed) {
                    continue;
                }
                let r = match (job, &buf) {
                    (Job::Copy(off, _), Some(b)) => runs.iter().try_for_each(|&(s, l)| {
                        let at = off + s as u64;
                        target
                            .write_all_at(&b[s..s + l], at)
                            .map(|()| {
                                written.fetch_add(l as u64, Ordering::Relaxed);
                            })
                            .map_err(|e| {
                                Error::io(format!("writing {l} bytes at {at:#x}"), e).in_file(cfg.target.display())
                            })
                    }),
                    (Job::Zero(off, n), _) => target
                        .zero_range(off, n)
                        .map(|()| {
                            zeroed_bytes.fetch_add(n, Ordering::Relaxed);
                        })
                        .map_err(|e| {
                            Error::io(format!("zeroing {n} bytes at {off:#x}"), e).in_file(cfg.target.display())
                        }),
                    (Job::Copy(off, _), None) => Err(Error::internal(format!("no data for {off:#x}"))),
                };
                let (Job::Copy(at, n) | Job::Zero(at, n)) = job;
                match r {
                    Ok(()) => {
                        done[i].store(true, Ordering::Release);
                        progress.advance(n);
                    }
                    Err(e) => fail(at, e),
                }
                if let Some(b) = buf {
                    let _ = pool_tx.send(b);
                }
            }
        });
    });
    progress.finish();
    if let Some((at, e)) = failure.into_inner() {
        // Everything below the first unfinished job was written completely.
        let complete_upto = jobs
            .iter()
            .zip(&done)
            .find(|(_, d)| !d.load(Ordering::Acquire))
            .map(|(j, _)| match j {
                Job::Copy(o, _) | Job::Zero(o, _) => *o,
            })
            .unwrap_or(size);
        let _ = target.flush();
        let written = written.load(Ordering::Relaxed);
        let e = ExportError::Incomplete { at, complete: complete_upto, written, cause: e };
        return Err(Error::from(e).in_file(cfg.target.display()));
    }
    target.flush()?;
    let mut stats = ExportStats {
        written: written.into_inner(),
        skipped: skipped.into_inner(),
        zeroed: zeroed_bytes.into_inner(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_merge_units_and_skip_zero_ones() {
        let zeros = vec![0u8; 5 * ZERO_UNIT];
        let mut b = vec![0u8; 5 * ZERO_UNIT - 100];
        b[10] = 1;
        b[ZERO_UNIT + 5] = 1;
        b[4 * ZERO_UNIT + 7] = 1;
        assert_eq!(nonzero_runs(&b, &zeros), vec![(0, 2 * ZERO_UNIT), (4 * ZERO_UNIT, ZERO_UNIT - 100)]);
        assert!(nonzero_runs(&vec![0u8; 3 * ZERO_UNIT], &zeros).is_empty());
    }
}
