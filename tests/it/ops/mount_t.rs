//! `mount -t vdiskfs` and /etc/fstab lines (through mount(8) and `mount.vdiskfs`): a local
//! chain and an `ssh://` chain from the test sshd read the same bytes as qemu-img's reading of
//! the chain, options hold quoted commas and spaces (and `\040` in fstab), HOME may be unset,
//! and `umount` leaves no vdiskfs or ssh process behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use testkit::vmdk::{DeltaBuilder, write_flat};

use crate::common::sshd::Sshd;
use crate::common::*;

const MIB: u64 = 1 << 20;

/// Serializes the tests that install /sbin/mount.vdiskfs (one file for the whole machine).
static SBIN: Mutex<()> = Mutex::new(());

/// /sbin/mount.vdiskfs, a symlink to a copy of the helper with the built vdiskfs beside it;
/// removed on drop.
struct Helper {
    _lock: std::sync::MutexGuard<'static, ()>,
    _dir: tempfile::TempDir,
}

const SBIN_HELPER: &str = "/sbin/mount.vdiskfs";

impl Helper {
    fn install() -> Helper {
        need_fuse();
        need("mount");
        let lock = SBIN.lock().unwrap_or_else(|e| e.into_inner());
        if std::fs::symlink_metadata(SBIN_HELPER).is_ok() {
            crate::harness::skip(format!("{SBIN_HELPER} is already installed on this machine"));
        }
        let dir = tmpdir();
        let copy = dir.path().join("mount.vdiskfs");
        std::fs::copy(super::helper("mount.vdiskfs"), &copy).unwrap();
        std::os::unix::fs::symlink(bin(), dir.path().join("vdiskfs")).unwrap();
        std::os::unix::fs::symlink(&copy, SBIN_HELPER).unwrap();
        Helper { _lock: lock, _dir: dir }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(SBIN_HELPER);
    }
}

/// A VMDK chain (flat base, two SESparse snapshots) with the base in a directory of its own:
/// (top, base directory, qemu-img's bytes of the whole chain, of the chain below the top).
fn chain(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let (base, _) = write_flat(dir, "vm", &pattern(21, (12 * MIB) as usize), "vmfs").unwrap();
    let mut s1 = DeltaBuilder::sesparse(&base).unwrap();
    s1.write(0, &pattern(22, 8192)).write(5 * MIB, &pattern(23, (MIB + 4096) as usize)).zero(9 * MIB, 4096);
    let snap1 = s1.build(dir, "vm-000001").unwrap();
    let mut s2 = DeltaBuilder::sesparse(&snap1).unwrap();
    s2.write(4096, &pattern(24, 4096)).write(10 * MIB, &pattern(25, (MIB) as usize));
    let top = s2.build(dir, "vm-000002").unwrap();
    let (whole, below) = (qemu_raw(&top, "vmdk"), qemu_raw(&snap1, "vmdk"));
    // The base moves away: only parent-dir= finds it.
    let bases = dir.join("bases");
    std::fs::create_dir_all(&bases).unwrap();
    for f in ["vm.vmdk", "vm-flat.vmdk"] {
        std::fs::rename(dir.join(f), bases.join(f)).unwrap();
    }
    (top, bases, whole, below)
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().expect("run");
    assert!(o.status.success(), "{cmd:?} failed: {}", stderr(&o));
    o
}

fn mounted(mnt: &Path) -> bool {
    let m = mnt.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == Some(m.as_str()))
}

/// The processes whose command line names `needle`, and all their descendants.
fn processes_for(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            pids.push(pid);
        }
    }
    let mut i = 0;
    while i < pids.len() {
        let p = pids[i];
        for t in std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten() {
            let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for x in c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()) {
                if !pids.contains(&x) {
                    pids.push(x);
                }
            }
        }
        i += 1;
    }
    pids
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// `umount MNT`, then: the mount is gone and so is every process that served it.
fn umount_and_check_gone(mnt: &Path) {
    let pids = processes_for(&mnt.to_string_lossy());
    assert!(!pids.is_empty(), "a daemon serves {}", mnt.display());
    run(Command::new("umount").arg(mnt));
    assert!(!mounted(mnt), "{} still mounted", mnt.display());
    let gone = wait_for(10, || pids.iter().all(|p| !alive(*p)));
    let left: Vec<String> = pids
        .iter()
        .filter(|p| alive(**p))
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default().replace('\0', " "))
        .collect();
    assert!(gone, "processes left after umount {}: {left:?}", mnt.display());
}

fn read_raw(mnt: &Path, name: &str) -> Vec<u8> {
    std::fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("read {}/{name}: {e}", mnt.display()))
}

fn mount_t_mounts_a_local_and_an_ssh_chain_and_umount_ends_them() {
    let _h = Helper::install();
    let t = tmpdir();
    let (top, bases, whole, below) = chain(&t.path().join("local"));
    // Local: overlay= (writable), parent-dir=, allow_other, what mount(8) adds, HOME unset.
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ovl = t.path().join("fix.ovl");
    let opts = format!("rw,overlay={},parent-dir={},allow_other,x-test.note=1,nofail", ovl.display(), bases.display());
    run(Command::new("mount").env_remove("HOME").args(["-t", "vdiskfs", "-o", &opts]).arg(&top).arg(&mnt));
    assert_same("mount -t vdiskfs, local chain", &read_raw(&mnt, "vm-000002.raw"), &whole);
    std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("vm-000002.raw"))
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"written", 4096))
        .expect("overlay= makes the disk writable");
    umount_and_check_gone(&mnt);
    assert!(ovl.metadata().unwrap().len() > 0, "the writes went to the overlay");

    // ssh://, the ssh command a quoted value with spaces and a comma, --exclude-top.
    let sshd = Sshd::start();
    let cache = t.path().join("cache");
    let ssh = format!("{} -o Ciphers=aes128-ctr,aes256-gcm@openssh.com", sshd.ssh_command());
    let opts = format!(
        "ro,exclude-top,ssh-command=\"{ssh}\",cache-dir={},parent-dir={},timeout=10,_netdev",
        cache.display(),
        sshd.url(&bases)
    );
    run(Command::new("mount").env_remove("HOME").args(["-t", "vdiskfs", "-o", &opts]).arg(sshd.url(&top)).arg(&mnt));
    assert_same("mount -t vdiskfs, ssh:// chain, exclude-top", &read_raw(&mnt, "vm-000002.raw"), &below);
    assert!(sshd.served() > 0, "read over ssh");
    umount_and_check_gone(&mnt);

    // An unknown option is an error that names it; nothing is mounted.
    let o =
        Command::new("mount").args(["-t", "vdiskfs", "-o", "ro,exclude-topp"]).arg(&top).arg(&mnt).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown option 'exclude-topp'"), "{}", stderr(&o));
    assert!(!mounted(&mnt));
    let o = Command::new("mount")
        .args(["-t", "vdiskfs", "-o", &format!("ro,overlay={}", ovl.display())])
        .arg(&top)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("ro and overlay= conflict"), "{}", stderr(&o));
}
crate::register!(mount_t_mounts_a_local_and_an_ssh_chain_and_umount_ends_them);

/// fstab's escape for a field: space, tab, newline and backslash as octal.
fn fstab_escape(s: &str) -> String {
    s.replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011")
}

fn fstab_lines_mount_with_mount_a() {
    let _h = Helper::install();
    let t = tmpdir();
    let (top, bases, whole, below) = chain(&t.path().join("local"));
    let sshd = Sshd::start();
    let (m1, m2) = (t.path().join("local disk"), t.path().join("remote disk"));
    std::fs::create_dir(&m1).unwrap();
    std::fs::create_dir(&m2).unwrap();
    let cache = t.path().join("cache");
    let fstab = format!(
        "# vdiskfs test fstab\n\
         {top} {m1} vdiskfs ro,nofail,parent-dir={bases},x-systemd.automount 0 0\n\
         {url} {m2} vdiskfs ro,_netdev,nofail,x-systemd.requires=network-online.target,exclude-top,\
         ssh-command=\"{ssh}\",cache-dir={cache},parent-dir={purl} 0 0\n",
        top = fstab_escape(&top.to_string_lossy()),
        m1 = fstab_escape(&m1.to_string_lossy()),
        bases = fstab_escape(&bases.to_string_lossy()),
        url = sshd.url(&top),
        m2 = fstab_escape(&m2.to_string_lossy()),
        ssh = fstab_escape(&sshd.ssh_command()),
        cache = fstab_escape(&cache.to_string_lossy()),
        purl = sshd.url(&bases),
    );
    let file = t.path().join("fstab");
    std::fs::write(&file, fstab).unwrap();
    run(Command::new("mount").env_remove("HOME").arg("-a").arg("-T").arg(&file));
    assert_same("fstab, local chain", &read_raw(&m1, "vm-000002.raw"), &whole);
    assert_same("fstab, ssh:// chain, exclude-top", &read_raw(&m2, "vm-000002.raw"), &below);
    umount_and_check_gone(&m1);
    umount_and_check_gone(&m2);
}
crate::register!(fstab_lines_mount_with_mount_a);
