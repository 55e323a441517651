//! The copy engine shared by `export` and `sync`: a list of jobs (copy a range of the disk, or
//! make a range of the target read as zeros) carried out by a few worker threads.
//!
//! Each worker takes the next job, reads its piece of the disk into its own buffer, and writes
//! it straight away. Measured against a reader pool feeding one writer through channels, this
//! does the same system calls with no hand-off: no channel wake-ups (the `sched_yield` and
//! `futex` storms of a 2-core machine), and the piece is written while it is still in the
//! core's cache. Writes to one file serialize on its inode lock anyway, so the workers take
//! turns at writing through a mutex, where a waiting worker sleeps: on the inode lock it spins
//! (`rwsem_spin_on_owner`), taking the core another worker needs for its read. One worker's
//! read overlapping another's write is the parallelism that pays.
//!
//! On a target that reads as zeros, pieces are scanned in 4 KiB units and only the non-zero runs
//! are written, as `qemu-img convert -S 4k` does. Each unit is compared with one unit of zeros
//! that stays in L1, not with a zero buffer the size of the piece.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::Target;
use crate::disk::Disk;
use crate::error::Error;
use crate::progress::Progress;

/// Size of one copy piece: small enough to stay in a core's cache between read and write.
pub const PIECE: u64 = 1 << 20;
/// Size of one zeroing job (progress moves once per job).
const ZERO_PIECE: u64 = 256 << 20;
/// Granularity of zero detection on zeroed targets (as `qemu-img convert -S 4k`).
pub const ZERO_UNIT: usize = 4096;

/// One unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Copy `[start, start + len)` of the disk to the same place on the target.
    Copy(u64, u64),
    /// Make `[start, start + len)` of the target read as zeros.
    Zero(u64, u64),
}

impl Job {
    pub fn start(&self) -> u64 {
        match *self {
            Job::Copy(s, _) | Job::Zero(s, _) => s,
        }
    }
    pub fn len(&self) -> u64 {
        match *self {
            Job::Copy(_, n) | Job::Zero(_, n) => n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends the jobs for `[start, start + len)`: copied (`copy`) or zeroed, in pieces.
pub fn push_jobs(jobs: &mut Vec<Job>, start: u64, len: u64, copy: bool) {
    let piece = if copy { PIECE } else { ZERO_PIECE };
    let mut p = start;
    while p < start + len {
        let n = (start + len - p).min(piece);
        jobs.push(if copy { Job::Copy(p, n) } else { Job::Zero(p, n) });
        p += n;
    }
}

/// How to copy.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// The target reads as zeros: all-zero units of copied data need not be written.
    pub skip_zeros: bool,
    pub threads: usize,
}

/// What was done.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyStats {
    /// Bytes of data written.
    pub written: u64,
    /// Bytes of copied ranges that were zeros and not written (zeroed targets only).
    pub skipped: u64,
    /// Bytes made to read as zeros by zeroing.
    pub zeroed: u64,
}

/// A copy that stopped part-way.
#[derive(Debug)]
pub struct CopyFailure {
    /// Where it failed.
    pub at: u64,
    /// Every job below this offset was done completely.
    pub complete: u64,
    pub stats: CopyStats,
    pub cause: Error,
}

/// One unit of zeros to compare with: `memcmp` against a buffer that stays in L1 is vectorized
/// and stops at the first non-zero byte; a byte or word loop in Rust is several times slower.
static ZEROS: [u8; ZERO_UNIT] = [0; ZERO_UNIT];

fn is_zero(unit: &[u8]) -> bool {
    unit == &ZEROS[..unit.len()]
}

/// The runs of `buf` that are not all zeros, in units of [`ZERO_UNIT`], merged.
pub fn nonzero_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (k, unit) in buf.chunks(ZERO_UNIT).enumerate() {
        if is_zero(unit) {
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

/// Shared state of one run.
struct Run<'a> {
    disk: &'a Disk,
    target: &'a Target,
    jobs: &'a [Job],
    opts: CopyOptions,
    progress: &'a dyn Progress,
    next: AtomicUsize,
    done: Vec<AtomicBool>,
    written: AtomicU64,
    skipped: AtomicU64,
    zeroed: AtomicU64,
    stop: AtomicBool,
    failure: Mutex<Option<(u64, Error)>>,
    /// Held while writing: writers wait asleep here instead of spinning on the inode lock. A
    /// std mutex, which sleeps on a futex; parking_lot's yields in a loop first.
    write_turn: std::sync::Mutex<()>,
}

impl Run<'_> {
    fn fail(&self, at: u64, e: Error) {
        self.stop.store(true, Ordering::Relaxed);
        let mut f = self.failure.lock();
        if f.as_ref().is_none_or(|(o, _)| at < *o) {
            *f = Some((at, e));
        }
    }

    fn io(&self, what: String, e: std::io::Error) -> Error {
        Error::io(what, e).in_file(self.target.path().display())
    }

    /// Takes jobs until none is left or one failed.
    fn work(&self) {
        let mut buf = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&job) = self.jobs.get(i) else { break };
            let r = match job {
                Job::Copy(off, n) => self.copy(off, n, &mut buf),
                Job::Zero(off, n) => self
                    .target
                    .zero_range(off, n)
                    .map(|()| {
                        self.zeroed.fetch_add(n, Ordering::Relaxed);
                    })
                    .map_err(|e| self.io(format!("zeroing {n} bytes at {off:#x}"), e)),
            };
            match r {
                Ok(()) => {
                    self.done[i].store(true, Ordering::Release);
                    self.progress.advance(job.len());
                }
                Err(e) => self.fail(job.start(), e),
            }
        }
    }

    fn copy(&self, off: u64, n: u64, buf: &mut Vec<u8>) -> crate::Result<()> {
        self.disk.read_into(off, n as usize, buf)?;
        let whole = [(0, buf.len())];
        let runs = if self.opts.skip_zeros { nonzero_runs(buf) } else { whole.to_vec() };
        let mut kept = 0;
        let _turn = self.write_turn.lock().unwrap_or_else(|p| p.into_inner());
        for (s, l) in runs {
            let at = off + s as u64;
            self.target
                .write_all_at(&buf[s..s + l], at)
                .map_err(|e| self.io(format!("writing {l} bytes at {at:#x}"), e))?;
            kept += l as u64;
            self.written.fetch_add(l as u64, Ordering::Relaxed);
        }
        self.skipped.fetch_add(buf.len() as u64 - kept, Ordering::Relaxed);
        Ok(())
    }
}

/// Carries out `jobs` (in order of their offsets) on `target`, reporting bytes to `progress`.
pub fn run(
    disk: &Disk,
    target: &Target,
    jobs: &[Job],
    opts: CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyStats, Box<CopyFailure>> {
    let r = Run {
        disk,
        target,
        jobs,
        opts,
        progress,
        next: AtomicUsize::new(0),
        done: jobs.iter().map(|_| AtomicBool::new(false)).collect(),
        written: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        zeroed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        write_turn: std::sync::Mutex::new(()),
    };
    let threads = opts.threads.clamp(1, jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| r.work());
        }
    });
    let stats = CopyStats {
        written: r.written.load(Ordering::Relaxed),
        skipped: r.skipped.load(Ordering::Relaxed),
        zeroed: r.zeroed.load(Ordering::Relaxed),
    };
    match r.failure.into_inner() {
        None => Ok(stats),
        Some((at, cause)) => {
            // Everything below the first unfinished job was written completely.
            let complete = jobs
                .iter()
                .zip(&r.done)
                .find(|(_, d)| !d.load(Ordering::Acquire))
                .map_or(disk.size(), |(j, _)| j.start());
            Err(Box::new(CopyFailure { at, complete, stats, cause }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_merge_units_and_skip_zero_ones() {
        let mut b = vec![0u8; 5 * ZERO_UNIT - 100];
        b[10] = 1;
        b[ZERO_UNIT + 5] = 1;
        b[4 * ZERO_UNIT + 7] = 1;
        assert_eq!(nonzero_runs(&b), vec![(0, 2 * ZERO_UNIT), (4 * ZERO_UNIT, ZERO_UNIT - 100)]);
        assert!(nonzero_runs(&vec![0u8; 3 * ZERO_UNIT]).is_empty());
    }

    #[test]
    fn jobs_are_pieces_of_the_range() {
        let mut j = Vec::new();
        push_jobs(&mut j, 10, 2 * PIECE + 5, true);
        push_jobs(&mut j, 3 * PIECE, 5, false);
        assert_eq!(
            j,
            vec![
                Job::Copy(10, PIECE),
                Job::Copy(10 + PIECE, PIECE),
                Job::Copy(10 + 2 * PIECE, 5),
                Job::Zero(3 * PIECE, 5)
            ]
        );
    }
}
