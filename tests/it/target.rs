//! `export` never writes a source: not any file a layer of the chain reads (a VMDK extent as
//! much as the top), not a block device that is a source under another node, and not a loop
//! device whose backing file is a source. Each refusal leaves the source byte for byte as it was.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::vhd::{Dialect, VhdBuilder};
use testkit::vmdk::{DeltaBuilder, write_flat};

use vdiskfs::progress::Silent;
use vdiskfs::source::Location;

use crate::common::*;

const MIB: u64 = 1 << 20;

/// A read-write loop device for `file` (the refusal must come from vdiskfs, not from a
/// read-only device), detached on drop.
fn attach_rw(file: &Path) -> Loop {
    let o = Command::new("losetup").args(["-f", "--show"]).arg(file).output().expect("losetup");
    assert!(o.status.success(), "losetup: {}", stderr(&o));
    Loop(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// A block node at `path` naming the same device as `dev`, removed on drop.
struct Node(PathBuf);

impl Node {
    fn same_as(dev: &str, path: &Path) -> Node {
        let rdev = std::fs::metadata(dev).unwrap().rdev();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mknod of a block node at a path this test owns.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev as libc::dev_t) };
        assert_eq!(r, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
        Node(path.to_path_buf())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `export TOP TARGET` fails with one line naming `target` and holding `needles`, and every
/// file in `kept` is unchanged.
fn refused(top: &Path, target: &Path, needles: &[&str], kept: &[&Path]) {
    let before: Vec<Vec<u8>> = kept.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let o = vdiskfs([os("export"), os("--quiet"), top.as_os_str(), target.as_os_str()]);
    assert_one_line_error(&o, &target.display().to_string(), needles);
    for (p, b) in kept.iter().zip(before) {
        assert!(std::fs::read(p).unwrap() == b, "{} changed", p.display());
    }
}

crate::register!(export_refuses_an_extent_of_the_chain_and_a_loop_device_backed_by_a_source);
/// A VMDK chain (flat base, SESparse snapshot): exporting it into the base's `-flat` extent,
/// the snapshot's extent, or a read-write loop device (or another node of it) backed by the
/// flat extent is refused, and the extent is untouched. Before, only the files' own inodes were
/// compared, so the loop device took the export and overwrote the base.
fn export_refuses_an_extent_of_the_chain_and_a_loop_device_backed_by_a_source() {
    need("losetup");
    let t = tmpdir();
    let (base, _) = write_flat(t.path(), "vm", &pattern(1, (4 * MIB) as usize), "vmfs").unwrap();
    let mut s = DeltaBuilder::sesparse(&base).unwrap();
    s.write(MIB, &pattern(2, 8192));
    let top = s.build(t.path(), "vm-000001").unwrap();
    let flat = t.path().join("vm-flat.vmdk");
    let delta = t.path().join("vm-000001-sesparse.vmdk");
    refused(&top, &flat, &["is the source", "vm-flat.vmdk", "never written"], &[&flat]);
    refused(&top, &delta, &["is the source", "never written"], &[&delta, &flat]);
    refused(&top, &base, &["is the source"], &[&base, &flat]);
    let lo = attach_rw(&flat);
    let needles = ["loop device backed by", "vm-flat.vmdk", "never written"];
    refused(&top, Path::new(&lo.0), &needles, &[&flat]);
    // Another node of the same loop device: recognised by the device it names.
    let node = Node::same_as(&lo.0, &t.path().join("lo-node"));
    refused(&top, &node.0, &needles, &[&flat]);
}

crate::register!(export_refuses_a_block_device_source_under_another_name);
/// The chain's top is a block device (a loop device holding a VHD child); exporting it to a
/// node made elsewhere for the same device is refused (compared by the device number, not the
/// node's inode), and the child is untouched. A loop device of an unrelated file is accepted.
fn export_refuses_a_block_device_source_under_another_name() {
    need("losetup");
    let t = tmpdir();
    let base = t.path().join("base.vhd");
    // 1 MiB of disk in 2 MiB blocks: the child's device is larger than the disk, so only the
    // source check can refuse it (a smaller device would be refused as too small).
    VhdBuilder::dynamic(MIB).dialect(Dialect::Xen).write(0, &pattern(3, (MIB / 2) as usize)).build(&base).unwrap();
    let child = t.path().join("child.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    c.write(3 * MIB / 4, &pattern(4, 4096));
    c.build(&child).unwrap();
    let lo = attach_rw(&child);
    // The device's own top names its parent by file name; it lives in the files' directory.
    let top = Path::new(&lo.0);
    let node = Node::same_as(&lo.0, &t.path().join("child-node"));
    assert!(std::fs::metadata(&child).unwrap().len() > MIB, "the device must be large enough");
    let args = [os("--parent-dir"), t.path().as_os_str()];
    let before = std::fs::read(&child).unwrap();
    let mut a: Vec<&std::ffi::OsStr> = vec![os("export"), os("--quiet")];
    a.extend(args);
    a.extend([top.as_os_str(), node.0.as_os_str()]);
    let o = vdiskfs(&a);
    assert_one_line_error(&o, &node.0.display().to_string(), &["is the source", &lo.0, "never written"]);
    assert!(std::fs::read(&child).unwrap() == before, "the child changed");
    // An unrelated device of the right size takes the export.
    let spare = t.path().join("spare.img");
    std::fs::write(&spare, vec![0xeeu8; (4 * MIB) as usize]).unwrap();
    let lo2 = attach_rw(&spare);
    a.pop();
    a.push(os(&lo2.0));
    let o = vdiskfs(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut model = vec![0u8; MIB as usize];
    model[..(MIB / 2) as usize].copy_from_slice(&pattern(3, (MIB / 2) as usize));
    model[(3 * MIB / 4) as usize..(3 * MIB / 4) as usize + 4096].copy_from_slice(&pattern(4, 4096));
    assert_same("export of the device chain", &std::fs::read(&lo2.0).unwrap()[..model.len()], &model);
}

crate::register!(export_and_sync_refuse_the_left_out_top_the_overlay_and_a_source);
/// The top left out by `--exclude-top` is still a source (it is the running VM's disk), and so
/// are the overlay and every layer for a `sync`: each is refused as the target, one line naming
/// it, and left byte for byte as it was. Before, the left-out top was missing from the sources,
/// and a top larger than the disk took the export.
fn export_and_sync_refuse_the_left_out_top_the_overlay_and_a_source() {
    let t = tmpdir();
    let base = t.path().join("base.vhd");
    // 1 MiB of disk in 2 MiB blocks: the child's file is larger than the disk, so only the
    // source check can refuse it.
    VhdBuilder::dynamic(MIB).dialect(Dialect::Xen).write(0, &pattern(5, (MIB / 2) as usize)).build(&base).unwrap();
    let child = t.path().join("child.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    c.write(MIB / 4, &pattern(6, 4096));
    c.build(&child).unwrap();
    assert!(std::fs::metadata(&child).unwrap().len() > MIB, "the child must be larger than the disk");
    let export = |extra: &[&std::ffi::OsStr], target: &Path| {
        let mut a = vec![os("export"), os("--quiet")];
        a.extend_from_slice(extra);
        a.extend([child.as_os_str(), target.as_os_str()]);
        vdiskfs(&a)
    };
    let kept = |paths: &[&Path]| paths.iter().map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>();
    let before = kept(&[&base, &child]);

    let o = export(&[os("--exclude-top")], &child);
    assert_one_line_error(&o, &child.display().to_string(), &["is the source", "never written"]);
    assert!(kept(&[&base, &child]) == before, "--exclude-top: a source changed");

    // An overlay made for this chain (as a writable mount makes it), then named as the target.
    let ovl = t.path().join("fix.ovl");
    let opts = vdiskfs::open::OpenOptions::default();
    let disk = vdiskfs::open::open_images(&[Location::local(&child)], &opts, &Silent).unwrap().remove(0);
    drop(disk.attach_overlay(&ovl, vdiskfs::overlay::DEFAULT_CLUSTER, true).unwrap());
    let o = export(&[os("--overlay"), ovl.as_os_str()], &ovl);
    assert_one_line_error(&o, &ovl.display().to_string(), &["is the source", "never written"]);
    let ovl_before = std::fs::read(&ovl).unwrap();

    // A sync into a layer: its state is real (an export made it), so only the target is wrong.
    let state = t.path().join("out.state");
    let out = t.path().join("out.raw");
    let o = export(&[os("--state"), state.as_os_str()], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    for target in [&base, &child] {
        let a = [os("sync"), os("--quiet"), os("--state"), state.as_os_str(), child.as_os_str(), target.as_os_str()];
        let o = vdiskfs(a);
        assert_one_line_error(&o, &target.display().to_string(), &["is the source", "never written"]);
    }
    assert!(kept(&[&base, &child]) == before, "sync: a source changed");
    assert!(std::fs::read(&ovl).unwrap() == ovl_before, "the overlay changed");
    // The export that was allowed holds the disk (checked against the model of the two writes).
    let mut model = vec![0u8; MIB as usize];
    model[..(MIB / 2) as usize].copy_from_slice(&pattern(5, (MIB / 2) as usize));
    model[(MIB / 4) as usize..(MIB / 4) as usize + 4096].copy_from_slice(&pattern(6, 4096));
    assert_same("the export beside them", &std::fs::read(&out).unwrap(), &model);
}
