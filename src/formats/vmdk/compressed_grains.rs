//! Compressed grains of stream-optimized extents (Virtual Disk Format 5.0, "Stream-Optimized
//! Compressed Sparse Extents"): at the sector a grain table entry names there is a grain marker
//! (u64 lba, u32 size) followed by `size` bytes of zlib (RFC 1950) deflate data, which inflate
//! to one grain (the last grain of a disk whose size is not a whole number of grains may be
//! shorter). Each grain is inflated once and kept in a byte-bounded cache; a grain that fails to
//! inflate, inflates to the wrong size or carries the wrong lba is an I/O error at read time.

use std::sync::Arc;

use flate2::{Decompress, FlushDecompress, Status};

use super::error::{Error, GrainDefect};
use super::grains::{BufferCache, Grain, GrainMap};
use super::hosted::{GRAIN_MARKER_LEN, GrainMarker};
use crate::error::{Error as CrateError, Result};

/// Inflates grain `g` of `map`, whose marker is at byte `at`.
pub fn inflate_grain(map: &GrainMap, g: u64, at: u64) -> Result<Vec<u8>> {
    let gs = map.grain;
    let expect_min = gs.min(map.extent_bytes - g * gs) as usize;
    let limit = 2 * gs + 1024;
    let avail = map.file_len - at;
    let first = avail.min(GRAIN_MARKER_LEN as u64 + gs) as usize;
    let mut buf = vec![0u8; first];
    map.src.read_exact_at(&mut buf, at)?;
    let m = GrainMarker::parse(&buf);
    let bad = |defect| Error::CompressedGrain { grain: g, at, defect };
    let lba = g * (gs / 512);
    if m.lba != lba {
        return Err(bad(GrainDefect::WrongLba { found: m.lba, expected: lba }).into());
    }
    if m.size == 0 || m.size as u64 > limit {
        return Err(bad(GrainDefect::ImpossibleSize(m.size)).into());
    }
    let total = GRAIN_MARKER_LEN as u64 + m.size as u64;
    if total > avail {
        return Err(bad(GrainDefect::PastEnd(m.size)).into());
    }
    if total as usize > buf.len() {
        let mut rest = vec![0u8; total as usize - buf.len()];
        map.src.read_exact_at(&mut rest, at + buf.len() as u64)?;
        buf.extend_from_slice(&rest);
    }
    let data = &buf[GRAIN_MARKER_LEN..total as usize];
    // One extra byte of room tells "too long" apart from "exactly one grain".
    let mut out = Vec::with_capacity(gs as usize + 1);
    let mut z = Decompress::new(true);
    let status = z.decompress_vec(data, &mut out, FlushDecompress::Finish);
    if out.len() as u64 > gs {
        return Err(bad(GrainDefect::TooLong(gs)).into());
    }
    match status {
        Ok(Status::StreamEnd) => {}
        Ok(_) => return Err(bad(GrainDefect::Truncated).into()),
        Err(source) => return Err(Error::InflateFailed { grain: g, at, source }.into()),
    }
    if out.len() < expect_min {
        return Err(bad(GrainDefect::TooShort { got: out.len(), expected: expect_min }).into());
    }
    out.resize(gs as usize, 0);
    Ok(out)
}

/// Fills `buf` from byte `rel` of a compressed extent, inflating grains through `cache`
/// (keyed by extent number and grain).
pub fn read_compressed(map: &GrainMap, ext: u32, cache: &BufferCache, rel: u64, buf: &mut [u8]) -> Result<()> {
    let gs = map.grain;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = rel + done as u64;
        let g = pos / gs;
        let in_g = (pos % gs) as usize;
        let n = (gs as usize - in_g).min(buf.len() - done);
        match map.lookup(g)? {
            Grain::Compressed(at) => {
                // Inflated with no lock held; a concurrent miss may inflate the same grain too.
                let data = cache.get_or_load((ext, g), || inflate_grain(map, g, at).map(Arc::from))?;
                buf[done..done + n].copy_from_slice(&data[in_g..in_g + n]);
            }
            Grain::Zero => buf[done..done + n].fill(0),
            other => {
                return Err(CrateError::internal(format!("grain {g} was mapped as compressed data but is {other:?}")));
            }
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::formats::vmdk::grains::{Flavor, buffer_cache};
    use crate::source::MemSource;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// One table of 2 entries at sector 1 (GD at sector 0 would be invalid: GD at 512, GT at
    /// 1024); grain markers for grains 0 and 1 of 1 KiB at sectors 4 and 8.
    fn extent(g0: &[u8], g1_lba: u64, g1: &[u8], extent_bytes: u64) -> GrainMap {
        let mut f = vec![0u8; 8192];
        f[512..516].copy_from_slice(&2u32.to_le_bytes()); // GD[0] -> GT at sector 2
        f[1024..1028].copy_from_slice(&4u32.to_le_bytes()); // GT[0] -> sector 4
        f[1028..1032].copy_from_slice(&8u32.to_le_bytes()); // GT[1] -> sector 8
        for (at, lba, data) in [(2048usize, 0u64, g0), (4096, g1_lba, g1)] {
            let z = zlib(data);
            f[at..at + 8].copy_from_slice(&lba.to_le_bytes()); // marker lba
            f[at + 8..at + 12].copy_from_slice(&(z.len() as u32).to_le_bytes()); // marker size
            f[at + 12..at + 12 + z.len()].copy_from_slice(&z);
        }
        let src = Arc::new(MemSource::new("s.vmdk", f));
        let flavor = Flavor::Hosted { zero_grain: false, compressed: true };
        GrainMap::new(src, flavor, 1024, 2, extent_bytes, 512, 1, 0, Arc::new(buffer_cache(1 << 20))).unwrap()
    }

    #[test]
    fn grains_inflate_including_a_short_last_grain() {
        let m = extent(&[7u8; 1024], 2, &[9u8; 512], 1536);
        let cache = buffer_cache(1 << 20);
        let mut buf = vec![0u8; 1536];
        read_compressed(&m, 0, &cache, 0, &mut buf).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 7) && buf[1024..].iter().all(|&b| b == 9));
    }

    #[test]
    fn wrong_sizes_and_lbas_are_errors() {
        let cache = buffer_cache(1 << 20);
        let mut buf = vec![0u8; 1024];
        let m = extent(&[7u8; 1000], 2, &[9u8; 1024], 2048);
        assert!(
            read_compressed(&m, 0, &cache, 0, &mut buf).unwrap_err().to_string().contains("inflates to 1000 bytes")
        );
        let m = extent(&[7u8; 1025], 2, &[9u8; 1024], 2048);
        assert!(read_compressed(&m, 0, &cache, 0, &mut buf).unwrap_err().to_string().contains("more than 1024"));
        let m = extent(&[7u8; 1024], 5, &[9u8; 1024], 2048);
        assert!(read_compressed(&m, 0, &cache, 1024, &mut buf).unwrap_err().to_string().contains("names sector 5"));
    }
}
