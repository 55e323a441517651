//! The VHD family through the whole stack, checked against a model and independent readers.

use std::path::{Path, PathBuf};

use testkit::vhd::{Dialect, VhdBuilder};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// Tiny deterministic generator for write positions.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A chain of `depth` layers (1 = a lone dynamic disk) with random writes in units of `unit`
/// bytes. Returns the paths top first and the model of the merged disk.
fn build_chain(dir: &Path, dialect: Dialect, depth: usize, size: u64, unit: u64, seed: u64) -> (Vec<PathBuf>, Vec<u8>) {
    let mut model = vec![0u8; size as usize];
    let mut rng = Lcg(seed);
    let mut paths: Vec<PathBuf> = Vec::new();
    for k in 0..depth {
        let path = dir.join(format!("layer{k}.vhd"));
        let mut b = if k == 0 {
            VhdBuilder::dynamic(size).dialect(dialect)
        } else {
            VhdBuilder::differencing(paths.last().unwrap()).unwrap().dialect(dialect)
        };
        if dialect == Dialect::Xen && k + 1 < depth {
            b = b.hidden(false);
        }
        for w in 0..12 {
            let units = size / unit;
            let len = (1 + rng.next(if w % 3 == 0 { 600 } else { 24 })).min(units) * unit;
            let off = rng.next(units - len / unit + 1) * unit;
            let data = pattern(seed * 1000 + k as u64 * 50 + w, len as usize);
            b.write(off, &data);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        b.build(&path).unwrap();
        paths.push(path);
    }
    paths.reverse();
    (paths, model)
}

fn read_mounted(img: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args: Vec<&std::ffi::OsStr> = extra.iter().map(os).collect();
    args.push(img.as_os_str());
    let m = mount(&args);
    let name = format!("{}.raw", img.file_stem().unwrap().to_string_lossy());
    std::fs::read(m.file(&name)).unwrap()
}

crate::register!(fixed_and_dynamic_vhd_match_qemu_and_the_model);
fn fixed_and_dynamic_vhd_match_qemu_and_the_model() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    // A size that is not a whole CHS geometry, so a CHS-sizing reader would be caught.
    let size = 9 * MIB + 3 * 512;
    for dialect in [Dialect::Windows, Dialect::Xen] {
        let mut model = vec![0u8; size as usize];
        let mut dynamic = VhdBuilder::dynamic(size).dialect(dialect);
        let mut fixed = VhdBuilder::fixed(size).dialect(dialect);
        for (i, (off, len)) in [(0, 4096), (MIB + 512, 3 * MIB), (9 * MIB, 3 * 512)].into_iter().enumerate() {
            let d = pattern(i as u64 + 7, len as usize);
            dynamic.write(off, &d);
            fixed.write(off, &d);
            model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        for (name, b) in [("dyn.vhd", &dynamic), ("fix.vhd", &fixed)] {
            let p = t.path().join(name);
            b.build(&p).unwrap();
            let got = read_mounted(&p, &[]);
            assert_eq!(got.len() as u64, size, "virtual size is current_size, not CHS");
            assert_same(&format!("{dialect:?} {name} vs model"), &got, &model);
            assert_same(&format!("{dialect:?} {name} vs qemu-img"), &got, &qemu_raw(&p, "vpc"));
        }
    }
}

crate::register!(qemu_made_vhds_match_qemu);
fn qemu_made_vhds_match_qemu() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let raw = t.path().join("src.raw");
    let mut data = vec![0u8; (12 * MIB) as usize];
    data[(3 * MIB) as usize..(5 * MIB) as usize].copy_from_slice(&pattern(5, (2 * MIB) as usize));
    data[100..612].copy_from_slice(&pattern(6, 512));
    std::fs::write(&raw, &data).unwrap();
    for sub in ["dynamic", "fixed"] {
        let p = t.path().join(format!("q-{sub}.vhd"));
        sh(&format!(
            "qemu-img convert -f raw -O vpc -o subformat={sub},force_size=on {} {}",
            raw.display(),
            p.display()
        ));
        let got = read_mounted(&p, &[]);
        assert_same(&format!("qemu {sub}"), &got, &qemu_raw(&p, "vpc"));
        assert_same(&format!("qemu {sub} vs source"), &got, &data);
    }
}

crate::register!(differencing_chains_match_model_and_libvhdi);
/// Chains of depth 1, 3 and 16 in both dialects, written in whole bitmap bytes so that libvhdi
/// reads them correctly too: the mount must equal the model and vhdimount's merged view.
fn differencing_chains_match_model_and_libvhdi() {
    need_fuse();
    need("vhdimount");
    for dialect in [Dialect::Windows, Dialect::Xen] {
        for depth in [1, 3, 16] {
            let t = tmpdir();
            let (paths, model) = build_chain(t.path(), dialect, depth, 24 * MIB + 4096, 4096, depth as u64 + 31);
            let got = read_mounted(&paths[0], &[]);
            let what = format!("{dialect:?} depth {depth}");
            assert_same(&format!("{what} vs model"), &got, &model);
            assert_same(&format!("{what} vs libvhdi"), &got, &vhdimount_top(&paths[0]));
        }
    }
}

crate::register!(sector_granular_bitmaps_follow_the_spec);
/// Sector-granular writes: a bitmap byte mixes child and parent sectors. libvhdi misreads these
/// (every sector after the first set bit of a byte comes from the child) and qemu ignores the
/// parent entirely, so the spec model is the only oracle here.
fn sector_granular_bitmaps_follow_the_spec() {
    need_fuse();
    let t = tmpdir();
    let (paths, model) = build_chain(t.path(), Dialect::Xen, 4, 8 * MIB, 512, 99);
    let got = read_mounted(&paths[0], &[]);
    assert_same("sector-granular chain vs model", &got, &model);
    // The case is real: libvhdi, which is right on whole-byte chains, differs from the spec here.
    if have("vhdimount") {
        assert_ne!(vhdimount_top(&paths[0]), model, "expected libvhdi's mixed-bitmap-byte defect to show");
    }
}

crate::register!(real_consumers_read_the_mounted_chain);
fn real_consumers_read_the_mounted_chain() {
    need_fuse();
    need("qemu-img");
    need("losetup");
    need("kpartx");
    let Some(fs) = fs_pair(40 * MIB) else { return };
    let t = tmpdir();
    let base = t.path().join("base.vhd");
    let mut b = VhdBuilder::dynamic(fs.base.len() as u64).dialect(Dialect::Xen);
    b.write_diff(&vec![0u8; fs.base.len()], &fs.base, 4096);
    b.build(&base).unwrap();
    let child = t.path().join("child.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    c.write_diff(&fs.base, &fs.child, 512);
    c.build(&child).unwrap();
    let m = mount(&[child.as_os_str()]);
    let raw = m.file("child.raw");

    // kpartx parses the partition table through a loop device.
    let lo = Loop::attach(&raw, None);
    let listing = sh(&format!("kpartx -l {}", lo.0));
    let start_sectors = (fs.part.0 / 512).to_string();
    let size_sectors = (fs.part.1 / 512).to_string();
    let fields: Vec<&str> = listing.lines().next().unwrap_or_default().split_whitespace().collect();
    assert!(
        fields.contains(&size_sectors.as_str()) && fields.contains(&start_sectors.as_str()),
        "kpartx -l: {listing}"
    );
    drop(lo);

    assert_real_consumers(&raw, &fs);
}

crate::register!(seek_data_and_hole_follow_the_chain_allocation);
fn seek_data_and_hole_follow_the_chain_allocation() {
    need_fuse();
    let t = tmpdir();
    let base = t.path().join("base.vhd");
    let mut b = VhdBuilder::dynamic(16 * MIB);
    b.write(2 * MIB, &pattern(1, MIB as usize));
    b.build(&base).unwrap();
    let child = t.path().join("child.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap();
    c.write(8 * MIB, &pattern(2, 4096));
    c.build(&child).unwrap();
    let m = mount(&[child.as_os_str()]);
    let f = std::fs::File::open(m.file("child.raw")).unwrap();
    use std::os::fd::AsRawFd;
    let seek = |off: i64, whence| unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    assert_eq!(seek(0, libc::SEEK_DATA), (2 * MIB) as i64);
    assert_eq!(seek((2 * MIB) as i64, libc::SEEK_HOLE), (3 * MIB) as i64);
    assert_eq!(seek((3 * MIB) as i64, libc::SEEK_DATA), (8 * MIB) as i64);
    assert_eq!(seek((8 * MIB) as i64, libc::SEEK_HOLE), (8 * MIB + 4096) as i64);
    assert_eq!(seek((9 * MIB) as i64, libc::SEEK_DATA), -1, "no data after the last extent: ENXIO");
    assert_eq!(seek((9 * MIB) as i64, libc::SEEK_HOLE), (9 * MIB) as i64);
}

crate::register!(footer_copy_at_offset_zero_is_used_when_the_file_is_longer);
fn footer_copy_at_offset_zero_is_used_when_the_file_is_longer() {
    need_fuse();
    let t = tmpdir();
    let p = t.path().join("on-lv.vhd");
    let mut b = VhdBuilder::dynamic(6 * MIB).dialect(Dialect::Xen).trailing(3 * MIB + 512);
    let d = pattern(3, (2 * MIB) as usize);
    b.write(MIB, &d);
    b.build(&p).unwrap();
    let got = read_mounted(&p, &[]);
    assert_eq!(got.len() as u64, 6 * MIB);
    assert_eq!(&got[MIB as usize..3 * MIB as usize], &d[..]);
    assert!(got[..MIB as usize].iter().all(|&x| x == 0));
}

crate::register!(block_device_sources_and_parent_dir_links);
/// A XenServer LVM SR: the VHDs are block devices (size from the device), and parents are found
/// by name in a directory of device links given with --parent-dir.
fn block_device_sources_and_parent_dir_links() {
    need_fuse();
    need("losetup");
    let t = tmpdir();
    let (paths, model) = build_chain(t.path(), Dialect::Xen, 2, 6 * MIB, 4096, 5);
    // Pad both files so the device is bigger than the VHD, as an LV is.
    for p in &paths {
        let f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.set_len(f.metadata().unwrap().len() + 4 * MIB).unwrap();
    }
    let top = Loop::attach(&paths[0], None);
    let base = Loop::attach(&paths[1], None);
    let links = t.path().join("vg");
    std::fs::create_dir(&links).unwrap();
    std::os::unix::fs::symlink(&base.0, links.join(paths[1].file_name().unwrap())).unwrap();
    let m = mount(&[os("--parent-dir"), links.as_os_str(), os(&top.0)]);
    let name = format!("{}.raw", Path::new(&top.0).file_name().unwrap().to_string_lossy());
    assert_same("chain on block devices", &std::fs::read(m.file(&name)).unwrap(), &model);
    drop(m);
}

crate::register!(windows_absolute_locators_resolve_through_parent_dir);
fn windows_absolute_locators_resolve_through_parent_dir() {
    need_fuse();
    let t = tmpdir();
    let pd = t.path().join("Virtual Hard Disks");
    std::fs::create_dir(&pd).unwrap();
    let base = pd.join("base.vhd");
    let mut b = VhdBuilder::dynamic(4 * MIB);
    b.write(0, &pattern(1, 8192));
    b.build(&base).unwrap();
    let snaps = t.path().join("Snapshots");
    std::fs::create_dir(&snaps).unwrap();
    let child = snaps.join("child.vhd");
    let mut c = VhdBuilder::differencing(&base)
        .unwrap()
        .locators(vec![("W2ku".into(), r"D:\VMs\Virtual Hard Disks\base.vhd".into())]);
    c.write(4096, &pattern(2, 512));
    c.build(&child).unwrap();
    // Not found without --parent-dir, with a message saying what was tried.
    let o = vdiskfs([os("info"), child.as_os_str()]);
    assert_one_line_error(&o, &child.display().to_string(), &["parent not found", "base.vhd", "--parent-dir"]);
    let mut model = vec![0u8; (4 * MIB) as usize];
    model[..8192].copy_from_slice(&pattern(1, 8192));
    model[4096..4608].copy_from_slice(&pattern(2, 512));
    assert_same("parent via --parent-dir", &read_mounted(&child, &["--parent-dir", pd.to_str().unwrap()]), &model);
}

crate::register!(locators_pointing_outside_are_refused_unless_trusted);
fn locators_pointing_outside_are_refused_unless_trusted() {
    need_fuse();
    let t = tmpdir();
    let elsewhere = tmpdir();
    let base = elsewhere.path().join("secret-base.vhd");
    let mut b = VhdBuilder::dynamic(4 * MIB);
    b.write(0, &pattern(9, 4096));
    b.build(&base).unwrap();
    let child = t.path().join("child.vhd");
    let rel = format!("../{}/secret-base.vhd", elsewhere.path().file_name().unwrap().to_string_lossy());
    let c = VhdBuilder::differencing(&base)
        .unwrap()
        .dialect(Dialect::Xen)
        .locators(vec![("MacX".into(), format!("file://{rel}")), ("W2ku".into(), base.display().to_string())]);
    c.build(&child).unwrap();
    let o = vdiskfs([os("info"), child.as_os_str()]);
    assert_one_line_error(
        &o,
        &child.display().to_string(),
        &["parent not found", "refused to follow", "--trust-locators"],
    );
    let got = read_mounted(&child, &["--trust-locators"]);
    assert_eq!(&got[..4096], &pattern(9, 4096)[..]);
}

crate::register!(blktap_hidden_flag_outside_the_checksum_is_accepted);
fn blktap_hidden_flag_outside_the_checksum_is_accepted() {
    need_fuse();
    let t = tmpdir();
    let base = t.path().join("base.vhd");
    let mut b = VhdBuilder::dynamic(4 * MIB).dialect(Dialect::Xen).hidden(true);
    b.write(0, &pattern(4, 4096));
    b.build(&base).unwrap();
    let child = t.path().join("child.vhd");
    VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen).build(&child).unwrap();
    assert_eq!(&read_mounted(&child, &[])[..4096], &pattern(4, 4096)[..]);
}

crate::register!(several_images_mount_side_by_side);
fn several_images_mount_side_by_side() {
    need_fuse();
    let t = tmpdir();
    let a = t.path().join("a.vhd");
    let mut ba = VhdBuilder::dynamic(2 * MIB);
    ba.write(0, &pattern(1, 4096));
    ba.build(&a).unwrap();
    let sub = t.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let b = sub.join("b.vhd");
    VhdBuilder::fixed(3 * MIB).build(&b).unwrap();
    let m = mount(&[a.as_os_str(), b.as_os_str()]);
    let mut names: Vec<String> =
        std::fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["a.raw", "b.raw"]);
    assert_eq!(std::fs::metadata(m.file("b.raw")).unwrap().len(), 3 * MIB);
    assert_eq!(&std::fs::read(m.file("a.raw")).unwrap()[..4096], &pattern(1, 4096)[..]);
    // Read-only: opening for write is refused with EROFS.
    let e = std::fs::OpenOptions::new().write(true).open(m.file("a.raw")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
}
