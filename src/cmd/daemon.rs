//! Process concerns of `mount`: detaching (`--daemon`) with a readiness pipe, the signal thread
//! that unmounts on SIGINT/SIGTERM/SIGHUP, and the kernel readahead of our own mount.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use vdiskfs::{Error, Result};

/// The child's end of the readiness pipe: the parent exits with what it reports.
pub struct Ready(std::fs::File, Option<PathBuf>);

impl Ready {
    /// Reports success, with the lines the parent prints, and lets go of the terminal.
    pub fn ok(mut self, text: &str) {
        if let Err(e) = redirect_stdio(self.1.as_deref()) {
            let _ = writeln!(self.0, "ERR {e}");
            std::process::exit(e.exit_code());
        }
        let _ = write!(self.0, "OK\n{text}");
    }
    /// Reports failure: the parent prints the error and exits non-zero.
    pub fn fail(mut self, e: &Error) {
        let _ = writeln!(self.0, "ERR {e}");
    }
}

/// Forks. The parent waits on a pipe for the child's verdict and exits with it; the child
/// (returned to) detaches and reports readiness through the returned [`Ready`]. Until then
/// the child keeps stderr (progress and warnings reach the terminal); stdin and stdout go to
/// /dev/null at once, stderr to the log file once it reports.
pub fn daemonize(log_file: Option<&Path>) -> Result<Ready> {
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
            quiet_stdin_stdout()?;
            Ok(Ready(std::fs::File::from(wr), log_file.map(Path::to_path_buf)))
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

/// Points stdin and stdout at /dev/null.
fn quiet_stdin_stdout() -> Result<()> {
    let null =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| Error::io("/dev/null", e))?;
    // SAFETY: dup2 onto the standard descriptors.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
    }
    Ok(())
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

/// The signals that unmount. Blocked in every thread (call before any thread starts), so that
/// only the signal thread receives them.
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, before any thread is started.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for the stop signals and unmounts. If an unmount fails (EBUSY: a loop device still
/// holds the file), it says why and keeps waiting: the next signal tries again. (fuser's own
/// unmounter forgets the mount after a failed attempt, so later signals would do nothing.)
pub fn spawn_signal_thread(set: libc::sigset_t, mountpoint: PathBuf) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: sigwait on the set blocked in every thread.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                log::info!("signal {sig}: unmounting {}", mountpoint.display());
                match unmount_soon(&mountpoint) {
                    Ok(()) => return,
                    Err(e) => {
                        let held = vdiskfs::holders::holders_under(&mountpoint);
                        let by = if held.is_empty() {
                            "a loop device or a process using the disk".to_string()
                        } else {
                            held.join("; ")
                        };
                        log::error!(
                            "cannot unmount {} on signal {sig}: {e}; held by {by}; still serving (detach the loop device or stop the process, then signal again)",
                            mountpoint.display()
                        )
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::io("spawning the signal thread", e))
}

/// Unmounts, retrying for a moment while the mount is busy: a reader that has just closed the
/// file leaves it busy until the kernel's RELEASE reaches us. A mount still busy after that is
/// held by someone (a loop device, an open file); the caller says so and waits for the next signal.
fn unmount_soon(mountpoint: &Path) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match unmount(mountpoint) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Unmounts (not lazily: a busy mount stays and says so): `umount(2)` as root, else
/// `fusermount3 -u`. The FUSE session then ends by itself.
fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let out = std::process::Command::new("fusermount3").arg("-u").arg("--").arg(mountpoint).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()))
}

/// The kernel caps a FUSE mount's readahead at its bdi's `read_ahead_kb` (128 KiB by default),
/// whatever the file system asked for at init. As root we raise it for our own mount only.
/// The device number comes from mountinfo: a stat of the mount point would wait for a FUSE
/// reply that no thread serves yet.
pub fn set_bdi_readahead(mountpoint: &Path, kb: u32) {
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
