//! What each subcommand does, on validated configuration.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;

use crate::chain::{ExtentKind, OpenConfig};
use crate::cli::{Cli, Command, InfoArgs, MountConfig};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::formats;
use crate::fs::VdiskFs;
use crate::fs::fuse::FuseFs;
use crate::source::Location;

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mount(a) => mount(a.config()?),
        Command::Info(a) => info(&a),
        Command::Map(a) => map(&a),
        Command::Export(a) => export(&a),
        Command::Check(a) => crate::check::run(&a),
    }
}

/// Pairs overlays with disks: one per disk in order, or one directory for all.
fn attach_overlays(disks: Vec<Disk>, overlays: &[std::path::PathBuf], cluster: u64) -> Result<Vec<Disk>> {
    if overlays.is_empty() {
        return Ok(disks);
    }
    let paths: Vec<std::path::PathBuf> = if overlays.len() == disks.len() && !(disks.len() == 1 && overlays[0].is_dir())
    {
        overlays.to_vec()
    } else if overlays.len() == 1 && overlays[0].is_dir() {
        disks.iter().map(|d| overlays[0].join(format!("{}.overlay", d.name().trim_end_matches(".raw")))).collect()
    } else {
        return Err(Error::usage(format!(
            "{} disk(s) but {} --overlay file(s): give one per disk, in order, or one directory",
            disks.len(),
            overlays.len()
        )));
    };
    let mut out = Vec::new();
    for (d, p) in disks.into_iter().zip(paths) {
        for l in d.chain().layers() {
            if let (Ok(a), Some(b)) = (std::fs::canonicalize(&p), l.location().as_path())
                && std::fs::canonicalize(b).is_ok_and(|b| b == a)
            {
                return Err(Error::usage(format!("--overlay {} is one of the source images", p.display())));
            }
        }
        let ov = crate::overlay::Overlay::attach(&p, d.size(), &d.chain().identity_text()?, cluster, true)?;
        out.push(d.with_overlay(ov));
    }
    Ok(out)
}

fn export(a: &crate::cli::ExportArgs) -> Result<()> {
    let cfg = a.open.config()?;
    let mut disks = open_disks(std::slice::from_ref(&a.image), &cfg)?;
    let disk = match &a.disk {
        Some(n) => {
            let names: Vec<String> = disks.iter().map(|d| d.name().to_string()).collect();
            let i = disks.iter().position(|d| d.name() == n || d.name().trim_end_matches(".raw") == n).ok_or_else(
                || Error::usage(format!("no disk {n} in {} (it has {})", a.image.display(), names.join(", "))),
            )?;
            disks.swap_remove(i)
        }
        None if disks.len() == 1 => disks.remove(0),
        None => {
            let names: Vec<String> = disks.iter().map(|d| d.name().to_string()).collect();
            return Err(Error::usage(format!(
                "{} holds {} disks ({}); choose one with --disk NAME",
                a.image.display(),
                disks.len(),
                names.join(", ")
            )));
        }
    };
    let disk = match &a.overlay {
        Some(p) => {
            let ov = crate::overlay::Overlay::attach(p, disk.size(), &disk.chain().identity_text()?, 0, false)?;
            disk.with_overlay(ov)
        }
        None => disk,
    };
    let sources: Vec<std::path::PathBuf> = disk
        .chain()
        .layers()
        .iter()
        .filter_map(|l| l.location().as_path().map(|p| p.to_path_buf()))
        .chain(a.overlay.iter().cloned())
        .collect();
    let ecfg = crate::export::ExportConfig {
        target: a.target.clone(),
        target_zeroed: a.target_zeroed,
        verify: a.verify,
        threads: a.threads.clamp(1, 64),
        progress: !a.quiet,
    };
    let st = crate::export::export(&disk, &ecfg, &sources)?;
    let secs = st.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "exported {} ({} bytes) to {} in {:.2} s: {} bytes written ({:.0} MB/s), {} zero bytes skipped, {} zeroed{}",
        disk.name(),
        disk.size(),
        a.target.display(),
        secs,
        st.written,
        st.written as f64 / secs / 1e6,
        st.skipped,
        st.zeroed,
        if st.verified { "; verified" } else { "" }
    );
    Ok(())
}

/// Opens every image as disks, named uniquely.
pub fn open_disks(images: &[std::path::PathBuf], cfg: &OpenConfig) -> Result<Vec<Disk>> {
    let mut disks: Vec<Disk> = Vec::new();
    for img in images {
        let mtime = std::fs::metadata(img).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
        for (name, chain) in formats::open_image(&Location::local(img), cfg)? {
            let name = unique_name(name, &disks);
            disks.push(Disk::new(name, chain, mtime));
        }
    }
    Ok(disks)
}

/// `name`, or `name` with `-2`, `-3`, … before the extension if a disk already has it.
pub fn unique_name(name: String, disks: &[Disk]) -> String {
    if !disks.iter().any(|d| d.name() == name) {
        return name;
    }
    let (stem, ext) =
        name.rsplit_once('.').map(|(s, e)| (s.to_string(), format!(".{e}"))).unwrap_or((name.clone(), String::new()));
    (2..).map(|i| format!("{stem}-{i}{ext}")).find(|n| !disks.iter().any(|d| d.name() == n)).expect("unbounded")
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", U[i]) }
}

fn info(a: &InfoArgs) -> Result<()> {
    let cfg = a.open.config()?;
    let disks = open_disks(std::slice::from_ref(&a.image), &cfg)?;
    let mut out = Vec::new();
    for d in &disks {
        out.push((d, d.chain().describe()?));
    }
    if a.json {
        let v = json!({
            "image": a.image.display().to_string(),
            "disks": out.iter().map(|(d, layers)| json!({
                "name": d.name(),
                "virtual_size": d.size(),
                "layers": layers.iter().enumerate().map(|(i, l)| {
                    let mut v = serde_json::to_value(l).expect("plain data");
                    v["depth"] = json!(i);
                    v["details"] = l.details.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>().into();
                    v
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("plain data"));
        return Ok(());
    }
    for (d, layers) in &out {
        println!("disk {}: {} ({} bytes), {} layer(s)", d.name(), human(d.size()), d.size(), layers.len());
        for (i, l) in layers.iter().enumerate() {
            let role = if i == 0 {
                " (top)"
            } else if i + 1 == layers.len() {
                " (base)"
            } else {
                ""
            };
            println!("  [{i}]{role} {}", l.path);
            println!("      format:        {} {}", l.format, l.subformat);
            println!("      virtual size:  {} ({} bytes)", human(l.virtual_size), l.virtual_size);
            if l.block_size > 0 {
                println!("      block size:    {}", human(l.block_size));
            }
            println!("      identity:      {}", l.identity);
            println!("      allocated:     {} ({} bytes)", human(l.allocated_bytes), l.allocated_bytes);
            if let Some(p) = &l.parent {
                println!("      parent:        expects {}", p.expected_identity);
                if let Some(r) = &p.resolved {
                    println!("      parent found:  {r}");
                }
                for h in &p.hints {
                    println!("      locator:       {} {}", h.kind, h.path);
                }
            }
            let w = l.details.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0).max(14);
            for (k, v) in &l.details {
                println!("      {:<w$} {v}", format!("{k}:"));
            }
        }
    }
    Ok(())
}

fn map(a: &InfoArgs) -> Result<()> {
    let cfg = a.open.config()?;
    let disks = open_disks(std::slice::from_ref(&a.image), &cfg)?;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    let wr = |e: std::io::Error| Error::io("writing output", e);
    for d in &disks {
        let chain = d.chain();
        let layers = chain.layers();
        let mut first = true;
        if a.json {
            write!(w, "[").map_err(wr)?;
        } else {
            writeln!(w, "{:<20}{:<20}{:<8}{:<10}{:<20}File", "Offset", "Length", "Depth", "Kind", "Mapped to")
                .map_err(wr)?;
        }
        const WINDOW: u64 = 1 << 30;
        let mut pos = 0;
        while pos < chain.size() {
            for e in chain.extents(pos, WINDOW)? {
                let (depth, data, zero, present, offset, compressed) = match e.kind {
                    ExtentKind::Data { depth, source, offset } => {
                        let compressed = layers[depth as usize].compressed(source as usize);
                        (depth as usize, true, false, true, Some(offset), compressed)
                    }
                    ExtentKind::Zero { depth } => {
                        (depth as usize, false, true, (depth as usize) < layers.len(), None, false)
                    }
                };
                if a.json {
                    let mut o = json!({"start": e.start, "length": e.len, "depth": depth, "present": present,
                        "zero": zero, "data": data, "compressed": compressed});
                    if let Some(off) = offset {
                        o["offset"] = json!(off);
                    }
                    write!(w, "{}{}", if first { "" } else { ",\n" }, o).map_err(wr)?;
                    first = false;
                } else {
                    let kind = if data {
                        "data"
                    } else if present {
                        "zero"
                    } else {
                        "hole"
                    };
                    let file = layers.get(depth).map(|l| l.location().to_string()).unwrap_or_default();
                    let mapped = offset.map(|o| format!("{o:#x}")).unwrap_or_default();
                    writeln!(
                        w,
                        "{:<20}{:<20}{:<8}{:<10}{:<20}{file}",
                        format!("{:#x}", e.start),
                        format!("{:#x}", e.len),
                        depth,
                        kind,
                        mapped
                    )
                    .map_err(wr)?;
                }
            }
            pos += WINDOW;
        }
        if a.json {
            writeln!(w, "]").map_err(wr)?;
        }
    }
    w.flush().map_err(wr)
}

fn mount(cfg: MountConfig) -> Result<()> {
    let disks = open_disks(&cfg.images, &cfg.open)?;
    let disks = attach_overlays(disks, &cfg.overlays, cfg.overlay_cluster)?;
    let summary: Vec<String> = disks
        .iter()
        .map(|d| {
            let ov = d.overlay().map(|o| format!(", writable, overlay {}", o.path().display())).unwrap_or_default();
            format!(
                "{}/{} ({} bytes, {} layer(s){ov})",
                cfg.mountpoint.display(),
                d.name(),
                d.size(),
                d.chain().depth()
            )
        })
        .collect();
    let ready_pipe = if cfg.daemon { Some(daemonize(&cfg)?) } else { None };
    match serve(disks, &cfg, summary, ready_pipe) {
        Ok(()) => Ok(()),
        Err((e, Some(mut pipe))) => {
            // The parent prints the error; we are detached.
            let _ = writeln!(pipe, "ERR {e}");
            std::process::exit(e.exit_code());
        }
        Err((e, None)) => Err(e),
    }
}

/// Forks. The parent waits on a pipe for the child's verdict and exits with it; the child
/// (returned to) detaches and reports readiness through the returned pipe.
fn daemonize(cfg: &MountConfig) -> Result<std::fs::File> {
    let mut fds = [0; 2];
    // SAFETY: plain pipe(2) into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: the fds were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other threads exist yet (nothing before the mount spawns any).
    match unsafe { libc::fork() } {
        -1 => Err(Error::io("fork", std::io::Error::last_os_error())),
        0 => {
            drop(rd);
            // SAFETY: setsid in the child.
            unsafe { libc::setsid() };
            let _ = std::env::set_current_dir("/");
            redirect_stdio(cfg.log_file.as_deref())?;
            Ok(std::fs::File::from(wr))
        }
        _ => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            if let Some(rest) = msg.strip_prefix("OK\n") {
                print!("{rest}");
                std::process::exit(0);
            }
            let err = msg.strip_prefix("ERR ").unwrap_or("the daemon exited before the mount was ready").trim_end();
            eprintln!("vdiskfs: {err}");
            std::process::exit(1);
        }
    }
}

/// Points stdin/stdout at /dev/null and stderr at the log file (or /dev/null), so a daemon
/// never holds its caller's pipes open.
fn redirect_stdio(log: Option<&Path>) -> Result<()> {
    let null =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| Error::io("/dev/null", e))?;
    let err = match log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| Error::io(p.display().to_string(), e))?,
        None => null.try_clone().map_err(|e| Error::io("dup", e))?,
    };
    // SAFETY: dup2 onto the standard descriptors.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(err.as_raw_fd(), 2);
    }
    Ok(())
}

type ServeError = (Error, Option<std::fs::File>);

/// The kernel caps a FUSE mount's readahead at its bdi's `read_ahead_kb` (128 KiB by default),
/// whatever the file system asked for at init. As root we raise it for our own mount only.
/// The device number comes from mountinfo: a stat of the mount point would wait for a FUSE
/// reply that no thread serves yet.
fn set_bdi_readahead(mountpoint: &Path, kb: u32) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let want = mountpoint.to_string_lossy();
    // Fields: id parent major:minor root mountpoint ...; the last match is the newest mount.
    let Some(dev) = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == want).then(|| f[2].to_string())
    }) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, kb.to_string()) {
        Ok(()) => log::info!("{knob} = {kb}"),
        Err(e) => log::info!("cannot set {knob} ({e}); readahead stays at the kernel default"),
    }
}

fn serve(
    disks: Vec<Disk>,
    cfg: &MountConfig,
    summary: Vec<String>,
    mut ready: Option<std::fs::File>,
) -> Result<(), ServeError> {
    // Block the stop signals in every thread; one thread waits for them and unmounts.
    // SAFETY: sigset manipulation on a local set, before any thread is started.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let fs = Arc::new(VdiskFs::new(disks));
    let mut options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("vdiskfs".into()),
        fuser::MountOption::Subtype("vdiskfs".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
    ];
    if fs.disks().iter().any(|d| d.writable()) {
        options[0] = fuser::MountOption::RW;
    }
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = options;
    fcfg.n_threads = Some(cfg.threads);
    fcfg.clone_fd = true;
    if cfg.allow_other {
        fcfg.acl = fuser::SessionACL::All;
    }
    let fuse = FuseFs::new(fs.clone(), cfg.fuse.clone());
    let mut session = fuser::Session::new(fuse, &cfg.mountpoint, &fcfg)
        .map_err(|e| (Error::io(format!("cannot mount at {}", cfg.mountpoint.display()), e), ready.take()))?;
    set_bdi_readahead(&cfg.mountpoint, cfg.fuse.readahead / 1024);
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait on the set blocked above.
            unsafe { libc::sigwait(&set, &mut sig) };
            log::info!("signal {sig}: unmounting");
            if let Err(e) = unmounter.unmount() {
                log::error!("unmount failed: {e}");
            }
        })
        .map_err(|e| (Error::io("spawning the signal thread", e), None))?;
    // st_blocks: walk each chain's allocation once, in the background.
    let fs2 = fs.clone();
    let _ = std::thread::Builder::new().name("alloc".into()).spawn(move || {
        // Background work: let reads go first.
        // SAFETY: setpriority on this thread's own id.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        for d in fs2.disks() {
            if let Err(e) = d.compute_allocated() {
                log::warn!("{}: allocation scan failed: {e}", d.name());
            }
        }
    });
    // Overlays: a checkpoint every few seconds bounds what a power loss can take, as a file
    // system's commit interval does (fsync and flush checkpoint at once).
    if fs.disks().iter().any(|d| d.writable()) {
        let fs3 = fs.clone();
        let _ = std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                for d in fs3.disks() {
                    if d.overlay().is_some_and(|o| o.is_dirty())
                        && let Err(e) = d.flush()
                    {
                        log::error!("{}: periodic checkpoint failed: {e}", d.name());
                    }
                }
            }
        });
    }
    let text: String = summary.iter().map(|s| format!("mounted {s}\n")).collect();
    match ready.take() {
        Some(mut p) => {
            let _ = write!(p, "OK\n{text}");
        }
        None => print!("{text}"),
    }
    let _ = std::io::stdout().flush();
    let r = session.run().map_err(|e| (Error::io("FUSE session failed", e), None));
    // However the session ended, make the overlays' last writes durable.
    if let Err(e) = fs.flush_all() {
        log::error!("final checkpoint: {e}");
        return Err((e, None));
    }
    r
}
