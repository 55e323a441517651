//! The hosted sparse extent header (`KDMV`, Virtual Disk Format 5.0, "Hosted Sparse Extent
//! Header"), including the stream-optimized variant whose real header is the footer at the end of
//! the file ("Stream-Optimized Compressed Sparse Extents": footer marker, footer, end-of-stream
//! marker), and the grain marker in front of each compressed grain. 512 bytes, little-endian.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::Error;

pub const MAGIC: &[u8; 4] = b"KDMV";
pub const SECTOR: u64 = 512;
/// `gdOffset` of a stream-optimized header whose grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// flags bit 0: the newline-detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// flags bit 1: a redundant grain directory is kept at `rgdOffset`.
pub const FLAG_RGD: u32 = 1 << 1;
/// flags bit 2: a grain table entry of 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// flags bit 16: grains are compressed (qemu and vdiskfs go by `compressAlgorithm`).
#[cfg(test)]
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// flags bit 17: metadata is preceded by markers, grains by grain markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
pub const COMPRESS_NONE: u16 = 0;
pub const COMPRESS_DEFLATE: u16 = 1;
/// Marker types (the `type` field of a metadata marker).
pub const MARKER_EOS: u32 = 0;
pub const MARKER_FOOTER: u32 = 3;
/// The largest grain vdiskfs accepts (the spec's limit, and a bound on per-grain buffers).
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// The largest number of grain table entries per table (the spec uses 512).
pub const MAX_GTES: u32 = 4096;

/// A parsed sparse extent header (sector counts already converted where named `*_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    /// Capacity in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain: u64,
    /// Embedded descriptor: offset and size in sectors (0 = none).
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    pub unclean_shutdown: bool,
    pub compress: u16,
}

impl Header {
    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }
    pub fn compressed(&self) -> bool {
        self.compress == COMPRESS_DEFLATE
    }

    /// Parses the first 512 bytes of a `KDMV` extent (or the footer copy).
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        if b.len() < 512 || &b[0..4] != MAGIC {
            return Err(Error::BadMagic { what: "sparse extent header", found: b[..b.len().min(4)].to_vec() });
        }
        let version = LE::read_u32(&b[4..8]);
        if !(1..=3).contains(&version) {
            return Err(Error::HostedVersion(version));
        }
        let flags = LE::read_u32(&b[8..12]);
        if flags & FLAG_NL_DETECT != 0 && &b[73..77] != b"\n \r\n" {
            return Err(Error::NewlineDetection { found: [b[73], b[74], b[75], b[76]] });
        }
        let h = Header {
            version,
            flags,
            capacity: LE::read_u64(&b[12..20]),
            grain: LE::read_u64(&b[20..28]),
            desc_offset: LE::read_u64(&b[28..36]),
            desc_size: LE::read_u64(&b[36..44]),
            gtes_per_gt: LE::read_u32(&b[44..48]),
            rgd_offset: LE::read_u64(&b[48..56]),
            gd_offset: LE::read_u64(&b[56..64]),
            overhead: LE::read_u64(&b[64..72]),
            unclean_shutdown: b[72] != 0,
            compress: LE::read_u16(&b[77..79]),
        };
        check_grain(h.grain)?;
        if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES {
            return Err(Error::GtesPerTable(h.gtes_per_gt));
        }
        if !matches!(h.compress, COMPRESS_NONE | COMPRESS_DEFLATE) {
            return Err(Error::CompressAlgorithm(h.compress));
        }
        Ok(h)
    }
}

/// Checks a grain size in sectors: a power of two from 1 sector to 1 MiB.
pub fn check_grain(sectors: u64) -> Result<(), Error> {
    if sectors == 0 || !sectors.is_power_of_two() || sectors > MAX_GRAIN_SECTORS {
        return Err(Error::GrainSize(sectors));
    }
    Ok(())
}

/// Checks the last 1536 bytes of a stream-optimized file (footer marker, footer, end-of-stream
/// marker) and returns the footer header.
pub fn parse_footer(tail: &[u8]) -> Result<Header, Error> {
    if tail.len() != 1536 {
        return Err(Error::BadFooter(FooterDefect::TooShort));
    }
    let (marker, rest) = tail.split_at(512);
    let (footer, eos) = rest.split_at(512);
    if LE::read_u32(&marker[8..12]) != 0 || LE::read_u32(&marker[12..16]) != MARKER_FOOTER {
        return Err(Error::BadFooter(FooterDefect::NoFooterMarker));
    }
    if LE::read_u64(&eos[0..8]) != 0 || LE::read_u32(&eos[8..12]) != 0 || LE::read_u32(&eos[12..16]) != MARKER_EOS {
        return Err(Error::BadFooter(FooterDefect::NoEndOfStream));
    }
    let h = Header::parse(footer).map_err(|e| Error::FooterHeader(Box::new(e)))?;
    if h.gd_offset == GD_AT_END {
        return Err(Error::BadFooter(FooterDefect::NoDirectory));
    }
    Ok(h)
}

/// What is wrong with a stream-optimized footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FooterDefect {
    #[error("the file is too short to hold one")]
    TooShort,
    #[error("no footer marker 1536 bytes before the end")]
    NoFooterMarker,
    #[error("no end-of-stream marker in the last sector")]
    NoEndOfStream,
    #[error("the footer does not say where the grain directory is")]
    NoDirectory,
}

/// A grain marker: the grain's first sector in the extent, and the compressed size that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrainMarker {
    pub lba: u64,
    pub size: u32,
}

/// Bytes of a grain marker before the compressed data.
pub const GRAIN_MARKER_LEN: usize = 12;

impl GrainMarker {
    pub fn parse(b: &[u8]) -> GrainMarker {
        GrainMarker { lba: LE::read_u64(&b[0..8]), size: LE::read_u32(&b[8..12]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header qemu-img writes for a 10 MiB monolithicSparse disk with zeroed grains.
    fn qemu_header() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(b"KDMV"); // magic
        b[4..8].copy_from_slice(&2u32.to_le_bytes()); // version 2 (zeroed grains)
        b[8..12].copy_from_slice(&0x7u32.to_le_bytes()); // flags: NL detect, redundant GD, zeroed grains
        b[12..20].copy_from_slice(&20480u64.to_le_bytes()); // capacity: 20480 sectors
        b[20..28].copy_from_slice(&128u64.to_le_bytes()); // grain: 128 sectors = 64 KiB
        b[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptor at sector 1
        b[36..44].copy_from_slice(&20u64.to_le_bytes()); // descriptor: 20 sectors
        b[44..48].copy_from_slice(&512u32.to_le_bytes()); // 512 GTEs per GT
        b[48..56].copy_from_slice(&21u64.to_le_bytes()); // redundant GD at sector 21
        b[56..64].copy_from_slice(&26u64.to_le_bytes()); // GD at sector 26
        b[64..72].copy_from_slice(&128u64.to_le_bytes()); // overhead: 128 sectors
        b[72] = 0; // clean shutdown
        b[73..77].copy_from_slice(b"\n \r\n"); // newline detection
        b[77..79].copy_from_slice(&0u16.to_le_bytes()); // no compression
        b
    }

    #[test]
    fn qemu_sparse_header_parses() {
        let h = Header::parse(&qemu_header()).unwrap();
        assert_eq!((h.version, h.capacity, h.grain, h.gtes_per_gt, h.gd_offset), (2, 20480, 128, 512, 26));
        assert!(h.zero_grain() && !h.compressed() && !h.markers());
        assert_eq!(h.flags & FLAG_COMPRESSED, 0);
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut b = qemu_header();
        b[4] = 4;
        assert!(Header::parse(&b).unwrap_err().to_string().contains("version 4"));
        for (g, ok) in [(0u64, false), (3, false), (4096, false), (2048, true), (1, true)] {
            let mut b = qemu_header();
            b[20..28].copy_from_slice(&g.to_le_bytes());
            assert_eq!(Header::parse(&b).is_ok(), ok, "grain {g}");
        }
        let mut b = qemu_header();
        b[75] = b'\n'; // CRLF turned into LF by a text-mode copy
        assert!(Header::parse(&b).unwrap_err().to_string().contains("text-mode"));
        let mut b = qemu_header();
        b[77] = 2;
        assert!(Header::parse(&b).unwrap_err().to_string().contains("compression algorithm 2"));
    }

    #[test]
    fn stream_footer_is_found_between_its_markers() {
        let mut tail = vec![0u8; 1536];
        tail[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes()); // footer marker: val 0, size 0, type 3
        let mut h = qemu_header();
        h[56..64].copy_from_slice(&0x1234u64.to_le_bytes()); // the real GD offset
        tail[512..1024].copy_from_slice(&h);
        // end-of-stream marker: all zero
        assert_eq!(parse_footer(&tail).unwrap().gd_offset, 0x1234);
        tail[12] = 2; // a grain directory marker instead
        assert!(parse_footer(&tail).unwrap_err().to_string().contains("footer marker"));
    }

    #[test]
    fn grain_marker_parses() {
        let b = [0x80, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x02, 0, 0]; // lba 128, size 0x210
        assert_eq!(GrainMarker::parse(&b), GrainMarker { lba: 128, size: 0x210 });
    }
}
