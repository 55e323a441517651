//! Opening: the layer above `chain` and `formats` that turns an IMAGE named by the user into
//! [`Disk`]s. It owns the open configuration, opens the top through the [`Gate`], asks the
//! formats what the source holds, and hands the chain a [`ParentResolver`] that finds parents
//! through the same gate. Data and control flow one way: cmd → open → chain/formats → layer →
//! source.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::chain::{Chain, ChainError, Limits, Link, ParentResolver};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::formats::{self, FormatContext, Opened, xva};
use crate::gate::{Candidate, Gate, Lookup, Policy};
use crate::layer::{Layer, ParentRef};
use crate::progress::Progress;
use crate::source::{FileId, Location};

/// Everything that decides how images are opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Where named files may come from, and which kinds.
    pub policy: Policy,
    /// How chains are followed.
    pub limits: Limits,
    /// Memory bound of each chain's merged block map cache.
    pub map_cache_bytes: usize,
    /// XVA settings (cache directory, checksum verification).
    pub xva: xva::Options,
    /// Leave each chain's top out, as if it were absent (`--exclude-top`): the running VM's
    /// active image. It is read only for its parent link; the disk keeps its name.
    pub exclude_top: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            policy: Policy::default(),
            limits: Limits::default(),
            map_cache_bytes: 64 << 20,
            xva: Default::default(),
            exclude_top: false,
        }
    }
}

/// Opens every image as disks, named uniquely (`<stem>.raw`, then `<stem>-2.raw`, …).
pub fn open_images(images: &[Location], opts: &OpenOptions, progress: &dyn Progress) -> Result<Vec<Disk>> {
    let policy = Arc::new(opts.policy.clone());
    let mut disks: Vec<Disk> = Vec::new();
    for img in images {
        for (name, chain, mtime) in open_image(img, &policy, opts, progress)? {
            let name = unique_name(name, &disks);
            disks.push(Disk::new(name, chain, mtime));
        }
    }
    Ok(disks)
}

/// One image: a chain named after its file, or every disk of an XVA.
fn open_image(
    img: &Location,
    policy: &Arc<Policy>,
    opts: &OpenOptions,
    progress: &dyn Progress,
) -> Result<Vec<(String, Chain, SystemTime)>> {
    let (gate, src) = Gate::new(policy.clone()).open_top(img)?;
    let id = src.id();
    let mtime = id.map_or(SystemTime::UNIX_EPOCH, mtime_of);
    let ctx = FormatContext { gate: &gate, xva: &opts.xva, progress };
    if opts.exclude_top {
        let loc = src.location().clone();
        let layer =
            formats::open_parent_link(src, &ctx)?.ok_or_else(|| Error::from(ChainError::NothingBelow).in_file(&loc))?;
        let top = Link { layer, id, found: None };
        let chain = Chain::open_below(top, &Resolver { ctx }, opts.limits, opts.map_cache_bytes)?;
        return Ok(vec![(formats::raw_name(&img.file_name()), chain, mtime)]);
    }
    match formats::open(src, &ctx)? {
        Opened::Layer(layer) => {
            let top = Link { layer, id, found: None };
            let chain = Chain::open(top, &Resolver { ctx }, opts.limits, opts.map_cache_bytes)?;
            Ok(vec![(formats::raw_name(&img.file_name()), chain, mtime)])
        }
        Opened::Disks(disks) => Ok(disks
            .into_iter()
            .map(|(name, layer)| (name, Chain::from_layers(vec![layer], opts.map_cache_bytes), mtime))
            .collect()),
    }
}

fn mtime_of(id: FileId) -> SystemTime {
    let ns = id.mtime_ns.max(0) as u128;
    SystemTime::UNIX_EPOCH + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
}

/// Parents come through the chain's gate, and are opened by the formats.
struct Resolver<'a> {
    ctx: FormatContext<'a>,
}

impl ParentResolver for Resolver<'_> {
    fn lookup(&self, child: &dyn Layer, pref: &ParentRef) -> Lookup {
        self.ctx.gate.lookup(&child.location().dir(), &pref.hints)
    }

    fn open(&self, child: &dyn Layer, at: &Candidate) -> Result<Option<Link>> {
        let Some(src) = self.ctx.gate.open_named(at, &child.location().dir())? else { return Ok(None) };
        let id = src.id();
        let layer = formats::open_layer(src, &self.ctx)?;
        Ok(Some(Link { layer, id, found: Some(at.by.clone()) }))
    }
}

/// `name`, or `name` with `-2`, `-3`, … before the extension if a disk already has it.
pub fn unique_name(name: String, disks: &[Disk]) -> String {
    let taken = |n: &str| disks.iter().any(|d| d.name() == n);
    if !taken(&name) {
        return name;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) => (s.to_string(), format!(".{e}")),
        None => (name.clone(), String::new()),
    };
    let mut i = 2;
    loop {
        let n = format!("{stem}-{i}{ext}");
        if !taken(&n) {
            return n;
        }
        i += 1;
    }
}
