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
        Command::Check(a) => crate::check::run(&a),
    }
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
            for (k, v) in &l.details {
                println!("      {:<14} {v}", format!("{k}:"));
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
    let summary: Vec<String> = disks
        .iter()
        .map(|d| {
            format!("{}/{} ({} bytes, {} layer(s))", cfg.mountpoint.display(), d.name(), d.size(), d.chain().depth())
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
        for d in fs2.disks() {
            if let Err(e) = d.compute_allocated() {
                log::warn!("{}: allocation scan failed: {e}", d.name());
            }
        }
    });
    let text: String = summary.iter().map(|s| format!("mounted {s}\n")).collect();
    match ready.take() {
        Some(mut p) => {
            let _ = write!(p, "OK\n{text}");
        }
        None => print!("{text}"),
    }
    let _ = std::io::stdout().flush();
    session.run().map_err(|e| (Error::io("FUSE session failed", e), None))
}
