//! Readers and writers racing an unmount and a SIGTERM: everything ends within a deadline, the
//! daemon neither hangs nor panics, and the overlay it leaves holds only bytes someone wrote.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::vhd::VhdBuilder;

use crate::common::*;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
const SIZE: u64 = 16 * MIB;

/// Opens the disk, does a burst of 4 KiB reads and writes (writer `id` writes blocks filled
/// with byte `id`), closes it; again until the mount is gone or `stop`.
fn hammer(raw: PathBuf, id: u8, stop: Arc<AtomicBool>) -> u64 {
    let mut n = 0u64;
    let mut x = u64::from(id) * 0x9e37_79b9 + 1;
    while !stop.load(Ordering::Relaxed) {
        let Ok(f) = std::fs::OpenOptions::new().read(true).write(id != 0).open(&raw) else { return n };
        for _ in 0..16 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 33) % (SIZE / BLOCK as u64) * BLOCK as u64;
            let r = if id == 0 || x & 1 == 0 {
                f.read_exact_at(&mut [0u8; BLOCK], off)
            } else {
                f.write_all_at(&[id; BLOCK], off)
            };
            if r.is_err() {
                return n;
            }
            n += 1;
        }
    }
    n
}

/// Stops the mount with `how` while four threads hammer it; all must end within deadlines.
fn race(how: &str) {
    let t = tmpdir();
    let base = pattern(0x4ace, SIZE as usize);
    let img = t.path().join("disk.vhd");
    VhdBuilder::dynamic(SIZE).write(0, &base).build(&img).unwrap();
    let ovl = t.path().join("o.ovl");
    let m = mount(&[os("--threads"), os("4"), os("--overlay"), ovl.as_os_str(), img.as_os_str()]);
    let pid = crate::overlay::daemon_pid(&m.dir).expect("daemon");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    for id in 0..4u8 {
        let (raw, stop, tx) = (m.file("disk.raw"), stop.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(hammer(raw, id, stop));
        });
    }
    std::thread::sleep(Duration::from_millis(700));
    let gone = || crate::overlay::daemon_pid(&m.dir).is_none();
    // SAFETY: kill with a pid and a signal number.
    let term = || unsafe { libc::kill(pid, libc::SIGTERM) };
    if how != "unmount" {
        // Files are open: the mount is busy, the daemon says so and keeps serving.
        term();
    }
    if how != "sigterm" {
        // Lazily: the open files keep working, new opens fail, and the daemon ends with the last.
        sh(&format!("umount -l {}", m.dir.display()));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    for _ in 0..4 {
        ops += rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{how}: an I/O thread hangs"));
    }
    assert!(ops > 0, "{how}: the threads did I/O");
    // Nothing holds the mount now: the daemon's retry, or the next signal (as an init system
    // would send), ends it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !wait_for(4, gone) {
        assert!(Instant::now() < deadline, "{how}: the daemon hangs: {}", m.log_text());
        term();
    }
    let log = m.log_text();
    assert!(!log.contains("panicked"), "{how}: the daemon panicked: {log}");
    check_blocks(&img, &ovl, &base, how);
}

/// Every 4 KiB block of the disk the overlay leaves is the base's or one writer's.
fn check_blocks(img: &Path, ovl: &Path, base: &[u8], how: &str) {
    let out = ovl.with_extension("raw");
    let o = vdiskfs([os("export"), os("--quiet"), os("--overlay"), ovl.as_os_str(), img.as_os_str(), out.as_os_str()]);
    assert!(o.status.success(), "{how}: the overlay reattaches: {}", stderr(&o));
    let got = std::fs::read(&out).unwrap();
    for (i, (g, b)) in got.chunks(BLOCK).zip(base.chunks(BLOCK)).enumerate() {
        let one_writer = (1..4u8).any(|id| g.iter().all(|&x| x == id));
        assert!(g == b || one_writer, "{how}: block {i} holds bytes nobody wrote: {:02x?}", &g[..16]);
    }
}

crate::register!(io_racing_an_unmount_and_a_sigterm_ends_without_hang_or_panic);
fn io_racing_an_unmount_and_a_sigterm_ends_without_hang_or_panic() {
    need_fuse();
    for how in ["unmount", "sigterm", "both"] {
        race(how);
    }
}
