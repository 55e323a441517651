//! Composed disks (`--compose mbr|gpt`, `raw:`): the generated table as independent readers see
//! it (sfdisk, kpartx, parted, gdisk/sgdisk), both seeds' layouts end to end through the mount,
//! loop devices and e2fsck, and `export` against `qemu-img convert`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::Value;
use testkit::vhd::VhdBuilder;

use crate::common::*;

pub const MIB: u64 = 1 << 20;

/// A Xen guest's volumes, as xen-tools makes them: an ext4 root with files, and a swap.
pub struct Guest {
    pub root: PathBuf,
    pub swap: PathBuf,
    /// Files in the root filesystem: (name, bytes).
    pub files: Vec<(String, Vec<u8>)>,
}

/// An ext4 volume of `mib` MiB holding `files`, made with `mkfs.ext4 -d`.
pub fn ext4_volume(dir: &Path, name: &str, mib: u64, files: &[(String, Vec<u8>)]) -> PathBuf {
    let root = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&root).unwrap();
    for (n, b) in files {
        std::fs::write(root.join(n), b).unwrap();
    }
    let vol = dir.join(name);
    sh(&format!(
        "mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 -d {} {} {}k",
        root.display(),
        vol.display(),
        mib * 1024
    ));
    vol
}

pub fn guest(dir: &Path) -> Guest {
    for tool in ["mkfs.ext4", "mkswap"] {
        need(tool);
    }
    let files = vec![("hostname".to_string(), b"xen-guest\n".to_vec()), ("data.bin".to_string(), pattern(42, 300_000))];
    let root = ext4_volume(dir, "root", 40, &files);
    let swap = dir.join("swap");
    sh(&format!("truncate -s 16M {0} && mkswap -q {0}", swap.display()));
    Guest { root, swap, files }
}

pub fn raw_arg(p: &Path) -> std::ffi::OsString {
    let mut s = std::ffi::OsString::from("raw:");
    s.push(p);
    s
}

/// Every file's bytes, to show that sources never change.
pub fn snapshot(paths: &[&Path]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// One partition as a reader reports it: start and size in sectors, type as the reader spells
/// it, and whether it is marked bootable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub start: u64,
    pub size: u64,
    pub ty: String,
    pub boot: bool,
}

/// `sfdisk --json`: (label, rows).
pub fn sfdisk(raw: &Path) -> (String, Vec<Row>, Value) {
    let v: Value = serde_json::from_str(&sh(&format!("sfdisk --json {}", raw.display()))).unwrap();
    let t = &v["partitiontable"];
    let rows = t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Row {
            start: p["start"].as_u64().unwrap(),
            size: p["size"].as_u64().unwrap(),
            ty: p["type"].as_str().unwrap().to_lowercase(),
            boot: p["bootable"].as_bool().unwrap_or(false)
                || p["attrs"].as_str().is_some_and(|a| a.contains("LegacyBIOSBootable")),
        })
        .collect();
    (t["label"].as_str().unwrap().to_string(), rows, v)
}

/// `kpartx -l` through a read-only loop device: (start, size) of each partition.
pub fn kpartx(raw: &Path) -> Vec<(u64, u64)> {
    let lo = Loop::attach(raw, None);
    let out = sh(&format!("kpartx -l {}", lo.0));
    drop(lo);
    out.lines()
        .filter(|l| l.contains(" : "))
        .map(|l| {
            // loop0p1 : 0 81920 /dev/loop0 2048
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5].parse().unwrap(), f[3].parse().unwrap())
        })
        .collect()
}

/// `parted -s -m FILE unit B print`: (start, size) in bytes, the name field (GPT), the flags,
/// the file system found.
pub fn parted(raw: &Path) -> Vec<(u64, u64, String, String, String)> {
    let out = sh(&format!("parted -s -m {} unit B print", raw.display()));
    let b = |s: &str| s.trim_end_matches('B').parse::<u64>().unwrap();
    out.lines()
        .filter(|l| l.split(':').next().is_some_and(|n| n.parse::<u32>().is_ok()))
        .map(|l| {
            // 1:1048576B:42991615B:41943040B:ext4:root:legacy_boot;
            let f: Vec<&str> = l.trim_end_matches(';').split(':').collect();
            (b(f[1]), b(f[3]), f[5].to_string(), f[6].to_string(), f[4].to_string())
        })
        .collect()
}

/// The byte range of every partition, from sfdisk.
pub fn ranges(rows: &[Row]) -> Vec<(u64, u64)> {
    rows.iter().map(|r| (r.start * 512, r.size * 512)).collect()
}

/// Mounts the ext4 partition at `range` through `losetup -o --sizelimit` read-only, checks
/// every file, and runs `e2fsck -fn` on it.
pub fn check_root(raw: &Path, range: (u64, u64), files: &[(String, Vec<u8>)]) {
    let lo = Loop::attach(raw, Some(range));
    let fsck = std::process::Command::new("e2fsck").args(["-fn", &lo.0]).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn: {}{}", String::from_utf8_lossy(&fsck.stdout), stderr(&fsck));
    drop(lo);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for ((n, want), got) in files.iter().zip(read_files_in_partition(raw, range, &names)) {
        assert!(got == *want, "{n} differs inside the partition");
    }
}

/// `blkid -p` of the partition at `range`: its TYPE.
pub fn fs_type(raw: &Path, range: (u64, u64)) -> String {
    let lo = Loop::attach(raw, Some(range));
    let t = sh(&format!("blkid -p -o value -s TYPE {}", lo.0)).trim().to_string();
    drop(lo);
    t
}

/// `qemu-img convert` of the mounted file and `vdiskfs export ARGS` give the same bytes; returns them.
pub fn export_equals_qemu_convert(raw: &Path, export_args: &[&OsStr]) -> Vec<u8> {
    let t = tmpdir();
    let q = t.path().join("q.raw");
    sh(&format!("qemu-img convert -f raw -O raw {} {}", raw.display(), q.display()));
    let out = t.path().join("exported.raw");
    let mut args = vec![os("export"), os("--quiet"), os("--verify")];
    args.extend_from_slice(export_args);
    args.push(out.as_os_str());
    let o = vdiskfs(&args);
    assert!(o.status.success(), "export: {}", stderr(&o));
    let (a, b) = (std::fs::read(&q).unwrap(), std::fs::read(&out).unwrap());
    assert_same("vdiskfs export vs qemu-img convert", &b, &a);
    assert_same("the mounted file", &std::fs::read(raw).unwrap(), &a);
    a
}

crate::register!(mbr_of_xen_tools_volumes_reads_alike_everywhere);
/// Seed 000: root and swap LVs become one MBR disk: sfdisk, kpartx and parted agree on every
/// start, size, type and flag; the root mounts and checks clean through losetup; the swap is a
/// swap; qemu-img convert and export agree; the volumes are unchanged.
fn mbr_of_xen_tools_volumes_reads_alike_everywhere() {
    need_fuse();
    for tool in ["sfdisk", "kpartx", "parted", "qemu-img", "e2fsck", "blkid", "losetup"] {
        need(tool);
    }
    let t = tmpdir();
    let g = guest(t.path());
    let before = snapshot(&[&g.root, &g.swap]);
    let args = [os("--compose"), os("mbr"), os("--bootable"), os("1"), os("--part-type"), os("2=swap")];
    let parts = [raw_arg(&g.root), raw_arg(&g.swap)];
    let mut margs: Vec<&OsStr> = args.to_vec();
    margs.extend(parts.iter().map(|p| p.as_os_str()));
    let m = mount(&margs);
    let raw = m.file("disk.raw");
    let (label, rows, _) = sfdisk(&raw);
    assert_eq!(label, "dos");
    let want = vec![
        Row { start: 2048, size: 40 * 2048, ty: "83".into(), boot: true },
        Row { start: 41 * 2048, size: 16 * 2048, ty: "82".into(), boot: false },
    ];
    assert_eq!(rows, want);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 57 * MIB, "an MBR disk ends with its last partition");
    assert_eq!(kpartx(&raw), vec![(2048, 40 * 2048), (41 * 2048, 16 * 2048)]);
    let p = parted(&raw);
    assert_eq!((p[0].0, p[0].1, p[1].0, p[1].1), (MIB, 40 * MIB, 41 * MIB, 16 * MIB));
    assert!(p[0].3.contains("boot") && !p[1].3.contains("boot"), "parted flags: {p:?}");
    assert!(p[1].3.contains("swap") && (p[0].4.as_str(), p[1].4.as_str()) == ("ext4", "linux-swap(v1)"), "{p:?}");
    let r = ranges(&rows);
    check_root(&raw, r[0], &g.files);
    assert_eq!(fs_type(&raw, r[1]), "swap");
    export_equals_qemu_convert(&raw, &margs);
    drop(m);
    assert!(snapshot(&[&g.root, &g.swap]) == before, "a source volume changed");
}

crate::register!(gpt_of_xen_tools_volumes_reads_alike_everywhere);
/// The same volumes behind a GPT: gdisk and sgdisk find no problem, and every reader sees the
/// same partitions, types, names and the bootable attribute; the GUIDs are the same each time.
fn gpt_of_xen_tools_volumes_reads_alike_everywhere() {
    need_fuse();
    for tool in ["sfdisk", "kpartx", "parted", "gdisk", "sgdisk", "qemu-img", "e2fsck", "losetup"] {
        need(tool);
    }
    let t = tmpdir();
    let g = guest(t.path());
    let parts = [raw_arg(&g.root), raw_arg(&g.swap)];
    let mut args = vec![os("--compose"), os("gpt"), os("--bootable"), os("1"), os("--part-type"), os("2=swap")];
    args.extend(parts.iter().map(|p| p.as_os_str()));
    let m = mount(&args);
    let raw = m.file("disk.raw");
    let v = sh(&format!("sgdisk -v {}", raw.display()));
    assert!(v.contains("No problems found"), "sgdisk -v: {v}");
    let (label, rows, json) = sfdisk(&raw);
    assert_eq!(label, "gpt");
    let linux = "0fc63daf-8483-4772-8e79-3d69d8477de4";
    let swap = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f";
    let want = vec![
        Row { start: 2048, size: 40 * 2048, ty: linux.into(), boot: true },
        Row { start: 41 * 2048, size: 16 * 2048, ty: swap.into(), boot: false },
    ];
    assert_eq!(rows, want);
    let names: Vec<&str> =
        json["partitiontable"]["partitions"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["root", "swap"]);
    let size = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(size, 57 * MIB + 33 * 512, "the backup table follows the last partition");
    let gl = sh(&format!("gdisk -l {}", raw.display()));
    let gd: Vec<Vec<&str>> = gl
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 6 && f[0].parse::<u32>().is_ok())
        .collect();
    assert_eq!(gd.len(), 2, "gdisk -l: {gl}");
    assert_eq!((gd[0][1], gd[0][2], gd[0][5], gd[0][6]), ("2048", "83967", "8300", "root"), "gdisk -l: {gl}");
    assert_eq!((gd[1][1], gd[1][2], gd[1][5]), ("83968", "116735", "8200"), "gdisk -l: {gl}");
    assert!(gl.contains("GPT: present") && gl.contains("MBR: protective"), "gdisk -l: {gl}");
    let attrs = sh(&format!("sgdisk -i 1 {}", raw.display()));
    assert!(attrs.contains("Attribute flags: 0000000000000004"), "sgdisk -i 1: {attrs}");
    assert_eq!(kpartx(&raw), vec![(2048, 40 * 2048), (41 * 2048, 16 * 2048)]);
    let p = parted(&raw);
    assert_eq!((p[0].0, p[0].1, p[1].0, p[1].1), (MIB, 40 * MIB, 41 * MIB, 16 * MIB));
    assert_eq!((p[0].2.as_str(), p[1].2.as_str()), ("root", "swap"));
    assert!(p[0].3.contains("legacy_boot"), "parted flags: {p:?}");
    check_root(&raw, ranges(&rows)[0], &g.files);
    let first = json["partitiontable"].clone();
    export_equals_qemu_convert(&raw, &args);
    drop(m);
    let m = mount(&args);
    let (_, _, again) = sfdisk(&m.file("disk.raw"));
    assert_eq!(again["partitiontable"]["id"], first["id"], "the disk GUID is derived, not random");
    let uuids = |t: &Value| t["partitions"].as_array().unwrap().iter().map(|p| p["uuid"].clone()).collect::<Vec<_>>();
    assert_eq!(uuids(&again["partitiontable"]), uuids(&first), "so are the partition GUIDs");
}

crate::register!(onapp_raw_xen_disk_behind_a_16k_table);
/// Seed 002: a raw Xen disk (a filesystem without a partition table) as partition 1 behind
/// OnApp's DOS-compatible 16 KiB table, exported onto a "KVM volume" 16 KiB larger that held
/// other bytes before; the partition checks clean on the target.
fn onapp_raw_xen_disk_behind_a_16k_table() {
    need_fuse();
    for tool in ["sfdisk", "parted", "qemu-img", "e2fsck", "losetup"] {
        need(tool);
    }
    let t = tmpdir();
    let files = vec![("etc-issue".to_string(), b"CentOS release 6\n".to_vec()), ("blob".into(), pattern(5, 70_000))];
    let xen = ext4_volume(t.path(), "xen-disk", 30, &files);
    let before = snapshot(&[&xen]);
    let x = raw_arg(&xen);
    let args = [os("--compose"), os("mbr"), os("--part-offset"), os("16KiB"), os("--name"), os("kvm"), x.as_os_str()];
    let m = mount(&args);
    let raw = m.file("kvm.raw");
    let size = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(size, 30 * MIB + 16384, "the KVM volume is the Xen disk extended by 16 KiB");
    let (_, rows, _) = sfdisk(&raw);
    assert_eq!(rows, vec![Row { start: 32, size: 30 * 2048, ty: "83".into(), boot: false }]);
    let p = parted(&raw);
    assert_eq!((p[0].0, p[0].1), (16384, 30 * MIB));
    let want = export_equals_qemu_convert(&raw, &args);
    // The KVM volume exists and holds old bytes: export zeroes what the disk leaves as holes.
    let kvm = t.path().join("kvm-volume");
    std::fs::write(&kvm, pattern(77, size as usize)).unwrap();
    let mut eargs = vec![os("export"), os("--quiet")];
    eargs.extend_from_slice(&args);
    eargs.push(kvm.as_os_str());
    let o = vdiskfs(&eargs);
    assert!(o.status.success(), "export: {}", stderr(&o));
    assert_same("the KVM volume after export", &std::fs::read(&kvm).unwrap(), &want);
    check_root(&kvm, (16384, 30 * MIB), &files);
    drop(m);
    assert!(snapshot(&[&xen]) == before, "the Xen disk changed");
}

crate::register!(a_chain_part_keeps_its_holes_and_map_names_the_parts);
/// A part can be any chain: a differencing VHD beside a raw volume. Its holes stay holes
/// (SEEK_DATA, `map`), its bytes are the chain's, and `info` describes the composition.
fn a_chain_part_keeps_its_holes_and_map_names_the_parts() {
    let t = tmpdir();
    let base = t.path().join("base.vhd");
    let mut b = VhdBuilder::dynamic(8 * MIB);
    b.write(0, &pattern(1, MIB as usize));
    b.build(&base).unwrap();
    let top = t.path().join("top.vhd");
    let mut c = VhdBuilder::differencing(&base).unwrap();
    c.write(6 * MIB, &pattern(2, 4096));
    c.build(&top).unwrap();
    let vol = t.path().join("vol.img");
    std::fs::write(&vol, pattern(3, 3 * 512 + 100)).unwrap();
    let v = raw_arg(&vol);
    let compose = [os("--compose"), os("gpt"), os("--part-align"), os("4KiB"), top.as_os_str(), v.as_os_str()];
    let mut args = vec![os("map"), os("--json")];
    args.extend_from_slice(&compose);
    let o = vdiskfs(&args);
    assert!(o.status.success(), "map: {}", stderr(&o));
    let map: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["data"].as_bool().unwrap())
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    // Table, the base's first MiB, the top's 4 KiB, the raw volume (its 412 bytes of padding
    // are zeros), the backup table.
    let vstart = 9 * MIB;
    assert_eq!(
        data,
        [(0, 34 * 512), (MIB, MIB), (7 * MIB, 4096), (vstart, 3 * 512 + 100), (vstart + 4 * 512, 33 * 512)]
    );
    let mut args = vec![os("map")];
    args.extend_from_slice(&compose);
    let text = String::from_utf8(vdiskfs(&args).stdout).unwrap();
    assert!(text.contains(&format!("part 1: {}", top.display())), "{text}");
    assert!(text.contains(&format!("part 2: raw:{}", vol.display())) && text.contains("GPT partition table"), "{text}");
    let mut args = vec![os("info")];
    args.extend_from_slice(&compose);
    let o = vdiskfs(&args);
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "info: {}", stderr(&o));
    assert!(info.contains("format:        composed gpt"), "{info}");
    assert!(
        info.contains(&format!("part2:         raw:{}: start {vstart} (sector {})", vol.display(), vstart / 512)),
        "{info}"
    );
    assert!(info.contains("part1_layers:  vhd:"), "{info}");
    if !fuse_ok() {
        return;
    }
    let m = mount(&compose);
    let got = std::fs::read(m.file("disk.raw")).unwrap();
    let mut want = pattern(1, MIB as usize);
    want.resize(6 * MIB as usize, 0);
    want.extend_from_slice(&pattern(2, 4096));
    want.resize(8 * MIB as usize, 0);
    assert_same("part 1: the VHD chain", &got[MIB as usize..9 * MIB as usize], &want);
    assert_same("part 2: the raw volume", &got[vstart as usize..][..3 * 512 + 100], &pattern(3, 3 * 512 + 100));
    assert!(got[vstart as usize + 3 * 512 + 100..][..412].iter().all(|&b| b == 0), "padding reads as zeros");
}

crate::register!(a_raw_volume_alone_is_a_disk_of_its_own);
fn a_raw_volume_alone_is_a_disk_of_its_own() {
    let t = tmpdir();
    let vol = t.path().join("xvda1");
    let bytes = pattern(9, 5 * MIB as usize + 512);
    std::fs::write(&vol, &bytes).unwrap();
    let v = raw_arg(&vol);
    let o = vdiskfs([os("info"), os("--json"), v.as_os_str()]);
    assert!(o.status.success(), "info: {}", stderr(&o));
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    let l = &info["disks"][0]["layers"][0];
    assert_eq!((l["format"].as_str(), l["subformat"].as_str()), (Some("raw"), Some("file")));
    assert_eq!(info["disks"][0]["name"], "xvda1.raw");
    if !fuse_ok() {
        return;
    }
    let m = mount(&[v.as_os_str()]);
    assert_same("raw:", &std::fs::read(m.file("xvda1.raw")).unwrap(), &bytes);
}
