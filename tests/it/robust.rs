//! Damaged images never panic or hang: valid images of every format are corrupted at random
//! (bytes overwritten, files truncated), and the number fields of their headers and tables are
//! set to extreme values (0, 2^32 - 1, 2^63, u64::MAX, ...) with the checksums that guard them
//! made right again, so that the values reach the arithmetic behind the checks. Each is then
//! opened and read through the library. Errors are the expected outcome; a panic or a hang fails
//! the test. `.ci/run` also runs this in the `robust` profile, where arithmetic that wraps
//! panics (`overflow-checks`).

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use testkit::{pattern, vhd, vhdx, vmdk, xva};
use vdiskfs::open::{OpenOptions, open_images};
use vdiskfs::progress::Silent;
use vdiskfs::source::Location;

const MIB: u64 = 1 << 20;

/// One sample: its files (name, bytes), the file to open, and the number fields of its headers.
struct Sample {
    files: Vec<(String, Vec<u8>)>,
    open: String,
    fields: Vec<Field>,
}

/// A number in a file of a sample: file index, byte offset, width (4 or 8), big-endian.
#[derive(Debug, Clone, Copy)]
struct Field {
    file: usize,
    at: usize,
    width: usize,
    big: bool,
}

fn build(dir: &Path, f: impl FnOnce(&Path) -> String) -> Sample {
    let open = f(dir);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    let fields = files.iter().enumerate().flat_map(|(i, (name, b))| fields_of(i, name, b)).collect();
    Sample { files, open, fields }
}

fn u64_at(b: &[u8], at: usize, big: bool) -> u64 {
    let a: [u8; 8] = b[at..at + 8].try_into().unwrap();
    if big { u64::from_be_bytes(a) } else { u64::from_le_bytes(a) }
}

/// The header and table fields of one file, found from its own bytes.
fn fields_of(file: usize, name: &str, b: &[u8]) -> Vec<Field> {
    let f = |at: usize, width: usize, big: bool| Field { file, at, width, big };
    let mut out = Vec::new();
    if name.ends_with(".vhd") {
        let n = b.len();
        for foot in [0, n - 512] {
            out.extend([f(foot + 16, 8, true), f(foot + 40, 8, true), f(foot + 48, 8, true)]);
        }
        let h = u64_at(b, n - 512 + 16, true) as usize;
        if h + 1024 <= n {
            out.extend([f(h + 16, 8, true), f(h + 28, 4, true), f(h + 32, 4, true)]);
            for l in 0..8 {
                let e = h + 576 + 24 * l;
                out.extend([f(e + 4, 4, true), f(e + 8, 4, true), f(e + 16, 8, true)]);
            }
        }
    } else if name.ends_with(".vhdx") {
        for h in [64 << 10, 128 << 10] {
            out.extend([f(h + 8, 8, false), f(h + 68, 4, false), f(h + 72, 8, false)]);
        }
        let rt = 192 << 10;
        out.push(f(rt + 8, 4, false));
        for e in 0..2 {
            out.extend([f(rt + 16 + 32 * e + 16, 8, false), f(rt + 16 + 32 * e + 24, 4, false)]);
        }
        for e in 0..2 {
            let off = u64_at(b, rt + 16 + 32 * e + 16, false) as usize;
            out.extend((0..4).map(|k| f(off + 8 * k, 8, false))); // BAT entries
            out.extend((0..5).flat_map(|k| [f(off + 32 + 32 * k + 16, 4, false), f(off + 32 + 32 * k + 20, 4, false)]));
        }
    } else if b.starts_with(b"KDMV") {
        for h in [0, b.len() - 1024] {
            out.extend([12, 20, 28, 36, 48, 56, 64].map(|at| f(h + at, 8, false)));
            out.push(f(h + 44, 4, false));
        }
    } else if b.starts_with(&0xcafe_babeu64.to_le_bytes()) {
        out.extend((2..26).map(|q| f(8 * q, 8, false)));
        for region in [16, 18] {
            let at = (u64_at(b, 8 * region, false) * 512) as usize;
            out.extend((0..4).map(|k| f(at + 8 * k, 8, false)));
        }
    }
    out.retain(|x| x.at + x.width <= b.len());
    out
}

/// Values that reach past every check a careless parser might make.
const EXTREMES: [u64; 12] = [
    0,
    1,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 54,
    1 << 63,
    u64::MAX / 512,
    u64::MAX / 512 + 1,
    u64::MAX - 511,
    u64::MAX,
];

fn put_field(b: &mut [u8], x: &Field, v: u64) {
    let bytes = match (x.width, x.big) {
        (4, true) => (v as u32).to_be_bytes().to_vec(),
        (4, false) => (v as u32).to_le_bytes().to_vec(),
        (_, true) => v.to_be_bytes().to_vec(),
        (_, false) => v.to_le_bytes().to_vec(),
    };
    b[x.at..x.at + x.width].copy_from_slice(&bytes);
}

/// Makes the checksums that guard the damaged fields right again (VHD footers and dynamic
/// header, VHDX headers and region tables), so the values get past them.
fn fix_checksums(name: &str, b: &mut [u8]) {
    let vhd_sum = |b: &mut [u8], at: usize, len: usize, field: usize| {
        b[at + field..at + field + 4].fill(0);
        let s = !b[at..at + len].iter().fold(0u32, |s, &x| s.wrapping_add(x as u32));
        b[at + field..at + field + 4].copy_from_slice(&s.to_be_bytes());
    };
    let crc = |b: &mut [u8], at: usize, len: usize| {
        if b.len() >= at + len {
            b[at + 4..at + 8].fill(0);
            let c = crc32c::crc32c(&b[at..at + len]);
            b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
        }
    };
    let n = b.len();
    if name.ends_with(".vhd") && n >= 1024 {
        let h = u64_at(b, n - 512 + 16, true);
        for foot in [0, n - 512] {
            vhd_sum(b, foot, 512, 64);
        }
        if let Some(h) = usize::try_from(h).ok().filter(|&h| h.checked_add(1024).is_some_and(|e| e <= n)) {
            vhd_sum(b, h, 1024, 36);
        }
    } else if name.ends_with(".vhdx") {
        for h in [64 << 10, 128 << 10] {
            crc(b, h, 4096);
        }
        for r in [192 << 10, 256 << 10] {
            crc(b, r, 64 << 10);
        }
    }
}

fn samples() -> &'static Vec<Sample> {
    static S: OnceLock<Vec<Sample>> = OnceLock::new();
    S.get_or_init(|| {
        let mut out = Vec::new();
        let data = |seed| pattern(seed, MIB as usize);
        let t = tempfile::tempdir().unwrap();
        let d = |n: &str| {
            let p = t.path().join(n);
            std::fs::create_dir(&p).unwrap();
            p
        };
        out.push(build(&d("vhd"), |dir| {
            let base = dir.join("base.vhd");
            let mut b = vhd::VhdBuilder::dynamic(6 * MIB).dialect(vhd::Dialect::Xen);
            b.write(MIB, &data(1));
            b.build(&base).unwrap();
            let mut c = vhd::VhdBuilder::differencing(&base).unwrap().dialect(vhd::Dialect::Xen);
            c.write(MIB + 4096, &pattern(2, 8192));
            c.build(&dir.join("top.vhd")).unwrap();
            "top.vhd".into()
        }));
        out.push(build(&d("vhdx"), |dir| {
            let mut b = vhdx::VhdxBuilder::dynamic(6 * MIB);
            b.write(2 * MIB, &data(3));
            b.build(&dir.join("d.vhdx")).unwrap();
            "d.vhdx".into()
        }));
        out.push(build(&d("stream"), |dir| {
            let mut raw = vec![0u8; (4 * MIB) as usize];
            raw[MIB as usize..(2 * MIB) as usize].copy_from_slice(&data(4));
            vmdk::StreamBuilder::from_raw(&raw).build(&dir.join("s.vmdk")).unwrap();
            "s.vmdk".into()
        }));
        out.push(build(&d("sesparse"), |dir| {
            let (flat, _) = vmdk::write_flat(dir, "base", &vec![7u8; (4 * MIB) as usize], "vmfs").unwrap();
            let mut s = vmdk::DeltaBuilder::sesparse(&flat).unwrap();
            s.write(MIB, &pattern(5, 65536));
            let p = s.build(dir, "base-000001").unwrap();
            p.file_name().unwrap().to_string_lossy().into_owned()
        }));
        out.push(build(&d("xva"), |dir| {
            let mut x = xva::XvaBuilder::xapi("vm");
            let mut disk = vec![0u8; (3 * MIB) as usize];
            disk[..MIB as usize].copy_from_slice(&data(6));
            x.disk("root", disk, 3, 0);
            let plain = x.to_bytes();
            std::fs::write(dir.join("vm.xva"), &plain).unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &plain).unwrap();
            std::fs::write(dir.join("vm-gz.xva"), gz.finish().unwrap()).unwrap();
            "vm.xva".into()
        }));
        out
    })
}

#[derive(Debug, Clone)]
struct Damage {
    sample: usize,
    file: usize,
    writes: Vec<(u32, u8, bool)>,
    truncate: Option<u32>,
    open_gz: bool,
    /// (field index, value index in EXTREMES or any value) set in header fields.
    fields: Vec<(usize, Result<usize, u64>)>,
    fix_sums: bool,
}

fn damage() -> impl Strategy<Value = Damage> {
    let value = prop_oneof![3 => (0..EXTREMES.len()).prop_map(Ok), 1 => any::<u64>().prop_map(Err)];
    (
        0..5usize,
        0..4usize,
        prop::collection::vec((any::<u32>(), any::<u8>(), any::<bool>()), 0..8),
        prop::option::weighted(0.2, any::<u32>()),
        any::<bool>(),
        prop::collection::vec((any::<usize>(), value), 0..4),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(sample, file, writes, truncate, open_gz, fields, fix_sums)| Damage {
            sample,
            file,
            writes,
            truncate,
            open_gz,
            fields,
            fix_sums,
        })
}

/// Opens and reads every disk of the damaged image; any error is fine, a panic is not. A damaged
/// size can claim terabytes: the reads cover the first 8 MiB, the last MiB and 16 places between.
fn exercise(dir: &Path, open: &str) {
    let Ok(disks) = open_images(&[Location::local(dir.join(open))], &OpenOptions::default(), &Silent) else { return };
    for disk in disks {
        let chain = disk.chain();
        let _ = chain.describe();
        let _ = chain.allocated_bytes();
        let size = chain.size();
        let mut buf = vec![0u8; 256 << 10];
        let spread = (0..16).map(|k| size / 16 * k + 4096 * k);
        let starts = (0..32).map(|k| k * (256 << 10)).chain(spread).chain([size.saturating_sub(MIB)]);
        for off in starts.filter(|&o| o < size) {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = chain.read(off, &mut buf[..n]);
        }
        let _ = chain.next_data(0);
        let _ = chain.next_data(size / 2);
    }
}

crate::register!(damaged_images_of_every_format_never_panic);
fn damaged_images_of_every_format_never_panic() {
    // ROBUST_CASES=N runs a longer search (the default keeps the suite quick).
    let cases = std::env::var("ROBUST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let config = ProptestConfig { cases, max_shrink_iters: 200, ..ProptestConfig::default() };
    proptest!(config, |(d in damage())| {
        let s = &samples()[d.sample];
        let t = tempfile::tempdir().unwrap();
        let victim = d.file % s.files.len();
        for (k, (name, bytes)) in s.files.iter().enumerate() {
            let mut b = bytes.clone();
            if !s.fields.is_empty() {
                for &(i, v) in &d.fields {
                    let x = s.fields[i % s.fields.len()];
                    if x.file == k {
                        put_field(&mut b, &x, v.map_or_else(|v| v, |i| EXTREMES[i]));
                    }
                }
                if d.fix_sums {
                    fix_checksums(name, &mut b);
                }
            }
            if k == victim {
                for &(pos, val, head) in &d.writes {
                    // Half the damage lands in the first 64 KiB, where headers and tables live.
                    let range = if head { b.len().min(65536) } else { b.len() };
                    if range > 0 {
                        b[pos as usize % range] = val;
                    }
                }
                if let Some(n) = d.truncate {
                    let keep = n as usize % (b.len() + 1);
                    b.truncate(keep);
                }
            }
            std::fs::write(t.path().join(name), b).unwrap();
        }
        let open = if d.sample == 4 && d.open_gz { "vm-gz.xva" } else { s.open.as_str() };
        exercise(t.path(), open);
    });
}
