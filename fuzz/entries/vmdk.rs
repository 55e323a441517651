//! VMDK: the descriptor, hosted sparse and stream-optimized files (opened whole, as a monolithic
//! file), and the COWD and SESparse extents (opened as the one extent of a descriptor line, as a
//! descriptor names them, and mapped and read grain by grain).

use std::sync::Arc;

use vdiskfs::formats::vmdk::compressed_grains::read_compressed;
use vdiskfs::formats::vmdk::descriptor::{self, Access, ExtentLine, ExtentType};
use vdiskfs::formats::vmdk::extent::{ExtentData, ExtentFiles};
use vdiskfs::formats::vmdk::grains::{Grain, buffer_cache};
use vdiskfs::formats::vmdk::{MAX_SIZE, VmdkLayer, cowd, hosted, sesparse};
use vdiskfs::source::{Location, MemSource, Source};

use super::{DIR, MAX_EXTENTS, PIECE, READ_BUDGET, decode_sparse, exercise_layer, gate};

/// Bytes of an extent mapped at its start and again at its end. A run over a hole asks the
/// directory table by table, so mapping a whole extent whose header claims terabytes cost
/// milliseconds per input (vmdk_cowd ran at 537 inputs/s); the two ends hold the first tables
/// and the highest grain numbers.
const EXTENT_WINDOW: u64 = 8 << 20;
/// Grain tables are read whole at open up to this total, as the layer does.
const VALIDATE_AT_OPEN_BYTES: u64 = 16 << 20;

fn open(file: Vec<u8>) {
    let gate = gate();
    if let Ok(layer) = VmdkLayer::open(Arc::new(MemSource::new(&format!("{DIR}/fuzz.vmdk"), file)), &gate) {
        exercise_layer(Arc::new(layer));
    }
}

/// Descriptor text: the text parsers, then the text as a standalone descriptor (its extent files
/// are never found; ZERO extents need none).
pub fn vmdk_descriptor(data: &[u8]) {
    let text = descriptor::decode_text(data);
    let _ = descriptor::looks_like_descriptor(&text);
    if let Ok(d) = descriptor::parse(&text) {
        let _ = (d.parent(), d.get("ddb.adapterType"));
        if let Some(t) = &d.create_type {
            let _ = descriptor::classify_create_type(t);
        }
        for e in &d.extents {
            let _ = e.display();
        }
    }
    open(data.to_vec());
}

/// A hosted sparse (`KDMV`) file (raw or sparse-encoded, see [`decode_sparse`]): the header and
/// footer parsers, then the file opened as a monolithic VMDK (embedded descriptor, grain
/// directory and tables, grains).
pub fn vmdk_sparse(data: &[u8]) {
    hosted_file(decode_sparse(data));
}

fn hosted_file(data: Vec<u8>) {
    let _ = hosted::Header::parse(&data);
    if data.len() >= 1536 {
        let _ = hosted::parse_footer(&data[data.len() - 1536..]);
    }
    open(data);
}

/// A stream-optimized file: as [`vmdk_sparse`], with the header (and a footer, if one is where
/// it belongs) made to say compressed grains behind markers, so every input takes that path.
pub fn vmdk_stream(data: &[u8]) {
    let mut f = decode_sparse(data);
    let n = f.len();
    let footer_at = n.checked_sub(1024).filter(|_| n >= 1536);
    for at in std::iter::once(0).chain(footer_at) {
        if f.len() >= at + 512 && f[at..].starts_with(hosted::MAGIC) {
            f[at + 4..at + 8].copy_from_slice(&3u32.to_le_bytes());
            let flags = u32::from_le_bytes(f[at + 8..at + 12].try_into().expect("4 bytes"));
            f[at + 8..at + 12].copy_from_slice(&(flags | hosted::FLAG_MARKERS | 1 << 16).to_le_bytes());
            f[at + 77..at + 79].copy_from_slice(&hosted::COMPRESS_DEFLATE.to_le_bytes());
        }
    }
    hosted_file(f);
}

/// A COWD (vmfsSparse) extent file (raw or sparse-encoded), as a `RW n VMFSSPARSE` line names it.
pub fn vmdk_cowd(data: &[u8]) {
    let data = decode_sparse(data);
    let Ok(h) = cowd::Header::parse(&data) else { return };
    extent(data, h.sectors, ExtentType::VmfsSparse, "fuzz-delta.vmdk");
}

/// A SESparse extent file (raw or sparse-encoded), as a `RW n SESPARSE` line names it.
pub fn vmdk_sesparse(data: &[u8]) {
    let data = decode_sparse(data);
    let Ok(h) = sesparse::ConstHeader::parse(&data) else { return };
    let _ = sesparse::check_volatile(data.get(512..).unwrap_or_default());
    extent(data, h.capacity, ExtentType::SeSparse, "fuzz-sesparse.vmdk");
}

/// Opens `data` as the extent of a line of `sectors` (at most the header's capacity, and at most
/// what a descriptor may claim) and reads it as the layer would: runs of grains, data read,
/// compressed grains inflated.
fn extent(data: Vec<u8>, sectors: u64, kind: ExtentType, name: &str) {
    let sectors = sectors.min(MAX_SIZE / 512);
    if sectors == 0 {
        return;
    }
    let line = ExtentLine { access: Access::Rw, sectors, kind, file: Some(name.into()), offset: 0 };
    let gate = gate();
    let desc = Location::local(format!("{DIR}/fuzz.vmdk"));
    let src: Arc<dyn Source> = Arc::new(MemSource::new(&format!("{DIR}/{name}"), data));
    let files = ExtentFiles::new(&gate, &desc, Arc::new(buffer_cache(16 << 20)));
    let Ok(ExtentData::Sparse(s)) = files.data(0, &line, src, None) else { return };
    let map = &s.map;
    let len = sectors * 512;
    if map.scan_directory().is_ok_and(|(_, bytes)| bytes <= VALIDATE_AT_OPEN_BYTES) {
        let _ = map.validate_tables();
    }
    let inflated = buffer_cache(4 << 20);
    let mut buf = vec![0u8; PIECE as usize];
    let mut budget = READ_BUDGET;
    // The first and the last [`EXTENT_WINDOW`] bytes (all of a small extent), as runs.
    let tail = if len <= 2 * EXTENT_WINDOW { 0 } else { len - EXTENT_WINDOW };
    let windows = if tail == 0 { vec![(0, len)] } else { vec![(0, EXTENT_WINDOW), (tail, len)] };
    let mut runs = 0;
    for (mut pos, end) in windows {
        while pos < end && runs < MAX_EXTENTS && budget > 0 {
            let Ok((grain, n)) = map.run(pos, end - pos) else { break };
            assert!(n > 0 && n <= end - pos, "a run of {n} bytes at {pos:#x} of [{pos:#x}, {end:#x})");
            let k = n.min(PIECE).min(budget) as usize;
            match grain {
                Grain::Data(at) => drop(map.src.read_exact_at(&mut buf[..k], at)),
                Grain::Compressed(_) => drop(read_compressed(map, 0, &inflated, pos, &mut buf[..k])),
                Grain::Unallocated | Grain::Zero => {}
            }
            budget -= k as u64;
            pos += n;
            runs += 1;
        }
    }
}
