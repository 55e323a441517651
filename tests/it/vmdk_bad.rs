//! Bad VMDKs: each is refused at open with one line naming the file and the defect and leaves no
//! mount behind; defects found only while reading (compressed grains, grain tables of disks too
//! large to check at open) give EIO and a log line, never bytes.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use testkit::vmdk::{DeltaBuilder, DescriptorText, ExtentSpec, write_flat};

use crate::common::*;
use crate::vmdk::qemu_io;

const MIB: u64 = 1 << 20;

fn flat_descriptor(dir: &Path, name: &str, create_type: &str, extents: Vec<ExtentSpec>) -> PathBuf {
    let d = DescriptorText { cid: 0x1111_2222, parent: None, create_type: create_type.into(), extents, ddb: vec![] };
    let p = dir.join(name);
    d.write(&p).unwrap();
    p
}

fn u32_at(p: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
    u32::from_le_bytes(b)
}

fn put(p: &Path, off: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new().write(true).open(p).unwrap().write_all_at(bytes, off).unwrap();
}

/// A qemu-made monolithicSparse disk (64 KiB grains) with data in grains 0, 1 and 40.
fn qemu_sparse(dir: &Path, name: &str) -> Option<PathBuf> {
    need("qemu-img");
    let raw = dir.join(format!("{name}.raw"));
    let mut d = vec![0u8; (4 * MIB) as usize];
    d[..128 << 10].copy_from_slice(&pattern(1, 128 << 10));
    d[(40 << 16)..(41 << 16)].copy_from_slice(&pattern(2, 1 << 16));
    std::fs::write(&raw, d).unwrap();
    let p = dir.join(name);
    sh(&format!("qemu-img convert -f raw -O vmdk {} {}", raw.display(), p.display()));
    Some(p)
}

/// Byte offset of grain table entry `g` of a hosted sparse file (through GD entry 0).
fn gte_offset(p: &Path, g: u64) -> u64 {
    let gd = u32_at(p, 56) as u64 * 512;
    u32_at(p, gd) as u64 * 512 + g * 4
}

crate::register!(extent_paths_outside_the_allowed_directories_are_refused_though_qemu_follows_them);
fn extent_paths_outside_the_allowed_directories_are_refused_though_qemu_follows_them() {
    let t = tmpdir();
    for path in ["/etc/shadow", "../../../../../../etc/shadow"] {
        let p = flat_descriptor(
            t.path(),
            "evil.vmdk",
            "monolithicFlat",
            vec![{
                let mut e = ExtentSpec::new(1, "FLAT", Some(path));
                e.offset = Some(0);
                e
            }],
        );
        if have("qemu-img") && path.starts_with('/') {
            // qemu opens it: the descriptor would expose /etc/shadow.
            assert!(std::process::Command::new("qemu-img").arg("info").arg(&p).output().unwrap().status.success());
        }
        refused(&p, &p, &["extent 0", path, "refused to follow", "--trust-locators"]);
    }
    // An out-of-tree extent the operator vouches for opens with --trust-locators.
    let other = tmpdir();
    let data = pattern(4, 8192);
    std::fs::write(other.path().join("disk-flat.img"), &data).unwrap();
    let abs = other.path().join("disk-flat.img").display().to_string();
    let mut e = ExtentSpec::new(16, "FLAT", Some(&abs));
    e.offset = Some(0);
    let p = flat_descriptor(t.path(), "trusted.vmdk", "monolithicFlat", vec![e]);
    refused(&p, &p, &["refused to follow"]);
    if fuse_ok() {
        assert_eq!(crate::vmdk::read_mounted(&p, &["--trust-locators"]), data);
    }
}

crate::register!(a_missing_extent_is_refused_naming_it);
fn a_missing_extent_is_refused_naming_it() {
    let t = tmpdir();
    let (p, _) = write_flat(t.path(), "vm", &pattern(1, 8192), "vmfs").unwrap();
    std::fs::remove_file(t.path().join("vm-flat.vmdk")).unwrap();
    refused(&p, &p, &["extent 0 file 'vm-flat.vmdk' not found", "vm-flat.vmdk"]);
}

crate::register!(a_flat_extent_shorter_than_its_line_is_refused);
fn a_flat_extent_shorter_than_its_line_is_refused() {
    let t = tmpdir();
    let (p, _) = write_flat(t.path(), "vm", &pattern(1, (2 * MIB) as usize), "vmfs").unwrap();
    let flat = t.path().join("vm-flat.vmdk");
    std::fs::OpenOptions::new().write(true).open(&flat).unwrap().set_len(MIB).unwrap();
    refused(&p, &flat, &["flat extent holds 1048576 bytes", "vm.vmdk declares 4096 sectors"]);
}

crate::register!(a_truncated_sparse_extent_is_refused);
fn a_truncated_sparse_extent_is_refused() {
    let t = tmpdir();
    let Some(p) = qemu_sparse(t.path(), "cut.vmdk") else { return };
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 4096).unwrap();
    refused(&p, &p, &["grain table 0 entry 40", "past the end of the file"]);
}

crate::register!(grain_directory_and_table_entries_past_the_end_are_refused);
fn grain_directory_and_table_entries_past_the_end_are_refused() {
    let t = tmpdir();
    let Some(p) = qemu_sparse(t.path(), "gd.vmdk") else { return };
    let gd = u32_at(&p, 56) as u64 * 512;
    put(&p, gd, &0x0fff_0000u32.to_le_bytes());
    refused(&p, &p, &["grain directory entry 0", "past the end of the file"]);
    let Some(p) = qemu_sparse(t.path(), "gt.vmdk") else { return };
    put(&p, gte_offset(&p, 1), &0x00ff_ffffu32.to_le_bytes());
    refused(&p, &p, &["grain table 0 entry 1", "past the end of the file"]);
}

crate::register!(impossible_grain_sizes_are_refused);
fn impossible_grain_sizes_are_refused() {
    let t = tmpdir();
    for grain in [0u64, 24, 4096] {
        let Some(p) = qemu_sparse(t.path(), &format!("g{grain}.vmdk")) else { return };
        put(&p, 20, &grain.to_le_bytes());
        refused(&p, &p, &[&format!("grain size {grain} sectors is impossible")]);
    }
    // The same check guards COWD.
    let (base, _) = write_flat(t.path(), "b", &pattern(1, (4 * MIB) as usize), "vmfs").unwrap();
    let snap = DeltaBuilder::cowd(&base).unwrap().build(t.path(), "b-000001").unwrap();
    let delta = t.path().join("b-000001-delta.vmdk");
    put(&delta, 16, &3u32.to_le_bytes());
    refused(&snap, &delta, &["grain size 3 sectors is impossible"]);
}

fn sesparse_snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let (base, _) = write_flat(dir, "vm", &pattern(1, (8 * MIB) as usize), "vmfs").unwrap();
    let mut b = DeltaBuilder::sesparse(&base).unwrap();
    b.write(MIB, &pattern(2, 8192));
    (b.build(dir, "vm-000001").unwrap(), dir.join("vm-000001-sesparse.vmdk"))
}

crate::register!(unsupported_sesparse_versions_and_dirty_journals_are_refused);
fn unsupported_sesparse_versions_and_dirty_journals_are_refused() {
    let t = tmpdir();
    let (snap, ext) = sesparse_snapshot(t.path());
    put(&ext, 8, &0x0000_0003_0000_0000u64.to_le_bytes());
    refused(&snap, &ext, &["SESparse version 3.0", "not supported"]);
    let (snap, ext) = sesparse_snapshot(t.path());
    put(&ext, 8 * 512 + 24, &1u64.to_le_bytes());
    refused(&snap, &ext, &["SESparse journal needs replaying"]);
    // A grain table entry of an unknown type.
    let (snap, ext) = sesparse_snapshot(t.path());
    let mut b = [0u8; 8];
    std::fs::File::open(&ext).unwrap().read_exact_at(&mut b, 18 * 8).unwrap();
    let gt = u64::from_le_bytes(b) * 512;
    put(&ext, gt + 256 * 8, &0x5000_0000_0000_0001u64.to_le_bytes());
    refused(&snap, &ext, &["grain table 0 entry 256 has an unknown type"]);
}

crate::register!(raw_device_maps_unknown_create_types_and_noaccess_extents_are_refused);
fn raw_device_maps_unknown_create_types_and_noaccess_extents_are_refused() {
    let t = tmpdir();
    std::fs::write(t.path().join("x-flat.vmdk"), vec![0u8; 4096]).unwrap();
    let flat = || ExtentSpec::new(8, "VMFS", Some("x-flat.vmdk"));
    let p = flat_descriptor(t.path(), "rdm.vmdk", "vmfsRawDeviceMap", vec![flat()]);
    refused(&p, &p, &["createType \"vmfsRawDeviceMap\"", "raw device mapping"]);
    let p = flat_descriptor(t.path(), "rdm2.vmdk", "vmfs", vec![ExtentSpec::new(8, "VMFSRDM", Some("x-rdmp.vmdk"))]);
    refused(&p, &p, &["VMFSRDM", "raw device mapping"]);
    let p = flat_descriptor(t.path(), "odd.vmdk", "monolithicSparkly", vec![flat()]);
    refused(&p, &p, &["unknown createType \"monolithicSparkly\""]);
    let mut e = flat();
    e.access = "NOACCESS".into();
    let p = flat_descriptor(t.path(), "noaccess.vmdk", "vmfs", vec![e]);
    refused(&p, &p, &["NOACCESS"]);
    let p = t.path().join("badline.vmdk");
    std::fs::write(
        &p,
        "# Disk DescriptorFile\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 8 VMFS x-flat.vmdk\n",
    )
    .unwrap();
    refused(&p, &p, &["bad extent line", "double quotes"]);
}

crate::register!(bare_snapshot_extents_point_at_their_descriptor);
fn bare_snapshot_extents_point_at_their_descriptor() {
    let t = tmpdir();
    let (_, ext) = sesparse_snapshot(t.path());
    refused(&ext, &ext, &["SESparse extent", "open the descriptor", "vm-000001.vmdk here"]);
    let (base, _) = write_flat(t.path(), "c", &pattern(1, MIB as usize), "vmfs").unwrap();
    DeltaBuilder::cowd(&base).unwrap().build(t.path(), "c-000001").unwrap();
    let delta = t.path().join("c-000001-delta.vmdk");
    refused(&delta, &delta, &["COWD", "c-000001.vmdk here"]);
    if have("qemu-img") {
        let p = t.path().join("split.vmdk");
        sh(&format!("qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse {} 4M", p.display()));
        let piece = t.path().join("split-s001.vmdk");
        refused(&piece, &piece, &["one piece of a split disk", "split.vmdk here"]);
    }
}

crate::register!(a_parent_cid_mismatch_is_refused_showing_both_cids);
fn a_parent_cid_mismatch_is_refused_showing_both_cids() {
    let t = tmpdir();
    let (base, base_cid) = write_flat(t.path(), "vm", &pattern(1, MIB as usize), "vmfs").unwrap();
    let snap = DeltaBuilder::sesparse(&base).unwrap().parent_link(0x0bad_cafe, "vm.vmdk").build(t.path(), "s").unwrap();
    refused(&snap, &snap, &[&format!("has identity {base_cid:08x}"), "expects 0badcafe", "--ignore-parent-id"]);
}

crate::register!(a_missing_parent_is_refused_naming_it);
fn a_missing_parent_is_refused_naming_it() {
    let t = tmpdir();
    let (snap, _) = sesparse_snapshot(t.path());
    std::fs::remove_file(t.path().join("vm.vmdk")).unwrap();
    refused(&snap, &snap, &["parent not found", "parentFileNameHint 'vm.vmdk'"]);
}

crate::register!(a_parent_cycle_is_refused);
/// qemu never finishes opening such a pair; vdiskfs notices the loop.
fn a_parent_cycle_is_refused() {
    let t = tmpdir();
    let (base, _) = write_flat(t.path(), "vm", &pattern(1, MIB as usize), "vmfs").unwrap();
    let a = DeltaBuilder::sesparse(&base).unwrap();
    let b = DeltaBuilder::sesparse(&base).unwrap();
    let (ca, cb) = (a.cid(), b.cid());
    a.parent_link(cb, "b.vmdk").build(t.path(), "a").unwrap();
    let bp = b.parent_link(ca, "a.vmdk").build(t.path(), "b").unwrap();
    let o = vdiskfs([os("info"), bp.as_os_str()]);
    assert_one_line_error(&o, &t.path().join("a.vmdk").display().to_string(), &["parent cycle", "b.vmdk"]);
}

crate::register!(bad_compressed_grains_give_eio_and_a_log_line);
/// A stream-optimized grain that fails to inflate, or inflates to the wrong size, is EIO for
/// that grain with a log line naming the file; the rest of the disk reads.
fn bad_compressed_grains_give_eio_and_a_log_line() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let raw = t.path().join("s.raw");
    let mut d = vec![0u8; (2 * MIB) as usize];
    d[..3 << 16].copy_from_slice(&pattern(3, 3 << 16));
    std::fs::write(&raw, &d).unwrap();
    let p = t.path().join("stream.vmdk");
    sh(&format!("qemu-img convert -f raw -O vmdk -o subformat=streamOptimized {} {}", raw.display(), p.display()));
    // Grain 0: break the zlib header. Grain 1: a valid stream of 4 KiB instead of 64 KiB.
    let g0 = u32_at(&p, gte_offset(&p, 0)) as u64 * 512;
    put(&p, g0 + 12, &[0u8, 0u8]);
    let g1 = u32_at(&p, gte_offset(&p, 1)) as u64 * 512;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, &pattern(9, 4096)).unwrap();
    let short = z.finish().unwrap();
    put(&p, g1 + 8, &(short.len() as u32).to_le_bytes());
    put(&p, g1 + 12, &short);
    let m = mount(&[p.as_os_str()]);
    let f = std::fs::File::open(m.file("stream.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    for (off, why) in [(0u64, "inflate failed"), (1 << 16, "inflates to 4096 bytes instead of 65536")] {
        let e = f.read_at(&mut buf, off).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "grain at {off}");
        assert!(wait_for(5, || m.log_text().contains(why)), "log: {}", m.log_text());
    }
    assert!(m.log_text().contains("stream.vmdk"), "log names the file: {}", m.log_text());
    f.read_exact_at(&mut buf, 2 << 16).unwrap();
    assert_eq!(&buf[..], &pattern(3, 3 << 16)[2 << 16..(2 << 16) + 4096]);
}

crate::register!(a_bad_grain_table_of_a_large_disk_gives_eio_at_read_time);
/// Grain tables of a large disk are checked when first loaded: a bad entry there is EIO at read
/// time with a log line, and the mount itself is not delayed by reading every table.
fn a_bad_grain_table_of_a_large_disk_gives_eio_at_read_time() {
    need_fuse();
    need("qemu-img");
    need("qemu-io");
    let t = tmpdir();
    let p = t.path().join("large.vmdk");
    sh(&format!("qemu-img create -q -f vmdk {} 600G", p.display()));
    qemu_io(&p, "write -P 0x42 0 128k");
    qemu_io(&p, "write -P 0x43 500G 64k");
    put(&p, gte_offset(&p, 1), &0x7fff_ffffu32.to_le_bytes());
    let m = mount(&[p.as_os_str()]);
    let f = std::fs::File::open(m.file("large.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = f.read_at(&mut buf, 1 << 16).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(wait_for(5, || m.log_text().contains("grain table 0 entry 1")), "log: {}", m.log_text());
    assert!(m.log_text().contains("large.vmdk"), "{}", m.log_text());
    f.read_exact_at(&mut buf, 500 << 30).unwrap();
    assert!(buf.iter().all(|&b| b == 0x43));
}

crate::register!(an_extent_found_by_name_elsewhere_is_shown_warned_and_checked);
/// A snapshot's extents moved out of its directory and found by file name in a `--parent-dir`:
/// `info` says so for each, the open logs a warning naming it, and a sparse extent whose header
/// capacity is not exactly its line's (another disk's file of that name) is refused. A flat
/// extent has no header: only its size is checked, and the warning says so.
fn an_extent_found_by_name_elsewhere_is_shown_warned_and_checked() {
    let t = tmpdir();
    let (dir, pd) = (t.path().join("vm"), t.path().join("moved"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(&pd).unwrap();
    let (base, _) = write_flat(&dir, "vm", &pattern(1, (4 * MIB) as usize), "vmfs").unwrap();
    let mut s = DeltaBuilder::sesparse(&base).unwrap();
    s.write(MIB, &pattern(2, 8192));
    let top = s.build(&dir, "vm-000001").unwrap();
    for f in ["vm-flat.vmdk", "vm-000001-sesparse.vmdk"] {
        std::fs::rename(dir.join(f), pd.join(f)).unwrap();
    }
    let info = |img: &Path| vdiskfs([os("info"), os("--parent-dir"), pd.as_os_str(), img.as_os_str()]);
    let o = info(&top);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for f in ["vm-flat.vmdk", "vm-000001-sesparse.vmdk"] {
        let shown =
            format!("{} (found by file name in a --parent-dir, not where the image names it)", pd.join(f).display());
        assert!(out.contains(&shown), "info should say {shown}: {out}");
        let warned = format!(
            "extent 0 '{f}' found by file name in a --parent-dir, not where the image names it: {}",
            pd.join(f).display()
        );
        assert!(stderr(&o).contains(&warned), "open should warn {warned}: {}", stderr(&o));
    }
    assert!(stderr(&o).contains("it holds 4194304 bytes; only its size ties it"), "{}", stderr(&o));
    if fuse_ok() {
        let m = mount(&[os("--parent-dir"), pd.as_os_str(), top.as_os_str()]);
        let got = std::fs::read(m.file("vm-000001.raw")).unwrap();
        assert_eq!(&got[MIB as usize..MIB as usize + 8192], &pattern(2, 8192)[..]);
    }
    // Another disk's SESparse extent of that name, larger than this line: its capacity differs.
    let other = t.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (obase, _) = write_flat(&other, "vm", &pattern(3, (8 * MIB) as usize), "vmfs").unwrap();
    DeltaBuilder::sesparse(&obase).unwrap().build(&other, "vm-000001").unwrap();
    std::fs::rename(other.join("vm-000001-sesparse.vmdk"), pd.join("vm-000001-sesparse.vmdk")).unwrap();
    let ext = pd.join("vm-000001-sesparse.vmdk");
    let o = info(&top);
    let e = stderr(&o);
    let line = e.lines().find(|l| l.starts_with("vdiskfs: ")).unwrap_or_default();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(line.starts_with(&format!("vdiskfs: {}: found by file name in a --parent-dir", ext.display())), "{e}");
    assert!(
        line.contains("header says 16384 sectors where vm-000001.vmdk declares 8192: not this disk's extent"),
        "{e}"
    );
}
