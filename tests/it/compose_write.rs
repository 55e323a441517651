//! Composed disks written through an overlay (a bootloader in the MBR and its gap, a file in a
//! partition, `grub-install`), and the bad inputs a composition refuses.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::compose::{MIB, check_root, guest, raw_arg, sfdisk, snapshot};

/// A writable loop device over `file` (optionally a range), detached on drop.
struct RwLoop(String);

impl RwLoop {
    fn attach(file: &Path, range: Option<(u64, u64)>) -> RwLoop {
        let r = range.map(|(o, n)| format!("-o {o} --sizelimit {n}")).unwrap_or_default();
        RwLoop(sh(&format!("losetup -f --show {r} {}", file.display())).trim().to_string())
    }
}

impl Drop for RwLoop {
    fn drop(&mut self) {
        let _ = Command::new("sync").status();
        drop(Loop(self.0.clone()));
    }
}

/// A temporary mount of `dev` (read-write), unmounted on drop.
struct FsMount(std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl FsMount {
    fn new(dev: &str) -> FsMount {
        let t = tmpdir();
        let dir = t.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        sh(&format!("mount {dev} {}", dir.display()));
        FsMount(dir, t)
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn compose_args<'a>(parts: &'a [std::ffi::OsString], extra: &[&'a OsStr]) -> Vec<&'a OsStr> {
    let mut a = vec![os("--compose"), os("mbr"), os("--bootable"), os("1"), os("--part-type"), os("2=swap")];
    a.extend_from_slice(extra);
    a.extend(parts.iter().map(|p| p.as_os_str()));
    a
}

/// The composed disk's bytes as generated, without any overlay.
fn pristine(args: &[&OsStr]) -> Vec<u8> {
    let m = mount(args);
    std::fs::read(m.file("disk.raw")).unwrap()
}

crate::register!(boot_code_gap_and_files_written_through_the_overlay_persist);
/// A boot sector (440 bytes, the table left alone) and a core image in the gap written with
/// dd through a loop device, and a changed fstab inside partition 1, all land in the overlay:
/// after a remount they are there, the table is intact, the partition checks clean, export
/// gives the same bytes, and the volumes never changed. A different composition refuses the
/// overlay.
fn boot_code_gap_and_files_written_through_the_overlay_persist() {
    need_fuse();
    for tool in ["losetup", "dd", "e2fsck", "sfdisk"] {
        need(tool);
    }
    let t = tmpdir();
    let g = guest(t.path());
    let before = snapshot(&[&g.root, &g.swap]);
    let parts = [raw_arg(&g.root), raw_arg(&g.swap)];
    let plain = compose_args(&parts, &[]);
    let fresh = pristine(&plain);
    let ovl = t.path().join("fix.ovl");
    let args = compose_args(&parts, &[os("--overlay"), ovl.as_os_str()]);
    let boot = pattern(7, 440);
    let core = pattern(8, 2047 * 512);
    let fstab = b"UUID=root / ext4 defaults 0 1\n".to_vec();
    std::fs::write(t.path().join("boot.bin"), &boot).unwrap();
    std::fs::write(t.path().join("core.bin"), &core).unwrap();
    {
        let m = mount(&args);
        let raw = m.file("disk.raw");
        let disk = RwLoop::attach(&raw, None);
        let d = t.path().display();
        sh(&format!("dd if={d}/boot.bin of={} bs=440 count=1 conv=notrunc,fsync status=none", disk.0));
        sh(&format!("dd if={d}/core.bin of={} bs=512 seek=1 conv=notrunc,fsync status=none", disk.0));
        drop(disk);
        let p1 = RwLoop::attach(&raw, Some((MIB, 40 * MIB)));
        let fs = FsMount::new(&p1.0);
        std::fs::write(fs.0.join("fstab"), &fstab).unwrap();
        drop(fs);
        drop(p1);
    }
    let m = mount(&args);
    let raw = m.file("disk.raw");
    let got = std::fs::read(&raw).unwrap();
    assert_same("boot code", &got[..440], &boot);
    assert_same("the partition table", &got[440..512], &fresh[440..512]);
    assert_same("the gap", &got[512..MIB as usize], &core);
    let (_, rows, _) = sfdisk(&raw);
    assert_eq!((rows[0].start, rows[0].boot, rows[1].ty.as_str()), (2048, true, "82"));
    let mut files = g.files.clone();
    files.push(("fstab".into(), fstab));
    check_root(&raw, (MIB, 40 * MIB), &files);
    drop(m);
    let out = t.path().join("exported.raw");
    let mut e = vec![os("export"), os("--quiet"), os("--overlay"), ovl.as_os_str()];
    e.extend_from_slice(&plain);
    e.push(out.as_os_str());
    let o = vdiskfs(&e);
    assert!(o.status.success(), "export: {}", stderr(&o));
    assert_same("export with the overlay", &std::fs::read(&out).unwrap(), &got);
    let other = compose_args(&parts, &[os("--part-offset"), os("2MiB"), os("--overlay"), ovl.as_os_str()]);
    let err = try_mount(&other).expect_err("an overlay made for another composition");
    assert!(err.contains("overlay was made for a different disk"), "{err}");
    assert!(snapshot(&[&g.root, &g.swap]) == before, "a source volume changed");
}

crate::register!(grub_install_through_the_overlay_lands_in_mbr_and_gap);
/// `grub-install --target=i386-pc` on the composed disk through a loop device, with /boot on
/// partition 1: the MBR and the gap hold GRUB after a remount, the table is intact, and the
/// volumes are unchanged.
fn grub_install_through_the_overlay_lands_in_mbr_and_gap() {
    need_fuse();
    for tool in ["grub-install", "losetup", "e2fsck", "sfdisk"] {
        need(tool);
    }
    if !Path::new("/usr/lib/grub/i386-pc").is_dir() {
        assert!(!in_ci(), "grub-pc-bin (/usr/lib/grub/i386-pc) is required in CI");
        crate::harness::skip("grub-pc-bin not installed");
    }
    let t = tmpdir();
    let g = guest(t.path());
    let before = snapshot(&[&g.root, &g.swap]);
    let parts = [raw_arg(&g.root), raw_arg(&g.swap)];
    let fresh = pristine(&compose_args(&parts, &[]));
    let ovl = t.path().join("grub.ovl");
    let args = compose_args(&parts, &[os("--overlay"), ovl.as_os_str()]);
    {
        let m = mount(&args);
        let raw = m.file("disk.raw");
        let disk = RwLoop::attach(&raw, None);
        let p1 = RwLoop::attach(&raw, Some((MIB, 40 * MIB)));
        let fs = FsMount::new(&p1.0);
        let o = Command::new("grub-install")
            .args(["--target=i386-pc", "--modules=part_msdos ext2"])
            .arg(format!("--boot-directory={}", fs.0.join("boot").display()))
            .arg(&disk.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "grub-install: {}", stderr(&o));
        drop(fs);
        drop(p1);
        drop(disk);
    }
    let m = mount(&args);
    let raw = m.file("disk.raw");
    let got = std::fs::read(&raw).unwrap();
    assert!(got[..440].windows(4).any(|w| w == b"GRUB"), "GRUB's boot sector is in the MBR");
    assert_same("the partition table", &got[440..512], &fresh[440..512]);
    assert!(got[512..1024].iter().any(|&b| b != 0), "GRUB's core image starts in sector 1 (the gap)");
    let lo = Loop::attach(&raw, Some((MIB, 40 * MIB)));
    let fsck = Command::new("e2fsck").args(["-fn", &lo.0]).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn: {}", String::from_utf8_lossy(&fsck.stdout));
    let ls = sh(&format!("debugfs -R 'ls -l /boot/grub/i386-pc' {} 2>/dev/null", lo.0));
    assert!(ls.contains("core.img") && ls.contains("normal.mod"), "debugfs: {ls}");
    drop(lo);
    drop(m);
    assert!(snapshot(&[&g.root, &g.swap]) == before, "a source volume changed");
}

/// `vdiskfs ARGS` fails with exit `code` and one stderr line holding every needle.
fn fails(args: &[&OsStr], code: i32, needles: &[&str]) {
    let o = vdiskfs(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

crate::register!(bad_compositions_are_refused_with_one_line);
fn bad_compositions_are_refused_with_one_line() {
    let t = tmpdir();
    let vol = |name: &str, len: u64| {
        let p = t.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        raw_arg(&p)
    };
    let (a, b) = (vol("a", MIB), vol("b", MIB));
    let missing = t.path().join("missing");
    let m = raw_arg(&missing);
    fn info<'a>(extra: &[&'a OsStr], parts: &[&'a OsStr]) -> Vec<&'a OsStr> {
        let mut v = vec![os("info"), os("--compose")];
        v.extend_from_slice(extra);
        v.extend_from_slice(parts);
        v
    }
    fails(
        &info(&[os("mbr")], &[a.as_os_str(), m.as_os_str()]),
        1,
        &[&format!("vdiskfs: {}: cannot open", missing.display())],
    );
    fails(
        &info(&[os("gpt"), os("--part-offset"), os("16KiB")], &[a.as_os_str()]),
        2,
        &["--part-offset 16384 is smaller than the GPT partition table, which takes the first 17408 bytes"],
    );
    fails(&info(&[os("mbr"), os("--part-offset"), os("100")], &[a.as_os_str()]), 2, &["not a multiple of 512"]);
    let five = [a.as_os_str(), b.as_os_str(), a.as_os_str(), b.as_os_str(), a.as_os_str()];
    fails(&info(&[os("mbr")], &five), 2, &["5 parts, but an MBR holds at most 4 partitions", "--compose gpt"]);
    let (h1, h2) = (vol("huge1", 1536 << 30), vol("huge2", 1536 << 30));
    let huge = [h1.as_os_str(), h2.as_os_str()];
    fails(&info(&[os("mbr")], &huge), 2, &["an MBR addresses at most 2199023255040 bytes (2 TiB): use --compose gpt"]);
    let o = vdiskfs(info(&[os("gpt")], &huge));
    assert!(o.status.success(), "GPT addresses it: {}", stderr(&o));
    fails(&info(&[os("mbr"), os("--part-type"), os("3=swap")], &[a.as_os_str()]), 2, &["there is no part 3"]);
    fails(&info(&[os("mbr"), os("--part-type"), os("1=bios")], &[a.as_os_str()]), 2, &["has no MBR form"]);
    let e = vol("empty", 0);
    fails(
        &info(&[os("mbr")], &[a.as_os_str(), e.as_os_str()]),
        1,
        &["empty: is empty: a partition needs at least one sector"],
    );
    fails(&[os("info"), a.as_os_str(), b.as_os_str()], 2, &["several IMAGEs need --compose"]);
    let o = vdiskfs([os("info"), os("--bootable"), os("1"), a.as_os_str()]);
    assert_eq!(o.status.code(), Some(2), "--bootable needs --compose: {}", stderr(&o));
    if fuse_ok() {
        let mut args = vec![os("--compose"), os("mbr"), a.as_os_str(), m.as_os_str()];
        let err = try_mount(&args).expect_err("a missing volume");
        assert_eq!(err.lines().count(), 1, "{err}");
        args.truncate(3);
        args.insert(2, os("--part-offset"));
        args.insert(3, os("512"));
        assert!(try_mount(&args).is_ok(), "a table of one sector before the first partition");
    }
}

crate::register!(a_volume_resized_while_mounted_gives_eio_and_a_log_line);
/// An `lvextend` (here a truncate) of a part while mounted: the partition table and every
/// offset were laid out for the old size, so reads of that part fail with EIO and a log line
/// until the size is back.
fn a_volume_resized_while_mounted_gives_eio_and_a_log_line() {
    need_fuse();
    let t = tmpdir();
    let p = t.path().join("vol");
    std::fs::write(&p, pattern(4, 4 * MIB as usize)).unwrap();
    let v = raw_arg(&p);
    let m = mount(&[os("--compose"), os("mbr"), v.as_os_str()]);
    let raw = m.file("disk.raw");
    let read = |off: u64| {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&raw).unwrap();
        let mut buf = vec![0u8; 4096 * 2];
        let aligned = (buf.as_ptr() as usize).next_multiple_of(4096) - buf.as_ptr() as usize;
        f.read_exact_at(&mut buf[aligned..aligned + 4096], off).map(|_| buf[aligned..aligned + 4096].to_vec())
    };
    assert_eq!(read(MIB).unwrap(), pattern(4, 4096));
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(5 * MIB).unwrap();
    let e = read(2 * MIB).expect_err("a read of the resized part");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(read(0).is_ok(), "the table is not the part");
    assert!(
        wait_for(5, || m.log_text().contains("size changed from 4194304 to 5242880 bytes")),
        "log: {}",
        m.log_text()
    );
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(4 * MIB).unwrap();
    assert_eq!(read(3 * MIB).unwrap(), pattern(4, 4 * MIB as usize)[2 * MIB as usize..][..4096]);
}
