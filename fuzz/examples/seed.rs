//! Writes seed inputs for every fuzz target into `corpus/<target>/seed-*`, from the real images in
//! `tests/data/` (decompressed with `xz`) and from images the test kit writes. Run from `fuzz/`:
//! `cargo run --release --example seed`, then fuzz, then minimize (`cargo fuzz cmin`).

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{pattern, vhd, vhdx, vmdk, xva};
use vdiskfs::formats::vhd::{DynHeader, Footer};
use vdiskfs::formats::vhdx::header;
use vdiskfs::formats::xva::tar::{self, Input};
use vdiskfs::source::MemSource;
use vdiskfs_fuzz::{DIFFERENCING, FIX_CHECKSUM, TARGETS, check_templates, encode_sparse};

const MIB: u64 = 1 << 20;
/// Larger seeds are left out: the corpora stay small, and the fuzzers run with smaller `-max_len`.
const MAX_SEED: usize = 256 << 10;

struct Seeds {
    dir: PathBuf,
    count: usize,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        assert!(TARGETS.iter().any(|(t, _)| *t == target), "no target {target}");
        let d = self.dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        // Trailing zeros add nothing: every entry pads with zeros.
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if end > MAX_SEED {
            println!("left out {target}/{name}: {end} bytes");
            return;
        }
        std::fs::write(d.join(format!("seed-{name}")), &bytes[..end.max(1)]).unwrap();
        self.count += 1;
    }

    /// `[control][structure]`, with and without the checksum fixed.
    fn structure(&mut self, target: &str, name: &str, control: u8, bytes: &[u8]) {
        for c in [control, control | FIX_CHECKSUM] {
            let mut v = vec![c];
            v.extend_from_slice(bytes);
            self.put(target, &format!("{name}-{c}"), &v);
        }
    }
}

fn tests_data(name: &str) -> Vec<u8> {
    let p = Path::new("../tests/data").join(name);
    if let Some(_stem) = name.strip_suffix(".hex") {
        return decode_hexdump(&std::fs::read_to_string(&p).unwrap());
    }
    let out = Command::new("xz").arg("-dc").arg(&p).output().expect("xz");
    assert!(out.status.success(), "xz -dc {}", p.display());
    out.stdout
}

/// `hexdump -C` text: `*` repeats the previous line up to the next offset.
fn decode_hexdump(text: &str) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    let mut last: Vec<u8> = Vec::new();
    let mut pending_repeat = false;
    for line in text.lines() {
        let line = line.trim_end();
        if line == "*" {
            pending_repeat = true;
            continue;
        }
        let Some(off) = line.get(..8).and_then(|o| usize::from_str_radix(o, 16).ok()) else { continue };
        if pending_repeat {
            while out.len() < off {
                out.extend_from_slice(&last);
            }
            out.truncate(off);
            pending_repeat = false;
        }
        let hex: Vec<u8> = line[8..]
            .split("|")
            .next()
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|h| u8::from_str_radix(h, 16).ok())
            .collect();
        out.extend_from_slice(&hex);
        if !hex.is_empty() {
            last = hex;
        }
    }
    out
}

fn vhd_seeds(s: &mut Seeds, name: &str, f: &[u8]) {
    s.put("image", name, &encode_sparse(f));
    if f.len() < 512 {
        return;
    }
    let foot = &f[f.len() - 512..];
    let diff = Footer::parse(foot).is_ok_and(|x| x.disk_type == 4);
    let c = if diff { DIFFERENCING } else { 0 };
    s.structure("vhd_footer", name, c, foot);
    let Ok(ft) = Footer::parse(foot) else { return };
    let at = ft.data_offset as usize;
    let Some(h) = f.get(at..at + 1024) else { return };
    s.structure("vhd_header", name, c, h);
    let Ok(dh) = DynHeader::parse(h) else { return };
    // [control][block size][size: u32][entries: u16][BAT…][data…], data being what follows
    // the BAT in the real file (its sector numbers are the real file's: close enough to start).
    let exp = (dh.block_size as u64 / 512).trailing_zeros() as u8;
    let entries = dh.max_table_entries.min(u16::MAX as u32) as u16;
    let mut v = vec![c, exp];
    v.extend_from_slice(&((ft.current_size / 512) as u32).to_le_bytes());
    v.extend_from_slice(&entries.to_le_bytes());
    let bat = dh.table_offset as usize;
    let bat_end = (bat + 4 * entries as usize).min(f.len());
    v.extend_from_slice(&f[bat.min(bat_end)..bat_end]);
    v.extend_from_slice(&f[bat_end..(bat_end + (32 << 10)).min(f.len() - 512)]);
    s.put("vhd_bat", name, &v);
}

fn vhdx_seeds(s: &mut Seeds, name: &str, f: &[u8], differencing: bool) {
    s.put("image", name, &encode_sparse(f));
    let c = if differencing { DIFFERENCING } else { 0 };
    for (i, at) in header::HEADER_OFFSETS.into_iter().enumerate() {
        let h = &f[at as usize..at as usize + header::HEADER_SIZE];
        s.structure("vhdx_header", &format!("{name}-{i}"), c | if i == 1 { 4 } else { 0 }, h);
    }
    let rt = &f[header::REGION_OFFSETS[0] as usize..][..header::REGION_SIZE];
    s.structure("vhdx_regions", name, c, rt);
    s.structure("vhdx_regions", &format!("{name}-both"), c | 4, rt);
    let regions = header::parse_regions(rt).expect("a test kit region table");
    let meta = regions.iter().find(|r| r.guid == vdiskfs::formats::vhdx::METADATA_REGION).unwrap();
    let m = &f[meta.offset as usize..][..meta.length as usize];
    s.structure("vhdx_metadata", name, c, &m[..m.len().min(128 << 10)]);
    let cur = header::VhdxHeader::parse(&f[header::HEADER_OFFSETS[1] as usize..][..header::HEADER_SIZE])
        .expect("a test kit header");
    if cur.has_log() {
        let log = &f[cur.log_offset as usize..][..cur.log_length as usize];
        s.structure("vhdx_log", name, c, log);
    }
    // [control][block size][sector][size: u32][file MiB][entries: u16][BAT…][data…]: the test
    // kit's layout is the template's (BAT at 3 MiB, blocks from 4 MiB).
    let bat = regions.iter().find(|r| r.guid == vdiskfs::formats::vhdx::BAT_REGION).unwrap();
    let entries = (bat.length as usize / 8).min(8192);
    let b = &f[bat.offset as usize..][..8 * entries];
    let used = b.chunks(8).rposition(|e| e != [0; 8]).map_or(1, |i| i + 1);
    let mut v = vec![c, 0, 0];
    v.extend_from_slice(&((8 * MIB / 512) as u32).to_le_bytes());
    v.push(((f.len() as u64 - 4 * MIB).div_ceil(MIB)).min(15) as u8);
    v.extend_from_slice(&(used as u16).to_le_bytes());
    v.extend_from_slice(&b[..8 * used]);
    v.extend_from_slice(&f[4 * MIB as usize..(4 * MIB as usize + 4096).min(f.len())]);
    s.put("vhdx_bat", name, &v);
}

fn xva_seeds(s: &mut Seeds, name: &str, x: &xva::XvaBuilder, dir: &Path) {
    let plain = x.to_bytes();
    s.put("image", name, &encode_sparse(&plain));
    s.put("xva_tar", name, &encode_sparse(&plain));
    let src = MemSource::new("x.xva", plain.clone());
    let mut xml = None;
    let mut push = |m: tar::Member| {
        if m.name == "ova.xml" {
            xml = m.content;
        }
        Ok(())
    };
    tar::walk(Input::File(&src), &|n, size| n == "ova.xml" || size <= 128, &mut push, &|_| {}).unwrap();
    s.put("xva_ovaxml", name, &xml.expect("ova.xml"));
    let gz = dir.join(format!("{name}.gz"));
    x.build_gzip(&gz).unwrap();
    let gz = std::fs::read(&gz).unwrap();
    s.put("xva_gzip", name, &gz);
    s.put("image", &format!("{name}-gz"), &gz);
    let mut two = gz.clone();
    two.extend_from_slice(&gz);
    s.put("xva_gzip", &format!("{name}-two-members"), &two);
    for (frame, tag) in [(None, "zst"), (Some(16 << 10), "zst-frames")] {
        let p = dir.join(format!("{name}.{tag}"));
        x.build_zstd(&p, frame).unwrap();
        let z = std::fs::read(&p).unwrap();
        s.put("xva_zstd", &format!("{name}-{tag}"), &z);
        s.put("image", &format!("{name}-{tag}"), &z);
    }
}

fn main() {
    check_templates();
    let mut s = Seeds { dir: PathBuf::from("corpus"), count: 0 };
    let t = std::env::temp_dir().join(format!("vdiskfs-seed-{}", std::process::id()));
    std::fs::create_dir_all(&t).unwrap();
    let dir = t.as_path();

    // Real images from other writers.
    for name in ["img-1x1-512-gpt.vhd.hex", "img-1x1-512-gpt.vhdf.hex", "dfvfs_ext2.vhd.xz", "plaso_image.vhd.xz"] {
        vhd_seeds(&mut s, name, &tests_data(name));
    }
    for name in ["dfvfs_image.vhd.xz", "dfvfs_image-differential.vhd.xz", "dfvfs_fat-differential.vhd.xz"] {
        vhd_seeds(&mut s, name, &tests_data(name));
    }
    let mkimg = tests_data("img-1x1-512-gpt.vhdx.hex");
    s.put("image", "img-1x1-512-gpt.vhdx", &encode_sparse(&mkimg));
    for name in ["dfvfs_ext2.vmdk.xz", "plaso_image.vmdk.xz"] {
        let f = tests_data(name);
        s.put("vmdk_sparse", name, &encode_sparse(&f));
        s.put("image", name, &encode_sparse(&f));
        embedded_descriptor(&mut s, name, &f);
    }
    for name in ["cot_blank.vmdk.xz", "cot_input.vmdk.xz", "cot_ubuntu.2.0-disk1.vmdk.xz"] {
        let f = tests_data(name);
        s.put("vmdk_stream", name, &encode_sparse(&f));
        s.put("image", name, &encode_sparse(&f));
        embedded_descriptor(&mut s, name, &f);
    }

    // The test kit's VHDs.
    for (name, dialect) in [("win", vhd::Dialect::Windows), ("xen", vhd::Dialect::Xen)] {
        let base = dir.join(format!("{name}-base.vhd"));
        let mut b = vhd::VhdBuilder::dynamic(4 * MIB).dialect(dialect).block_size(64 << 10);
        b.write(MIB, &pattern(1, 8192)).write(3 * MIB + 512, &pattern(2, 512));
        b.build(&base).unwrap();
        vhd_seeds(&mut s, &format!("{name}-dynamic.vhd"), &std::fs::read(&base).unwrap());
        let top = dir.join(format!("{name}-top.vhd"));
        let mut c = vhd::VhdBuilder::differencing(&base).unwrap().dialect(dialect).block_size(64 << 10);
        c.write(MIB + 4096, &pattern(3, 1024));
        c.build(&top).unwrap();
        vhd_seeds(&mut s, &format!("{name}-differencing.vhd"), &std::fs::read(&top).unwrap());
    }
    let fixed = dir.join("fixed.vhd");
    vhd::VhdBuilder::fixed(64 << 10).build(&fixed).unwrap();
    vhd_seeds(&mut s, "fixed.vhd", &std::fs::read(&fixed).unwrap());

    // The test kit's VHDXs: dynamic, 4 KiB sectors, differencing, pending logs.
    let base = dir.join("base.vhdx");
    let mut b = vhdx::VhdxBuilder::dynamic(8 * MIB).block_size(MIB);
    b.write(MIB, &pattern(4, 4096)).zero_block(3).undefined_block(5);
    b.build(&base).unwrap();
    vhdx_seeds(&mut s, "dynamic.vhdx", &std::fs::read(&base).unwrap(), false);
    let p = dir.join("4k.vhdx");
    let mut b4 = vhdx::VhdxBuilder::dynamic(8 * MIB).block_size(MIB).logical_sector(4096);
    b4.write(0, &pattern(5, 4096));
    b4.build(&p).unwrap();
    vhdx_seeds(&mut s, "4k.vhdx", &std::fs::read(&p).unwrap(), false);
    let p = dir.join("top.avhdx");
    let mut c = vhdx::VhdxBuilder::differencing(&base).unwrap().block_size(MIB);
    c.write(2 * MIB + 512, &pattern(6, 1024)).write(5 * MIB, &pattern(7, 512));
    c.build(&p).unwrap();
    vhdx_seeds(&mut s, "differencing.avhdx", &std::fs::read(&p).unwrap(), true);
    let plans = [
        ("log", vhdx::LogPlan { stale_blocks: vec![1], entries: 1, ..Default::default() }),
        (
            "log-wrapped",
            vhdx::LogPlan {
                stale_blocks: vec![1],
                entries: 3,
                start: MIB - 8192,
                older_sequence: true,
                ..Default::default()
            },
        ),
        ("log-garbage-bat", vhdx::LogPlan { garbage_bat: true, entries: 2, torn_head: true, ..Default::default() }),
        ("log-size", vhdx::LogPlan { old_virtual_size: Some(4 * MIB), entries: 1, ..Default::default() }),
    ];
    for (name, plan) in plans {
        let p = dir.join(format!("{name}.vhdx"));
        let mut b = vhdx::VhdxBuilder::dynamic(8 * MIB).block_size(MIB).pending_log(plan);
        b.write(MIB, &pattern(8, 4096));
        b.build(&p).unwrap();
        vhdx_seeds(&mut s, &format!("{name}.vhdx"), &std::fs::read(&p).unwrap(), false);
    }

    // The test kit's VMDKs: stream-optimized, SESparse and COWD deltas over a flat base.
    let mut raw = vec![0u8; 4 * MIB as usize];
    raw[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(9, 4096));
    raw[4 * MIB as usize - 100..].fill(0x5a);
    let p = dir.join("stream.vmdk");
    vmdk::StreamBuilder::from_raw(&raw).build(&p).unwrap();
    let f = std::fs::read(&p).unwrap();
    s.put("vmdk_stream", "stream.vmdk", &encode_sparse(&f));
    s.put("image", "stream.vmdk", &encode_sparse(&f));
    let (flat, _) = vmdk::write_flat(dir, "base", &vec![0u8; MIB as usize], "vmfs").unwrap();
    s.put("vmdk_descriptor", "flat.vmdk", &std::fs::read(&flat).unwrap());
    let mut se = vmdk::DeltaBuilder::sesparse(&flat).unwrap();
    se.write(65536, &pattern(10, 8192)).zero(0, 4096).unmap(8192, 4096);
    let d = se.build(dir, "base-000001").unwrap();
    s.put("vmdk_descriptor", "sesparse.vmdk", &std::fs::read(&d).unwrap());
    let e = std::fs::read(dir.join("base-000001-sesparse.vmdk")).unwrap();
    s.put("vmdk_sesparse", "sesparse", &encode_sparse(&e));
    let mut co = vmdk::DeltaBuilder::cowd(&flat).unwrap();
    co.write(4096, &pattern(11, 1024));
    let d = co.build(dir, "base-000002").unwrap();
    s.put("vmdk_descriptor", "cowd.vmdk", &std::fs::read(&d).unwrap());
    let e = std::fs::read(dir.join("base-000002-delta.vmdk")).unwrap();
    s.put("vmdk_cowd", "cowd", &encode_sparse(&e));
    let mut co = vmdk::DeltaBuilder::cowd(&flat).unwrap().grain_sectors(8);
    co.write(8192, &pattern(12, 4096));
    co.build(dir, "base-000003").unwrap();
    let e = std::fs::read(dir.join("base-000003-delta.vmdk")).unwrap();
    s.put("vmdk_cowd", "cowd-grain8", &encode_sparse(&e));
    s.put(
        "vmdk_descriptor",
        "zero-extents.vmdk",
        b"# Disk DescriptorFile\nversion=1\nCID=0000abcd\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
          RW 2048 ZERO\nRDONLY 100 ZERO\n\nddb.adapterType = \"lsilogic\"\n",
    );

    // The test kit's XVAs: small chunks so that the compressed streams stay small.
    let mut x = xva::XvaBuilder::xapi("vm");
    let mut disk = vec![0u8; 256 << 10];
    disk[..4096].copy_from_slice(&pattern(13, 4096));
    x.disk("root", disk, 3, 0).chunk_size(64 << 10);
    xva_seeds(&mut s, "xapi", &x, dir);
    let mut y = xva::XvaBuilder::xapi("vm2");
    y.disk("a", vec![0x11; 128 << 10], 5, 0)
        .disk("b", vec![0; 64 << 10], 7, 1)
        .chunk_size(32 << 10)
        .checksum(xva::Checksum::Sha1)
        .omit_zero_chunks(false)
        .keepalive(0, 2)
        .end_marker(false);
    xva_seeds(&mut s, "sha1-keepalive", &y, dir);

    // Each structure target gets its template as is, too.
    for (target, c) in [("vhd_footer", 0u8), ("vhd_header", 0), ("vhdx_header", 0), ("vhdx_regions", 0)] {
        s.put(target, "empty", &[c]);
    }
    std::fs::remove_dir_all(&t).unwrap();
    println!("wrote {} seeds", s.count);
}

fn embedded_descriptor(s: &mut Seeds, name: &str, f: &[u8]) {
    if let Ok(h) = vdiskfs::formats::vmdk::hosted::Header::parse(f) {
        let at = (h.desc_offset * 512) as usize;
        if let Some(d) = f.get(at..at + (h.desc_size * 512) as usize) {
            s.put("vmdk_descriptor", name, d);
        }
    }
}
