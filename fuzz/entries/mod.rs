//! The fuzz targets' entry functions: bytes in, the parser and what uses its result run, errors
//! ignored, a panic or a hang the only failure.
//!
//! Each `fuzz_targets/<name>.rs` calls the function of the same name, and `tests/it/fuzz_corpus.rs`
//! replays every file of `corpus/<name>/` through the same function (this file is included there
//! with `#[path]`), so the two cannot drift apart. [`TARGETS`] lists them all.
//!
//! Structures behind a checksum are fuzzed inside a valid template image: the fuzzed bytes take
//! the place of one structure (a VHD footer, a VHDX region table, a log…), the checksum is
//! recomputed when the control byte in front of them says so, and the whole image is opened and
//! read. That way the fuzzer reaches the code behind the checksum, and what the parser's result is
//! used for, not just the parser.

mod image;
mod vhd;
mod vhdx;
mod vmdk;
mod xva;

pub use image::{decode_sparse, encode_sparse, image};
pub use vhd::{vhd_bat, vhd_footer, vhd_header};
pub use vhdx::{vhdx_bat, vhdx_header, vhdx_log, vhdx_metadata, vhdx_regions};
pub use vmdk::{vmdk_cowd, vmdk_descriptor, vmdk_sesparse, vmdk_sparse, vmdk_stream};
pub use xva::{xva_gzip, xva_ovaxml, xva_tar, xva_zstd};

use std::sync::Arc;

use vdiskfs::chain::Chain;
use vdiskfs::gate::Gate;
use vdiskfs::layer::Layer;
use vdiskfs::source::{Location, Source};

/// A target's entry function: the fuzz input in, nothing out (a panic or a hang is the failure).
pub type Entry = fn(&[u8]);

/// Every target: its name (the `fuzz_targets/` file and the `corpus/` folder) and its entry.
pub const TARGETS: &[(&str, Entry)] = &[
    ("vhd_footer", vhd_footer),
    ("vhd_header", vhd_header),
    ("vhd_bat", vhd_bat),
    ("vhdx_header", vhdx_header),
    ("vhdx_regions", vhdx_regions),
    ("vhdx_metadata", vhdx_metadata),
    ("vhdx_log", vhdx_log),
    ("vhdx_bat", vhdx_bat),
    ("vmdk_descriptor", vmdk_descriptor),
    ("vmdk_sparse", vmdk_sparse),
    ("vmdk_stream", vmdk_stream),
    ("vmdk_cowd", vmdk_cowd),
    ("vmdk_sesparse", vmdk_sesparse),
    ("xva_tar", xva_tar),
    ("xva_ovaxml", xva_ovaxml),
    ("xva_gzip", xva_gzip),
    ("xva_zstd", xva_zstd),
    ("image", image),
];

/// Where fuzzed images pretend to live: a directory that does not exist, so a name inside an
/// image (a parent, a VMDK extent) is looked up through the gate and never found.
pub const DIR: &str = "/nonexistent-vdiskfs-fuzz";

/// Control byte in front of a fuzzed structure: recompute its checksum.
pub const FIX_CHECKSUM: u8 = 1;
/// Control byte: make the template a differencing disk (parent locators, partial blocks).
pub const DIFFERENCING: u8 = 2;

/// Extents of a disk visited per run, and bytes read from them: fuzzed headers can claim
/// terabytes, and the harness must stay fast whatever they claim.
const MAX_EXTENTS: usize = 4096;
const READ_BUDGET: u64 = 2 << 20;
const PIECE: u64 = 16 << 10;
/// Bytes of the disk walked at its start and again at its end. A walk asks the layers' tables
/// block by block, so a whole-disk walk of a header claiming terabytes cost milliseconds per
/// input (vhdx_bat ran at 258 inputs/s); the two ends hold the first blocks and the arithmetic
/// of the highest offsets, which is what a fuzzed size can get wrong.
const WALK_WINDOW: u64 = 64 << 20;
/// The gate images are opened with: default policy (names confined to [`DIR`]).
pub fn gate() -> Gate {
    Gate::new(Arc::new(Default::default()))
}

/// The control byte and the bytes after it.
pub fn split_control(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&c, rest)) => (c, rest),
        None => (0, data),
    }
}

/// `data` padded with zeros or cut to exactly `n` bytes.
pub fn padded(data: &[u8], n: usize) -> Vec<u8> {
    let mut v = data[..data.len().min(n)].to_vec();
    v.resize(n, 0);
    v
}

/// Reads what consumers read from one layer: a chain of it alone (a parent, if it names one, is
/// not looked for: its ranges read as zeros).
pub fn exercise_layer(layer: Arc<dyn Layer>) {
    let _ = layer.identity();
    let _ = layer.parent();
    exercise_chain(&Chain::from_layers(vec![layer], 1 << 20));
}

/// What `info`, `map` and a reader do with a chain: describe it, resolve the extents of its
/// first and last [`WALK_WINDOW`] bytes (all of a small disk; the last through the iterator
/// `map`, `export` and SEEK_DATA use), read the first and last bytes of each (bounded, see
/// [`MAX_EXTENTS`] and [`READ_BUDGET`]), seek data and holes there. Errors are fine; a span the
/// chain cannot use is its own error, not ours.
pub fn exercise_chain(chain: &Chain) {
    let _ = chain.describe();
    let _ = chain.identity_text();
    let size = chain.size();
    // A disk of up to two windows is walked whole.
    let tail = if size <= 2 * WALK_WINDOW { 0 } else { size - WALK_WINDOW };
    let head = if tail == 0 { Vec::new() } else { chain.extents(0, WALK_WINDOW).unwrap_or_default() };
    for e in &head {
        assert!(e.len > 0 && e.end() <= WALK_WINDOW, "extent {e:?} outside the first {WALK_WINDOW} bytes");
    }
    let tail_walk = chain.walk(tail).map_while(|e| e.ok()).inspect(|e| {
        assert!(e.len > 0 && e.start >= tail && e.end() <= size, "extent {e:?} outside [{tail}, {size})");
    });
    let mut buf = vec![0u8; PIECE as usize];
    let mut budget = READ_BUDGET;
    for e in head.iter().copied().chain(tail_walk).take(MAX_EXTENTS) {
        if budget == 0 {
            break;
        }
        let head = e.len.min(PIECE).min(budget);
        let _ = chain.read(e.start, &mut buf[..head as usize]);
        budget -= head;
        if e.len > head && budget > 0 {
            let tail = (e.len - head).min(512).min(budget);
            let _ = chain.read(e.end() - tail, &mut buf[..tail as usize]);
            budget -= tail;
        }
    }
    if size > 0 {
        // A read across the end of the first map block and the last byte of the disk.
        let at = (1u64 << 20).min(size - 1).saturating_sub(100);
        let n = (size - at).min(200) as usize;
        let _ = chain.read(at, &mut buf[..n]);
        let _ = chain.read(size - 1, &mut buf[..1]);
    }
    let _ = chain.next_data(tail);
    let _ = chain.next_hole(tail);
}

/// The templates the structure targets put fuzzed bytes in open and read as planned (else every
/// input would be refused for the template's sake, and the fuzzer would learn nothing).
pub fn check_templates() {
    vhd::check_templates();
    vhdx::check_templates();
}

/// A file of `len` bytes made of pieces over zeros, read as a [`Source`]: the VHDX templates are
/// megabytes long but hold a few KiB, and zeroing megabytes for every run would be most of it.
#[derive(Debug, Clone)]
pub struct Pieces {
    loc: Location,
    len: u64,
    /// Later pieces are written over earlier ones.
    pieces: Vec<(u64, Vec<u8>)>,
}

impl Pieces {
    pub fn new(name: &str, len: u64) -> Self {
        Pieces { loc: Location::local(format!("{DIR}/{name}")), len, pieces: Vec::new() }
    }

    /// Writes `bytes` at `at` (over what is there).
    pub fn put(&mut self, at: u64, bytes: &[u8]) {
        self.pieces.push((at, bytes.to_vec()));
    }
}

impl Source for Pieces {
    fn location(&self) -> &Location {
        &self.loc
    }
    fn len(&self) -> vdiskfs::Result<u64> {
        Ok(self.len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdiskfs::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = buf.len().min((self.len - offset) as usize);
        let (buf, end) = (&mut buf[..n], offset + n as u64);
        buf.fill(0);
        for (at, p) in &self.pieces {
            let (from, to) = ((*at).max(offset), (at + p.len() as u64).min(end));
            if from < to {
                let src = &p[(from - at) as usize..(to - at) as usize];
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
            }
        }
        Ok(n)
    }
}
