//! XVA: the tar walk that indexes an export, `ova.xml`, and the gzip and zstd scanners that
//! record restart points, with reads that start at them.

use std::sync::Arc;

use vdiskfs::formats::xva::compressed::{Codec, CompressedTar, scanner};
use vdiskfs::formats::xva::gzip::GzDecoder;
use vdiskfs::formats::xva::ovaxml::{self, Export};
use vdiskfs::formats::xva::restart::Recorder;
use vdiskfs::formats::xva::tar::{self, Input};
use vdiskfs::formats::xva::zstd::ZstdDecoder;
use vdiskfs::source::{MemSource, Source};

use super::{DIR, decode_sparse};

/// Decompressed bytes a run decodes at most (and so the longest stream it checks).
const MAX_OUT: usize = 1 << 20;
/// Restart points checked per run.
const MAX_POINTS: usize = 16;

/// A plain tar stream (raw or sparse-encoded, see [`decode_sparse`]): the member index an
/// export gets (names, offsets, small contents).
pub fn xva_tar(data: &[u8]) {
    let src = MemSource::new(&format!("{DIR}/fuzz.xva"), decode_sparse(data));
    let keep = |name: &str, size: u64| size <= tar::SMALL || (name == "ova.xml" && size <= 1 << 20);
    let mut members = Vec::new();
    let mut push = |m: tar::Member| {
        members.push(m);
        Ok(())
    };
    let _ = tar::walk(Input::File(&src), &keep, &mut push, &|_| {});
}

/// `ova.xml` text (invalid UTF-8 replaced): the generic value parser and the export reader.
pub fn xva_ovaxml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = ovaxml::parse_value(&text);
    if let Ok(e) = Export::parse(&text) {
        let _ = (e.vm(), e.get_version("product_version"));
        for v in &e.vdis {
            let _ = e.vbds_of(&v.id).count();
        }
    }
}

/// A gzip stream: the index pass (restart points at member starts), then a decoder started at
/// each point and random reads, which must give the bytes the index pass decoded.
pub fn xva_gzip(data: &[u8]) {
    compressed(data, Codec::Gzip);
}

/// A zstd stream: as [`xva_gzip`], with restart points at frame starts.
pub fn xva_zstd(data: &[u8]) {
    compressed(data, Codec::Zstd);
}

fn compressed(data: &[u8], codec: Codec) {
    let src: Arc<dyn Source> = Arc::new(MemSource::new(&format!("{DIR}/fuzz.xva"), data.to_vec()));
    let Ok(mut scan) = scanner(codec, src.clone(), Recorder::memory()) else { return };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match scan.decoder().decode(&mut buf) {
            Ok(0) => break,
            Ok(n) if out.len() + n <= MAX_OUT => out.extend_from_slice(&buf[..n]),
            Ok(_) | Err(_) => return,
        }
    }
    let total = scan.decoder().pos();
    assert_eq!(total, out.len() as u64, "the decoder's position is not what it decoded");
    let Some(rec) = scan.finish() else { panic!("the index pass lost its recorder") };
    for p in rec.points.iter().take(MAX_POINTS) {
        assert!(p.out <= total, "restart point {p:?} past the end of a {total}-byte stream");
        let w = rec.window(p).expect("a window the index pass recorded");
        let mut d: Box<dyn vdiskfs::formats::xva::compressed::ForwardDecoder> = match codec {
            Codec::Gzip => Box::new(GzDecoder::at(src.clone(), p, &w).expect("a decoder at a restart point")),
            _ => Box::new(ZstdDecoder::at(src.clone(), p).expect("a decoder at a restart point")),
        };
        let mut got = vec![0u8; 4096];
        let n = d.decode(&mut got).expect("decoding from a restart point");
        let at = p.out as usize;
        assert_eq!(&got[..n], &out[at..(at + n).min(out.len())], "decoding from restart point {p:?}");
    }
    let Ok(tar) = CompressedTar::new(src, codec, rec.points, rec.windows, total, None, 0) else { return };
    for (at, n) in [(0, 4096), (total / 2, 1000), (total.saturating_sub(100), 100)] {
        let n = n.min(total - at) as usize;
        let mut got = vec![0u8; n];
        tar.read_exact_at(at, &mut got).expect("a read of the decompressed stream");
        assert_eq!(got, out[at as usize..at as usize + n], "read of {n} bytes at {at:#x}");
    }
}
