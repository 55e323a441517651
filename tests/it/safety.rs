//! A mount on a shared host: what --overlay refuses to touch, what other users may do, what a
//! reader's close does, and SIGTERM while a loop device holds the disk.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::vhd::VhdBuilder;

use crate::common::*;

const MIB: u64 = 1 << 20;

fn small_disk(dir: &Path) -> (PathBuf, Vec<u8>) {
    let base = pattern(0x5afe, (4 * MIB) as usize);
    let img = dir.join("disk.vhd");
    VhdBuilder::dynamic(4 * MIB).write(0, &base).build(&img).unwrap();
    (img, base)
}

/// Mounting with `--overlay target` fails, says which file and why, and leaves it as it was.
fn overlay_refused(img: &Path, target: &Path, why: &str, before: &[u8]) {
    let err = try_mount(&[os("--overlay"), target.as_os_str(), img.as_os_str()]).expect_err("must be refused");
    let line = err.lines().find(|l| l.contains("vdiskfs:")).unwrap_or(&err).to_string();
    assert!(line.contains(&target.display().to_string()), "names the file: {err}");
    assert!(line.contains("not a vdiskfs overlay") && line.contains(why), "says why ({why}): {err}");
    let mut now = vec![0u8; before.len()];
    std::fs::File::open(target).unwrap().read_exact_at(&mut now, 0).unwrap();
    assert_same(&format!("{} after the refusal", target.display()), &now, before);
}

crate::register!(overlay_path_holding_anything_else_is_refused_and_left_alone);
/// `--overlay PATH` creates a missing or empty file; anything else that is not an overlay (a
/// file with other data, small or large, a block device) is refused, never overwritten.
fn overlay_path_holding_anything_else_is_refused_and_left_alone() {
    need_fuse();
    need("losetup");
    let t = tmpdir();
    let (img, _) = small_disk(t.path());
    for (name, len) in [("small.bin", 100usize), ("big.bin", (2 * MIB) as usize)] {
        let f = t.path().join(name);
        let data = pattern(len as u64, len);
        std::fs::write(&f, &data).unwrap();
        overlay_refused(&img, &f, "refusing to overwrite", &data);
    }
    // A block device: its size reads as 0 through stat, like a new empty file.
    let back = t.path().join("dev.img");
    let data = pattern(77, MIB as usize);
    std::fs::write(&back, &data).unwrap();
    let o = Command::new("losetup").args(["-f", "--show"]).arg(&back).output().unwrap();
    assert!(o.status.success(), "losetup: {}", stderr(&o));
    let lo = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
    overlay_refused(&img, Path::new(&lo.0), "block device", &data);
    drop(lo);
    assert_same("the loop device's file", &std::fs::read(&back).unwrap(), &data);
    // export --overlay opens it read-only: refused the same way.
    let lo = Loop::attach(&back, None);
    let out = t.path().join("out.raw");
    let o = vdiskfs([os("export"), os("--quiet"), os("--overlay"), os(&lo.0), img.as_os_str(), out.as_os_str()]);
    assert_one_line_error(&o, &lo.0, &["not a vdiskfs overlay", "block device"]);
}

/// The overlay map of a live mount's overlay file (what a crash would find there).
fn durable_map(ovl: &Path) -> Vec<u8> {
    let b = std::fs::read(ovl).unwrap();
    let h = vdiskfs::overlay::OverlayHeader::parse(&b[..4096], b.len() as u64).unwrap();
    b[h.map_offset as usize..(h.map_offset + h.map_bytes) as usize].to_vec()
}

crate::register!(closing_a_read_only_open_runs_no_checkpoint);
/// flush runs at every close(). A reader's close must not checkpoint what a writer did (it
/// would stall the reader, and fail it after an overlay error). Seen in the file: the map of a
/// write reaches it only at a checkpoint. The periodic checkpoint may land in between, at most
/// once per interval.
fn closing_a_read_only_open_runs_no_checkpoint() {
    need_fuse();
    let t = tmpdir();
    let (img, _) = small_disk(t.path());
    let ovl = t.path().join("o.ovl");
    let m = mount(&[os("--overlay"), ovl.as_os_str(), img.as_os_str()]);
    let raw = m.file("disk.raw");
    let w = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let mut checkpointed = 0;
    let rounds = 8u64;
    let start = std::time::Instant::now();
    for round in 0..rounds {
        // A cluster of its own each round: its map entry reaches the file only at a checkpoint.
        let off = round * MIB / 2;
        w.write_all_at(&[0xc5u8; 4096], off).unwrap();
        let before = durable_map(&ovl);
        let r = std::fs::File::open(&raw).unwrap();
        let mut b = [0u8; 16];
        r.read_exact_at(&mut b, off).unwrap();
        assert_eq!(b, [0xc5u8; 16]);
        drop(r);
        if durable_map(&ovl) != before {
            checkpointed += 1;
        }
        w.sync_data().unwrap();
    }
    // Only the periodic checkpoint (every 5 s) may have landed between a write and the check.
    let periodic = 1 + start.elapsed().as_secs() / vdiskfs::fs::background::CHECKPOINT_INTERVAL.as_secs();
    assert!(checkpointed <= periodic, "{checkpointed} of {rounds} closes of a read-only open ran a checkpoint");
    // The writer's own close still does (and its fsync did).
    w.write_all_at(&[0xc6u8; 4096], 3 * MIB + MIB / 4).unwrap();
    let before = durable_map(&ovl);
    drop(w);
    assert_ne!(durable_map(&ovl), before, "closing the writer checkpoints");
}

/// Runs `sh -c CMD` as user nobody (no groups); returns (success, stderr).
fn as_nobody(cmd: &str) -> (bool, String) {
    let o = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "sh", "-c", cmd])
        .output()
        .unwrap();
    (o.status.success(), stderr(&o))
}

crate::register!(allow_other_lets_other_users_read_but_not_write);
/// --allow-other lets every local user in: reading, fine; writing a writable disk, only with
/// --allow-other-write. Checked as user nobody through the kernel (default_permissions).
fn allow_other_lets_other_users_read_but_not_write() {
    need_fuse();
    need("setpriv");
    let t = tmpdir();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (img, base) = small_disk(t.path());
    for (flag, may_write) in [("--allow-other", false), ("--allow-other-write", true)] {
        let ovl = t.path().join(format!("o{may_write}.ovl"));
        let m = mount(&[os(flag), os("--overlay"), ovl.as_os_str(), img.as_os_str()]);
        // The mount's parent is a private temporary directory: let nobody through.
        std::fs::set_permissions(m.dir.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let raw = m.file("disk.raw");
        let o = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"])
            .arg(&raw)
            .output()
            .unwrap();
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        assert_same(&format!("{flag}: what nobody reads"), &o.stdout, &base);
        let (ok, err) = as_nobody(&format!("printf XXXX | dd of={} conv=notrunc bs=4 count=1", raw.display()));
        let mut head = [0u8; 4];
        std::fs::File::open(&raw).unwrap().read_exact_at(&mut head, 0).unwrap();
        if may_write {
            assert!(ok, "{flag}: nobody may write: {err}");
            assert_eq!(&head, b"XXXX", "{flag}: nobody's write landed");
        } else {
            assert!(!ok && err.contains("Permission denied"), "{flag}: nobody must not write: {err}");
            assert_eq!(head, base[..4], "{flag}: nobody's write must not land");
        }
    }
}

/// The pid of the vdiskfs serving `mnt`.
fn daemon(mnt: &Path) -> i32 {
    crate::overlay::daemon_pid(mnt).expect("the daemon runs")
}

crate::register!(sigterm_with_a_loop_device_attached_keeps_serving_until_detached);
/// A loop device on the mounted disk holds the mount busy: the first SIGTERM cannot unmount
/// (EBUSY); the daemon keeps serving and logs why, naming the loop device. After `losetup -d`, the next SIGTERM unmounts.
fn sigterm_with_a_loop_device_attached_keeps_serving_until_detached() {
    need_fuse();
    need("losetup");
    let t = tmpdir();
    let (img, base) = small_disk(t.path());
    let ovl = t.path().join("o.ovl");
    let m = mount(&[os("--overlay"), ovl.as_os_str(), img.as_os_str()]);
    let pid = daemon(&m.dir);
    let lo = Loop::attach(&m.file("disk.raw"), None);
    // SAFETY: kill with a pid and a signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let log_says = || m.log_text().contains("cannot unmount");
    assert!(wait_for(15, log_says), "the daemon says why it still serves: {}", m.log_text());
    let log = m.log_text();
    let file = std::fs::canonicalize(m.file("disk.raw")).unwrap();
    let holder = format!("held by loop device {} (backing {})", lo.0, file.display());
    assert!(log.contains("busy") && log.contains(&holder), "names the cause, the holder and the fix: {log}");
    assert_eq!(crate::overlay::daemon_pid(&m.dir), Some(pid), "the daemon keeps running");
    let mut b = vec![0u8; 4096];
    std::fs::File::open(&lo.0).unwrap().read_exact_at(&mut b, MIB).unwrap();
    assert_same("the loop device still reads the disk", &b, &base[MIB as usize..][..4096]);
    drop(lo);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(wait_for(15, || crate::overlay::daemon_pid(&m.dir).is_none()), "the second SIGTERM ends it");
    assert!(!m.file("disk.raw").exists(), "unmounted");
}
