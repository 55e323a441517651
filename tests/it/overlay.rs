//! The copy-on-write overlay and export, through real FUSE, against a model; sources never change.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use testkit::vhd::{Dialect, VhdBuilder};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// A two-layer VHD chain with data in both layers; returns (top, all source paths, model).
fn chain(dir: &Path, size: u64) -> (PathBuf, Vec<PathBuf>, Vec<u8>) {
    let mut model = vec![0u8; size as usize];
    let base = dir.join("base.vhd");
    let mut b = VhdBuilder::dynamic(size).dialect(Dialect::Xen);
    for (i, off) in (0..size).step_by((3 * MIB) as usize).enumerate() {
        let n = MIB.min(size - off);
        let d = pattern(i as u64 + 1, n as usize);
        b.write(off, &d);
        model[off as usize..(off + n) as usize].copy_from_slice(&d);
    }
    b.build(&base).unwrap();
    let top = dir.join("top.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    let d = pattern(99, 512 * 9);
    c.write(MIB / 2, &d);
    model[(MIB / 2) as usize..(MIB / 2) as usize + d.len()].copy_from_slice(&d);
    c.build(&top).unwrap();
    (top.clone(), vec![top, base], model)
}

fn hashes(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn mount_rw(top: &Path, ovl: &Path) -> Mount {
    mount(&[os("--overlay"), ovl.as_os_str(), top.as_os_str()])
}

fn punch(f: &std::fs::File, off: u64, len: u64) {
    let r = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off as i64, len as i64)
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u64),
    Discard(u64, u64),
    Fsync,
    Read(u64, usize),
    Remount,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..size, 1usize..200_000, any::<u64>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
        2 => (0..size, 1u64..600_000).prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Fsync),
        3 => (0..size, 1usize..300_000).prop_map(|(o, l)| Op::Read(o, l)),
        1 => Just(Op::Remount),
    ]
}

const PROP_SIZE: u64 = 6 * MIB + 3 * 512;

crate::register!(overlay_matches_a_model_under_random_operations);
/// Random writes (any offset and length), discards, fsyncs, reads and remounts against a
/// Vec<u8> model, through the real FUSE mount with a real overlay file.
fn overlay_matches_a_model_under_random_operations() {
    need_fuse();
    let config = ProptestConfig { cases: 10, max_shrink_iters: 20, ..ProptestConfig::default() };
    proptest!(config, |(ops in prop::collection::vec(op(PROP_SIZE), 1..30))| {
        let t = tmpdir();
        let (top, sources, mut model) = chain(t.path(), PROP_SIZE);
        let before = hashes(&sources);
        let ovl = t.path().join("o.ovl");
        let mut m = mount_rw(&top, &ovl);
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(m.file("top.raw")).unwrap();
        for o in &ops {
            match *o {
                Op::Write(off, len, seed) => {
                    let len = len.min((PROP_SIZE - off) as usize);
                    let d = pattern(seed, len);
                    f.write_all_at(&d, off).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&d);
                }
                Op::Discard(off, len) => {
                    punch(&f, off, len);
                    let end = (off + len).min(PROP_SIZE);
                    model[off as usize..end as usize].fill(0);
                }
                Op::Fsync => f.sync_all().unwrap(),
                Op::Read(off, len) => {
                    let len = len.min((PROP_SIZE - off) as usize);
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off).unwrap();
                    prop_assert!(buf == model[off as usize..off as usize + len], "read at {off:#x}+{len}");
                }
                Op::Remount => {
                    drop(f);
                    drop(m);
                    m = mount_rw(&top, &ovl);
                    f = std::fs::OpenOptions::new().read(true).write(true).open(m.file("top.raw")).unwrap();
                }
            }
        }
        let all = std::fs::read(m.file("top.raw")).unwrap();
        prop_assert!(all == model, "whole disk differs from the model");
        drop(f);
        drop(m);
        let m = mount_rw(&top, &ovl);
        prop_assert!(std::fs::read(m.file("top.raw")).unwrap() == model, "after remount");
        drop(m);
        prop_assert!(hashes(&sources) == before, "a source image changed");
    });
}

/// Exports the chain + overlay to a new file and compares it with `want`.
fn export_and_check(top: &Path, ovl: &Path, want: &[u8]) {
    let t = tmpdir();
    let out = t.path().join("exported.raw");
    let o = vdiskfs([os("export"), os("--verify"), os("--overlay"), ovl.as_os_str(), top.as_os_str(), out.as_os_str()]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    assert_same("exported disk", &std::fs::read(&out).unwrap(), want);
}

crate::register!(qemu_io_writes_survive_remount_and_export);
fn qemu_io_writes_survive_remount_and_export() {
    need_fuse();
    need("qemu-io");
    let t = tmpdir();
    let (top, sources, mut model) = chain(t.path(), 8 * MIB);
    let before = hashes(&sources);
    let ovl = t.path().join("o.ovl");
    let m = mount_rw(&top, &ovl);
    let raw = m.file("top.raw");
    for (pat, off, len) in [(0xa5u8, 512u64, 512u64), (0x3c, MIB + 4096, 200_000), (0x11, 7 * MIB - 100, 100)] {
        sh(&format!("qemu-io -f raw -c 'write -P {pat} {off} {len}' {}", raw.display()));
        model[off as usize..(off + len) as usize].fill(pat);
    }
    assert_same("after qemu-io writes", &std::fs::read(&raw).unwrap(), &model);
    drop(m);
    let m = mount_rw(&top, &ovl);
    sh(&format!(
        "qemu-io -f raw -c 'read -P 165 512 512' -c 'read -P 60 {} 200000' {}",
        MIB + 4096,
        m.file("top.raw").display()
    ));
    assert_same("after remount", &std::fs::read(m.file("top.raw")).unwrap(), &model);
    drop(m);
    export_and_check(&top, &ovl, &model);
    assert_eq!(hashes(&sources), before, "a source image changed");
}

crate::register!(mkfs_and_file_writes_through_a_loop_device_at_a_partition_offset);
fn mkfs_and_file_writes_through_a_loop_device_at_a_partition_offset() {
    need_fuse();
    need("losetup");
    need("mkfs.ext4");
    need("sfdisk");
    let t = tmpdir();
    let size = 48 * MIB;
    // A base disk holding only a partition table, as a fresh target disk would.
    let mut disk = vec![0u8; size as usize];
    let tbl = t.path().join("tbl.raw");
    std::fs::write(&tbl, &disk).unwrap();
    sh(&format!(
        "echo 'start=2048, size={}, type=83' | sfdisk -q --label dos {}",
        (size - 2 * MIB) / 512,
        tbl.display()
    ));
    disk[..512].copy_from_slice(&std::fs::read(&tbl).unwrap()[..512]);
    let base = t.path().join("base.vhd");
    let mut b = VhdBuilder::dynamic(size);
    b.write(0, &disk[..4096]);
    b.build(&base).unwrap();
    let before = hashes(std::slice::from_ref(&base));
    let ovl = t.path().join("o.ovl");
    let part = (MIB, size - 2 * MIB);
    let content = pattern(5, 300_000);
    {
        let m = mount_rw(&base, &ovl);
        let o = Command::new("losetup")
            .args(["-f", "--show", "-o", &part.0.to_string(), "--sizelimit", &part.1.to_string()])
            .arg(m.file("base.raw"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let lo = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
        sh(&format!("mkfs.ext4 -q -F {}", lo.0));
        let fsm = t.path().join("fs");
        std::fs::create_dir(&fsm).unwrap();
        sh(&format!("mount {} {}", lo.0, fsm.display()));
        std::fs::write(fsm.join("data.bin"), &content).unwrap();
        std::fs::create_dir(fsm.join("etc")).unwrap();
        std::fs::write(fsm.join("etc/fstab"), b"/dev/vda1 / ext4 defaults 0 1\n").unwrap();
        sh(&format!("umount {}", fsm.display()));
        drop(lo);
    }
    // Remount with the same overlay: the filesystem and its files are there.
    let m = mount_rw(&base, &ovl);
    let files = read_files_in_partition(&m.file("base.raw"), part, &["data.bin", "etc/fstab"]);
    assert_eq!(files[0], content);
    assert_eq!(files[1], b"/dev/vda1 / ext4 defaults 0 1\n");
    let merged = std::fs::read(m.file("base.raw")).unwrap();
    drop(m);
    export_and_check(&base, &ovl, &merged);
    let t2 = tmpdir();
    let out = t2.path().join("e.raw");
    let o = vdiskfs([os("export"), os("--overlay"), ovl.as_os_str(), base.as_os_str(), out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = read_files_in_partition(&out, part, &["data.bin"]);
    assert_eq!(files[0], content, "file in the exported disk");
    assert_eq!(hashes(std::slice::from_ref(&base)), before, "the source changed");
}

/// The pid of the vdiskfs serving `mnt`.
pub fn daemon_pid(mnt: &Path) -> Option<i32> {
    let want = mnt.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmd.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        (args.first().is_some_and(|a| a.ends_with("vdiskfs")) && args.contains(&want)).then_some(pid)
    })
}

crate::register!(kill_9_during_writes_keeps_fsynced_data_and_never_shows_garbage);
/// kill -9 in the middle of a write stream: after remounting, every write that an fsync
/// covered is there, and every byte holds either its last-fsynced value or a later write's.
fn kill_9_during_writes_keeps_fsynced_data_and_never_shows_garbage() {
    need_fuse();
    let size = 8 * MIB;
    for round in 0..3u64 {
        let t = tmpdir();
        let (top, sources, base_model) = chain(t.path(), size);
        let before = hashes(&sources);
        let ovl = t.path().join("o.ovl");
        let m = mount_rw(&top, &ovl);
        let pid = daemon_pid(&m.dir).expect("daemon pid");
        let f = std::fs::OpenOptions::new().read(true).write(true).open(m.file("top.raw")).unwrap();
        // Writes to random, overlapping ranges; remember them all.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut synced = 0;
        let mut x = 0x9e37_79b9_u64 ^ round;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150 + 100 * round));
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        for i in 0..100_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 20) % (size - 70_000);
            let len = 1 + ((x >> 8) % 65_536) as usize;
            let d = pattern(i + 1000 * round, len);
            // Recorded before it is issued: a write cut off by the kill may be partly applied.
            writes.push((off, d));
            let (off, d) = writes.last().unwrap();
            if f.write_all_at(d, *off).is_err() {
                break;
            }
            if i % 7 == 6 {
                if f.sync_data().is_err() {
                    break;
                }
                synced = writes.len();
            }
        }
        killer.join().unwrap();
        drop(f);
        assert!(synced > 0, "the daemon died before any fsync");
        m.unmount();
        drop(m);
        // The model at the last fsync, and for each byte the values later writes could leave.
        let mut model = base_model.clone();
        for (off, d) in &writes[..synced] {
            model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        let m = mount_rw(&top, &ovl);
        let got = std::fs::read(m.file("top.raw")).unwrap();
        let mut ok = got.iter().zip(&model).map(|(a, b)| a == b).collect::<Vec<bool>>();
        for (off, d) in &writes[synced..] {
            for (k, &v) in d.iter().enumerate() {
                let i = *off as usize + k;
                ok[i] |= got[i] == v;
            }
        }
        if let Some(bad) = ok.iter().position(|&o| !o) {
            panic!(
                "round {round}: byte {bad:#x} is {:#04x}: neither its fsynced value {:#04x} nor any later write ({} writes, {} fsynced)",
                got[bad],
                model[bad],
                writes.len(),
                synced
            );
        }
        drop(m);
        assert_eq!(hashes(&sources), before, "a source image changed");
    }
}

crate::register!(overlay_for_another_chain_is_refused);
fn overlay_for_another_chain_is_refused() {
    need_fuse();
    let t = tmpdir();
    let (top, _, _) = chain(t.path(), 4 * MIB);
    let ovl = t.path().join("o.ovl");
    drop(mount_rw(&top, &ovl));
    let other = t.path().join("other.vhd");
    VhdBuilder::dynamic(4 * MIB).build(&other).unwrap();
    let e = try_mount(&[os("--overlay"), ovl.as_os_str(), other.as_os_str()]).unwrap_err();
    assert!(e.contains("overlay was made for a different disk") && e.contains("o.ovl"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // The same overlay twice at once is refused too.
    let _m = mount_rw(&top, &ovl);
    let e = try_mount(&[os("--overlay"), ovl.as_os_str(), top.as_os_str()]).unwrap_err();
    assert!(e.contains("in use"), "{e}");
}

crate::register!(export_skips_holes_refuses_bad_targets_and_reports_partial_failure);
fn export_skips_holes_refuses_bad_targets_and_reports_partial_failure() {
    let t = tmpdir();
    let size = 16 * MIB;
    let top = t.path().join("d.vhd");
    let mut b = VhdBuilder::dynamic(size);
    b.write(2 * MIB, &pattern(1, (3 * MIB) as usize)).write(12 * MIB, &pattern(2, MIB as usize));
    b.build(&top).unwrap();
    let mut model = vec![0u8; size as usize];
    model[(2 * MIB) as usize..(5 * MIB) as usize].copy_from_slice(&pattern(1, (3 * MIB) as usize));
    model[(12 * MIB) as usize..(13 * MIB) as usize].copy_from_slice(&pattern(2, MIB as usize));

    // A new target: holes are not written, so it stays sparse.
    let out = t.path().join("new.raw");
    let o = vdiskfs([os("export"), top.as_os_str(), out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same("export", &std::fs::read(&out).unwrap(), &model);
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&out).unwrap().blocks() * 512 <= 5 * MIB, "holes were written");

    // An existing, dirty target of the right size: holes are zeroed (not skipped).
    let dirty = t.path().join("dirty.raw");
    std::fs::write(&dirty, vec![0xffu8; size as usize]).unwrap();
    let o = vdiskfs([os("export"), os("--verify"), top.as_os_str(), dirty.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same("export over a dirty file", &std::fs::read(&dirty).unwrap(), &model);

    // Refused: smaller than the disk; the source itself; a directory.
    let small = t.path().join("small.raw");
    std::fs::write(&small, vec![0u8; MIB as usize]).unwrap();
    assert_one_line_error(
        &vdiskfs([os("export"), top.as_os_str(), small.as_os_str()]),
        &small.display().to_string(),
        &["smaller than the disk"],
    );
    let o = vdiskfs([os("export"), top.as_os_str(), top.as_os_str()]);
    assert!(!o.status.success() && stderr(&o).contains("sources are never written"), "{}", stderr(&o));
    assert!(!vdiskfs([os("export"), top.as_os_str(), t.path().as_os_str()]).status.success());

    // A block device holding a mounted filesystem is refused.
    if have("losetup") && have("mkfs.ext4") {
        let img = t.path().join("dev.img");
        std::fs::write(&img, vec![0u8; (20 * MIB) as usize]).unwrap();
        let o = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().unwrap();
        let lo = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
        sh(&format!("mkfs.ext4 -q -F {}", lo.0));
        let mnt = t.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        sh(&format!("mount {} {}", lo.0, mnt.display()));
        let o = vdiskfs([os("export"), top.as_os_str(), os(&lo.0)]);
        sh(&format!("umount {}", mnt.display()));
        assert_one_line_error(&o, &lo.0, &["in use", "refusing"]);
        // Unmounted, the same device takes the export.
        let o = vdiskfs([os("export"), os("--verify"), top.as_os_str(), os(&lo.0)]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_same("export to a block device", &std::fs::read(&lo.0).unwrap()[..size as usize], &model);
        // And a file attached to a loop device is refused.
        let o = vdiskfs([os("export"), top.as_os_str(), img.as_os_str()]);
        assert!(!o.status.success() && stderr(&o).contains("attached to"), "{}", stderr(&o));
    }

    // A target that runs out of space part-way: the message says what was written.
    if fuse_ok() {
        let fs = t.path().join("tiny");
        std::fs::create_dir(&fs).unwrap();
        sh(&format!("mount -t tmpfs -o size=3M tmpfs {}", fs.display()));
        let target = fs.join("t.raw");
        let o = vdiskfs([os("export"), os("--threads"), os("1"), top.as_os_str(), target.as_os_str()]);
        sh(&format!("umount {}", fs.display()));
        assert_one_line_error(&o, &target.display().to_string(), &["INCOMPLETE", "everything below 0x"]);
    }
}

crate::register!(guestfish_writes_a_file_into_the_guest_filesystem);
/// libguestfs writes into the guest filesystem of a mounted, overlaid chain; the file is there
/// after a remount and in the exported disk, and the sources are unchanged.
fn guestfish_writes_a_file_into_the_guest_filesystem() {
    need_fuse();
    need("guestfish");
    let Some(fs) = fs_pair(64 * MIB) else { return };
    let t = tmpdir();
    let base = t.path().join("base.vhd");
    let mut b = VhdBuilder::dynamic(fs.base.len() as u64).dialect(Dialect::Xen);
    b.write_diff(&vec![0u8; fs.base.len()], &fs.base, 4096);
    b.build(&base).unwrap();
    let top = t.path().join("snap.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    c.write_diff(&fs.base, &fs.child, 512);
    c.build(&top).unwrap();
    let sources = vec![top.clone(), base.clone()];
    let before = hashes(&sources);
    let ovl = t.path().join("fixups.ovl");
    let text = "written by guestfish through the vdiskfs overlay\n";
    {
        let m = mount_rw(&top, &ovl);
        let o = Command::new("guestfish")
            .env("LIBGUESTFS_BACKEND", "direct")
            .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
            .args(["--rw", "--format=raw", "-a"])
            .arg(m.file("snap.raw"))
            .args([
                "run",
                ":",
                "mount",
                "/dev/sda1",
                "/",
                ":",
                "mkdir-p",
                "/etc/fixups",
                ":",
                "write",
                "/etc/fixups/note.txt",
                text,
            ])
            .args([":", "rm", &format!("/{}", fs.base_file.0), ":", "umount-all", ":", "sync"])
            .output()
            .unwrap();
        assert!(o.status.success(), "guestfish: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    }
    let m = mount_rw(&top, &ovl);
    let files = read_files_in_partition(&m.file("snap.raw"), fs.part, &["etc/fixups/note.txt", &fs.child_file.0]);
    assert_eq!(files[0], text.as_bytes());
    assert_eq!(files[1], fs.child_file.1, "the child layer's file is still there");
    let merged = std::fs::read(m.file("snap.raw")).unwrap();
    drop(m);
    export_and_check(&top, &ovl, &merged);
    let out = t.path().join("exported.raw");
    let o = vdiskfs([os("export"), os("--overlay"), ovl.as_os_str(), top.as_os_str(), out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lo = Loop::attach(&out, Some(fs.part));
    let gone = t.path().join("g");
    std::fs::create_dir(&gone).unwrap();
    sh(&format!("mount -t ext4 -o ro,noload {} {}", lo.0, gone.display()));
    let note = std::fs::read(gone.join("etc/fixups/note.txt"));
    let deleted = gone.join(&fs.base_file.0).exists();
    sh(&format!("umount {}", gone.display()));
    drop(lo);
    assert_eq!(note.unwrap(), text.as_bytes(), "the note in the exported disk");
    assert!(!deleted, "guestfish deleted a base file; the export must not have it");
    assert_eq!(hashes(&sources), before, "a source image changed");
}

crate::register!(blkdiscard_through_a_loop_device_zeroes_and_frees_overlay_space);
/// What fstrim sends: BLKDISCARD on a loop device over the mounted file reads back as zeros
/// and gives the overlay's space back.
fn blkdiscard_through_a_loop_device_zeroes_and_frees_overlay_space() {
    need_fuse();
    need("losetup");
    need("blkdiscard");
    use std::os::unix::fs::MetadataExt;
    let t = tmpdir();
    let (top, sources, mut model) = chain(t.path(), 12 * MIB);
    let before = hashes(&sources);
    let ovl = t.path().join("o.ovl");
    let m = mount_rw(&top, &ovl);
    let raw = m.file("top.raw");
    let d = pattern(77, (4 * MIB) as usize);
    std::fs::OpenOptions::new().write(true).open(&raw).unwrap().write_all_at(&d, 4 * MIB).unwrap();
    model[(4 * MIB) as usize..(8 * MIB) as usize].copy_from_slice(&d);
    let o = Command::new("losetup").args(["-f", "--show"]).arg(&raw).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lo = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
    sh(&format!("sync; blockdev --flushbufs {}", lo.0));
    let used_before = std::fs::metadata(&ovl).unwrap().blocks() * 512;
    // Discard [5 MiB, 7 MiB + 4 KiB): whole clusters are punched, the edge is zeroed.
    sh(&format!("blkdiscard -o {} -l {} {}", 5 * MIB, 2 * MIB + 4096, lo.0));
    drop(lo);
    model[(5 * MIB) as usize..(7 * MIB + 4096) as usize].fill(0);
    assert_same("after blkdiscard", &std::fs::read(&raw).unwrap(), &model);
    let used_after = std::fs::metadata(&ovl).unwrap().blocks() * 512;
    assert!(used_after + 2 * MIB - 65536 <= used_before, "overlay space not freed: {used_before} -> {used_after}");
    drop(m);
    let m = mount_rw(&top, &ovl);
    assert_same("after remount", &std::fs::read(m.file("top.raw")).unwrap(), &model);
    drop(m);
    assert_eq!(hashes(&sources), before, "a source image changed");
}
