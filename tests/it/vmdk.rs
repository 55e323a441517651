//! VMDK through the whole stack: every createType qemu-img writes, qemu-made chains, SESparse and
//! COWD snapshots from the testkit over an ESXi-style flat base, and the corpus, checked against
//! qemu-img, libvmdk's vmdkmount (except zeroed grains, which it misreads), dissect.hypervisor
//! (except SESparse unmapped grains, which it reads from the parent) and a model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use testkit::vmdk::{DeltaBuilder, DescriptorText, ExtentSpec, StreamBuilder, write_flat};

use crate::common::*;

const MIB: u64 = 1 << 20;

pub fn read_mounted(img: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args: Vec<&std::ffi::OsStr> = extra.iter().map(os).collect();
    args.push(img.as_os_str());
    let m = mount(&args);
    let name = format!("{}.raw", img.file_stem().unwrap().to_string_lossy());
    std::fs::read(m.file(&name)).unwrap()
}

/// libvmdk's view of a chain: the merged top file `vmdkN` of `vmdkmount`.
fn vmdkmount_top(img: &Path) -> Vec<u8> {
    let t = tmpdir();
    let mnt = t.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let o = std::process::Command::new("vmdkmount").arg(img).arg(&mnt).output().expect("vmdkmount");
    assert!(o.status.success(), "vmdkmount {}: {}", img.display(), stderr(&o));
    let mut names: Vec<String> =
        std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort_by_key(|n| n.trim_start_matches("vmdk").parse::<u32>().unwrap_or(0));
    let data = std::fs::read(mnt.join(names.last().expect("vmdkmount shows files")));
    let _ = std::process::Command::new("fusermount3").arg("-u").arg(&mnt).status();
    data.expect("read vmdkmount file")
}

/// dissect.hypervisor's view (a third reader, installed with pip); `None` when it is missing.
fn dissect_raw(img: &Path) -> Option<Vec<u8>> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import dissect.hypervisor"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(!in_ci(), "dissect.hypervisor is required in CI (.ci/run installs it with pip)");
        crate::harness::note("dissect.hypervisor comparison (pip install dissect.hypervisor)");
        return None;
    }
    let t = tmpdir();
    let out = t.path().join("d.raw");
    let script = "import sys\nfrom dissect.hypervisor.disk.vmdk import VMDK\nv = VMDK(sys.argv[1])\n\
                  o = open(sys.argv[2], 'wb')\nwhile True:\n    b = v.read(1 << 20)\n    if not b:\n        break\n    o.write(b)\n";
    sh(&format!("python3 -c \"{script}\" {} {}", img.display(), out.display()));
    Some(std::fs::read(out).unwrap())
}

pub fn qemu_io(img: &Path, cmd: &str) {
    sh(&format!("qemu-io -f vmdk -c '{cmd}' {} > /dev/null", img.display()));
}

/// Disk content with data in several places, including the last partial grain.
fn sample_raw(size: u64) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (i, (off, len)) in
        [(0u64, 4096u64), (MIB + 512, 3 * MIB), (5 * MIB, 64 << 10), (size - 1536, 1536)].into_iter().enumerate()
    {
        d[off as usize..(off + len) as usize].copy_from_slice(&pattern(i as u64 + 40, len as usize));
    }
    d
}

crate::register!(every_subformat_qemu_img_creates_matches_qemu_and_libvmdk);
fn every_subformat_qemu_img_creates_matches_qemu_and_libvmdk() {
    need_fuse();
    need("qemu-img");
    need("vmdkmount");
    let t = tmpdir();
    // Not a whole number of 64 KiB grains: the last grain is partial.
    let size = 9 * MIB + 3 * 512;
    let data = sample_raw(size);
    let raw = t.path().join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    for sub in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"] {
        let p = t.path().join(format!("{sub}.vmdk"));
        sh(&format!("qemu-img convert -f raw -O vmdk -o subformat={sub} {} {}", raw.display(), p.display()));
        let got = read_mounted(&p, &[]);
        assert_same(&format!("{sub} vs source"), &got, &data);
        assert_same(&format!("{sub} vs qemu-img"), &got, &qemu_raw(&p, "vmdk"));
        // libvmdk refuses createType monolithicFlat ("Unsupported disk type").
        if sub != "monolithicFlat" {
            assert_same(&format!("{sub} vs libvmdk"), &got, &vmdkmount_top(&p));
        }
    }
}

crate::register!(esxi_vmfs_and_vmfs_thin_flat_disks_match_qemu);
/// qemu-img cannot create createType "vmfs" (qemu 10 rejects subformat=vmfs), so the ESXi
/// layout comes from the testkit: a descriptor plus `-flat.vmdk`, read by qemu as the oracle.
fn esxi_vmfs_and_vmfs_thin_flat_disks_match_qemu() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let data = sample_raw(8 * MIB);
    let (vmfs, _) = write_flat(t.path(), "Windows-2019", &data, "vmfs").unwrap();
    let got = read_mounted(&vmfs, &[]);
    assert_same("vmfs vs model", &got, &data);
    assert_same("vmfs vs qemu-img", &got, &qemu_raw(&vmfs, "vmdk"));
    // qemu refuses createType vmfsThin; the extent is the same VMFS flat file.
    let (thin, _) = write_flat(t.path(), "thin", &data, "vmfsThin").unwrap();
    assert_same("vmfsThin vs model", &read_mounted(&thin, &[]), &data);
}

crate::register!(qemu_made_chains_match_qemu_and_libvmdk);
fn qemu_made_chains_match_qemu_and_libvmdk() {
    need_fuse();
    need("qemu-img");
    need("qemu-io");
    need("vmdkmount");
    let t = tmpdir();
    let raw = t.path().join("src.raw");
    std::fs::write(&raw, sample_raw(12 * MIB)).unwrap();
    let base = t.path().join("base.vmdk");
    sh(&format!("qemu-img convert -f raw -O vmdk {} {}", raw.display(), base.display()));
    let mut parent = base.clone();
    for (k, cmds) in [
        ["write -P 0x11 1M 64k", "write -P 0x12 3584k 1536k", "write -P 0x13 12276k 12k"],
        ["write -P 0x21 0 512", "write -P 0x22 2M 4k", "write -P 0x23 7M 3M"],
        ["write -P 0x31 1040k 8k", "write -P 0x32 11M 1M", "write -P 0x33 40k 24k"],
    ]
    .iter()
    .enumerate()
    {
        let child = t.path().join(format!("snap{k}.vmdk"));
        sh(&format!(
            "qemu-img create -q -f vmdk -b {} -F vmdk {}",
            parent.file_name().unwrap().to_string_lossy(),
            child.display()
        ));
        for c in cmds {
            qemu_io(&child, c);
        }
        let got = read_mounted(&child, &[]);
        assert_same(&format!("depth {} vs qemu-img", k + 2), &got, &qemu_raw(&child, "vmdk"));
        assert_same(&format!("depth {} vs libvmdk", k + 2), &got, &vmdkmount_top(&child));
        parent = child;
    }
}

crate::register!(zeroed_grains_in_a_child_mask_the_parent);
/// qemu writes zeroed grains (entry 1) when asked to write zeros into an image with
/// zeroed_grain=on. They must read as zeros, hiding the parent. libvmdk reads them as the
/// embedded descriptor text instead (FORMAT-NOTES), so qemu is the only oracle here.
fn zeroed_grains_in_a_child_mask_the_parent() {
    need_fuse();
    need("qemu-img");
    need("qemu-io");
    let t = tmpdir();
    let raw = t.path().join("src.raw");
    let data = vec![0xabu8; (4 * MIB) as usize];
    std::fs::write(&raw, &data).unwrap();
    let base = t.path().join("base.vmdk");
    sh(&format!("qemu-img convert -f raw -O vmdk {} {}", raw.display(), base.display()));
    let child = t.path().join("child.vmdk");
    sh(&format!("qemu-img create -q -f vmdk -o zeroed_grain=on -b base.vmdk -F vmdk {}", child.display()));
    qemu_io(&child, "write -z 1M 256k");
    qemu_io(&child, "write -P 0x7 2M 64k");
    let got = read_mounted(&child, &[]);
    let mut model = data.clone();
    model[MIB as usize..(MIB + (256 << 10)) as usize].fill(0);
    model[(2 * MIB) as usize..(2 * MIB + (64 << 10)) as usize].fill(7);
    assert_same("zeroed grains vs model", &got, &model);
    assert_same("zeroed grains vs qemu-img", &got, &qemu_raw(&child, "vmdk"));
    let map = vdiskfs([os("map"), os("--json"), child.as_os_str()]);
    let map = String::from_utf8_lossy(&map.stdout).into_owned();
    assert!(map.contains(r#""start":1048576,"length":262144,"depth":0,"present":true,"zero":true"#), "{map}");
    if have("vmdkmount") {
        assert_ne!(vmdkmount_top(&child), model, "expected libvmdk's zeroed-grain defect to show");
    }
}

/// Writes the model of a delta: data, zero and unmapped grains over `parent`.
struct Delta {
    model: Vec<u8>,
    /// What dissect (which reads unmapped grains from the parent) should show.
    dissect_model: Vec<u8>,
}

fn sesparse_child(parent: &Path, parent_model: &[u8], dir: &Path, name: &str, seed: u64) -> (PathBuf, Delta) {
    let mut b = DeltaBuilder::sesparse(parent).unwrap();
    let mut model = parent_model.to_vec();
    let mut dm = parent_model.to_vec();
    let size = model.len() as u64;
    // Writes in three grain tables (16 MiB each), the first and last grain, a partial table.
    for (i, (off, len)) in [(0, 4096), (MIB, 20 * 4096), (17 * MIB + 8192, 4096), (size - 8192, 8192), (33 * MIB, MIB)]
        .into_iter()
        .enumerate()
    {
        let d = pattern(seed * 100 + i as u64, len as usize);
        b.write(off, &d);
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
        dm[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    // A zero grain and an unmapped run over parent data: both read as zeros (dissect shows the
    // parent through the unmapped run).
    b.zero(2 * MIB, 4096);
    model[(2 * MIB) as usize..(2 * MIB + 4096) as usize].fill(0);
    dm[(2 * MIB) as usize..(2 * MIB + 4096) as usize].fill(0);
    b.unmap(3 * MIB, 3 * 4096);
    model[(3 * MIB) as usize..(3 * MIB + 3 * 4096) as usize].fill(0);
    (b.build(dir, name).unwrap(), Delta { model, dissect_model: dm })
}

crate::register!(sesparse_snapshots_over_a_flat_base_match_qemu_dissect_and_the_model);
fn sesparse_snapshots_over_a_flat_base_match_qemu_dissect_and_the_model() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let size = 40 * MIB;
    let base_data: Vec<u8> = pattern(7, size as usize);
    let (base, _) = write_flat(t.path(), "vm", &base_data, "vmfs").unwrap();
    let (snap1, d1) = sesparse_child(&base, &base_data, t.path(), "vm-000001", 1);
    let (snap2, d2) = sesparse_child(&snap1, &d1.model, t.path(), "vm-000002", 2);
    for (snap, d) in [(&snap1, &d1), (&snap2, &d2)] {
        let got = read_mounted(snap, &[]);
        assert_same("SESparse vs model", &got, &d.model);
        assert_same("SESparse vs qemu-img", &got, &qemu_raw(snap, "vmdk"));
    }
    if let Some(d) = dissect_raw(&snap1) {
        assert_same("SESparse vs dissect (unmapped from the parent)", &d, &d1.dissect_model);
        assert_ne!(d, d1.model, "expected dissect's unmapped-grain defect to show");
    }
}

crate::register!(cowd_redo_logs_over_a_flat_base_match_qemu_libvmdk_dissect_and_the_model);
fn cowd_redo_logs_over_a_flat_base_match_qemu_libvmdk_dissect_and_the_model() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let size = 10 * MIB;
    let base_data = pattern(3, size as usize);
    let (base, _) = write_flat(t.path(), "esx5", &base_data, "vmfs").unwrap();
    let mut parent = base;
    let mut model = base_data;
    // ESX writes one-sector grains; 8-sector grains test the grain arithmetic.
    for (k, grain) in [1u64, 8, 1].into_iter().enumerate() {
        let mut b = DeltaBuilder::cowd(&parent).unwrap().grain_sectors(grain);
        let gs = grain * 512;
        for (i, (off, n)) in [(0, 1), (MIB + 7 * gs, 9), (2 * MIB - gs, 3), (size - gs, 1), (4 * MIB, 1024 / grain)]
            .into_iter()
            .enumerate()
        {
            let d = pattern(k as u64 * 10 + i as u64, (n * gs) as usize);
            b.write(off, &d);
            model[off as usize..(off + n * gs) as usize].copy_from_slice(&d);
        }
        let snap = b.build(t.path(), &format!("esx5-00000{}", k + 1)).unwrap();
        let got = read_mounted(&snap, &[]);
        assert_same(&format!("COWD {k} vs model"), &got, &model);
        assert_same(&format!("COWD {k} vs qemu-img"), &got, &qemu_raw(&snap, "vmdk"));
        if have("vmdkmount") {
            assert_same(&format!("COWD {k} vs libvmdk"), &got, &vmdkmount_top(&snap));
        }
        if let Some(d) = dissect_raw(&snap) {
            assert_same(&format!("COWD {k} vs dissect"), &d, &model);
        }
        parent = snap;
    }
}

crate::register!(esxi_chain_with_two_sesparse_snapshots_serves_real_consumers);
/// The ESXi layout from the migration guide: `vm.vmdk` + `vm-flat.vmdk`, then two SESparse
/// snapshots. A file written in the guest after the first snapshot exists only in the top.
fn esxi_chain_with_two_sesparse_snapshots_serves_real_consumers() {
    need_fuse();
    need("qemu-img");
    need("losetup");
    let Some(fs) = fs_pair(40 * MIB) else { return };
    let t = tmpdir();
    let (base, _) = write_flat(t.path(), "Windows-2019", &fs.base, "vmfs").unwrap();
    // Snapshot 1 holds half of the changed grains, snapshot 2 the rest.
    let mut half = fs.base.clone();
    for (g, (a, b)) in fs.base.chunks(4096).zip(fs.child.chunks(4096)).enumerate() {
        if a != b && g % 2 == 0 {
            half[g * 4096..(g + 1) * 4096].copy_from_slice(b);
        }
    }
    let mut s1 = DeltaBuilder::sesparse(&base).unwrap();
    s1.write_diff(&fs.base, &half);
    let snap1 = s1.build(t.path(), "Windows-2019-000001").unwrap();
    let mut s2 = DeltaBuilder::sesparse(&snap1).unwrap();
    s2.write_diff(&half, &fs.child);
    let snap2 = s2.build(t.path(), "Windows-2019-000002").unwrap();
    assert_same("the chain vs qemu-img", &qemu_raw(&snap2, "vmdk"), &fs.child);

    let m = mount(&[snap2.as_os_str()]);
    let raw = m.file("Windows-2019-000002.raw");
    assert_real_consumers(&raw, &fs);
}

crate::register!(corpus_vmdks_from_qemu_vmware_and_virtualbox_match_qemu);
fn corpus_vmdks_from_qemu_vmware_and_virtualbox_match_qemu() {
    need_fuse();
    need("qemu-img");
    need("xz");
    let t = tmpdir();
    for name in ["dfvfs_ext2.vmdk.xz", "plaso_image.vmdk.xz", "cot_blank.vmdk.xz", "cot_input.vmdk.xz"] {
        let img = corpus(name, t.path());
        assert_same(name, &read_mounted(&img, &[]), &qemu_raw(&img, "vmdk"));
    }
    // An 8 GiB VirtualBox export, its grain directory found through the footer: compared with
    // `qemu-img compare`, which skips the holes the mount reports through SEEK_DATA/SEEK_HOLE.
    let img = corpus("cot_ubuntu.2.0-disk1.vmdk.xz", t.path());
    let m = mount(&[img.as_os_str()]);
    let raw = m.file("cot_ubuntu.2.0-disk1.raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 << 30);
    sh(&format!("qemu-img compare -q -f raw -F vmdk {} {}", raw.display(), img.display()));
}

crate::register!(stream_optimized_exports_with_the_directory_in_the_footer_match_qemu_and_libvmdk);
/// The corpus exports carry no data, so the testkit writes one the way ovftool and VirtualBox
/// do: the grain directory found through the footer, and a short last grain.
fn stream_optimized_exports_with_the_directory_in_the_footer_match_qemu_and_libvmdk() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let size = 70 * MIB + 5 * 512;
    let mut raw = sample_raw(size);
    raw[(40 * MIB) as usize..(41 * MIB) as usize].copy_from_slice(&pattern(77, MIB as usize));
    let p = t.path().join("export-disk1.vmdk");
    StreamBuilder::from_raw(&raw).build(&p).unwrap();
    let got = read_mounted(&p, &[]);
    assert_same("stream export vs model", &got, &raw);
    assert_same("stream export vs qemu-img", &got, &qemu_raw(&p, "vmdk"));
    if have("vmdkmount") {
        assert_same("stream export vs libvmdk", &got, &vmdkmount_top(&p));
    }
    let info = vdiskfs([os("info"), p.as_os_str()]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("grain directory found through the footer"));
}

crate::register!(zero_rdonly_and_offset_extents_are_placed_as_declared);
/// A hand-written descriptor with a FLAT extent at an offset, an RDONLY extent and a ZERO
/// extent (qemu skips non-RW and ZERO lines and so reads a shorter, shifted disk; VMware places
/// every line), and a child whose ZERO extent masks its parent.
fn zero_rdonly_and_offset_extents_are_placed_as_declared() {
    need_fuse();
    let t = tmpdir();
    let dev = pattern(5, (3 * MIB) as usize);
    std::fs::write(t.path().join("dev.img"), &dev).unwrap();
    std::fs::write(t.path().join("ro.img"), pattern(6, MIB as usize)).unwrap();
    let mk = |access: &str, sectors, kind: &str, file: Option<&str>, offset| ExtentSpec {
        access: access.into(),
        sectors,
        kind: kind.into(),
        file: file.map(str::to_string),
        offset,
    };
    let d = DescriptorText {
        cid: 0x0abc_def0,
        parent: None,
        create_type: "monolithicFlat".into(),
        extents: vec![
            mk("RW", 2048, "FLAT", Some("dev.img"), Some(2048)),
            mk("RDONLY", 2048, "FLAT", Some("ro.img"), Some(0)),
            mk("RW", 4096, "ZERO", None, None),
            mk("RW", 2048, "FLAT", Some("dev.img"), Some(0)),
        ],
        ddb: vec![],
    };
    let p = t.path().join("multi.vmdk");
    d.write(&p).unwrap();
    let mut model = Vec::new();
    model.extend_from_slice(&dev[MIB as usize..(2 * MIB) as usize]);
    model.extend_from_slice(&pattern(6, MIB as usize));
    model.extend_from_slice(&vec![0u8; (2 * MIB) as usize]);
    model.extend_from_slice(&dev[..MIB as usize]);
    assert_same("multi-extent descriptor", &read_mounted(&p, &[]), &model);

    // A child: its first MiB from a COWD extent, the rest a ZERO extent hiding the parent.
    let mut b = DeltaBuilder::cowd(&p).unwrap();
    b.write(0, &pattern(8, 4096));
    let snap = b.build(t.path(), "multi-000001").unwrap();
    let text = std::fs::read_to_string(&snap).unwrap();
    let text = text.replace(
        "RW 10240 VMFSSPARSE \"multi-000001-delta.vmdk\"",
        "RW 2048 VMFSSPARSE \"multi-000001-delta.vmdk\"\nRW 8192 ZERO",
    );
    std::fs::write(&snap, text).unwrap();
    let mut cm = vec![0u8; model.len()];
    cm[..MIB as usize].copy_from_slice(&model[..MIB as usize]);
    cm[..4096].copy_from_slice(&pattern(8, 4096));
    assert_same("ZERO extent in a child", &read_mounted(&snap, &[]), &cm);
}

crate::register!(info_shows_descriptor_facts_extents_and_the_chain);
fn info_shows_descriptor_facts_extents_and_the_chain() {
    let t = tmpdir();
    let base_data = pattern(1, (20 * MIB) as usize);
    let (base, base_cid) = write_flat(t.path(), "vm", &base_data, "vmfs").unwrap();
    let mut b = DeltaBuilder::sesparse(&base).unwrap();
    b.write(MIB, &pattern(2, 8192));
    let cid = b.cid();
    let snap = b.build(t.path(), "vm-000001").unwrap();
    let o = vdiskfs([os("info"), snap.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "format:        vmdk seSparse".to_string(),
        format!("identity:      {cid:08x}"),
        format!("parent:        expects {base_cid:08x}"),
        "locator:       parentFileNameHint vm.vmdk".to_string(),
        "RW 40960 SESPARSE \"vm-000001-sesparse.vmdk\"".to_string(),
        "SESparse 2.1, 4 KiB grains".to_string(),
        "allocated:     8.0 KiB (8192 bytes)".to_string(),
        "format:        vmdk vmfs".to_string(),
        "RW 40960 VMFS \"vm-flat.vmdk\"".to_string(),
        "ddb.adapterType".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }
    let o = vdiskfs([os("info"), os("--json"), snap.as_os_str()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = &v["disks"][0]["layers"];
    assert_eq!(layers[0]["details"]["createType"], "seSparse");
    assert_eq!(layers[0]["parent"]["resolved"], base.display().to_string());
    assert_eq!(layers[1]["details"]["parentCID"], "ffffffff (no parent)");
}

crate::register!(a_2_tib_sparse_vmdk_mounts_quickly_and_reads_its_last_grain);
/// A 2 TiB monolithicSparse disk: grain tables load lazily, so the mount is ready at once.
fn a_2_tib_sparse_vmdk_mounts_quickly_and_reads_its_last_grain() {
    need_fuse();
    need("qemu-img");
    need("qemu-io");
    let t = tmpdir();
    let p = t.path().join("big.vmdk");
    sh(&format!("qemu-img create -q -f vmdk {} 2T", p.display()));
    qemu_io(&p, "write -P 0x5a 2199023190016 65536");
    qemu_io(&p, "write -P 0x33 1099511627776 4096");
    let t0 = Instant::now();
    let m = mount(&[p.as_os_str()]);
    let took = t0.elapsed();
    eprintln!("2 TiB sparse VMDK: mount ready in {took:?}");
    assert!(took.as_secs() < 10, "mount took {took:?}");
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(m.file("big.raw")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 2 << 40);
    let mut buf = vec![0u8; 65536];
    f.read_exact_at(&mut buf, 2199023190016).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    f.read_exact_at(&mut buf, 1099511627776 - 4096).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..8192].iter().all(|&b| b == 0x33));
}
