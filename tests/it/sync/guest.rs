//! A guest file system written between snapshots, through a loop device as a guest would write
//! it (mkfs.ext4, then files added, changed and removed), is intact on the target after the last
//! sync, in every format: `e2fsck -fn` finds nothing and every file holds what was written.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Dest, Esxi, HyperV, MIB, SIZE, SparseVmdk, Tracked, Vm, XenVhd};
use crate::common::*;

/// A disk with an MBR and one ext4 partition, changed through a read-write loop device.
struct Guest {
    _dir: tempfile::TempDir,
    raw: PathBuf,
    part: (u64, u64),
}

impl Guest {
    fn new() -> Guest {
        let dir = tmpdir();
        let raw = dir.path().join("guest.raw");
        std::fs::write(&raw, vec![0u8; SIZE as usize]).unwrap();
        let part = (MIB, SIZE - 2 * MIB);
        sh(&format!("echo 'start=2048, size={}, type=83' | sfdisk -q --label dos {}", part.1 / 512, raw.display()));
        let g = Guest { _dir: dir, raw, part };
        g.with_device(|dev| sh(&format!("mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {dev}")));
        g
    }

    fn with_device<T>(&self, f: impl FnOnce(&str) -> T) -> T {
        let o = Command::new("losetup")
            .args(["-f", "--show", "-o", &self.part.0.to_string(), "--sizelimit", &self.part.1.to_string()])
            .arg(&self.raw)
            .output()
            .unwrap();
        assert!(o.status.success(), "losetup: {}", stderr(&o));
        let lo = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
        f(&lo.0)
    }

    /// Mounts the file system, lets `f` change it, unmounts; returns the whole disk.
    fn change(&self, f: impl FnOnce(&Path)) -> Vec<u8> {
        self.with_device(|dev| {
            let m = tmpdir();
            sh(&format!("mount -t ext4 {dev} {}", m.path().display()));
            f(m.path());
            sh(&format!("umount {}", m.path().display()));
        });
        std::fs::read(&self.raw).unwrap()
    }
}

/// Writes to `t` every 4 KiB unit where `new` differs from the model, in runs.
fn apply<V: Vm>(t: &mut Tracked<V>, new: &[u8]) {
    const U: usize = 4096;
    let mut run: Option<usize> = None;
    for u in 0..=new.len() / U {
        let differs = u < new.len() / U && t.model[u * U..(u + 1) * U] != new[u * U..(u + 1) * U];
        match (differs, run) {
            (true, None) => run = Some(u),
            (false, Some(s)) => {
                t.write((s * U) as u64, &new[s * U..u * U]);
                run = None;
            }
            _ => {}
        }
    }
    assert_same("model after the guest's writes", &t.model, new);
}

struct States {
    disks: Vec<Vec<u8>>,
    part: (u64, u64),
    files: Vec<(&'static str, Vec<u8>)>,
}

/// The base (a fresh file system with two files), two snapshots' worth of changes, and the
/// last delta written before the VM stops.
fn guest_states() -> States {
    let g = Guest::new();
    let big = pattern(61, 3 << 20);
    let s0 = g.change(|m| {
        std::fs::create_dir(m.join("etc")).unwrap();
        std::fs::write(m.join("etc/hostname"), b"web-1\n").unwrap();
        std::fs::write(m.join("base.bin"), pattern(60, 300_000)).unwrap();
    });
    let s1 = g.change(|m| {
        std::fs::write(m.join("etc/hostname"), b"web-1.example.org\n").unwrap();
        std::fs::write(m.join("snap1.bin"), &big).unwrap();
    });
    let s2 = g.change(|m| {
        std::fs::remove_file(m.join("base.bin")).unwrap();
        std::fs::write(m.join("late.bin"), pattern(62, 2_000_000)).unwrap();
    });
    let s3 = g.change(|m| std::fs::write(m.join("cutover.txt"), b"written after the VM was told to stop\n").unwrap());
    let files = vec![
        ("etc/hostname", b"web-1.example.org\n".to_vec()),
        ("snap1.bin", big),
        ("late.bin", pattern(62, 2_000_000)),
        ("cutover.txt", b"written after the VM was told to stop\n".to_vec()),
    ];
    States { disks: vec![s0, s1, s2, s3], part: g.part, files }
}

fn migrate_guest<V: Vm>(what: &str, vm: V, dir: &Path, s: &States) {
    let dest = Dest::file(dir);
    let mut t = Tracked { vm, model: s.disks[0].clone() };
    dest.ok("export", &["--exclude-top"], &t.vm.top());
    apply(&mut t, &s.disks[1]);
    t.vm.snapshot();
    dest.ok("sync", &["--exclude-top"], &t.vm.top());
    assert_same(&format!("{what}: after the first sync"), &dest.read(), &s.disks[1]);
    apply(&mut t, &s.disks[2]);
    t.vm.snapshot();
    apply(&mut t, &s.disks[3]);
    t.vm.stop();
    dest.ok("sync", &[], &t.vm.top());
    assert_same(&format!("{what}: after the last sync"), &dest.read(), &s.disks[3]);
    // The guest's view of the target: a clean file system holding every file.
    let lo = Loop::attach(&dest.target, Some(s.part));
    let o = Command::new("e2fsck").args(["-fn", &lo.0]).output().unwrap();
    assert!(o.status.success(), "{what}: e2fsck -fn: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    drop(lo);
    let names: Vec<&str> = s.files.iter().map(|f| f.0).collect();
    for (got, (name, want)) in read_files_in_partition(&dest.target, s.part, &names).iter().zip(&s.files) {
        assert!(got == want, "{what}: {name} differs on the target");
    }
    let gone = read_missing(&dest.target, s.part, "base.bin");
    assert!(gone, "{what}: base.bin was removed in the guest but is on the target");
}

/// True when `name` does not exist in the file system of the partition.
fn read_missing(raw: &Path, part: (u64, u64), name: &str) -> bool {
    let lo = Loop::attach(raw, Some(part));
    let o = Command::new("debugfs").args(["-R", &format!("stat {name}"), &lo.0]).output().unwrap();
    String::from_utf8_lossy(&o.stderr).contains("not found") || String::from_utf8_lossy(&o.stdout).contains("not found")
}

crate::register!(a_guest_file_system_written_between_snapshots_is_intact_after_the_last_sync);
fn a_guest_file_system_written_between_snapshots_is_intact_after_the_last_sync() {
    for tool in ["losetup", "sfdisk", "mkfs.ext4", "e2fsck", "debugfs", "qemu-img", "qemu-io"] {
        need(tool);
    }
    let s = guest_states();
    let (a, b, c, d) = (tmpdir(), tmpdir(), tmpdir(), tmpdir());
    migrate_guest("XenServer VHD", XenVhd::new(a.path(), &s.disks[0]), a.path(), &s);
    migrate_guest("Hyper-V VHDX", HyperV::new(b.path(), &s.disks[0]), b.path(), &s);
    migrate_guest("ESXi SESparse", Esxi::new(c.path(), &s.disks[0]), c.path(), &s);
    migrate_guest("VMDK sparse", SparseVmdk::new(d.path(), &s.disks[0]), d.path(), &s);
}
