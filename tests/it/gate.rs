//! The gate through the command line: whatever an image names (a parent, an extent) is checked
//! for its type without blocking and for where it really leads, before a byte is read. FIFOs,
//! sockets and character devices are refused at once with one line (no hang, nothing armed);
//! symlinks and symlinked directories leading out of the image's directory are refused; block
//! devices are taken where the chain's top is one (and XenServer LVM names leading to
//! `/dev/dm-N`), or with `--allow-devices`. Every command runs under a deadline, so a hang fails
//! the test instead of stalling it.

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::vhd::{Dialect, VhdBuilder};
use testkit::vmdk::write_flat;

use crate::common::*;

const MIB: u64 = 1 << 20;
/// Far more than any refusal takes; a blocked open would take forever.
const DEADLINE: Duration = Duration::from_secs(20);

/// Runs `vdiskfs ARGS`; a run that outlives [`DEADLINE`] is killed and fails the test.
fn run(args: &[&OsStr]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vdiskfs");
    let t = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > DEADLINE {
            let _ = child.kill();
            let o = child.wait_with_output().expect("collect");
            panic!("vdiskfs {args:?} hung for {DEADLINE:?}; stderr: {}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect")
}

/// `info IMG` and `mount --daemon IMG` (each under the deadline) fail with one line naming
/// `file` and holding every needle; no mount is left behind.
fn refused_at_once(extra: &[&str], img: &Path, file: &Path, needles: &[&str]) {
    let mut args: Vec<&OsStr> = vec![os("info")];
    args.extend(extra.iter().map(os));
    args.push(img.as_os_str());
    let t = Instant::now();
    assert_one_line_error(&run(&args), &file.display().to_string(), needles);
    assert!(t.elapsed() < Duration::from_secs(5), "info took {:?}", t.elapsed());
    if !fuse_ok() {
        return;
    }
    let tmp = tmpdir();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut args: Vec<&OsStr> = vec![os("mount"), os("--daemon")];
    args.extend(extra.iter().map(os));
    args.extend([img.as_os_str(), mnt.as_os_str()]);
    let o = run(&args);
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&*mnt.to_string_lossy());
    if mounted {
        let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    }
    assert!(!mounted, "mount succeeded or left a mount behind");
    assert_one_line_error(&o, &file.display().to_string(), needles);
}

/// `info` succeeds and names `parent` as the chain's second layer.
fn opens_with_parent(extra: &[&str], img: &Path, parent: &str) {
    let mut args: Vec<&OsStr> = vec![os("info")];
    args.extend(extra.iter().map(os));
    args.push(img.as_os_str());
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(parent), "the chain should go through {parent}: {out}");
}

/// A base with data and a child naming it `base.vhd` (relative), in `dir`. The base is moved
/// to `elsewhere` when given. Returns (child, base).
fn chain(dir: &Path, elsewhere: Option<&Path>) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    VhdBuilder::dynamic(4 * MIB).dialect(Dialect::Xen).write(0, &pattern(7, 8192)).build(&base).unwrap();
    let child = dir.join("child.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    c.write(4096, &pattern(8, 512));
    c.build(&child).unwrap();
    match elsewhere {
        Some(d) => {
            let moved = d.join("base.vhd");
            std::fs::rename(&base, &moved).unwrap();
            (child, moved)
        }
        None => (child, base),
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path in a test directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
}

crate::register!(a_fifo_named_by_an_image_fails_at_once_in_info_and_mount);
/// `mkfifo parent.vhd` next to a child used to make `info` and `mount` hang forever.
fn a_fifo_named_by_an_image_fails_at_once_in_info_and_mount() {
    let t = tmpdir();
    let (child, base) = chain(t.path(), None);
    std::fs::remove_file(&base).unwrap();
    mkfifo(&base);
    refused_at_once(&[], &child, &base, &["is a FIFO", "refused"]);
    // The top itself, and a VMDK extent.
    refused_at_once(&[], &base, &base, &["is a FIFO"]);
    let (desc, _) = write_flat(t.path(), "vm", &vec![0u8; MIB as usize], "vmfs").unwrap();
    let flat = t.path().join("vm-flat.vmdk");
    std::fs::remove_file(&flat).unwrap();
    mkfifo(&flat);
    refused_at_once(&[], &desc, &flat, &["is a FIFO"]);
}

crate::register!(character_devices_and_sockets_named_by_an_image_are_refused);
/// A parent that is `/dev/null` (a character device: opening `/dev/watchdog` the same way would
/// arm it), through a symlink or by an absolute locator, and a parent that is a socket.
fn character_devices_and_sockets_named_by_an_image_are_refused() {
    let t = tmpdir();
    let (child, base) = chain(t.path(), None);
    std::fs::remove_file(&base).unwrap();
    std::os::unix::fs::symlink("/dev/null", &base).unwrap();
    // The symlink leads out of the directory: refused before its target is looked at ...
    refused_at_once(&[], &child, &base, &["symbolic link to /dev/null", "outside"]);
    // ... and when the user trusts locators, the target's type refuses it.
    refused_at_once(&["--trust-locators"], &child, &base, &["is a character device"]);
    std::fs::remove_file(&base).unwrap();
    // An absolute locator naming the device itself.
    let real = t.path().join("real.vhd");
    VhdBuilder::dynamic(4 * MIB).build(&real).unwrap();
    let dev_child = t.path().join("dev-child.vhd");
    VhdBuilder::differencing(&real)
        .unwrap()
        .locators(vec![("W2ku".into(), "/dev/null".into())])
        .build(&dev_child)
        .unwrap();
    std::fs::remove_file(&real).unwrap(); // only the device is left to try
    refused_at_once(&["--trust-locators"], &dev_child, Path::new("/dev/null"), &["is a character device"]);
    // A socket at the parent's name.
    let _listener = std::os::unix::net::UnixListener::bind(&base).unwrap();
    refused_at_once(&[], &child, &base, &["is a socket"]);
}

crate::register!(symlinks_and_symlinked_directories_out_of_the_image_directory_are_refused);
/// A symlink beside the child, and a directory on the locator's way that is a symlink, both
/// leading to a real parent outside the child's directory; a `--parent-dir` that is itself a
/// symlink is the user's word, and is followed.
fn symlinks_and_symlinked_directories_out_of_the_image_directory_are_refused() {
    let t = tmpdir();
    let (img, other) = (t.path().join("img"), t.path().join("elsewhere"));
    std::fs::create_dir(&img).unwrap();
    std::fs::create_dir(&other).unwrap();
    let (child, base) = chain(&img, Some(&other));
    let link = img.join("base.vhd");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    let target = format!("symbolic link to {}", base.display());
    refused_at_once(&[], &child, &link, &[&target, "outside the image's directory", "--trust-locators"]);
    opens_with_parent(&["--trust-locators"], &child, &link.display().to_string());
    std::fs::remove_file(&link).unwrap();
    // `sub/base.vhd` stays inside the directory by its name only: `sub` leads elsewhere.
    std::os::unix::fs::symlink(&other, img.join("sub")).unwrap();
    let sub_child = img.join("sub-child.vhd");
    VhdBuilder::differencing(&base)
        .unwrap()
        .dialect(Dialect::Xen)
        .locators(vec![("MacX".into(), "file://./sub/base.vhd".into())])
        .build(&sub_child)
        .unwrap();
    refused_at_once(&[], &sub_child, &img.join("sub/base.vhd"), &[&target, "outside"]);
    // A --parent-dir given as a symlink to the parent's directory, and a link inside it.
    let pd = t.path().join("pd-link");
    std::os::unix::fs::symlink(&other, &pd).unwrap();
    std::os::unix::fs::symlink("base.vhd", other.join("alias.vhd")).unwrap();
    opens_with_parent(&["--parent-dir", pd.to_str().unwrap()], &child, &pd.join("base.vhd").display().to_string());
    let alias_child = img.join("alias-child.vhd");
    VhdBuilder::differencing(&base)
        .unwrap()
        .locators(vec![("W2ku".into(), r"C:\VMs\alias.vhd".into())])
        .build(&alias_child)
        .unwrap();
    opens_with_parent(&["--parent-dir", pd.to_str().unwrap()], &alias_child, "alias.vhd");
}

/// A block device node made for a test (`mknod`), removed on drop.
struct Node(PathBuf);

impl Node {
    /// A block node at `path` for the device `rdev`.
    fn block(path: &Path, rdev: u64) -> Node {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mknod of a block node at a path this test owns.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev as libc::dev_t) };
        assert_eq!(r, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
        Node(path.to_path_buf())
    }

    /// A block node `/dev/dm-N` for `rdev`, at the first N from 200 that is free: the name
    /// XenServer's LVM volumes lead to (this kernel has no device-mapper of its own).
    fn device_mapper(rdev: u64) -> Node {
        let free = (200..1000).map(|n| PathBuf::from(format!("/dev/dm-{n}"))).find(|p| !p.exists()).unwrap();
        Node::block(&free, rdev)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn rdev(dev: &str) -> u64 {
    let md = std::fs::metadata(dev).unwrap();
    assert!(md.file_type().is_block_device());
    md.rdev()
}

crate::register!(block_devices_need_a_block_device_top_or_allow_devices);
/// A regular-file top whose parent is a block device is refused unless `--allow-devices`; the
/// same parent is fine under a block-device top (the XenServer LVM layout: `VHD-*` names in a
/// `VG_XenStorage-*` directory that are symlinks to `/dev/dm-N`).
fn block_devices_need_a_block_device_top_or_allow_devices() {
    need("losetup");
    let t = tmpdir();
    let files = t.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let (child, base) = chain(&files, None);
    let mut model = vec![0u8; (4 * MIB) as usize];
    model[..8192].copy_from_slice(&pattern(7, 8192));
    model[4096..4608].copy_from_slice(&pattern(8, 512));
    // The child again, naming its parent as an LVM SR does (the LV name, beside it).
    let lv_child = files.join("lv-child.vhd");
    VhdBuilder::differencing(&base)
        .unwrap()
        .dialect(Dialect::Xen)
        .uuid(testkit::random_uuid())
        .locators(vec![("MacX".into(), "file://./VHD-base".into())])
        .write(4096, &pattern(8, 512))
        .build(&lv_child)
        .unwrap();
    let (lo_base, lo_child) = (Loop::attach(&base, None), Loop::attach(&lv_child, None));

    // A regular-file top, its parent a block node in the same directory.
    let top = t.path().join("top");
    std::fs::create_dir(&top).unwrap();
    std::fs::copy(&child, top.join("child.vhd")).unwrap();
    let _node = Node::block(&top.join("base.vhd"), rdev(&lo_base.0));
    refused_at_once(&[], &top.join("child.vhd"), &top.join("base.vhd"), &["is a block device", "--allow-devices"]);
    opens_with_parent(&["--allow-devices"], &top.join("child.vhd"), "base.vhd");

    // XenServer LVM: /dev/VG_XenStorage-*/VHD-* are symlinks to /dev/dm-N.
    let (dm_base, dm_child) = (Node::device_mapper(rdev(&lo_base.0)), Node::device_mapper(rdev(&lo_child.0)));
    let vg = t.path().join("VG_XenStorage-4e1f");
    std::fs::create_dir(&vg).unwrap();
    std::os::unix::fs::symlink(&dm_base.0, vg.join("VHD-base")).unwrap();
    std::os::unix::fs::symlink(&dm_child.0, vg.join("VHD-child")).unwrap();
    opens_with_parent(&[], &vg.join("VHD-child"), &vg.join("VHD-base").display().to_string());
    if fuse_ok() {
        let m = mount(&[vg.join("VHD-child").as_os_str()]);
        let got = std::fs::read(m.file("VHD-child.raw")).unwrap();
        assert_same("LVM chain through /dev/dm-N", &got[..model.len()], &model);
    }
    // The same dm symlink beside a regular-file top: a device it may not name, unless allowed.
    std::fs::copy(&lv_child, vg.join("file-child.vhd")).unwrap();
    refused_at_once(&[], &vg.join("file-child.vhd"), &vg.join("VHD-base"), &["symbolic link to /dev/dm-"]);
    opens_with_parent(&["--allow-devices"], &vg.join("file-child.vhd"), "VHD-base");
    // A dm-N name that is not a block device is no exception.
    drop(dm_base);
    let fake = PathBuf::from(format!(
        "/dev/dm-{}",
        (200..1000).find(|n| !Path::new(&format!("/dev/dm-{n}")).exists()).unwrap()
    ));
    std::fs::write(&fake, b"not a device").unwrap();
    let fake_node = Node(fake.clone());
    std::fs::remove_file(vg.join("VHD-base")).unwrap();
    std::os::unix::fs::symlink(&fake, vg.join("VHD-base")).unwrap();
    refused_at_once(&[], &vg.join("VHD-child"), &vg.join("VHD-base"), &["symbolic link to /dev/dm-"]);
    drop(fake_node);
}

/// `vdiskfs -v info --cache-dir CACHE IMG`: succeeds; returns stderr.
fn info_with_cache(cache: &Path, img: &Path) -> String {
    let o = run(&[os("-v"), os("info"), os("--cache-dir"), cache.as_os_str(), img.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    stderr(&o)
}

fn index_files(cache: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(cache) else { return Vec::new() };
    rd.map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("xva-index-"))
        .collect()
}

crate::register!(the_xva_index_is_kept_only_in_a_cache_directory_of_ones_own);
/// The XVA index is the one file vdiskfs writes and later trusts: a symlink planted at its name
/// is neither read nor written through, an index file of another user's is not read, and a cache
/// directory that others may write to or that another user owns is not used (a warning says
/// so, and the export still reads, indexed in memory).
fn the_xva_index_is_kept_only_in_a_cache_directory_of_ones_own() {
    use std::os::unix::fs::PermissionsExt;
    let t = tmpdir();
    let img = t.path().join("vm.xva");
    let mut x = testkit::xva::XvaBuilder::xapi("vm");
    x.disk("root", pattern(5, (2 * MIB) as usize), 3, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &x.to_bytes()).unwrap();
    std::fs::write(&img, gz.finish().unwrap()).unwrap();
    let cache = t.path().join("cache");
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    info_with_cache(&cache, &img);
    let [index] = index_files(&cache).try_into().unwrap();
    assert_eq!((mode(&cache), mode(&index)), (0o700, 0o600));
    assert!(info_with_cache(&cache, &img).contains("index read from"), "the index is used");

    // A symlink at the index's name, to a valid index elsewhere: not read, not written through.
    let genuine = t.path().join("genuine-index");
    std::fs::rename(&index, &genuine).unwrap();
    let kept = std::fs::read(&genuine).unwrap();
    std::os::unix::fs::symlink(&genuine, &index).unwrap();
    assert!(!info_with_cache(&cache, &img).contains("index read from"), "a symlink is not followed");
    assert_eq!(std::fs::read(&genuine).unwrap(), kept, "its target is untouched");
    assert!(std::fs::symlink_metadata(&index).unwrap().file_type().is_file(), "replaced by a file of our own");

    // An index file that another user owns (a copy of a good one) is not read.
    std::os::unix::fs::chown(&index, Some(12345), None).unwrap();
    assert!(!info_with_cache(&cache, &img).contains("index read from"), "another user's index is not read");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&index).unwrap()), 0, "rebuilt as ours");

    // A cache directory others may write to, or another user's: not used at all.
    std::fs::remove_file(&index).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = info_with_cache(&cache, &img);
    assert!(e.contains("is writable by every user (mode 777): XVA indexes are not kept there"), "{e}");
    assert!(index_files(&cache).is_empty(), "nothing written there");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&cache, Some(12345), None).unwrap();
    let e = info_with_cache(&cache, &img);
    assert!(e.contains("belongs to uid 12345, not to this user"), "{e}");
    assert!(index_files(&cache).is_empty(), "nothing written there");
    if fuse_ok() {
        let m = mount(&[os("--cache-dir"), cache.as_os_str(), img.as_os_str()]);
        let got = std::fs::read(m.file("root.raw")).unwrap();
        assert_same("XVA indexed in memory", &got[..(2 * MIB) as usize], &pattern(5, (2 * MIB) as usize));
    }
}
