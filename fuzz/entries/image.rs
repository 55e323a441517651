//! The whole-image target: any format, from bytes, as `vdiskfs info` and a mount read it.

use std::sync::Arc;

use vdiskfs::chain::Chain;
use vdiskfs::formats::{self, FormatContext, Opened, xva};
use vdiskfs::progress::Silent;
use vdiskfs::source::MemSource;

use super::{DIR, exercise_chain, gate};

/// Magic of the sparse encoding (see [`decode_sparse`]).
pub const SPARSE_MAGIC: &[u8; 4] = b"SPRS";
/// Largest file the sparse encoding may describe.
const MAX_SPARSE_LEN: u64 = 64 << 20;

/// A file from fuzz input: the bytes themselves, or, after [`SPARSE_MAGIC`], a file length (u32
/// LE) and pieces `{offset: u32 LE, len: u16 LE, bytes}` over zeros. The second form lets a few
/// KiB of input describe a VHDX, whose structures lie megabytes apart.
pub fn decode_sparse(data: &[u8]) -> Vec<u8> {
    let Some(rest) = data.strip_prefix(SPARSE_MAGIC) else { return data.to_vec() };
    let (len, mut rest) = match rest.split_first_chunk::<4>() {
        Some((l, r)) => (u32::from_le_bytes(*l) as u64, r),
        None => return data.to_vec(),
    };
    let mut file = vec![0u8; len.min(MAX_SPARSE_LEN) as usize];
    while let Some((head, r)) = rest.split_first_chunk::<6>() {
        let off = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let n = (u16::from_le_bytes([head[4], head[5]]) as usize).min(r.len());
        let (bytes, r) = r.split_at(n);
        if off < file.len() {
            let m = n.min(file.len() - off);
            file[off..off + m].copy_from_slice(&bytes[..m]);
        }
        rest = r;
    }
    file
}

/// The sparse encoding of `file` (non-zero 512-byte sectors only), for seeds.
pub fn encode_sparse(file: &[u8]) -> Vec<u8> {
    let mut out = SPARSE_MAGIC.to_vec();
    out.extend_from_slice(&(file.len() as u32).to_le_bytes());
    let mut at = 0;
    while at < file.len() {
        let end = (at + 512).min(file.len());
        if file[at..end].iter().all(|&b| b == 0) {
            at = end;
            continue;
        }
        // A run of non-zero sectors, at most 32 KiB.
        let mut stop = end;
        while stop < file.len() && stop - at < 32 << 10 {
            let next = (stop + 512).min(file.len());
            if file[stop..next].iter().all(|&b| b == 0) {
                break;
            }
            stop = next;
        }
        out.extend_from_slice(&(at as u32).to_le_bytes());
        out.extend_from_slice(&((stop - at) as u16).to_le_bytes());
        out.extend_from_slice(&file[at..stop]);
        at = stop;
    }
    out
}

/// Detects the format of the file the input describes, opens it as `vdiskfs` opens a top image
/// (no parent: a differencing disk's parent ranges read as zeros), and reads every disk in it.
pub fn image(data: &[u8]) {
    let file = decode_sparse(data);
    let src = Arc::new(MemSource::new(&format!("{DIR}/image"), file));
    let gate = gate();
    let opts = xva::Options { cache_dir: None, verify: true, block_cache_bytes: 0 };
    let ctx = FormatContext { gate: &gate, xva: &opts, progress: &Silent };
    match formats::open(src, &ctx) {
        Ok(Opened::Layer(layer)) => super::exercise_layer(layer),
        Ok(Opened::Disks(disks)) => {
            for (_, layer) in disks {
                exercise_chain(&Chain::from_layers(vec![layer], 1 << 20));
            }
        }
        Err(_) => {}
    }
}
