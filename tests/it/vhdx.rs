//! VHDX and AVHDX chains through the whole stack, checked against a model, qemu-img (fixed and
//! dynamic disks with 512-byte sectors) and libvhdi (chains, except where it is known wrong).

mod bad;

use std::path::{Path, PathBuf};

use testkit::vhdx::{LogPlan, VhdxBuilder};

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

/// Writes `len` bytes at `off` to both the builder and the model.
fn put(b: &mut VhdxBuilder, model: &mut [u8], off: u64, data: &[u8]) {
    b.write(off, data);
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// A base `.vhdx` and `depth - 1` differencing `.avhdx` checkpoints with random writes in units
/// of `unit` bytes (short runs make partially present blocks, long ones fully present blocks).
/// Returns the paths top first and the model of the merged disk.
fn build_chain(dir: &Path, depth: usize, size: u64, lss: u64, unit: u64, seed: u64) -> (Vec<PathBuf>, Vec<u8>) {
    let mut model = vec![0u8; size as usize];
    let mut rng = Lcg(seed);
    let mut paths: Vec<PathBuf> = Vec::new();
    for k in 0..depth {
        let path = if k == 0 { dir.join("base.vhdx") } else { dir.join(format!("base_snap{k}.avhdx")) };
        let mut b = if k == 0 {
            VhdxBuilder::dynamic(size).block_size(2 * MIB).logical_sector(lss)
        } else {
            VhdxBuilder::differencing(paths.last().unwrap()).unwrap()
        };
        // One whole block (FULLY_PRESENT in a child), then random runs (mostly partially present).
        let full = rng.next(size / (2 * MIB)) * 2 * MIB;
        put(&mut b, &mut model, full, &pattern(seed * 1000 + k as u64 * 50 + 49, (2 * MIB) as usize));
        for w in 0..12 {
            let units = size / unit;
            let len = (1 + rng.next(if w % 3 == 0 { 700 } else { 24 })).min(units) * unit;
            let off = rng.next(units - len / unit + 1) * unit;
            put(&mut b, &mut model, off, &pattern(seed * 1000 + k as u64 * 50 + w, len as usize));
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

fn info_text(img: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = vec![os("info")];
    args.extend(extra.iter().map(os));
    args.push(img.as_os_str());
    let o = vdiskfs(args);
    assert!(o.status.success(), "info: {}", stderr(&o));
    squash(&String::from_utf8_lossy(&o.stdout))
}

/// Runs of spaces as one, so checks do not depend on column widths.
fn squash(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !(c == ' ' && out.ends_with(' ')) {
            out.push(c);
        }
    }
    out
}

crate::register!(qemu_made_fixed_and_dynamic_vhdx_match_qemu);
fn qemu_made_fixed_and_dynamic_vhdx_match_qemu() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let raw = t.path().join("src.raw");
    let mut data = vec![0u8; (40 * MIB) as usize];
    data[(3 * MIB) as usize..(5 * MIB + 4096) as usize].copy_from_slice(&pattern(5, (2 * MIB + 4096) as usize));
    data[100..612].copy_from_slice(&pattern(6, 512));
    data[(39 * MIB) as usize..].copy_from_slice(&pattern(7, MIB as usize));
    std::fs::write(&raw, &data).unwrap();
    for (sub, opts) in
        [("dynamic", ""), ("dynamic", ",block_size=1M"), ("fixed", ""), ("dynamic", ",block_size=32M,log_size=4M")]
    {
        let p = t.path().join(format!("q-{sub}.vhdx"));
        sh(&format!("qemu-img convert -f raw -O vhdx -o subformat={sub}{opts} {} {}", raw.display(), p.display()));
        let got = read_mounted(&p, &[]);
        assert_same(&format!("qemu {sub}{opts} vs qemu-img"), &got, &qemu_raw(&p, "vhdx"));
        assert_same(&format!("qemu {sub}{opts} vs source"), &got, &data);
    }
}

crate::register!(mkimg_vhdx_matches_qemu);
fn mkimg_vhdx_matches_qemu() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let img = corpus("img-1x1-512-gpt.vhdx.hex", t.path());
    let got = read_mounted(&img, &[]);
    assert_same("mkimg vhdx", &got, &qemu_raw(&img, "vhdx"));
    assert!(info_text(&img, &[]).contains("creator: (empty)"), "mkimg leaves the creator empty");
}

crate::register!(builder_dynamic_and_fixed_vhdx_match_qemu_and_the_model);
/// Every payload state in a disk without parent, read by our reader, qemu and the model:
/// NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED (still pointing at stale data) read zeros.
fn builder_dynamic_and_fixed_vhdx_match_qemu_and_the_model() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let size = 12 * MIB + 8192;
    for fixed in [false, true] {
        let mut model = vec![0u8; size as usize];
        let mut b = if fixed { VhdxBuilder::fixed(size) } else { VhdxBuilder::dynamic(size) }.block_size(MIB);
        put(&mut b, &mut model, 0, &pattern(1, 4096));
        put(&mut b, &mut model, MIB + 512, &pattern(2, 3 * MIB as usize));
        put(&mut b, &mut model, 12 * MIB, &pattern(3, 8192));
        b.zero_block(5).unmap_block(6).undefined_block(7);
        put(&mut b, &mut model, 9 * MIB, &pattern(4, MIB as usize));
        b.unmap_block(9);
        model[(9 * MIB) as usize..(10 * MIB) as usize].fill(0);
        let p = t.path().join(if fixed { "fixed.vhdx" } else { "dynamic.vhdx" });
        b.build(&p).unwrap();
        let got = read_mounted(&p, &[]);
        assert_same(&format!("fixed={fixed} vs model"), &got, &model);
        assert_same(&format!("fixed={fixed} vs qemu-img"), &got, &qemu_raw(&p, "vhdx"));
    }
}

crate::register!(differencing_chains_match_model_and_libvhdi);
/// Chains of depth 1, 3 and 16 with 512- and 4096-byte logical sectors, partially and fully
/// present blocks, written in whole bitmap bytes: the mount equals the model and libvhdi.
fn differencing_chains_match_model_and_libvhdi() {
    need_fuse();
    need("vhdimount");
    for lss in [512, 4096] {
        for depth in [1, 3, 16] {
            let t = tmpdir();
            let (paths, model) = build_chain(t.path(), depth, 24 * MIB + 32768, lss, 8 * lss, depth as u64 + lss);
            let got = read_mounted(&paths[0], &[]);
            let what = format!("lss {lss} depth {depth}");
            assert_same(&format!("{what} vs model"), &got, &model);
            assert_same(&format!("{what} vs libvhdi"), &got, &vhdimount_top(&paths[0]));
        }
    }
}

crate::register!(sector_granular_bitmaps_follow_the_spec);
/// Runs that start and end in the middle of a bitmap byte.
fn sector_granular_bitmaps_follow_the_spec() {
    need_fuse();
    let t = tmpdir();
    let (paths, model) = build_chain(t.path(), 4, 8 * MIB, 512, 512, 99);
    assert_same("sector-granular chain vs model", &read_mounted(&paths[0], &[]), &model);
    if have("vhdimount") {
        assert_same("sector-granular chain vs libvhdi", &vhdimount_top(&paths[0]), &model);
    }
}

crate::register!(zero_and_unmapped_blocks_in_a_child_mask_parent_data);
/// ZERO and UNMAPPED blocks in a child read zeros even where the parent has data; NOT_PRESENT
/// and UNDEFINED show the parent; a grandchild that does not allocate a block sees the child's
/// zeros. libvhdi reads ZERO/UNMAPPED blocks from the parent (a known defect), so it is compared
/// only outside those blocks.
fn zero_and_unmapped_blocks_in_a_child_mask_parent_data() {
    need_fuse();
    for lss in [512u64, 4096] {
        let t = tmpdir();
        let size = 16 * MIB;
        let base = t.path().join("base.vhdx");
        let mut model = vec![0u8; size as usize];
        let mut b = VhdxBuilder::dynamic(size).block_size(2 * MIB).logical_sector(lss);
        put(&mut b, &mut model, 0, &pattern(1, size as usize));
        b.build(&base).unwrap();
        let child = t.path().join("base_snap1.avhdx");
        let mut c = VhdxBuilder::differencing(&base).unwrap();
        c.zero_block(1).unmap_block(2).undefined_block(3);
        model[(2 * MIB) as usize..(6 * MIB) as usize].fill(0);
        // A partially present block next to them, and a zeroed block written again.
        put(&mut c, &mut model, 8 * MIB + 8 * lss, &pattern(2, (16 * lss) as usize));
        c.zero_block(5);
        model[(10 * MIB) as usize..(12 * MIB) as usize].fill(0);
        put(&mut c, &mut model, 10 * MIB + 64 * lss, &pattern(3, (8 * lss) as usize));
        c.build(&child).unwrap();
        let top = t.path().join("base_snap2.avhdx");
        let mut g = VhdxBuilder::differencing(&child).unwrap();
        put(&mut g, &mut model, 14 * MIB, &pattern(4, (8 * lss) as usize));
        g.build(&top).unwrap();

        let got = read_mounted(&top, &[]);
        assert_same(&format!("lss {lss}: chain with ZERO/UNMAPPED blocks vs model"), &got, &model);
        let info = info_text(&child, &[]);
        assert!(info.contains("1 zero, 1 unmapped, 1 undefined"), "{info}");
        if have("vhdimount") {
            let lib = vhdimount_top(&top);
            let masked = |v: &[u8]| {
                let mut v = v.to_vec();
                v[(2 * MIB) as usize..(6 * MIB) as usize].fill(0);
                v[(10 * MIB) as usize..(12 * MIB) as usize].fill(0);
                v
            };
            assert_same("libvhdi outside ZERO/UNMAPPED blocks", &masked(&lib), &masked(&got));
            assert_ne!(lib[(2 * MIB) as usize..(3 * MIB) as usize], got[(2 * MIB) as usize..(3 * MIB) as usize]);
        }
    }
}

crate::register!(a_checkpoint_over_a_qemu_made_base_reads_through);
/// A base made by qemu-img (an independent writer) under a child made by the builder.
fn a_checkpoint_over_a_qemu_made_base_reads_through() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let raw = t.path().join("src.raw");
    let mut model = pattern(8, (20 * MIB) as usize);
    model[(4 * MIB) as usize..(9 * MIB) as usize].fill(0);
    std::fs::write(&raw, &model).unwrap();
    let base = t.path().join("base.vhdx");
    sh(&format!(
        "qemu-img convert -f raw -O vhdx -o subformat=dynamic,block_size=1M {} {}",
        raw.display(),
        base.display()
    ));
    let child = t.path().join("base_ABC.avhdx");
    let mut c = VhdxBuilder::differencing(&base).unwrap().block_size(MIB);
    put(&mut c, &mut model, 3 * MIB + 4096, &pattern(9, 2 * MIB as usize));
    c.zero_block(12);
    model[(12 * MIB) as usize..(13 * MIB) as usize].fill(0);
    c.build(&child).unwrap();
    assert_same("child over a qemu base", &read_mounted(&child, &[]), &model);
}

crate::register!(a_pending_log_is_replayed_in_memory_and_the_source_is_untouched);
/// A dirty log (a VHDX copied from a running VM): the file's BAT is garbage and its metadata
/// names another size; the log, split over three entries that wrap around the end of the log,
/// zeroes the BAT, writes it back and fixes the size. An older sequence and a torn entry after
/// the head are present too and must be ignored. The replayed view equals the model, and the
/// source file is unchanged.
fn a_pending_log_is_replayed_in_memory_and_the_source_is_untouched() {
    need_fuse();
    for (lss, with_parent) in [(512u64, false), (4096, false), (512, true)] {
        let t = tmpdir();
        let size = 20 * MIB;
        let mut model = vec![0u8; size as usize];
        let plan = LogPlan {
            stale_blocks: vec![1, 5],
            garbage_bat: true,
            old_virtual_size: Some(8 * MIB),
            entries: 3,
            start: MIB - 8192,
            older_sequence: true,
            torn_head: true,
            corrupt_entry: None,
        };
        let img = if with_parent {
            let base = t.path().join("base.vhdx");
            let mut b = VhdxBuilder::dynamic(size).block_size(MIB).logical_sector(lss);
            put(&mut b, &mut model, 0, &pattern(20, size as usize));
            b.build(&base).unwrap();
            t.path().join("base_snap.avhdx")
        } else {
            t.path().join("dirty.vhdx")
        };
        let mut b = if with_parent {
            VhdxBuilder::differencing(&t.path().join("base.vhdx")).unwrap().block_size(MIB)
        } else {
            VhdxBuilder::dynamic(size).block_size(MIB).logical_sector(lss)
        };
        put(&mut b, &mut model, 0, &pattern(21, 4096));
        put(&mut b, &mut model, MIB + 8 * lss, &pattern(22, (3 * MIB) as usize));
        put(&mut b, &mut model, 15 * MIB, &pattern(23, (16 * lss) as usize));
        b.zero_block(18);
        model[(18 * MIB) as usize..(19 * MIB) as usize].fill(0);
        b.pending_log(plan).build(&img).unwrap();

        let before = std::fs::read(&img).unwrap();
        let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
        let got = read_mounted(&img, &[]);
        assert_same(&format!("lss {lss} parent {with_parent}: replayed view vs model"), &got, &model);
        let info = info_text(&img, &[]);
        assert!(info.contains("replayed in memory: 3 entries"), "{info}");
        assert_eq!(std::fs::read(&img).unwrap(), before, "the source file changed");
        assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), mtime);
        // The case is real: qemu refuses to open it read-only.
        if lss == 512 && !with_parent && have("qemu-img") {
            let o = std::process::Command::new("qemu-img").args(["info", "-U"]).arg(&img).output().unwrap();
            assert!(!o.status.success() || stderr(&o).contains("log"), "qemu opened a dirty VHDX read-only");
        }
    }
}

crate::register!(a_torn_newer_header_falls_back_to_the_other_one);
fn a_torn_newer_header_falls_back_to_the_other_one() {
    need_fuse();
    let t = tmpdir();
    let p = t.path().join("torn.vhdx");
    let mut model = vec![0u8; (4 * MIB) as usize];
    let mut b = VhdxBuilder::dynamic(4 * MIB).block_size(MIB).torn_header();
    put(&mut b, &mut model, MIB, &pattern(1, 8192));
    b.build(&p).unwrap();
    assert_same("torn header", &read_mounted(&p, &[]), &model);
    let info = info_text(&p, &[]);
    assert!(info.contains("1 of 2, sequence 10; header 2 invalid: header checksum mismatch"), "{info}");
}

crate::register!(hyper_v_locators_resolve_and_info_shows_vhdx_details);
/// Hyper-V keeps checkpoints in another folder with `relative_path` `..\Virtual Hard Disks\..`;
/// `info` shows the VHDX details and the locators.
fn hyper_v_locators_resolve_and_info_shows_vhdx_details() {
    need_fuse();
    let t = tmpdir();
    let vhds = t.path().join("Virtual Hard Disks");
    let snaps = t.path().join("Snapshots");
    std::fs::create_dir(&vhds).unwrap();
    std::fs::create_dir(&snaps).unwrap();
    let base = vhds.join("web01.vhdx");
    let mut model = vec![0u8; (8 * MIB) as usize];
    let mut b = VhdxBuilder::dynamic(8 * MIB).block_size(MIB).logical_sector(4096).physical_sector(4096);
    put(&mut b, &mut model, 0, &pattern(1, MIB as usize));
    b.build(&base).unwrap();
    let linkage = testkit::vhdx::guid_text(&b.data_write_guid_value());
    let child = snaps.join("web01_6F2A.avhdx");
    let mut c = VhdxBuilder::differencing(&base).unwrap().locators(vec![
        ("parent_linkage".into(), linkage.to_uppercase()),
        ("relative_path".into(), r"..\Virtual Hard Disks\web01.vhdx".into()),
        ("absolute_win32_path".into(), r"D:\Hyper-V\web01\Virtual Hard Disks\web01.vhdx".into()),
    ]);
    put(&mut c, &mut model, 4096 * 3, &pattern(2, 4096));
    c.build(&child).unwrap();
    // `..\Virtual Hard Disks` climbs out of the checkpoint's folder: refused unless allowed.
    let o = vdiskfs([os("info"), child.as_os_str()]);
    assert_one_line_error(
        &o,
        &child.display().to_string(),
        &["parent not found", r"refused to follow relative_path ..\Virtual Hard Disks\web01.vhdx", "--parent-dir"],
    );
    let pd = ["--parent-dir", vhds.to_str().unwrap()];
    assert_same("checkpoint in Snapshots", &read_mounted(&child, &pd), &model);
    let info = info_text(&child, &pd);
    for needle in [
        "format:        vhdx differencing",
        "format:        vhdx dynamic",
        "locator:       relative_path ..\\Virtual Hard Disks\\web01.vhdx",
        "sector_size:   logical 4096, physical 4096",
        "log:           empty",
        &format!("expects {}", linkage.trim_matches(|c| c == '{' || c == '}')),
        &format!("parent found:  {}", base.display()),
    ] {
        assert!(info.contains(&squash(needle)), "missing {needle:?} in:\n{info}");
    }
    // Only the absolute path: found by file name through --parent-dir.
    let lone = t.path().join("lone.avhdx");
    VhdxBuilder::differencing(&base)
        .unwrap()
        .locators(vec![
            ("parent_linkage".into(), linkage.clone()),
            ("absolute_win32_path".into(), r"C:\ClusterStorage\Volume1\web01.vhdx".into()),
        ])
        .build(&lone)
        .unwrap();
    let o = vdiskfs([os("info"), lone.as_os_str()]);
    assert_one_line_error(&o, &lone.display().to_string(), &["parent not found", "web01.vhdx", "--parent-dir"]);
    let got = read_mounted(&lone, &["--parent-dir", vhds.to_str().unwrap()]);
    assert_eq!(&got[..MIB as usize], &pattern(1, MIB as usize)[..]);
}

crate::register!(real_consumers_read_the_mounted_vhdx_chain);
fn real_consumers_read_the_mounted_vhdx_chain() {
    need_fuse();
    need("qemu-img");
    need("losetup");
    let Some(fs) = fs_pair(40 * MIB) else { return };
    let t = tmpdir();
    let base = t.path().join("vm.vhdx");
    let mut b = VhdxBuilder::dynamic(fs.base.len() as u64).block_size(MIB);
    b.write_diff(&vec![0u8; fs.base.len()], &fs.base, 4096);
    b.build(&base).unwrap();
    let child = t.path().join("vm_8A1C.avhdx");
    let mut c = VhdxBuilder::differencing(&base).unwrap();
    c.write_diff(&fs.base, &fs.child, 512);
    c.build(&child).unwrap();
    let m = mount(&[child.as_os_str()]);
    let raw = m.file("vm_8A1C.raw");

    assert_real_consumers(&raw, &fs);
}

crate::register!(seek_data_and_hole_see_zero_blocks_as_holes);
fn seek_data_and_hole_see_zero_blocks_as_holes() {
    need_fuse();
    let t = tmpdir();
    let base = t.path().join("base.vhdx");
    let mut b = VhdxBuilder::dynamic(16 * MIB).block_size(MIB);
    b.write(2 * MIB, &pattern(1, 2 * MIB as usize));
    b.build(&base).unwrap();
    let child = t.path().join("child.avhdx");
    let mut c = VhdxBuilder::differencing(&base).unwrap().block_size(MIB);
    c.zero_block(3);
    c.write(8 * MIB, &pattern(2, 4096));
    c.build(&child).unwrap();
    let m = mount(&[child.as_os_str()]);
    let f = std::fs::File::open(m.file("child.raw")).unwrap();
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence| unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    assert_eq!(seek(0, libc::SEEK_DATA), (2 * MIB) as i64);
    assert_eq!(seek(2 * MIB, libc::SEEK_HOLE), (3 * MIB) as i64, "the child's ZERO block is a hole");
    assert_eq!(seek(3 * MIB, libc::SEEK_DATA), (8 * MIB) as i64);
    assert_eq!(seek(8 * MIB, libc::SEEK_HOLE), (8 * MIB + 4096) as i64);
}
