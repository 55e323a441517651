//! The overlay on real file systems that fail: one that runs out of space (ENOSPC at write
//! time), and a thin one whose device runs out underneath (a write-back error that the kernel
//! reports once: fsyncgate). Through the real mount, checked after a remount.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::vhd::VhdBuilder;

use crate::common::*;

const MIB: u64 = 1 << 20;

/// An ext4 file system on a loop device, made for one test and torn down on drop. For a thin
/// one, the loop device's file lives on a tmpfs smaller than the file system.
struct ScratchFs {
    pub mnt: PathBuf,
    lo: Option<Loop>,
    tmpfs: Option<PathBuf>,
}

impl ScratchFs {
    fn new(dir: &Path, fs_size: u64, thin_room: Option<u64>) -> ScratchFs {
        let mut s = ScratchFs { mnt: dir.join("fs"), lo: None, tmpfs: None };
        let back_dir = dir.join("back");
        std::fs::create_dir_all(&back_dir).unwrap();
        std::fs::create_dir_all(&s.mnt).unwrap();
        if let Some(room) = thin_room {
            sh(&format!("mount -t tmpfs -o size={room} tmpfs {}", back_dir.display()));
            s.tmpfs = Some(back_dir.clone());
        }
        let back = back_dir.join("fs.img");
        std::fs::File::create(&back).unwrap().set_len(fs_size).unwrap();
        let o = Command::new("losetup").args(["-f", "--show"]).arg(&back).output().unwrap();
        assert!(o.status.success(), "losetup: {}", stderr(&o));
        let lo = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
        // No reserved blocks (the daemon runs as root), few inodes, a small journal, all
        // metadata written now: on a thin device only data writes can fail later.
        sh(&format!(
            "mkfs.ext4 -q -F -m 0 -N 64 -J size=1 -E lazy_itable_init=0,lazy_journal_init=0,nodiscard {}",
            lo.0
        ));
        sh(&format!("mount -o errors=continue {} {}", lo.0, s.mnt.display()));
        s.lo = Some(lo);
        s
    }

    /// Unmounts and mounts the file system again: what it holds, not what the page cache does.
    /// A thin device gets its room back first, and the file system a repair if it needs one
    /// (its own metadata writes may have been lost too).
    fn cycle(&self) {
        let lo = self.lo.as_ref().unwrap();
        sh(&format!("umount {}", self.mnt.display()));
        if let Some(t) = &self.tmpfs {
            sh(&format!("mount -o remount,size=256m {}", t.display()));
        }
        let mount =
            || Command::new("mount").args(["-o", "errors=continue", &lo.0]).arg(&self.mnt).status().unwrap().success();
        if !mount() {
            let _ = Command::new("e2fsck").args(["-fy", &lo.0]).output();
            assert!(mount(), "{} does not mount again, even after e2fsck", lo.0);
        }
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        drop(self.lo.take());
        if let Some(t) = &self.tmpfs {
            let _ = Command::new("umount").arg(t).status();
        }
    }
}

/// A dynamic VHD of `size` with data everywhere (so that zeros read back are always wrong).
fn full_disk(dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    let base = pattern(0xba5e, size as usize);
    let img = dir.join("disk.vhd");
    VhdBuilder::dynamic(size).write(0, &base).build(&img).unwrap();
    (img, base)
}

/// The merged disk as `vdiskfs export --overlay` reads it (the overlay opened read-only).
fn exported(img: &Path, ovl: &Path) -> Vec<u8> {
    let t = tmpdir();
    let out = t.path().join("e.raw");
    let o = vdiskfs([os("export"), os("--quiet"), os("--overlay"), ovl.as_os_str(), img.as_os_str(), out.as_os_str()]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    std::fs::read(&out).unwrap()
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

crate::register!(fsync_after_a_lost_write_back_keeps_failing_and_the_mount_says_why);
/// The overlay's file system sits on a thin device that runs out: the kernel loses the data
/// and reports it to one fsync. Every later fsync must fail too, writes get EIO, the log says
/// why, `df` shows no room, and after a remount no byte reads as anything nobody wrote.
fn fsync_after_a_lost_write_back_keeps_failing_and_the_mount_says_why() {
    need_fuse();
    need("losetup");
    need("mkfs.ext4");
    let t = tmpdir();
    let size = 32 * MIB;
    let (img, base) = full_disk(t.path(), size);
    let scratch = ScratchFs::new(t.path(), 64 * MIB, Some(12 * MIB));
    let ovl = scratch.mnt.join("o.ovl");
    let m = mount(&[os("--overlay"), ovl.as_os_str(), img.as_os_str()]);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(m.file("disk.raw")).unwrap();
    let new = pattern(7, (20 * MIB) as usize);
    // The writes land in the page cache of the overlay's file system, and the device runs out
    // when it writes them back: under memory pressure already during the writes, else at fsync.
    let mut first = new.chunks(MIB as usize).enumerate().find_map(|(i, c)| f.write_all_at(c, i as u64 * MIB).err());
    if first.is_none() {
        first = f.sync_data().err();
    }
    let first = first.expect("the device ran out: a write or the fsync fails");
    for i in 0..3 {
        let e = f.sync_data().expect_err("every later fsync fails too");
        assert_eq!(errno(&e), libc::EIO, "fsync {i} after {first}: {e}");
    }
    let e = f.write_all_at(b"more", 30 * MIB).expect_err("writes fail once the overlay failed");
    assert_eq!(errno(&e), libc::EIO, "{e}");
    // A read of what changed since the last good checkpoint (the first MiB was written, or was
    // being written when it failed) fails; the rest reads. Past the kernel's page cache, which
    // still holds what was written.
    // SAFETY: fadvise on an open descriptor.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut b = vec![0u8; 4096];
    assert_eq!(errno(&f.read_exact_at(&mut b, 0).expect_err("unknown on disk")), libc::EIO);
    f.read_exact_at(&mut b, 31 * MIB).unwrap();
    assert_eq!(b, base[(31 * MIB) as usize..(31 * MIB) as usize + 4096]);
    // SAFETY: statvfs into a zeroed local struct.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(m.dir.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut sv) }, 0);
    assert_eq!(sv.f_bavail, 0, "a failed overlay has no room");
    drop(f);
    let log = m.log_text();
    assert!(log.contains("o.ovl") && log.contains("the overlay is failed"), "the log says why: {log}");
    m.unmount();
    assert!(wait_for(10, || daemon_gone(&m.dir)), "the daemon exits");
    drop(m);
    // What the device really holds: every byte is the base's or the write's, never zeros.
    scratch.cycle();
    let got = exported(&img, &ovl);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != base[i] && (i >= new.len() || got[i] != new[i])) {
        panic!("byte {i:#x} reads {:#04x}: neither the base's {:#04x} nor the write's", got[i], base[i]);
    }
}

/// True when no process serves `mnt` any more.
fn daemon_gone(mnt: &Path) -> bool {
    crate::overlay::daemon_pid(mnt).is_none()
}

crate::register!(a_full_overlay_file_system_gives_enospc_and_loses_nothing_acknowledged);
/// The overlay's file system fills up during writes into a discarded range: writes fail with
/// ENOSPC (not EIO), fsync still works, what a failed write left in the overlay's file never
/// shows through a later small write, and after a remount each cluster holds its old bytes or
/// the failed write's new ones, whole (a cluster already in the overlay, written in place, may
/// be torn byte by byte), and every acknowledged write.
fn a_full_overlay_file_system_gives_enospc_and_loses_nothing_acknowledged() {
    need_fuse();
    need("losetup");
    need("mkfs.ext4");
    let t = tmpdir();
    let size = 48 * MIB;
    let (img, base) = full_disk(t.path(), size);
    let scratch = ScratchFs::new(t.path(), 24 * MIB, None);
    let ovl = scratch.mnt.join("o.ovl");
    // Two models: `old` without the failed writes, `new` with them; acknowledged writes in both.
    let (mut old, mut new) = (base.clone(), base.clone());
    let mut failed: Vec<(u64, u64)> = Vec::new();
    {
        let m = mount(&[os("--overlay"), ovl.as_os_str(), img.as_os_str()]);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(m.file("disk.raw")).unwrap();
        // [8 MiB, 48 MiB) discarded: it reads zeros, and holds nothing in the overlay's file.
        punch(&f, 8 * MIB, 40 * MIB);
        for m in [&mut old, &mut new] {
            m[(8 * MIB) as usize..].fill(0);
        }
        let off = fill_until_enospc(&f, 8 * MIB, [&mut old, &mut new]);
        failed.push((off, MIB + 512));
        f.sync_data().expect("after ENOSPC, fsync still makes the acknowledged writes durable");
        let d = pattern(3, MIB as usize);
        let e = f.write_all_at(&d, 40 * MIB).expect_err("still full");
        assert_eq!(errno(&e), libc::ENOSPC, "{e}");
        new[(40 * MIB) as usize..][..d.len()].copy_from_slice(&d);
        failed.push((40 * MIB, MIB));
        // Room again (8 MiB of data discarded); then 16 bytes into every cluster the failed
        // writes touched: what they left in the file must not show around them.
        punch(&f, 8 * MIB, 8 * MIB);
        for m in [&mut old, &mut new] {
            m[(8 * MIB) as usize..(16 * MIB) as usize].fill(0);
        }
        for &(o, len) in &failed {
            for c in (o / CL..(o + len).div_ceil(CL)).map(|c| c * CL + 100) {
                f.write_all_at(&[0xabu8; 16], c).unwrap();
                for m in [&mut old, &mut new] {
                    m[c as usize..c as usize + 16].fill(0xab);
                }
            }
        }
        check_clusters("live", &read_all(&f, size), &old, &new, &failed);
        f.sync_data().unwrap();
        drop(f);
        let log = m.log_text();
        assert!(!log.contains("the overlay is failed"), "ENOSPC must not fail the overlay: {log}");
        m.unmount();
        assert!(wait_for(10, || daemon_gone(&m.dir)), "the daemon exits");
    }
    scratch.cycle();
    check_clusters("after a remount", &exported(&img, &ovl), &old, &new, &failed);
}

const CL: u64 = 64 * 1024;

fn read_all(f: &std::fs::File, size: u64) -> Vec<u8> {
    // Past the page cache: what the daemon serves.
    // SAFETY: fadvise on an open descriptor.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut b = vec![0u8; size as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    b
}

/// Writes 1 MiB + 512 bytes at a time (each ends inside a cluster: the next writes it in
/// place) from `from` until the overlay's file system is full, with an fsync every 4. Returns
/// where the failed write began; only `models[1]` has its bytes.
fn fill_until_enospc(f: &std::fs::File, from: u64, models: [&mut Vec<u8>; 2]) -> u64 {
    let chunk = MIB as usize + 512;
    let mut off = from;
    for i in 0.. {
        assert!(off + (chunk as u64) < 40 * MIB, "the overlay never ran out of space");
        let d = pattern(100 + i, chunk);
        if let Err(e) = f.write_all_at(&d, off) {
            assert_eq!(errno(&e), libc::ENOSPC, "a full file system is ENOSPC, not EIO: {e}");
            models[1][off as usize..][..chunk].copy_from_slice(&d);
            return off;
        }
        models[0][off as usize..][..chunk].copy_from_slice(&d);
        models[1][off as usize..][..chunk].copy_from_slice(&d);
        if i % 4 == 3 {
            f.sync_data().expect("fsync while there is room");
        }
        off += chunk as u64;
    }
    unreachable!()
}

fn punch(f: &std::fs::File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an open descriptor.
    let r = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off as i64, len as i64)
    };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
}

/// Each cluster of `got` is the one of `old` or of `new`, whole. The first cluster of a failed
/// write was already in the overlay (written in place): there, byte by byte.
fn check_clusters(what: &str, got: &[u8], old: &[u8], new: &[u8], failed: &[(u64, u64)]) {
    let cl = CL as usize;
    for c in 0..got.len() / cl {
        let r = c * cl..(c + 1) * cl;
        if got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r.clone()] {
            continue;
        }
        let in_place = failed.iter().any(|&(o, _)| o as usize / cl == c);
        let torn_ok = in_place && r.clone().all(|i| got[i] == old[i] || got[i] == new[i]);
        let i = r.clone().find(|&i| got[i] != old[i]).unwrap_or(r.start);
        assert!(torn_ok, "{what}: cluster {c} is neither old nor new at {i:#x}: {:#04x}", got[i]);
    }
}

/// Fills the rest of the file system at `dir` with a file, until ENOSPC.
fn fill_up(dir: &Path) {
    let f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x11u8; MIB as usize];
    let mut off = 0;
    while f.write_all_at(&chunk, off).is_ok() {
        off += MIB;
    }
    let _ = f.write_all_at(&chunk[..4096], off);
    let _ = f.sync_all();
}

crate::register!(fallocate_reserves_overlay_space_or_fails);
/// fallocate(mode 0) on the disk promises that writes there will not run out of space: it
/// reserves the overlay's space for real (ENOSPC when there is none), and the writes succeed
/// after the file system filled up.
fn fallocate_reserves_overlay_space_or_fails() {
    need_fuse();
    need("losetup");
    need("mkfs.ext4");
    let t = tmpdir();
    let size = 48 * MIB;
    let (img, _) = full_disk(t.path(), size);
    let scratch = ScratchFs::new(t.path(), 24 * MIB, None);
    let ovl = scratch.mnt.join("o.ovl");
    let m = mount(&[os("--overlay"), ovl.as_os_str(), img.as_os_str()]);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(m.file("disk.raw")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: fallocate on an open descriptor.
    let r = unsafe { libc::fallocate(fd, 0, (8 * MIB) as i64, (40 * MIB) as i64) };
    let e = std::io::Error::last_os_error();
    assert!(r != 0 && errno(&e) == libc::ENOSPC, "40 MiB on a 24 MiB file system: {r} {e}");
    // SAFETY: as above.
    let r = unsafe { libc::fallocate(fd, 0, MIB as i64 + 100, (6 * MIB) as i64) };
    assert_eq!(r, 0, "6 MiB fit: {}", std::io::Error::last_os_error());
    fill_up(&scratch.mnt);
    let new = pattern(42, (6 * MIB) as usize);
    f.write_all_at(&new, MIB + 100).expect("a reserved range takes writes on a full file system");
    f.sync_data().expect("and makes them durable");
    drop(f);
    m.unmount();
    assert!(wait_for(10, || daemon_gone(&m.dir)), "the daemon exits");
    drop(m);
    scratch.cycle();
    let got = exported(&img, &ovl);
    assert_same("the reserved range after a remount", &got[(MIB + 100) as usize..][..new.len()], &new);
}
