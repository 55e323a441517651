//! What a sync writes: every range of the disk that a layer above the one the target holds
//! decides, data and zeros alike, found with the one walk over the chain's extents.
//!
//! A range decided at depth `d` (0 = top) is new to the target exactly when `d` is above the
//! depth of the top the target holds. Data there is copied. Zeros decided there (VHDX
//! ZERO/UNMAPPED blocks, VMDK zero grains, SESparse unmapped and zero grains, a ZERO extent) are
//! written as zeros too, because they mask older data the target holds. Ranges no layer
//! allocates are decided below every layer (`Zero { depth == layers }`), so they are never new.
//! The walk never asks the layers the target holds ([`Chain::walk_above`]): their tables are not
//! read, which matters when they are large or remote.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::chain::{Chain, Extent};
use crate::disk::Disk;
use crate::error::Result;
use crate::export::{Job, push_jobs};

/// One range a sync writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlannedRange {
    pub start: u64,
    pub length: u64,
    /// The layer that decides it (0 = top).
    pub depth: usize,
    /// Data to copy (false: zeros to write).
    pub data: bool,
}

/// Bytes one new layer contributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerBytes {
    pub depth: usize,
    pub path: String,
    pub data: u64,
    pub zero: u64,
}

/// Everything a sync will write.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub ranges: Vec<PlannedRange>,
    /// One entry per layer above the one the target holds, top first.
    pub layers: Vec<LayerBytes>,
    #[serde(skip)]
    pub jobs: Vec<Job>,
}

impl Plan {
    /// The ranges decided above depth `held` of `chain`.
    pub fn new(chain: &Chain, held: usize) -> Result<Plan> {
        let mut layers: Vec<LayerBytes> = chain.layers()[..held]
            .iter()
            .enumerate()
            .map(|(depth, l)| LayerBytes { depth, path: l.location().to_string(), data: 0, zero: 0 })
            .collect();
        let mut ranges: Vec<PlannedRange> = Vec::new();
        for e in chain.walk_above(0, held) {
            let e: Extent = e?;
            let depth = e.depth();
            if depth >= held {
                continue;
            }
            let data = e.is_data();
            let lb = &mut layers[depth];
            if data {
                lb.data += e.len
            } else {
                lb.zero += e.len
            }
            // One range per run of one layer and kind, wherever the layer stores it.
            match ranges.last_mut() {
                Some(r) if r.depth == depth && r.data == data && r.start + r.length == e.start => r.length += e.len,
                _ => ranges.push(PlannedRange { start: e.start, length: e.len, depth, data }),
            }
        }
        let mut jobs = Vec::new();
        // Adjacent ranges of one kind become one run of jobs, whichever layers decide them.
        let mut run: Option<(u64, u64, bool)> = None;
        for r in &ranges {
            match &mut run {
                Some((s, l, d)) if *d == r.data && *s + *l == r.start => *l += r.length,
                _ => {
                    if let Some((s, l, d)) = run {
                        push_jobs(&mut jobs, s, l, d);
                    }
                    run = Some((r.start, r.length, r.data));
                }
            }
        }
        if let Some((s, l, d)) = run {
            push_jobs(&mut jobs, s, l, d);
        }
        Ok(Plan { ranges, layers, jobs })
    }

    pub fn data_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.data).sum()
    }
    pub fn zero_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.zero).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// A read rate measured on the source.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReadRate {
    /// Bytes read.
    pub bytes: u64,
    #[serde(serialize_with = "secs")]
    pub took: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl ReadRate {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.took.as_secs_f64().max(1e-6)
    }
}

/// How much of the planned data [`measure_read_rate`] reads at most, and for how long.
pub const MEASURE_BYTES: u64 = 64 << 20;
const MEASURE_TIME: Duration = Duration::from_secs(2);

/// Reads the first planned data pieces, up to [`MEASURE_BYTES`] or 2 seconds, with `threads`
/// readers as the sync itself would, through the whole read path (tables, chain, source).
/// `None` when the plan has no data to read.
pub fn measure_read_rate(disk: &Disk, plan: &Plan, threads: usize) -> Result<Option<ReadRate>> {
    let mut pieces = Vec::new();
    let mut total = 0;
    for j in &plan.jobs {
        if let Job::Copy(off, n) = *j {
            pieces.push((off, n));
            total += n;
            if total >= MEASURE_BYTES {
                break;
            }
        }
    }
    if pieces.is_empty() {
        return Ok(None);
    }
    let started = Instant::now();
    let (next, read) = (AtomicUsize::new(0), AtomicU64::new(0));
    let failure = parking_lot::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, pieces.len()) {
            s.spawn(|| {
                let mut buf = Vec::new();
                while started.elapsed() < MEASURE_TIME {
                    let Some(&(off, n)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    if let Err(e) = disk.read_into(off, n as usize, &mut buf) {
                        failure.lock().get_or_insert(e);
                        break;
                    }
                    read.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    Ok(Some(ReadRate { bytes: read.into_inner(), took: started.elapsed() }))
}
