//! XVA exports through the whole stack: xva-img-made chunks in every tar dialect GNU tar
//! writes, xapi-style exports with keep-alive chunks, gzip and zstd, real consumers, and every
//! kind of bad input. Independent checks: the raw disk each export was built from, and
//! `xva-img disk-export` of the unpacked archive.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use testkit::xva::{Checksum, Dialect, XvaBuilder, header};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// A sparse raw disk: pattern data at a few places (whole and partial chunks), zeros elsewhere,
/// so that xva-img and xapi leave chunks out.
fn sparse_disk(size: u64, seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (i, (off, len)) in
        [(0, 4096), (MIB + 512, 2 * MIB), (5 * MIB, 100), (size - 8192, 8192)].into_iter().enumerate()
    {
        if off + len <= size {
            d[off as usize..(off + len) as usize].copy_from_slice(&pattern(seed * 10 + i as u64, len as usize));
        }
    }
    d
}

fn cache_arg(dir: &Path) -> Vec<std::ffi::OsString> {
    vec!["--cache-dir".into(), dir.join("cache").into_os_string()]
}

/// Mounts `img` and returns the disks' (name, bytes) in directory order.
fn read_all(img: &Path, t: &Path, extra: &[&str]) -> Vec<(String, Vec<u8>)> {
    let c = cache_arg(t);
    let mut args: Vec<&OsStr> = c.iter().map(|s| s.as_os_str()).collect();
    args.extend(extra.iter().map(os));
    args.push(img.as_os_str());
    let m = mount(&args);
    let mut names: Vec<String> =
        std::fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), std::fs::read(m.file(&n)).unwrap())).collect()
}

/// `tar -xf` then `xva-img disk-export` of one `Ref:N` directory (converting `.xxhash` members to
/// the `.checksum` members xva-img 1.4.2 understands).
fn xva_img_export(img: &Path, dir: &str, t: &Path) -> Vec<u8> {
    let ex = t.join(format!("unpacked-{}", img.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&ex).unwrap();
    sh(&format!("tar -xf {} -C {}", img.display(), ex.display()));
    let d = ex.join(dir);
    for e in std::fs::read_dir(&d).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "xxhash") {
            let chunk = p.with_extension("");
            let sum = sh(&format!("sha1sum '{}' | cut -c1-40", chunk.display()));
            std::fs::write(chunk.with_extension("checksum"), sum.trim()).unwrap();
            std::fs::remove_file(&p).unwrap();
        }
    }
    let out = t.join(format!("{dir}.xva-img.raw"));
    sh(&format!("xva-img disk-export '{}' '{}'", d.display(), out.display()));
    std::fs::read(out).unwrap()
}

fn ova_xml(disks: &[(&str, u32, u64, u32)]) -> String {
    // Reuse the realistic writer's ova.xml: (label, vdi ref, size, userdevice).
    let mut b = XvaBuilder::xapi("imported vm");
    for &(l, r, s, u) in disks {
        b.disk(l, vec![0; s as usize], r, u);
    }
    b.cd_drive(false).ova_xml()
}

crate::register!(xva_img_exports_in_every_tar_dialect_match_raw_disks_and_xva_img);
fn xva_img_exports_in_every_tar_dialect_match_raw_disks_and_xva_img() {
    need_fuse();
    need("xva-img");
    need("xxhsum");
    need("zstd");
    need("pzstd");
    need("gzip");
    let t = tmpdir();
    let p = t.path();
    let a = sparse_disk(9 * MIB, 1); // xva-img 1.4.2 drops a partial last chunk: whole MiBs only
    let b = sparse_disk(7 * MIB, 2);
    std::fs::write(p.join("a.raw"), &a).unwrap();
    std::fs::write(p.join("b.raw"), &b).unwrap();
    let src = p.join("src");
    std::fs::create_dir_all(src.join("Ref:9")).unwrap();
    std::fs::create_dir_all(src.join("Ref:12")).unwrap();
    sh(&format!(
        "cd {} && xva-img -p disk-import Ref:9 ../a.raw >/dev/null && xva-img -p disk-import Ref:12 ../b.raw >/dev/null",
        src.display()
    ));
    // Disk b gets xapi's XXH64 checksums instead of xva-img's SHA-1.
    for e in std::fs::read_dir(src.join("Ref:12")).unwrap() {
        let q = e.unwrap().path();
        if q.extension().is_some_and(|x| x == "checksum") {
            let chunk = q.with_extension("");
            let h = sh(&format!("xxhsum -H64 '{}' | cut -c1-16", chunk.display())).trim().to_uppercase();
            std::fs::write(chunk.with_extension("xxhash"), h).unwrap();
            std::fs::remove_file(&q).unwrap();
        }
    }
    let n_a = std::fs::read_dir(src.join("Ref:9")).unwrap().count() / 2;
    assert!(n_a < 10, "xva-img left out the all-zero chunks ({n_a} of 10 written)");
    std::fs::write(src.join("ova.xml"), ova_xml(&[("system", 9, a.len() as u64, 0), ("data", 12, b.len() as u64, 1)]))
        .unwrap();
    // Members in xapi's order: ova.xml, then each VDI lexicographically (Ref:12 before Ref:9).
    let list = sh(&format!("cd {} && (echo ova.xml; ls -1 Ref:12/* | sort; ls -1 Ref:9/* | sort)", src.display()));
    std::fs::write(p.join("list"), list).unwrap();
    let mut images: Vec<PathBuf> = Vec::new();
    for fmt in ["v7", "ustar", "gnu", "pax"] {
        let img = p.join(format!("{fmt}.xva"));
        sh(&format!("cd {} && tar -H {fmt} -cf {} -T ../list", src.display(), img.display()));
        images.push(img);
    }
    let plain = &images[1].clone();
    for (name, cmd) in [("gz.xva", "gzip -c"), ("zst.xva", "zstd -q -c"), ("pzst.xva", "pzstd -q -p 2 -c")] {
        let out = p.join(name);
        sh(&format!("{cmd} {} > {}", plain.display(), out.display()));
        images.push(out);
    }
    let oracle_a = xva_img_export(plain, "Ref:9", p);
    let oracle_b = xva_img_export(plain, "Ref:12", p);
    assert_same("xva-img vs raw a", &oracle_a, &a);
    assert_same("xva-img vs raw b", &oracle_b, &b);
    for img in &images {
        let disks = read_all(img, p, &[]);
        let names: Vec<&str> = disks.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(names, ["data.raw", "system.raw"], "{}", img.display());
        assert_same(&format!("{} system", img.display()), &disks[1].1, &a);
        assert_same(&format!("{} data", img.display()), &disks[0].1, &b);
    }
    // A second open reads the cached index instead of scanning again.
    let idx: Vec<PathBuf> = std::fs::read_dir(p.join("cache")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(idx.len(), images.len(), "one index per archive, nothing else in the cache: {idx:?}");
    let c = cache_arg(p);
    let o = vdiskfs([os("-v"), os("info"), c[0].as_os_str(), c[1].as_os_str(), images[4].as_os_str()]);
    assert!(o.status.success() && stderr(&o).contains("index read from"), "{}", stderr(&o));
}

/// The importer's placement, written independently of the reader: walk the chunk members in
/// order; a gap is zeros in units of the first chunk; a zero-length chunk adds nothing.
fn importer_model(members: &[(String, Vec<u8>)], dir: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut last: i64 = -1;
    let mut first_len = None;
    for (name, data) in members {
        let Some(stem) = name.strip_prefix(&format!("{dir}/")) else { continue };
        if stem.contains('.') {
            continue;
        }
        let n: i64 = stem.parse().unwrap();
        let unit = *first_len.get_or_insert(data.len());
        out.resize(out.len() + (n - last - 1) as usize * unit, 0);
        out.extend_from_slice(data);
        last = n;
    }
    out.resize(size, 0);
    out
}

/// Reads the members of a plain tar written by the test kit (ustar or V7, no extensions).
fn members_of(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at + 512 <= tar.len() && tar[at] != 0 {
        let h = &tar[at..at + 512];
        let name = String::from_utf8_lossy(&h[..100]).trim_end_matches('\0').to_string();
        let size =
            u64::from_str_radix(String::from_utf8_lossy(&h[124..135]).trim_matches(['\0', ' ']), 8).unwrap() as usize;
        out.push((name, tar[at + 512..at + 512 + size].to_vec()));
        at += 512 + size.next_multiple_of(512);
    }
    out
}

crate::register!(xapi_export_with_keepalive_chunks_reads_as_the_importer_places_it);
fn xapi_export_with_keepalive_chunks_reads_as_the_importer_places_it() {
    need_fuse();
    need("xva-img");
    let t = tmpdir();
    let p = t.path();
    let sys = sparse_disk(12 * MIB, 3);
    let data: Vec<u8> = pattern(4, (6 * MIB + 512) as usize);
    let mut b = XvaBuilder::xapi("web & db");
    b.disk("system", sys.clone(), 9, 0).disk("data", data.clone(), 12, 1);
    b.keepalive(0, 1).keepalive(0, 5).keepalive(0, 5).keepalive(1, 3);
    let img = p.join("vm.xva");
    b.build(&img).unwrap();
    let members = members_of(&b.to_bytes());
    // The archive really has keep-alives, and naming them as offsets would be wrong.
    assert!(members.iter().any(|(n, d)| n.starts_with("Ref:9/") && !n.contains('.') && d.is_empty()));
    let model_sys = importer_model(&members, "Ref:9", sys.len());
    assert_same("importer model vs source", &model_sys, &sys);
    let mut naive = vec![0u8; sys.len()];
    for (n, d) in &members {
        if let Some(s) = n.strip_prefix("Ref:9/").filter(|s| !s.contains('.')) {
            let off = s.parse::<usize>().unwrap() * MIB as usize;
            if off + d.len() <= naive.len() {
                naive[off..off + d.len()].copy_from_slice(d);
            }
        }
    }
    assert!(naive != sys, "a reader placing chunk N at N MiB must get this export wrong");
    let disks = read_all(&img, p, &[]);
    assert_eq!(disks.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["data.raw", "system.raw"]);
    assert_same("system vs source", &disks[1].1, &sys);
    assert_same("data vs source", &disks[0].1, &data);
    assert_same("system vs xva-img", &disks[1].1, &xva_img_export(&img, "Ref:9", p));
    assert_same("data vs xva-img", &disks[0].1, &xva_img_export(&img, "Ref:12", p));
    // info lists the VM, each disk in userdevice order, and the CD that is not mounted.
    let c = cache_arg(p);
    let o = vdiskfs([os("info"), c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    let sys_at = out.find("disk system.raw").expect("system listed");
    assert!(sys_at < out.find("disk data.raw").expect("data listed"), "userdevice order: {out}");
    for needle in [
        "vm:",
        "web & db",
        "Ref:9 'system'",
        "XXH64",
        "3 keep-alive",
        "debian-12.5.0-amd64-netinst.iso' (CD, not mounted)",
    ] {
        assert!(out.contains(needle), "{needle:?} in {out}");
    }
}

crate::register!(compressed_exports_read_randomly_and_sequentially_without_a_copy);
fn compressed_exports_read_randomly_and_sequentially_without_a_copy() {
    need_fuse();
    let t = tmpdir();
    let p = t.path();
    let disk = sparse_disk(40 * MIB, 5);
    let mut disk = disk;
    // More than compressed::LONG (32 MiB) of chunk data, so a single zstd frame needs the block cache.
    disk[(6 * MIB) as usize..(38 * MIB) as usize].copy_from_slice(&pattern(77, (32 * MIB) as usize));
    let mut b = XvaBuilder::xapi("vm");
    b.disk("disk0", disk.clone(), 3, 0).keepalive(0, 21);
    let gz = p.join("gz.xva");
    let zs = p.join("zs.xva");
    let zm = p.join("zm.xva");
    b.build_gzip(&gz).unwrap();
    b.build_zstd(&zs, None).unwrap();
    b.build_zstd(&zm, Some(3 << 20)).unwrap();
    let c = cache_arg(p);
    for img in [&gz, &zs, &zm] {
        let m = mount(&[c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]);
        let f = std::fs::File::open(m.file("disk0.raw")).unwrap();
        use std::os::unix::fs::FileExt;
        // Random 4 KiB reads, back and forth, then the whole disk.
        let mut x = 12345u64;
        for _ in 0..64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 20) % (disk.len() as u64 - 4096);
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, off).unwrap();
            assert_same(&format!("{} at {off:#x}", img.display()), &buf, &disk[off as usize..off as usize + 4096]);
        }
        assert_same(&img.display().to_string(), &std::fs::read(m.file("disk0.raw")).unwrap(), &disk);
    }
    let o = vdiskfs([os("info"), c[0].as_os_str(), c[1].as_os_str(), zs.as_os_str()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("block cache"), "single-frame zstd says how it is served");
    // Only the indexes are kept: no decompressed copy, no block cache file left behind.
    let left: Vec<String> = std::fs::read_dir(p.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.len() == 3 && left.iter().all(|n| n.starts_with("xva-index-")), "{left:?}");
    let total: u64 = std::fs::read_dir(p.join("cache")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(total < 4 * MIB, "indexes are small: {total}");
}

crate::register!(real_consumers_read_a_mounted_xva_disk);
fn real_consumers_read_a_mounted_xva_disk() {
    need_fuse();
    need("qemu-img");
    let Some(fs) = fs_pair(64 * MIB) else { return };
    let t = tmpdir();
    let p = t.path();
    let mut b = XvaBuilder::xapi("guest");
    b.disk("root", fs.base.clone(), 7, 0).keepalive(0, 2).keepalive(0, 40);
    let img = p.join("guest.xva");
    b.build_gzip(&img).unwrap();
    let c = cache_arg(p);
    let m = mount(&[c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]);
    let raw = m.file("root.raw");
    let q = p.join("q.raw");
    sh(&format!("qemu-img convert -f raw -O raw {} {}", raw.display(), q.display()));
    assert_same("qemu-img convert", &std::fs::read(&q).unwrap(), &fs.base);
    let d = p.join("dd.raw");
    sh(&format!("dd if={} of={} bs=1M status=none", raw.display(), d.display()));
    assert_same("dd", &std::fs::read(&d).unwrap(), &fs.base);
    let got = read_files_in_partition(&raw, fs.part, &[&fs.base_file.0]);
    assert_eq!(got[0], fs.base_file.1, "file read through loop + ext4");
}

crate::register!(corrupted_chunk_gives_eio_and_a_log_line_check_reports_it_and_no_verify_reads_it);
fn corrupted_chunk_gives_eio_and_a_log_line_check_reports_it_and_no_verify_reads_it() {
    need_fuse();
    let t = tmpdir();
    let p = t.path();
    let disk = pattern(9, (4 * MIB) as usize);
    let mut b = XvaBuilder::xapi("vm");
    b.disk("d", disk.clone(), 3, 0).checksum(Checksum::Sha1);
    let mut bytes = b.to_bytes();
    let members = members_of(&bytes);
    // Flip one byte inside chunk 2's data.
    let at = find_member(&bytes, "Ref:3/00000002") + 1000;
    bytes[at] ^= 0xff;
    assert_eq!(members.len(), 9);
    let img = p.join("bad.xva");
    std::fs::write(&img, &bytes).unwrap();
    let c = cache_arg(p);
    let m = mount(&[c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]);
    let f = std::fs::File::open(m.file("d.raw")).unwrap();
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    let e = f.read_exact_at(&mut buf, 2 * MIB + 8192).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.read_exact_at(&mut buf, 3 * MIB).unwrap();
    assert_same("chunk after the bad one", &buf, &disk[(3 * MIB) as usize..(3 * MIB + 4096) as usize]);
    assert!(
        wait_for(5, || m.log_text().contains("Ref:3/00000002") && m.log_text().contains("checksum mismatch")),
        "log: {}",
        m.log_text()
    );
    drop(m);
    let o = vdiskfs([os("check"), c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1));
    assert!(out.contains("BAD d.raw 0x200000+0x100000: Ref:3/00000002: SHA-1"), "{out}");
    assert!(out.contains("1 bad"), "{out}");
    let j = vdiskfs([os("check"), os("--json"), c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["bad"][0]["offset"], 2 * MIB);
    let disks = read_all(&img, p, &["--no-verify"]);
    let mut want = disk.clone();
    want[(2 * MIB) as usize + 1000] ^= 0xff;
    assert_same("--no-verify reads the stored bytes", &disks[0].1, &want);
}

/// Offset of a member's data in a test-kit tar.
fn find_member(tar: &[u8], name: &str) -> usize {
    let mut at = 0;
    while at + 512 <= tar.len() {
        let n = String::from_utf8_lossy(&tar[at..at + 100]).trim_end_matches('\0').to_string();
        let size = u64::from_str_radix(String::from_utf8_lossy(&tar[at + 124..at + 135]).trim_matches(['\0', ' ']), 8)
            .unwrap() as usize;
        if n == name {
            return at + 512;
        }
        at += 512 + size.next_multiple_of(512);
    }
    panic!("{name} not in the archive");
}

/// A tar of the given members, in the xapi dialect, with the end marker.
fn tar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, d) in members {
        out.extend_from_slice(&header(n, d.len() as u64, Dialect::Xapi));
        out.extend_from_slice(d);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn xx(d: &[u8]) -> Vec<u8> {
    format!("{:016X}", xxhash_rust::xxh64::xxh64(d, 0)).into_bytes()
}

/// `info` and `mount` both refuse with one line naming the archive and each needle.
fn refused(img: &Path, needles: &[&str]) {
    let t = img.parent().unwrap();
    let c = cache_arg(t);
    let o = vdiskfs([os("info"), c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]);
    assert_one_line_error(&o, &img.display().to_string(), needles);
    if fuse_ok() {
        let e = try_mount(&[c[0].as_os_str(), c[1].as_os_str(), img.as_os_str()]).expect_err("mount must fail");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(&img.display().to_string()), "{e}");
    }
}

crate::register!(bad_archives_are_refused_with_one_line_naming_archive_and_member);
fn bad_archives_are_refused_with_one_line_naming_archive_and_member() {
    let t = tmpdir();
    let p = t.path();
    let one = pattern(1, MIB as usize);
    let two = pattern(2, MIB as usize);
    let xml = ova_xml(&[("d", 3, 2 * MIB, 0)]);
    let x = xml.as_bytes();
    fn with_ova<'a>(x: &'a [u8], extra: &[(&'a str, &'a [u8])]) -> Vec<(&'a str, &'a [u8])> {
        let mut m: Vec<(&str, &[u8])> = vec![("ova.xml", x)];
        m.extend_from_slice(extra);
        m
    }
    let good = |extra: &[(&'static str, &[u8])]| tar(&with_ova(x, extra));
    let (s1, s2) = (xx(&one), xx(&two));
    let ok = good(&[
        ("Ref:3/00000000", &one),
        ("Ref:3/00000000.xxhash", &s1),
        ("Ref:3/00000001", &two),
        ("Ref:3/00000001.xxhash", &s2),
    ]);
    let write = |name: &str, b: &[u8]| {
        let f = p.join(name);
        std::fs::write(&f, b).unwrap();
        f
    };
    // Truncated tar: cut inside the last chunk.
    refused(&write("trunc.xva", &ok[..ok.len() - 1024 - 600_000]), &["Ref:3/00000001", "truncated"]);
    // Cut at a member boundary before the end marker: the disk's data stops short.
    let cut = find_member(&ok, "Ref:3/00000001") - 512;
    refused(&write("cut.xva", &ok[..cut]), &["Ref:3/00000000", "truncated"]);
    // Header checksum mismatch.
    let mut h = ok.clone();
    let at = find_member(&ok, "Ref:3/00000001") - 512;
    h[at + 101] = b'7'; // the mode field
    refused(&write("hdr.xva", &h), &["Ref:3/000000", "checksum mismatch"]);
    // ova.xml missing, and malformed.
    refused(
        &write("noova.xml.xva", &tar(&[("Ref:3/00000000", &one), ("Ref:3/00000000.xxhash", &s1)])),
        &["ova.xml", "missing", "Ref:3/00000000"],
    );
    let broken = tar(&[("ova.xml", b"<value><struct><member><name>objects</name></struct></value>")]);
    refused(&write("badova.xva", &broken), &["ova.xml", "malformed"]);
    // A virtual_size over the bound (the whole-disk scans and map would follow it).
    let huge_xml = xml.replace(&(2 * MIB).to_string(), &(65u64 << 40).to_string());
    assert_ne!(huge_xml, xml);
    let huge = tar(&[("ova.xml", huge_xml.as_bytes()), ("Ref:3/00000000", &one), ("Ref:3/00000000.xxhash", &s1)]);
    refused(&write("huge.xva", &huge), &["ova.xml", "virtual_size 0x410000000000", "over the 64 TiB"]);
    // A chunk outside its VDI's directory.
    refused(
        &write(
            "outside.xva",
            &good(&[
                ("Ref:3/00000000", &one),
                ("Ref:3/00000000.xxhash", &s1),
                ("Ref:30/00000001", &two),
                ("Ref:30/00000001.xxhash", &s2),
            ]),
        ),
        &["Ref:30/00000001", "outside"],
    );
    // Chunk numbers going backwards.
    refused(
        &write(
            "back.xva",
            &good(&[
                ("Ref:3/00000001", &two),
                ("Ref:3/00000001.xxhash", &s2),
                ("Ref:3/00000000", &one),
                ("Ref:3/00000000.xxhash", &s1),
            ]),
        ),
        &["Ref:3/00000000", "backwards"],
    );
    // A chunk longer than the chunk size.
    let big = pattern(3, (MIB + 4096) as usize);
    let sb = xx(&big);
    let xml3 = ova_xml(&[("d", 3, 3 * MIB, 0)]);
    refused(
        &write(
            "long.xva",
            &tar(&[
                ("ova.xml", xml3.as_bytes()),
                ("Ref:3/00000000", &one),
                ("Ref:3/00000000.xxhash", &s1),
                ("Ref:3/00000001", &big),
                ("Ref:3/00000001.xxhash", &sb),
            ]),
        ),
        &["Ref:3/00000001", "longer than the chunk size"],
    );
    // A checksum file missing, and garbage.
    refused(
        &write(
            "nosum.xva",
            &good(&[("Ref:3/00000000", &one), ("Ref:3/00000001", &two), ("Ref:3/00000001.xxhash", &s2)]),
        ),
        &["Ref:3/00000000", "no checksum"],
    );
    refused(
        &write(
            "garbage.xva",
            &good(&[
                ("Ref:3/00000000", &one),
                ("Ref:3/00000000.xxhash", b"not-a-hash!!!!!!"),
                ("Ref:3/00000001", &two),
                ("Ref:3/00000001.xxhash", &s2),
            ]),
        ),
        &["Ref:3/00000000.xxhash", "16 hex"],
    );
    // Compressed streams that end early.
    let mut b = XvaBuilder::xapi("vm");
    b.disk("d", pattern(5, (3 * MIB) as usize), 3, 0);
    let gz = p.join("full.gz.xva");
    b.build_gzip(&gz).unwrap();
    let g = std::fs::read(&gz).unwrap();
    refused(&write("cut.gz.xva", &g[..g.len() * 2 / 3]), &["gzip stream ends early", "Ref:3/0000000"]);
    let zs = p.join("full.zst.xva");
    b.build_zstd(&zs, None).unwrap();
    let z = std::fs::read(&zs).unwrap();
    refused(&write("cut.zst.xva", &z[..z.len() * 2 / 3]), &["zstd stream ends early", "Ref:3/0000000"]);
    // The old pre-tar layout, and things that are not XVAs at all.
    let old = tar(&[("ova.xml", b"<?xml version=\"1.0\"?><appliance version=\"0.1\"><vm name=\"x\"/></appliance>")]);
    refused(&write("old.xva", &old), &["ova.xml", "appliance", "pre-tar"]);
    refused(
        &write("ova-only.xva", b"<?xml version=\"1.0\"?>\n<appliance version=\"0.1\">\n</appliance>\n"),
        &["pre-tar"],
    );
    refused(&write("random.xva", &pattern(8, 4096)), &["not an XVA"]);
}

crate::register!(v7_sha1_export_without_zero_omission_and_an_end_marker_less_tar_reads_back);
fn v7_sha1_export_without_zero_omission_and_an_end_marker_less_tar_reads_back() {
    need_fuse();
    let t = tmpdir();
    let p = t.path();
    let d = sparse_disk(3 * MIB + 512, 6);
    let mut b = XvaBuilder::xapi("vm");
    b.disk("only", d.clone(), 4, 0)
        .dialect(Dialect::V7)
        .checksum(Checksum::Sha1)
        .omit_zero_chunks(false)
        .end_marker(false)
        .cd_drive(false);
    let img = p.join("v7.xva");
    b.build(&img).unwrap();
    let disks = read_all(&img, p, &[]);
    assert_same("v7 sha1", &disks[0].1, &d);
}
