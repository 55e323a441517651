//! Damaged images never panic or hang: valid images of every format are corrupted at random
//! (bytes overwritten, files truncated), then opened and read in full through the library.
//! Errors are the expected outcome; a panic or a hang fails the test.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use testkit::{pattern, vhd, vhdx, vmdk, xva};
use vdiskfs::open::{OpenOptions, open_images};
use vdiskfs::progress::Silent;
use vdiskfs::source::Location;

const MIB: u64 = 1 << 20;

/// One sample: its files (name, bytes) and the file to open.
struct Sample {
    files: Vec<(String, Vec<u8>)>,
    open: String,
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
    Sample { files, open }
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
}

fn damage() -> impl Strategy<Value = Damage> {
    (
        0..5usize,
        0..4usize,
        prop::collection::vec((any::<u32>(), any::<u8>(), any::<bool>()), 1..8),
        prop::option::weighted(0.25, any::<u32>()),
        any::<bool>(),
    )
        .prop_map(|(sample, file, writes, truncate, open_gz)| Damage { sample, file, writes, truncate, open_gz })
}

/// Opens and reads every disk of the damaged image; any error is fine, a panic is not.
fn exercise(dir: &Path, open: &str) {
    let Ok(disks) = open_images(&[Location::local(dir.join(open))], &OpenOptions::default(), &Silent) else { return };
    for disk in disks {
        let chain = disk.chain();
        let _ = chain.describe();
        let _ = chain.allocated_bytes();
        let mut buf = vec![0u8; 256 << 10];
        let mut off = 0;
        while off < chain.size() {
            let n = (chain.size() - off).min(buf.len() as u64) as usize;
            let _ = chain.read(off, &mut buf[..n]);
            off += n as u64;
        }
        let _ = chain.next_data(0);
    }
}

crate::register!(damaged_images_of_every_format_never_panic);
fn damaged_images_of_every_format_never_panic() {
    let config = ProptestConfig { cases: 300, max_shrink_iters: 200, ..ProptestConfig::default() };
    proptest!(config, |(d in damage())| {
        let s = &samples()[d.sample];
        let t = tempfile::tempdir().unwrap();
        let victim = d.file % s.files.len();
        for (k, (name, bytes)) in s.files.iter().enumerate() {
            let mut b = bytes.clone();
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
