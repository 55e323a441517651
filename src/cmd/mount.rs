//! `vdiskfs mount`: open the images, pair overlays with disks, mount, serve until unmounted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use vdiskfs::disk::Disk;
use vdiskfs::fs::VdiskFs;
use vdiskfs::fs::background;
use vdiskfs::fs::fuse::FuseFs;
use vdiskfs::open::open_images;
use vdiskfs::{Error, Result};

use super::daemon;
use super::progress::Bar;
use crate::cli::MountConfig;

pub fn run(cfg: MountConfig) -> Result<()> {
    // Block the stop signals before any thread starts (remote images start their own), and
    // detach before opening, so that no thread or ssh process is lost to the fork. A detached
    // child keeps the terminal's stderr until it reports (progress bars, warnings).
    let signals = daemon::block_stop_signals();
    let ready = if cfg.daemon { Some(daemon::daemonize(cfg.log_file.as_deref())?) } else { None };
    let opened = open_images(&cfg.images, &cfg.open, &Bar::new(true))
        .and_then(|disks| attach_overlays(disks, &cfg.overlays, cfg.overlay_cluster));
    let served = opened.and_then(|disks| {
        let summary: String = disks.iter().map(|d| format!("mounted {}\n", describe(&cfg, d))).collect();
        serve(disks, &cfg, signals).map(|s| (s, summary))
    });
    match (served, ready) {
        (Ok((session, summary)), Some(r)) => {
            r.ok(&summary);
            finish(session)
        }
        (Ok((session, summary)), None) => {
            print!("{summary}");
            let _ = std::io::stdout().flush();
            finish(session)
        }
        (Err(e), Some(r)) => {
            // Detached: the waiting parent prints the error.
            let code = e.exit_code();
            r.fail(&e);
            std::process::exit(code);
        }
        (Err(e), None) => Err(e),
    }
}

fn describe(cfg: &MountConfig, d: &Disk) -> String {
    let ov = d.overlay().map(|o| format!(", writable, overlay {}", o.path().display())).unwrap_or_default();
    format!("{}/{} ({} bytes, {} layer(s){ov})", cfg.mountpoint.display(), d.name(), d.size(), d.chain().depth())
}

/// Pairs overlays with disks: one per disk in order, or one directory holding `<disk>.overlay`.
fn attach_overlays(disks: Vec<Disk>, overlays: &[PathBuf], cluster: u64) -> Result<Vec<Disk>> {
    if overlays.is_empty() {
        return Ok(disks);
    }
    let one_dir = overlays.len() == 1 && overlays[0].is_dir();
    let paths: Vec<PathBuf> = if one_dir {
        disks.iter().map(|d| overlays[0].join(format!("{}.overlay", d.name().trim_end_matches(".raw")))).collect()
    } else if overlays.len() == disks.len() {
        overlays.to_vec()
    } else {
        return Err(Error::usage(format!(
            "{} disk(s) but {} --overlay file(s): give one per disk, in order, or one directory",
            disks.len(),
            overlays.len()
        )));
    };
    disks.into_iter().zip(paths).map(|(d, p)| d.attach_overlay(&p, cluster, true)).collect()
}

/// A mounted file system, ready to serve.
struct Served {
    session: fuser::Session<FuseFs>,
    fs: Arc<VdiskFs>,
}

/// Mounts the disks and starts the signal thread and the background work.
/// `signals` are blocked in every thread; the signal thread waits for them.
fn serve(disks: Vec<Disk>, cfg: &MountConfig, signals: libc::sigset_t) -> Result<Served> {
    let fs = Arc::new(VdiskFs::new(disks).others_write(cfg.allow_other_write));
    let writable = fs.disks().iter().any(|d| d.writable());
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        if writable { fuser::MountOption::RW } else { fuser::MountOption::RO },
        fuser::MountOption::FSName("vdiskfs".into()),
        fuser::MountOption::Subtype("vdiskfs".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
    ];
    fcfg.n_threads = Some(cfg.threads);
    fcfg.clone_fd = true;
    if cfg.allow_other {
        fcfg.acl = fuser::SessionACL::All;
        // The kernel checks every access against the modes getattr reports (0644: others
        // read only), so that letting others in does not let them write.
        fcfg.mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    let fuse = FuseFs::new(fs.clone(), cfg.fuse.clone());
    let session = fuser::Session::new(fuse, &cfg.mountpoint, &fcfg)
        .map_err(|e| Error::io(format!("cannot mount at {}", cfg.mountpoint.display()), e))?;
    daemon::set_bdi_readahead(&cfg.mountpoint, cfg.fuse.readahead / 1024);
    daemon::spawn_signal_thread(signals, cfg.mountpoint.clone())?;
    background::spawn_allocation_scan(fs.clone());
    background::spawn_checkpointer(fs.clone());
    Ok(Served { session, fs })
}

/// Serves until unmounted, then makes the overlays' last writes durable.
fn finish(s: Served) -> Result<()> {
    let r = s.session.run().map_err(|e| Error::io("FUSE session failed", e));
    if let Err(e) = s.fs.flush_all() {
        log::error!("final checkpoint: {e}");
        return Err(e);
    }
    r
}
