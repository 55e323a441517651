//! A failing disk under the images: reads that fail, come back short, are slow, or stop where a
//! file was cut. A failing read is EIO at the reader and a log line naming the file and the
//! offset; never zeros, never a hang; other ranges still read and the mount stays up.
//!
//! Two levels: the library, every format over a [`FaultySource`]; and real FUSE, a VHD chain
//! served by the test kit's fault-injecting file system ([`FaultFs`]) with vdiskfs mounted on it.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::faultfs::{FaultFs, Rule};
use testkit::vhd::{Dialect, VhdBuilder};
use testkit::{vhdx, vmdk, xva};
use vdiskfs::chain::Chain;
use vdiskfs::formats::{self, FormatContext, Opened};
use vdiskfs::gate::Gate;
use vdiskfs::progress::Silent;
use vdiskfs::source::faulty::{Fault, FaultySource};
use vdiskfs::source::{FileTypes, LocalSource};

use crate::common::*;

const MIB: u64 = 1 << 20;
const PIECE: usize = 64 << 10;

/// One image of each format (the file to open, and the disk it holds), in `dir`.
fn samples(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut disk = vec![0u8; (4 * MIB) as usize];
    disk[(MIB / 2) as usize..(3 * MIB) as usize].copy_from_slice(&pattern(1, (5 * MIB / 2) as usize));
    let mut out = Vec::new();
    let p = dir.join("d.vhd");
    VhdBuilder::dynamic(4 * MIB).dialect(Dialect::Xen).write(0, &disk).build(&p).unwrap();
    out.push((p, disk.clone()));
    let p = dir.join("d.vhdx");
    vhdx::VhdxBuilder::dynamic(4 * MIB).write(0, &disk).build(&p).unwrap();
    out.push((p, disk.clone()));
    let p = dir.join("s.vmdk");
    vmdk::StreamBuilder::from_raw(&disk).build(&p).unwrap();
    out.push((p, disk.clone()));
    let p = dir.join("vm.xva");
    let mut x = xva::XvaBuilder::xapi("vm");
    x.disk("root", disk.clone(), 3, 0);
    x.build(&p).unwrap();
    out.push((p, disk));
    out
}

/// `path` opened over a [`FaultySource`], as the one disk it holds.
fn open_faulty(path: &Path) -> (Arc<FaultySource>, Chain) {
    let src = Arc::new(FaultySource::new(Arc::new(LocalSource::open(path, FileTypes::RegularOnly).unwrap())));
    let gate = Gate::new(Default::default());
    let xva = Default::default();
    let ctx = FormatContext { gate: &gate, xva: &xva, progress: &Silent };
    let layer = match formats::open(src.clone(), &ctx).unwrap() {
        Opened::Layer(l) => l,
        Opened::Disks(mut d) => d.remove(0).1,
    };
    (src, Chain::from_layers(vec![layer], 1 << 20))
}

/// Reads the disk in pieces: each piece is `Ok` with exactly the model's bytes, or an error
/// that is EIO and names the file. Returns how many pieces failed.
fn read_pieces(chain: &Chain, model: &[u8], file: &Path) -> usize {
    let mut failed = 0;
    for (k, want) in model.chunks(PIECE).enumerate() {
        let mut buf = vec![0xA5u8; want.len()];
        match chain.read((k * PIECE) as u64, &mut buf) {
            Ok(()) => assert_same(&format!("{} piece {k}", file.display()), &buf, want),
            Err(e) => {
                assert_eq!(e.errno(), libc::EIO, "{e}");
                assert!(e.to_string().contains(&*file.to_string_lossy()), "the error names the file: {e}");
                failed += 1;
            }
        }
    }
    failed
}

crate::register!(every_format_over_a_failing_source_gives_eio_never_zeros);
fn every_format_over_a_failing_source_gives_eio_never_zeros() {
    let t = tmpdir();
    for (path, model) in samples(t.path()) {
        let len = std::fs::metadata(&path).unwrap().len();
        let data_pieces = model.chunks(PIECE).filter(|p| p.iter().any(|&b| b != 0)).count();
        // Every read that needs the file fails: EIO for every piece holding data.
        let (src, chain) = open_faulty(&path);
        src.inject(0, len, Fault::Eio);
        let failed = read_pieces(&chain, &model, &path);
        assert!(failed >= data_pieces, "{}: {failed} of {data_pieces} data pieces failed", path.display());
        // Healed, the same chain reads right: no failure or zeros were kept.
        src.heal();
        assert_eq!(read_pieces(&chain, &model, &path), 0, "{}", path.display());
        // Short reads are read again until complete.
        let (src, chain) = open_faulty(&path);
        src.inject(0, len, Fault::Short);
        assert_eq!(read_pieces(&chain, &model, &path), 0, "{}: short reads", path.display());
        // A file cut short (where depends on the layout): what lay beyond fails, never zeros.
        let failed: usize = [len / 2, len / 4, len / 8]
            .into_iter()
            .map(|cut| {
                let (src, chain) = open_faulty(&path);
                src.shrink(cut);
                read_pieces(&chain, &model, &path)
            })
            .sum();
        assert!(failed > 0, "{}: nothing failed after the cuts", path.display());
    }
}

crate::register!(a_slow_read_holds_up_no_other_reader);
/// A read held up in the source for two seconds does not hold up a reader of another range:
/// no lock is held across a source read.
fn a_slow_read_holds_up_no_other_reader() {
    let t = tmpdir();
    let (path, model) = samples(t.path()).remove(0);
    let (src, chain) = open_faulty(&path);
    // Where the first and the last data pieces live in the file.
    let layer = chain.layers()[0].clone();
    let file_off = |v: u64| match layer.map(v, 4096).unwrap().kind {
        vdiskfs::layer::SpanKind::Data { offset, .. } => offset,
        k => panic!("{v:#x} is {k:?}"),
    };
    let (slow, fast) = (MIB / 2, 3 * MIB - 4096);
    src.inject(file_off(slow), file_off(slow) + 4096, Fault::Delay(Duration::from_secs(2)));
    let chain = Arc::new(chain);
    let c = chain.clone();
    let started = Instant::now();
    let slow_reader = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        c.read(slow, &mut b).map(|_| b)
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut b = vec![0u8; 4096];
    chain.read(fast, &mut b).unwrap();
    assert!(started.elapsed() < Duration::from_millis(1500), "the fast read waited {:?}", started.elapsed());
    assert_eq!(b, &model[fast as usize..fast as usize + 4096]);
    let got = slow_reader.join().unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(got, &model[slow as usize..slow as usize + 4096]);
}

/// The byte offset in the layer's file, and the virtual start, of the first data extent owned by
/// layer `depth`, from `vdiskfs map --json`.
fn data_extent(img: &Path, depth: u64) -> (u64, u64, u64) {
    let o = vdiskfs([os("map"), os("--json"), img.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let e = v.iter().find(|e| e["depth"] == depth && e["data"] == true).expect("a data extent");
    (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["offset"].as_u64().unwrap())
}

/// True when a line of `log` says `prefix N bytes at 0xOFF` for a read touching `[at, at + len)`.
fn logged_read_touches(log: &str, prefix: &str, at: u64, len: u64) -> bool {
    log.lines().filter_map(|l| l.split_once(prefix)).any(|(_, rest)| {
        let w: Vec<&str> = rest.split_whitespace().collect();
        let n = w.first().and_then(|n| n.parse::<u64>().ok());
        let off = w.get(3).and_then(|o| u64::from_str_radix(o.trim_start_matches("0x"), 16).ok());
        matches!((n, off), (Some(n), Some(off)) if off < at + len && off + n > at)
    })
}

/// Drops the mounted file's cached pages, so the next read reaches vdiskfs.
fn uncache(f: &std::fs::File) {
    // SAFETY: fadvise on a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

crate::register!(a_chain_on_a_failing_fuse_file_system_gives_eio_and_stays_mounted);
/// vdiskfs mounted on a VHD chain served by [`FaultFs`]: a range of the base that fails is EIO
/// at the reader and a log line naming the base and the offset, while the child's data and the
/// rest of the base still read; a healed range reads right; short reads are completed; a slow
/// base read does not hold up a read of the child; a shrunk child gives EIO and a log line;
/// and the mount unmounts normally at the end.
fn a_chain_on_a_failing_fuse_file_system_gives_eio_and_stays_mounted() {
    need_fuse();
    let t = tmpdir();
    let (images, served) = (t.path().join("images"), t.path().join("served"));
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&served).unwrap();
    let mut model = vec![0u8; (8 * MIB) as usize];
    model[..(4 * MIB) as usize].copy_from_slice(&pattern(1, (4 * MIB) as usize));
    let base = images.join("base.vhd");
    VhdBuilder::dynamic(8 * MIB).dialect(Dialect::Xen).write(0, &model[..(4 * MIB) as usize]).build(&base).unwrap();
    let child_data = pattern(2, MIB as usize);
    model[(6 * MIB) as usize..(7 * MIB) as usize].copy_from_slice(&child_data);
    let mut c = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    c.write(6 * MIB, &child_data);
    c.build(&images.join("child.vhd")).unwrap();
    let ffs = FaultFs::mount(&images, &served).unwrap();
    let child = served.join("child.vhd");
    let (b_start, _, b_off) = data_extent(&child, 1);
    let (c_start, c_len, c_off) = data_extent(&child, 0);
    let m = mount(&[child.as_os_str()]);
    let f = std::fs::File::open(m.file("child.raw")).unwrap();
    let read = |v: u64, n: usize| {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, v).map(|_| b)
    };
    let want = |v: u64, n: usize| model[v as usize..v as usize + n].to_vec();

    // EIO from the base for its first MiB of data.
    let bad = (b_start + 64 * 1024, b_off + 64 * 1024);
    ffs.set(vec![Rule::Eio { name: "base.vhd".into(), from: bad.1, to: bad.1 + MIB }]);
    uncache(&f);
    let e = read(bad.0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let line = format!("{}: read of", served.join("base.vhd").display());
    assert!(wait_for(5, || m.log_text().contains(&line)), "log: {}", m.log_text());
    assert!(logged_read_touches(&m.log_text(), &line, bad.1, MIB), "the log names the offset: {}", m.log_text());
    assert_eq!(read(c_start, 4096).unwrap(), want(c_start, 4096), "the child still reads");
    assert_eq!(read(3 * MIB, 4096).unwrap(), want(3 * MIB, 4096), "the rest of the base still reads");
    // Healed: the range reads right (no zeros were kept for it).
    ffs.set(vec![]);
    uncache(&f);
    assert_eq!(read(bad.0, 4096).unwrap(), want(bad.0, 4096));
    // Short reads everywhere: still the right bytes.
    ffs.set(vec![
        Rule::Short { name: "base.vhd".into(), from: 0, to: u64::MAX },
        Rule::Short { name: "child.vhd".into(), from: 0, to: u64::MAX },
    ]);
    uncache(&f);
    assert_eq!(read(0, (8 * MIB) as usize).unwrap(), model, "short reads");
    // A slow base read holds up no read of the child.
    ffs.set(vec![Rule::Delay {
        name: "base.vhd".into(),
        from: b_off + 2 * MIB,
        to: b_off + 2 * MIB + 4096,
        delay: Duration::from_secs(3),
    }]);
    uncache(&f);
    let started = Instant::now();
    let path = m.file("child.raw");
    let slow_at = b_start + 2 * MIB;
    let slow = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        std::fs::File::open(path).unwrap().read_exact_at(&mut b, slow_at).map(|_| b)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read(c_start + 8192, 4096).unwrap(), want(c_start + 8192, 4096));
    assert!(started.elapsed() < Duration::from_millis(2500), "the child read waited {:?}", started.elapsed());
    assert_eq!(slow.join().unwrap().unwrap(), want(slow_at, 4096));
    // The child shrinks under the mount: its data past the cut is EIO and a log line.
    let cut = c_off + c_len / 2;
    ffs.set(vec![Rule::Shrink { name: "child.vhd".into(), len: cut }]);
    uncache(&f);
    let e = read(c_start + c_len - 4096, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(wait_for(5, || m.log_text().contains("truncated")), "log: {}", m.log_text());
    assert!(ffs.counts().failed > 0);
    // The mount is up and unmounts as usual.
    ffs.set(vec![]);
    assert_eq!(read(0, 4096).unwrap(), want(0, 4096));
    drop(f);
    m.unmount();
    assert!(!std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&*m.dir.to_string_lossy()));
    drop(m);
    drop(ffs);
}
