//! Warm migration: a target that remembers which chain state it holds, and `sync`, which writes
//! only what the layers above that state decide.
//!
//! `export` records the chain it wrote ([`export_recorded`]); `sync` ([`SyncPlan`]) checks, in
//! this order, that the state belongs to this target (the same file or device), that the disk
//! has its recorded virtual size, that nothing changed the target since (a fingerprint of its
//! size and its first and last MiB) and that the chain still contains the recorded top with
//! the recorded layers below it, unwritten since (identities; size and mtime of VHD files). Any other move is refused with one line saying why: applying
//! a delta to the wrong disk, or twice, corrupts the VM silently.
//!
//! Then it records that a sync toward the new top is in progress, writes the ranges the plan
//! names (`plan.rs`), makes the target durable, and only then names the new top in the state.
//! A sync that was killed leaves the state "in progress toward T": a rerun whose chain contains
//! T accepts the target although its fingerprint moved, and writes every range again (each
//! write is idempotent, and every range the killed run could have written is in the plan).

mod plan;
mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use plan::{LayerBytes, MEASURE_BYTES, Plan, PlannedRange, ReadRate, measure_read_rate};
pub use state::{FileStamp, LayerRecord, Pending, State, TargetRecord, default_path, identity_key};

use crate::disk::Disk;
use crate::error::{Error, ErrorKind, Kind, Result};
use crate::export::{CopyOptions, Create, ExportConfig, ExportStats, Target, copy, export};
use crate::progress::Progress;

/// Why a sync refuses or fails.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "no sync state: export to this target first (vdiskfs export IMAGE TARGET records it; an interrupted export records none)"
    )]
    NoState,
    #[error("a block device target needs --state FILE, the state its export recorded")]
    StateNeeded,
    #[error("not a vdiskfs sync state: {0}")]
    BadState(String),
    #[error("the state is that of another target, {recorded}, not {this}")]
    OtherTarget { recorded: String, this: String },
    #[error(
        "the disk's virtual size changed from {recorded} to {now} bytes since the target was written (resized): export it again"
    )]
    Resized { recorded: u64, now: u64 },
    #[error(
        "the target changed since vdiskfs last wrote it (recorded {recorded}, now {now}): it may no longer hold what the state says; export again"
    )]
    TargetChanged { recorded: String, now: String },
    #[error(
        "the target holds {top}, which this chain does not contain (a reverted snapshot, or another VM's disk): export again"
    )]
    TopNotInChain { top: String },
    #[error(
        "the chain below {top} differs from what the target holds ({have} where the target holds {want}): export again"
    )]
    BelowDiffers { top: String, have: String, want: String },
    #[error(
        "the target's recorded top {top} has no identity (an XVA disk or a VMDK without CID): sync cannot tell which layers are new"
    )]
    NoIdentity { top: String },
    #[error(
        "{layer} was written since the target took it (its size or modification time changed: a coalesce, or a VM started on it): export again"
    )]
    LayerChanged { layer: String },
    #[error("the state records no layers")]
    NoLayers,
    #[error(
        "a sync toward {toward} was interrupted, and this chain does not contain it: the target holds part of it; export again"
    )]
    InterruptedElsewhere { toward: String },
    #[error("--state cannot be recorded for an export with --overlay: the target would hold writes no chain has")]
    OverlayState,
    #[error(
        "the target is INCOMPLETE: the sync failed at {at:#x} ({written} bytes written); the state says a sync toward {toward} is in progress: run the same sync again to finish it"
    )]
    Incomplete {
        at: u64,
        written: u64,
        toward: String,
        #[source]
        cause: Error,
    },
}

impl ErrorKind for SyncError {
    fn kind(&self) -> Kind {
        match self {
            SyncError::NoState => Kind::NotFound,
            SyncError::StateNeeded | SyncError::OverlayState => Kind::Usage,
            SyncError::BadState(_) | SyncError::NoLayers => Kind::Corrupt,
            SyncError::Incomplete { cause, .. } => cause.kind(),
            _ => Kind::Mismatch,
        }
    }
}

/// What to sync.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub target: PathBuf,
    /// `--state FILE`; by default `TARGET.vdiskfs-sync.json` beside a file target.
    pub state: Option<PathBuf>,
    pub threads: usize,
}

/// What a sync did.
#[derive(Debug, Clone)]
pub struct SyncReport {
    pub written: u64,
    pub zeroed: u64,
    pub elapsed: Duration,
    /// The top the state now names.
    pub top: LayerRecord,
    pub state: PathBuf,
}

/// A sync, checked and planned, not yet written.
#[derive(Debug)]
pub struct SyncPlan<'a> {
    disk: &'a Disk,
    target: Target,
    state_path: PathBuf,
    state: State,
    held_depth: usize,
    plan: Plan,
    threads: usize,
}

fn state_path(cfg_target: &Path, given: Option<&Path>) -> Result<PathBuf> {
    default_path(cfg_target, given).ok_or_else(|| Error::from(SyncError::StateNeeded).in_file(cfg_target.display()))
}

impl<'a> SyncPlan<'a> {
    /// Checks the state against the target and the chain of `disk`, and plans the sync.
    pub fn prepare(disk: &'a Disk, cfg: &SyncConfig) -> Result<SyncPlan<'a>> {
        let state_path = state_path(&cfg.target, cfg.state.as_deref())?;
        let in_state = |e: SyncError| Error::from(e).in_file(state_path.display());
        let state = State::load(&state_path)?.ok_or_else(|| in_state(SyncError::NoState))?;
        if state.virtual_size != disk.size() {
            return Err(in_state(SyncError::Resized { recorded: state.virtual_size, now: disk.size() }));
        }
        let target = Target::open(&cfg.target, disk.size(), &disk.source_paths(), Create::Never)?;
        let md =
            target.file().metadata().map_err(|e| Error::io("cannot stat target", e).in_file(cfg.target.display()))?;
        let this = TargetRecord::of(&cfg.target, &md);
        if !state.target.same_object(&this) {
            let e = SyncError::OtherTarget { recorded: state.target.describe(), this: this.describe() };
            return Err(in_state(e));
        }
        let held_depth = held_depth(disk, &state).map_err(in_state)?;
        match &state.pending {
            // An interrupted sync: its toward-top must be at or above the held top here.
            Some(p) => {
                let toward = p.toward.first().ok_or_else(|| in_state(SyncError::NoLayers))?;
                let at = find(disk, toward);
                if at.is_none_or(|d| d > held_depth) {
                    return Err(in_state(SyncError::InterruptedElsewhere { toward: toward.describe() }));
                }
            }
            None => {
                let now = target_fingerprint(&target, disk.size())?;
                if now != state.fingerprint {
                    let e = SyncError::TargetChanged { recorded: state.fingerprint.clone(), now };
                    return Err(Error::from(e).in_file(cfg.target.display()));
                }
            }
        }
        let plan = Plan::new(disk.chain(), held_depth)?;
        Ok(SyncPlan { disk, target, state_path, state, held_depth, plan, threads: cfg.threads })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    /// The top the target holds, as recorded.
    pub fn held(&self) -> &LayerRecord {
        &self.state.layers[0]
    }
    /// Its depth in this chain (how many layers are new).
    pub fn held_depth(&self) -> usize {
        self.held_depth
    }
    /// The top this sync writes toward.
    pub fn new_top(&self) -> LayerRecord {
        LayerRecord::of(self.disk.chain().layers()[0].as_ref())
    }
    /// The interrupted sync this one finishes, if any.
    pub fn finishing(&self) -> Option<&Pending> {
        self.state.pending.as_ref()
    }
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Writes the plan: state "in progress" first, then the ranges, a flush, and the state
    /// naming the new top once the target is durable.
    pub fn apply(mut self, progress: &dyn Progress) -> Result<SyncReport> {
        let started = Instant::now();
        let records = state::records(self.disk.chain());
        let top = records[0].clone();
        // Nothing new: the held top is the top. (New layers that decide nothing still become
        // the state's top below.)
        if self.held_depth == 0 && self.state.pending.is_none() {
            return Ok(SyncReport { written: 0, zeroed: 0, elapsed: started.elapsed(), top, state: self.state_path });
        }
        self.state.pending = Some(Pending { toward: records.clone(), started_unix: state::now_unix() });
        self.state.save(&self.state_path)?;
        progress.start("sync", self.plan.jobs.iter().map(|j| j.len()).sum());
        let opts = CopyOptions { skip_zeros: false, threads: self.threads };
        let r = copy::run(self.disk, &self.target, &self.plan.jobs, opts, progress);
        progress.finish();
        let st = match r {
            Ok(st) => st,
            Err(f) => {
                let _ = self.target.flush();
                let e = SyncError::Incomplete {
                    at: f.at,
                    written: f.stats.written,
                    toward: top.describe(),
                    cause: f.cause,
                };
                return Err(Error::from(e).in_file(self.target.path().display()));
            }
        };
        self.target.flush()?;
        let fp = target_fingerprint(&self.target, self.disk.size())?;
        State::new(self.state.target.clone(), self.disk.size(), records, fp).save(&self.state_path)?;
        Ok(SyncReport {
            written: st.written,
            zeroed: st.zeroed,
            elapsed: started.elapsed(),
            top,
            state: self.state_path,
        })
    }
}

/// The depth in `disk`'s chain of the layer with `rec`'s identity.
fn find(disk: &Disk, rec: &LayerRecord) -> Option<usize> {
    let key = rec.identity.as_ref()?;
    disk.chain().layers().iter().position(|l| l.identity().first().map(identity_key).as_ref() == Some(key))
}

/// Where the recorded top is in the chain, with the recorded layers below it.
fn held_depth(disk: &Disk, state: &State) -> std::result::Result<usize, SyncError> {
    let top = state.top().ok_or(SyncError::NoLayers)?;
    if top.identity.is_none() {
        return Err(SyncError::NoIdentity { top: top.describe() });
    }
    let depth = find(disk, top).ok_or_else(|| SyncError::TopNotInChain { top: top.describe() })?;
    let below = state::records(disk.chain()).split_off(depth);
    for (i, want) in state.layers.iter().enumerate() {
        let have = below.get(i);
        if have.is_none_or(|h| h.identity != want.identity) {
            let have = have.map_or("the end of the chain".into(), |h| h.describe());
            return Err(SyncError::BelowDiffers { top: top.describe(), have, want: want.describe() });
        }
        if want.stamp.is_some() && have.is_some_and(|h| h.stamp != want.stamp) {
            return Err(SyncError::LayerChanged { layer: want.describe() });
        }
    }
    if below.len() > state.layers.len() {
        let have = below[state.layers.len()].describe();
        return Err(SyncError::BelowDiffers { top: top.describe(), have, want: "nothing".into() });
    }
    Ok(depth)
}

fn target_fingerprint(target: &Target, size: u64) -> Result<String> {
    state::fingerprint(|b, o| target.read_exact_at(b, o), target.len(), size)
        .map_err(|e| Error::io("reading the target's fingerprint", e).in_file(target.path().display()))
}

/// An export that records what the target then holds, so that a later `sync` can continue it.
/// The old state is removed before the target is written (an interrupted export leaves none).
/// Returns where the state was recorded, if anywhere: a block device needs `state`; an export
/// with an overlay records nothing (no chain holds its writes).
pub fn export_recorded(
    disk: &Disk,
    cfg: &ExportConfig,
    state: Option<&Path>,
    progress: &dyn Progress,
) -> Result<(ExportStats, Option<PathBuf>)> {
    if disk.overlay().is_some() && state.is_some() {
        return Err(Error::from(SyncError::OverlayState));
    }
    let path = default_path(&cfg.target, state);
    if let Some(p) = &path {
        state::remove(p)?;
    }
    let stats = export(disk, cfg, progress)?;
    let Some(path) = path.filter(|_| disk.overlay().is_none()) else { return Ok((stats, None)) };
    let t = &cfg.target;
    let f = std::fs::File::open(t).map_err(|e| Error::io("cannot reopen the target", e).in_file(t.display()))?;
    let md = f.metadata().map_err(|e| Error::io("cannot stat target", e).in_file(t.display()))?;
    let len = {
        use std::io::Seek;
        (&f).seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io("cannot find the target's size", e).in_file(t.display()))?
    };
    let fp = state::fingerprint(|b, o| std::os::unix::fs::FileExt::read_exact_at(&f, b, o), len, disk.size())
        .map_err(|e| Error::io("reading the target's fingerprint", e).in_file(t.display()))?;
    State::new(TargetRecord::of(t, &md), disk.size(), state::records(disk.chain()), fp).save(&path)?;
    Ok((stats, Some(path)))
}
