//! The command line: clap types, validated into config types with no clap in them.

mod compose;
mod http;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use vdiskfs::chain::{DEFAULT_MAX_DEPTH, Limits, MAX_DEPTH_LIMIT};
use vdiskfs::formats::xva;
use vdiskfs::fs::fuse::FuseOptions;
use vdiskfs::gate::Policy;
use vdiskfs::open::{Image, OpenOptions};
use vdiskfs::source::Location;
use vdiskfs::source::remote::{self, RemoteOptions};
use vdiskfs::{Error, Result};

pub use compose::ComposeArgs;
pub use http::HttpArgs;

const ABOUT: &str = "Mount VHD, VHDX, VMDK and XVA snapshot chains as flat raw image files.";
const LONG_ABOUT: &str = "\
Mount VHD, VHDX, VMDK and XVA snapshot chains as flat raw image files.

Each IMAGE is the top of a chain; its parents are found through the locators stored in the image
and checked against the identity the child expects. The result is one raw file per chain,
MOUNTPOINT/<stem>.raw, that qemu-img, dd, losetup and virt-v2v read directly; it is read-only
unless --overlay FILE takes the writes. Source images are only ever opened read-only.

Examples:
  vdiskfs info child.vhd                      show the chain, top to base
  vdiskfs map --json child.vhd                allocation, shaped like qemu-img map --output=json
  vdiskfs check vm.xva                        verify every XVA chunk checksum
  vdiskfs mount --daemon child.vhd /mnt/v     then: qemu-img convert -O qcow2 /mnt/v/child.raw out.qcow2
  fusermount3 -u /mnt/v                       unmount (or Ctrl-C a foreground mount)
  vdiskfs mount --overlay fix.ovl child.vhd /mnt/v   writable; writes go to fix.ovl, never to the images
  vdiskfs export --overlay fix.ovl child.vhd /dev/vg/vm-disk   chain + overlay onto the target
  vdiskfs mount --daemon ssh://root@esx/vmfs/volumes/ds1/vm/vm-000002.vmdk /mnt/v
                                              a chain where it lives, read over ssh as needed
  vdiskfs info --http-user root --pin-sha256 AB:CD:… 'https://esx/folder/vm/vm-000002.vmdk?dcPath=ha-datacenter&dsName=ds1'
                                              over HTTPS from ESXi (password in VDISKFS_HTTP_PASSWORD)
  vdiskfs mount --compose mbr --bootable 1 --part-type 2=swap raw:/dev/vg/root raw:/dev/vg/swap /mnt/v
                                              one partitioned disk, /mnt/v/disk.raw, from two volumes
  vdiskfs sync --exclude-top vm-000002.vmdk vm.raw    only what changed since vm.raw was written";

#[derive(Debug, Parser)]
#[command(name = "vdiskfs", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount each chain as MOUNTPOINT/<stem>.raw (read-only unless --overlay).
    #[command(
        override_usage = "vdiskfs mount [OPTIONS] IMAGE... MOUNTPOINT",
        long_about = "\
Mount each chain as MOUNTPOINT/<stem>.raw, where <stem> is the image's file name without its last
extension. Stays in the foreground until unmounted (fusermount3 -u MOUNTPOINT, umount, Ctrl-C,
SIGTERM). With --daemon it returns once the mount is ready: exit 0 when reads will succeed,
non-zero with the error when opening failed. With --overlay FILE the raw file is writable and
every write goes to FILE (created if missing, reattached if present); the images are never
written.

Example:
  vdiskfs mount --daemon --parent-dir /srv/base vm-snap2.vhd /mnt/vm
  losetup -r -f --show /mnt/vm/vm-snap2.raw"
    )]
    Mount(MountArgs),
    /// Show the chain top to base: format, sizes, identity, parent link, allocation.
    #[command(long_about = "\
Show the chain top to base. For each layer: path, format and subformat, virtual size, block size,
identity (VHD UUID, VHDX DataWriteGuid, VMDK CID), the parent it expects and where it was found,
and allocated bytes.

Example:
  vdiskfs info --json child.vhd | jq '.disks[0].layers[].path'")]
    Info(InfoArgs),
    /// Show allocation extents and the layer that owns each (qemu-img map style).
    #[command(long_about = "\
Show allocation extents of the merged chain. --json prints the shape of `qemu-img map
--output=json` (start, length, depth, present, zero, data, compressed, offset), where depth names
the layer that owns the extent (0 = top) and equals the number of layers where nothing is
allocated.

Example:
  vdiskfs map --json child.vhd | jq '[.[] | select(.depth == 0) | .length] | add'")]
    Map(InfoArgs),
    /// Write the merged disk (chain + overlay) to a file or block device.
    #[command(long_about = "\
Write the merged disk (chain + optional overlay) to TARGET, a file or a block device. A new file
is created sparse; holes and all-zero ranges are skipped when the target is new or
--target-zeroed says it reads as zeros, and are zeroed otherwise. Copies with several threads and
shows a progress bar. Refuses a target that is mounted or in use, attached to a loop device, one
of the sources, or smaller than the disk. On failure it says how much of the target was written.

Examples:
  vdiskfs export --overlay fixups.ovl --verify vm-snap.vhd /dev/vg0/vm-disk
  vdiskfs export --compose mbr --part-offset 16KiB raw:/dev/xen/vm-disk /dev/kvm/vm-disk")]
    Export(ExportArgs),
    /// Write to TARGET only what changed since its last export or sync (warm migration).
    #[command(long_about = "\
Write to TARGET only what the chain's layers above the one TARGET holds decide: their data, and
their zero and unmapped blocks as zeros (they mask older data on the target). TARGET's state
(written by export and by each sync) names the chain it holds; it is TARGET.vdiskfs-sync.json
beside a file target, or --state FILE (required for a block device). Refused, with one line
saying why: a chain that does not contain the recorded top (a reverted snapshot or another VM),
a changed virtual size, the state of another target, or a target changed since its last step.
The state says a sync is in progress while it writes, so a sync that was interrupted can be
run again to finish; it names the new top only once the target is durable. --dry-run prints
what would be written and an estimated time at the source's measured read rate.

Warm migration (ESXi; XenServer and Hyper-V alike, see the README):
  vim-cmd vmsvc/snapshot.create 95 snap1
  vdiskfs export --exclude-top --state vm.state vm-000001.vmdk /dev/sdb    base, VM running
  vim-cmd vmsvc/snapshot.create 95 snap2
  vdiskfs sync --exclude-top --state vm.state vm-000002.vmdk /dev/sdb      snap1, VM running
  vim-cmd vmsvc/power.shutdown 95
  vdiskfs sync --state vm.state vm-000002.vmdk /dev/sdb                    the last delta")]
    Sync(SyncArgs),
    /// Verify every stored checksum (XVA chunks) by reading all data; report each bad range.
    #[command(long_about = "\
Read every allocated byte of every disk of IMAGE through the normal read path, so that every
stored checksum is verified (XVA: each chunk's SHA-1 or XXH64, whatever --no-verify says) and
every table a read needs is exercised. Each bad range is printed with the reason (for XVA it
names the chunk member, e.g. Ref:3/00000042). Exits 1 if any range is bad. A progress bar goes
to stderr when it is a terminal; --json prints the report as JSON.

Example:
  vdiskfs check vm.xva && vdiskfs mount --daemon --no-verify vm.xva /mnt/vm")]
    Check(InfoArgs),
}

impl Command {
    /// Commands whose output is a report on stdout (a closed pipe should end them quietly);
    /// `mount` and `export` are not, and must never die of SIGPIPE.
    pub fn prints_to_stdout(&self) -> bool {
        matches!(self, Command::Info(_) | Command::Map(_) | Command::Check(_))
            || matches!(self, Command::Sync(a) if a.dry_run)
    }
}

/// How parents are found and checked, and how remote images are read (every subcommand).
#[derive(Debug, Args, Clone)]
pub struct OpenArgs {
    /// Also look for parents (by file name) in DIR; repeatable. Parents found through relative
    /// locators must lie in the image's own directory or one of these. DIR may be
    /// ssh://[user@]host[:port]/dir or an http(s):// directory URL for an image on that host.
    #[arg(long = "parent-dir", value_name = "DIR")]
    pub parent_dirs: Vec<PathBuf>,
    /// Follow absolute and out-of-tree parent paths stored in images. Off by default: a crafted
    /// image could otherwise point at any file on this machine.
    #[arg(long)]
    pub trust_locators: bool,
    /// Accept a parent whose UUID/GUID/CID differs from what its child expects. The result is
    /// only right if the parent really is unchanged.
    #[arg(long)]
    pub ignore_parent_id: bool,
    /// Refuse chains deeper than N layers.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
    /// Directory for archive indexes (XVA) and the chunk cache of remote images [default:
    /// $XDG_CACHE_HOME/vdiskfs or ~/.cache/vdiskfs].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bound of the remote chunk cache in --cache-dir (K, M, G, T suffixes; 0: memory only);
    /// least recently used chunks go first.
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Remote images: a read the host cannot answer within SECS fails with EIO (the mount stays
    /// up; later reads reconnect).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Remote images: the ssh client and its options, like rsync -e (for example
    /// "ssh -F ./cfg -i key"). vdiskfs adds BatchMode=yes and keep-alives: it never prompts.
    #[arg(long, value_name = "CMD", default_value = "ssh")]
    pub ssh_command: String,
    /// Remote images: ssh connections per host.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub ssh_connections: usize,
    /// Skip verifying checksums stored in images (XVA chunk checksums), for speed.
    #[arg(long)]
    pub no_verify: bool,
    /// Accept block devices as parents or extents even when the chain's top is a regular file
    /// (they are accepted anyway when the top is a block device, as on XenServer LVM storage).
    #[arg(long)]
    pub allow_devices: bool,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub compose: ComposeArgs,
    /// Treat the chain as if IMAGE (its top) were absent: the disk is IMAGE's parent chain. For
    /// the running VM's active image, which the hypervisor is still writing (ESXi keeps its
    /// extent locked; only its descriptor is read). The disk keeps IMAGE's name.
    #[arg(long)]
    pub exclude_top: bool,
}

impl OpenArgs {
    pub fn options(&self) -> Result<OpenOptions> {
        let mut parent_dirs = Vec::new();
        for d in &self.parent_dirs {
            if let Some(url) = remote_url(d) {
                let dir = Location::parse_url(url).expect("a URL");
                parent_dirs.push(dir.map_err(|e| Error::usage(format!("--parent-dir {}: {e}", shown_url(url))))?);
                continue;
            }
            if !d.is_dir() {
                return Err(Error::usage(format!("--parent-dir {}: not a directory", d.display())));
            }
            parent_dirs.push(Location::local(absolute(d)?));
        }
        if self.max_depth == 0 || self.max_depth > MAX_DEPTH_LIMIT {
            return Err(Error::usage(format!("--max-depth must be between 1 and {MAX_DEPTH_LIMIT}")));
        }
        if self.timeout == 0 || self.timeout > 3600 {
            return Err(Error::usage("--timeout must be between 1 and 3600 seconds"));
        }
        if self.ssh_connections == 0 || self.ssh_connections > 16 {
            return Err(Error::usage("--ssh-connections must be between 1 and 16"));
        }
        let ssh_command = remote::split_command(&self.ssh_command)
            .ok_or_else(|| Error::usage(format!("--ssh-command {:?}: empty or unbalanced quotes", self.ssh_command)))?;
        let cache_dir = match &self.cache_dir {
            Some(d) => absolute(d)?,
            None => default_cache_dir(),
        };
        let remote = RemoteOptions {
            ssh_command,
            timeout: std::time::Duration::from_secs(self.timeout),
            cache_dir: (self.cache_size > 0).then(|| cache_dir.clone()),
            cache_bytes: self.cache_size,
            connections: self.ssh_connections,
            http: self.http.options()?,
            ..RemoteOptions::default()
        };
        Ok(OpenOptions {
            policy: Policy { parent_dirs, trust_locators: self.trust_locators, allow_devices: self.allow_devices },
            limits: Limits { max_depth: self.max_depth, check_identity: !self.ignore_parent_id },
            xva: xva::Options { cache_dir: Some(cache_dir), verify: !self.no_verify, ..Default::default() },
            remote,
            compose: self.compose.spec()?,
            exclude_top: self.exclude_top,
            ..OpenOptions::default()
        })
    }
}

/// The text of an `ssh://`, `http://` or `https://` argument, if it is one.
fn remote_url(p: &Path) -> Option<&str> {
    p.to_str().filter(|s| Location::parse_url(s).is_some())
}

/// A URL argument as errors show it: without a presigned URL's signature.
fn shown_url(url: &str) -> String {
    match Location::parse_url(url) {
        Some(Ok(l)) => l.to_string(),
        _ => url.split('?').next().unwrap_or(url).to_string(),
    }
}

/// `8G`, `512M`, `100000` (bytes): a size with an optional binary suffix.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: use a number with K, M, G or T")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?}: not a size"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?}: too large"))
}

/// A path from the command line, made absolute (the daemon changes its directory to `/`).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(p.display().to_string(), e))
}

/// A location on the command line: a local path, `ssh://[user@]host[:port]/path`, or an
/// `http(s)://` URL.
pub fn location(p: &Path) -> Result<Location> {
    match remote_url(p) {
        Some(url) => Location::parse_url(url).expect("a URL").map_err(|e| Error::from(e).in_file(shown_url(url))),
        None => absolute(p).map(Location::local),
    }
}

/// An IMAGE argument: `raw:LOCATION` for a raw volume, or an image at a location.
pub fn image(p: &Path) -> Result<Image> {
    Image::parse(p.as_os_str(), |rest| location(Path::new(rest)))
}

/// IMAGE [IMAGE...]: several only with --compose.
fn images(first: &Path, more: &[PathBuf], open: &OpenArgs) -> Result<Vec<Image>> {
    if !more.is_empty() && open.compose.compose.is_none() {
        return Err(Error::usage("several IMAGEs need --compose (one disk composed of them all)"));
    }
    std::iter::once(first).chain(more.iter().map(PathBuf::as_path)).map(image).collect()
}

/// `$XDG_CACHE_HOME/vdiskfs`, else `~/.cache/vdiskfs`, else `/var/cache/vdiskfs`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("vdiskfs");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache/vdiskfs"),
        None => PathBuf::from("/var/cache/vdiskfs"),
    }
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// IMAGE...: the top of each chain (an XVA: the export); MOUNTPOINT: an existing directory.
    #[arg(value_name = "PATH", required = true, num_args = 2..)]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub open: OpenArgs,
    /// Return once the mount is ready and keep serving in the background.
    #[arg(long)]
    pub daemon: bool,
    /// Let other users (and root) read the mount; needs user_allow_other in /etc/fuse.conf
    /// unless run as root. The kernel checks the files' modes: other users can read a disk,
    /// never write it (see --allow-other-write).
    #[arg(long)]
    pub allow_other: bool,
    /// With --allow-other (implied): let every local user also WRITE the writable disks (their
    /// mode becomes 0666). Without it only the user who mounted can write.
    #[arg(long)]
    pub allow_other_write: bool,
    /// Threads serving FUSE requests.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,
    /// Memory for the merged block map cache of each chain, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub map_cache_mb: usize,
    /// Kernel readahead per open file, in KiB (the FUSE default is 128).
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    pub readahead_kb: u32,
    /// Append log lines (read errors, warnings) to FILE. A daemon without it logs to nowhere.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Make the disk writable: writes go to this copy-on-write overlay FILE (created if missing,
    /// reattached if present, refused if made for another chain). Repeat once per disk, or give
    /// one directory to hold <disk>.overlay files.
    #[arg(long, value_name = "FILE")]
    pub overlay: Vec<PathBuf>,
    /// Cluster size of a NEW overlay, in KiB (the unit of copy-on-write and of the map).
    #[arg(long, value_name = "KIB", default_value_t = 64)]
    pub overlay_cluster_kb: u64,
}

/// A validated `mount`.
#[derive(Debug)]
pub struct MountConfig {
    pub images: Vec<Image>,
    pub mountpoint: PathBuf,
    pub open: OpenOptions,
    pub fuse: FuseOptions,
    pub daemon: bool,
    pub allow_other: bool,
    /// Other users may write the writable disks too.
    pub allow_other_write: bool,
    pub threads: usize,
    pub log_file: Option<PathBuf>,
    pub overlays: Vec<PathBuf>,
    pub overlay_cluster: u64,
}

impl MountArgs {
    pub fn config(&self) -> Result<MountConfig> {
        let (mnt, images) = self.paths.split_last().expect("clap requires two paths");
        if !mnt.is_dir() {
            return Err(Error::usage(format!("mount point {}: not an existing directory", mnt.display())));
        }
        if self.threads == 0 || self.threads > 256 {
            return Err(Error::usage("--threads must be between 1 and 256"));
        }
        let mut open = self.open.options()?;
        open.map_cache_bytes = self.map_cache_mb.max(1) << 20;
        let abs = |p: &PathBuf| absolute(p);
        Ok(MountConfig {
            images: images.iter().map(|p| image(p)).collect::<Result<_>>()?,
            mountpoint: abs(mnt)?,
            open,
            fuse: FuseOptions { readahead: self.readahead_kb.clamp(4, 16 << 10) << 10, ..FuseOptions::default() },
            daemon: self.daemon,
            allow_other: self.allow_other || self.allow_other_write,
            allow_other_write: self.allow_other_write,
            threads: self.threads,
            log_file: self.log_file.as_ref().map(abs).transpose()?,
            overlays: self.overlay.iter().map(abs).collect::<Result<_>>()?,
            overlay_cluster: self.overlay_cluster_kb.saturating_mul(1024),
        })
    }
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The top of the chain (raw:PATH for a raw volume).
    pub image: PathBuf,
    /// With --compose: the other parts, in order.
    #[arg(value_name = "IMAGE")]
    pub more: Vec<PathBuf>,
    #[command(flatten)]
    pub open: OpenArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl InfoArgs {
    pub fn images(&self) -> Result<Vec<Image>> {
        images(&self.image, &self.more, &self.open)
    }
}

#[derive(Debug, Args)]
#[command(
    override_usage = "vdiskfs export [OPTIONS] IMAGE TARGET\n       vdiskfs export --compose TABLE [OPTIONS] IMAGE... TARGET"
)]
pub struct ExportArgs {
    /// The top of the chain (raw:PATH for a raw volume).
    pub image: PathBuf,
    /// File or block device to write.
    pub target: PathBuf,
    /// With --compose: more parts, then the TARGET last.
    #[arg(value_name = "IMAGE")]
    pub more: Vec<PathBuf>,
    #[command(flatten)]
    pub open: OpenArgs,
    /// Merge this overlay (read-only) over the chain.
    #[arg(long, value_name = "FILE")]
    pub overlay: Option<PathBuf>,
    /// Which disk of an image holding several (an XVA), by its <name>.raw.
    #[arg(long, value_name = "NAME")]
    pub disk: Option<String>,
    /// The target already reads as zeros (a new LV on thin storage, a zeroed device): skip holes.
    #[arg(long)]
    pub target_zeroed: bool,
    /// Re-read the target afterwards and compare it with the disk.
    #[arg(long)]
    pub verify: bool,
    /// Copy threads.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Record what TARGET now holds in FILE, for a later `vdiskfs sync` [default:
    /// TARGET.vdiskfs-sync.json beside a file target; a block device needs this].
    #[arg(long, value_name = "FILE", conflicts_with = "no_state")]
    pub state: Option<PathBuf>,
    /// Record no sync state (and leave an existing one alone).
    #[arg(long)]
    pub no_state: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The top of the chain (with --exclude-top: the running VM's active image).
    pub image: PathBuf,
    /// The file or block device an earlier export or sync wrote.
    pub target: PathBuf,
    #[command(flatten)]
    pub open: OpenArgs,
    /// The target's sync state [default: TARGET.vdiskfs-sync.json beside a file target; a block
    /// device needs this].
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Print what would be written (ranges, bytes per layer, total, estimated time at the
    /// measured read rate of the source) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: the plan as JSON, every range.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Copy threads.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl ExportArgs {
    /// The IMAGEs and the TARGET, which is always the last path.
    pub fn images_and_target(&self) -> Result<(Vec<Image>, PathBuf)> {
        let mut all: Vec<PathBuf> = vec![self.image.clone(), self.target.clone()];
        all.extend(self.more.iter().cloned());
        let target = all.pop().expect("two paths at least");
        Ok((images(&all[0], &all[1..], &self.open)?, target))
    }
}
