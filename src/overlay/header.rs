//! The overlay file's header: 4 KiB, little-endian, CRC-32C at 4092 (see the layout in the
//! parent module's documentation).

use super::OverlayError;

const MAGIC: &[u8; 8] = b"VDKOVL01";
const VERSION: u32 = 1;
/// Bytes of the header; the map follows it.
pub(super) const HEADER: u64 = 4096;
/// The map is written back in pages of this size.
pub(super) const PAGE: u64 = 4096;
/// Longest chain identity the header holds.
const MAX_IDENTITY: usize = 3900;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayHeader {
    pub cluster: u64,
    pub virtual_size: u64,
    pub map_offset: u64,
    pub map_bytes: u64,
    pub data_offset: u64,
    /// The chain this overlay belongs to, as text (see `Chain::identity_text`).
    pub identity: String,
}

impl OverlayHeader {
    pub(super) fn new(cluster: u64, virtual_size: u64, identity: &str) -> OverlayHeader {
        let clusters = virtual_size.div_ceil(cluster);
        let map_bytes = clusters.div_ceil(4).next_multiple_of(PAGE);
        OverlayHeader {
            cluster,
            virtual_size,
            map_offset: HEADER,
            map_bytes,
            data_offset: (HEADER + map_bytes).next_multiple_of(1 << 20),
            identity: identity.to_string(),
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.cluster.trailing_zeros()).to_le_bytes());
        b[16..24].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.map_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.map_bytes.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        let id = self.identity.as_bytes();
        let n = id.len().min(MAX_IDENTITY);
        b[64..68].copy_from_slice(&(n as u32).to_le_bytes());
        b[68..68 + n].copy_from_slice(&id[..n]);
        let crc = crc32c::crc32c(&b[..4092]);
        b[4092..4096].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a header read from an overlay file of `file_len` bytes.
    pub fn parse(b: &[u8], file_len: u64) -> Result<OverlayHeader, OverlayError> {
        if b.len() < HEADER as usize || &b[0..8] != MAGIC {
            return Err(OverlayError::BadMagic);
        }
        let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let (stored, computed) = (le32(4092), crc32c::crc32c(&b[..4092]));
        if stored != computed {
            return Err(OverlayError::HeaderChecksum { stored, computed });
        }
        if le32(8) != VERSION {
            return Err(OverlayError::Version(le32(8)));
        }
        let shift = le32(12);
        if !(9..=24).contains(&shift) {
            return Err(OverlayError::ClusterShift(shift));
        }
        let n = le32(64) as usize;
        if n > MAX_IDENTITY {
            return Err(OverlayError::IdentityLength);
        }
        let h = OverlayHeader {
            cluster: 1 << shift,
            virtual_size: le64(16),
            map_offset: le64(24),
            map_bytes: le64(32),
            data_offset: le64(40),
            identity: String::from_utf8_lossy(&b[68..68 + n]).into_owned(),
        };
        let want = OverlayHeader::new(h.cluster, h.virtual_size, &h.identity);
        if (h.map_offset, h.map_bytes, h.data_offset) != (want.map_offset, want.map_bytes, want.data_offset) {
            return Err(OverlayError::Layout);
        }
        if file_len < h.data_offset + h.virtual_size {
            return Err(OverlayError::Truncated { len: file_len, needed: h.data_offset + h.virtual_size });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrips_and_rejects_damage() {
        let h = OverlayHeader::new(65536, 10 << 30, "vhd:abc > vhd:def");
        let b = h.encode();
        let full = h.data_offset + h.virtual_size;
        assert_eq!(OverlayHeader::parse(&b, full).unwrap(), h);
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(OverlayHeader::parse(&bad, full).unwrap_err().to_string().contains("CRC"));
        assert!(OverlayHeader::parse(&b, 100).unwrap_err().to_string().contains("truncated"));
    }
}
