//! Opening: the layer above `chain` and `formats` that turns an IMAGE named by the user into
//! [`Disk`]s. It owns the open configuration, opens the top through the [`Gate`], asks the
//! formats what the source holds, and hands the chain a [`ParentResolver`] that finds parents
//! through the same gate. Data and control flow one way: cmd → open → chain/formats → layer →
//! source.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::chain::{Chain, ChainError, Limits, Link, ParentResolver};
use crate::compose::{self, ComposeError, ComposedLayer};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::formats::{self, FormatContext, Opened, raw::RawLayer, xva};
use crate::gate::{Candidate, Gate, Lookup, Policy};
use crate::layer::{Layer, ParentRef};
use crate::progress::Progress;
use crate::source::remote::{RemoteOptions, Remotes};
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
    /// How files on ssh hosts are reached and cached.
    pub remote: RemoteOptions,
    /// Compose every IMAGE into one partitioned disk, as this says (`--compose`).
    pub compose: Option<compose::Spec>,
    /// Leave each chain's top out, as if it were absent (`--exclude-top`): the running VM's
    /// active image. It is read only for its parent link; the disk keeps its name.
    pub exclude_top: bool,
}

/// An IMAGE as the user names it: `raw:PATH` for a raw volume read as is, anything else for an
/// image whose format is detected. Parsed here only, so every command reads IMAGEs alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// The top of a chain, or an XVA: the format is detected.
    Detect(Location),
    /// `raw:PATH`: a raw volume (file or block device), byte for byte.
    Raw(Location),
}

impl Image {
    /// The prefix of a raw volume (`raw:/dev/vg/lv`; `./raw:x` names a file called `raw:x`).
    pub const RAW_PREFIX: &'static str = "raw:";

    /// `arg` as an IMAGE; `locate` turns the rest (after any `raw:`) into a location.
    pub fn parse(arg: &OsStr, locate: impl FnOnce(&OsStr) -> Result<Location>) -> Result<Image> {
        match arg.as_bytes().strip_prefix(Self::RAW_PREFIX.as_bytes()) {
            Some(rest) => Ok(Image::Raw(locate(OsStr::from_bytes(rest))?)),
            None => Ok(Image::Detect(locate(arg)?)),
        }
    }

    pub fn location(&self) -> &Location {
        match self {
            Image::Detect(l) | Image::Raw(l) => l,
        }
    }
}

/// A location alone names an image whose format is detected.
impl From<Location> for Image {
    fn from(l: Location) -> Image {
        Image::Detect(l)
    }
}

impl std::fmt::Display for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::Detect(l) => write!(f, "{l}"),
            Image::Raw(l) => write!(f, "{}{l}", Self::RAW_PREFIX),
        }
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            policy: Policy::default(),
            limits: Limits::default(),
            map_cache_bytes: 64 << 20,
            xva: Default::default(),
            remote: RemoteOptions::default(),
            compose: None,
            exclude_top: false,
        }
    }
}

/// Opens every image as disks, named uniquely (`<stem>.raw`, then `<stem>-2.raw`, …); with
/// `opts.compose`, as the one disk composed of them all.
pub fn open_images<I: Clone + Into<Image>>(
    images: &[I],
    opts: &OpenOptions,
    progress: &dyn Progress,
) -> Result<Vec<Disk>> {
    let images: Vec<Image> = images.iter().cloned().map(Into::into).collect();
    let policy = Arc::new(opts.policy.clone());
    let gate = Gate::with_remotes(policy, Remotes::new(opts.remote.clone()));
    if let Some(spec) = &opts.compose {
        return Ok(vec![open_composed(&images, spec, &gate, opts, progress)?]);
    }
    let mut disks: Vec<Disk> = Vec::new();
    for img in &images {
        for (name, chain, mtime) in open_image(img, &gate, opts, progress)? {
            let name = unique_name(name, &disks);
            disks.push(Disk::new(name, chain, mtime));
        }
    }
    Ok(disks)
}

/// A partition table followed by each image as a partition, as one disk `<name>.raw`. Each
/// part's chain gets an equal share of the map cache.
fn open_composed(
    images: &[Image],
    spec: &compose::Spec,
    gate: &Gate,
    opts: &OpenOptions,
    progress: &dyn Progress,
) -> Result<Disk> {
    let share =
        OpenOptions { map_cache_bytes: (opts.map_cache_bytes / (images.len() + 1)).max(1 << 20), ..opts.clone() };
    let mut parts = Vec::new();
    let mut newest = SystemTime::UNIX_EPOCH;
    for img in images {
        let mut disks = open_image(img, gate, &share, progress)?;
        if disks.len() != 1 {
            return Err(Error::from(ComposeError::SeveralDisks(disks.len())).in_file(img));
        }
        let (_, chain, mtime) = disks.remove(0);
        newest = newest.max(mtime);
        parts.push(compose::Part { name: img.to_string(), label: img.location().file_name(), chain: Arc::new(chain) });
    }
    let layer = ComposedLayer::new(spec, parts)?;
    Ok(Disk::new(spec.file_name(), Chain::from_layers(vec![Arc::new(layer)], share.map_cache_bytes), newest))
}

/// One image: a chain named after its file, or every disk of an XVA; a raw volume as itself.
fn open_image(
    img: &Image,
    gate: &Gate,
    opts: &OpenOptions,
    progress: &dyn Progress,
) -> Result<Vec<(String, Chain, SystemTime)>> {
    let (gate, src) = gate.open_top(img.location())?;
    let id = src.id();
    let mtime = id.map_or(SystemTime::UNIX_EPOCH, mtime_of);
    let name = formats::raw_name(&img.location().file_name());
    if let Image::Raw(_) = img {
        let layer = Arc::new(RawLayer::open(src)?);
        return Ok(vec![(name, Chain::from_layers(vec![layer], opts.map_cache_bytes), mtime)]);
    }
    let ctx = FormatContext { gate: &gate, xva: &opts.xva, progress };
    if opts.exclude_top {
        let loc = src.location().clone();
        let layer =
            formats::open_parent_link(src, &ctx)?.ok_or_else(|| Error::from(ChainError::NothingBelow).in_file(&loc))?;
        let top = Link { layer, id, found: None };
        let chain = Chain::open_below(top, &Resolver { ctx }, opts.limits, opts.map_cache_bytes)?;
        note_identities(&chain)?;
        return Ok(vec![(name, chain, mtime)]);
    }
    match formats::open(src, &ctx)? {
        Opened::Layer(layer) => {
            let top = Link { layer, id, found: None };
            let chain = Chain::open(top, &Resolver { ctx }, opts.limits, opts.map_cache_bytes)?;
            note_identities(&chain)?;
            Ok(vec![(name, chain, mtime)])
        }
        Opened::Disks(disks) => Ok(disks
            .into_iter()
            .map(|(name, layer)| (name, Chain::from_layers(vec![layer], opts.map_cache_bytes), mtime))
            .collect()),
    }
}

/// Tells every source which layer identity was read from it (a remote chunk cache checks that
/// the bytes it kept belong to the same version).
fn note_identities(chain: &Chain) -> Result<()> {
    for l in chain.layers() {
        let ids = l.identity();
        if ids.is_empty() {
            continue;
        }
        let text = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" ");
        for s in l.sources() {
            s.note_identity(&text)?;
        }
    }
    Ok(())
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
