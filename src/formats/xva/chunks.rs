//! Chunk placement and checksums, exactly as xapi's importer (`stream_vdi.ml`, `recv_all_vdi`)
//! does it, not as the file names suggest.
//!
//! Each disk's chunks `Ref:N/%08d` are taken in archive order; the number must increase. The
//! length of the first chunk is the chunk size. A gap in the numbering is that many chunk sizes
//! of zeros. A zero-length chunk (xapi's keep-alive) uses up a number but no bytes, so every
//! chunk after it sits one number "early". Each chunk is followed by `<chunk>.checksum` (SHA-1,
//! 40 hex) or `<chunk>.xxhash` (XXH64, 16 hex); the importer picks the algorithm from the
//! extension, and so does this module.
//!
//! xapi writes 1 MiB chunks; a chunk size over [`MAX_UNIT`] (1 GiB) is refused. Readers never
//! hold a whole chunk of that size: see `disk.rs`.

use sha1::{Digest, Sha1};

use super::tar::Member;
use crate::error::{ErrorKind, Kind};

/// A chunk's stored checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkChecksum {
    Sha1([u8; 20]),
    Xxh64(u64),
}

/// Why a checksum member's text is not a checksum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("not text")]
    NotText,
    /// `shown` is the start of the text, quoted.
    #[error("is not a SHA-1 digest (40 hex digits): {shown}")]
    NotSha1 { shown: String },
    #[error("is not an XXH64 hash (16 hex digits): {shown}")]
    NotXxh64 { shown: String },
    #[error("unknown checksum type .{ext}")]
    UnknownType { ext: String },
}

impl ChunkChecksum {
    /// Parses the content of a `.checksum` or `.xxhash` member.
    pub fn parse(ext: &str, content: &[u8]) -> Result<ChunkChecksum, ChecksumError> {
        let text = std::str::from_utf8(content).map_err(|_| ChecksumError::NotText)?.trim_end();
        let hex_ok = |n: usize| text.len() == n && text.bytes().all(|c| c.is_ascii_hexdigit());
        let shown = || format!("{:?}", text.chars().take(48).collect::<String>());
        match ext {
            "checksum" => {
                let bad = || ChecksumError::NotSha1 { shown: shown() };
                if !hex_ok(40) {
                    return Err(bad());
                }
                let mut d = [0u8; 20];
                for (i, b) in d.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
                }
                Ok(ChunkChecksum::Sha1(d))
            }
            "xxhash" => {
                let bad = || ChecksumError::NotXxh64 { shown: shown() };
                if !hex_ok(16) {
                    return Err(bad());
                }
                Ok(ChunkChecksum::Xxh64(u64::from_str_radix(text, 16).map_err(|_| bad())?))
            }
            _ => Err(ChecksumError::UnknownType { ext: ext.to_string() }),
        }
    }

    /// The same kind of checksum computed over `data`.
    pub fn compute(&self, data: &[u8]) -> ChunkChecksum {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }

    /// A hasher of the same kind, for data that comes in pieces.
    pub fn hasher(&self) -> ChunkHasher {
        match self {
            ChunkChecksum::Sha1(_) => ChunkHasher::Sha1(Sha1::new()),
            ChunkChecksum::Xxh64(_) => ChunkHasher::Xxh64(xxhash_rust::xxh64::Xxh64::new(0)),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ChunkChecksum::Sha1(_) => "SHA-1 (.checksum)",
            ChunkChecksum::Xxh64(_) => "XXH64 (.xxhash)",
        }
    }
}

impl std::fmt::Display for ChunkChecksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkChecksum::Sha1(d) => d.iter().try_for_each(|b| write!(f, "{b:02x}")),
            ChunkChecksum::Xxh64(h) => write!(f, "{h:016X}"),
        }
    }
}

/// A chunk's checksum computed piece by piece.
pub enum ChunkHasher {
    Sha1(Sha1),
    Xxh64(xxhash_rust::xxh64::Xxh64),
}

impl ChunkHasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ChunkHasher::Sha1(h) => h.update(data),
            ChunkHasher::Xxh64(h) => h.update(data),
        }
    }
    pub fn finish(self) -> ChunkChecksum {
        match self {
            ChunkHasher::Sha1(h) => ChunkChecksum::Sha1(h.finalize().into()),
            ChunkHasher::Xxh64(h) => ChunkChecksum::Xxh64(h.digest()),
        }
    }
}

/// What is wrong with the chunk members of an archive; each names the member.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("{member}: member outside every disk's directory (ova.xml lists {listed})")]
    Outside { member: String, listed: String },
    #[error("{member}: {dir}'s chunks resume after another disk's (each disk's chunks must be contiguous)")]
    NotContiguous { member: String, dir: String },
    #[error("{member}: chunk number too large")]
    NumberTooLarge { member: String },
    #[error("{member}: chunk numbers go backwards (after {after})")]
    Backwards { member: String, after: String },
    #[error("{member}: neither a chunk nor a chunk's checksum")]
    NotAChunk { member: String },
    #[error("{member}: no checksum member follows this chunk")]
    NoChecksum { member: String },
    #[error("{member}: checksum member does not follow its chunk {chunk}")]
    ChecksumAstray { member: String, chunk: String },
    #[error("{member}: checksum member of {size} bytes (garbage)")]
    ChecksumTooLarge { member: String, size: u64 },
    #[error("{member}")]
    BadChecksum {
        member: String,
        #[source]
        source: ChecksumError,
    },
    #[error("{dir}/…: chunk size {unit} is over 1 GiB")]
    ChunkSizeTooLarge { dir: String, unit: u64 },
    #[error("{member}: chunk of {size} bytes is longer than the chunk size {unit}")]
    TooLong { member: String, size: u64, unit: u64 },
    #[error("{member}: chunk ends at {end:#x}, past the disk's virtual_size {virtual_size:#x} (ova.xml)")]
    PastEnd { member: String, end: u64, virtual_size: u64 },
}

impl ErrorKind for ChunkError {
    fn kind(&self) -> Kind {
        match self {
            ChunkError::Outside { .. }
            | ChunkError::NotContiguous { .. }
            | ChunkError::NumberTooLarge { .. }
            | ChunkError::Backwards { .. }
            | ChunkError::NotAChunk { .. }
            | ChunkError::NoChecksum { .. }
            | ChunkError::ChecksumAstray { .. }
            | ChunkError::ChecksumTooLarge { .. }
            | ChunkError::BadChecksum { .. }
            | ChunkError::ChunkSizeTooLarge { .. }
            | ChunkError::TooLong { .. }
            | ChunkError::PastEnd { .. } => Kind::Corrupt,
        }
    }
}

/// One stored chunk of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Where it goes on the virtual disk.
    pub vstart: u64,
    pub len: u64,
    /// Offset of its data in the (decompressed) tar stream.
    pub data: u64,
    /// The number in its file name.
    pub number: u64,
    pub sum: Option<ChunkChecksum>,
}

/// The chunks of one VDI, placed.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Index into the VDI list given to [`place`].
    pub vdi: usize,
    pub chunks: Vec<Chunk>,
    /// Zero-length keep-alive chunks seen.
    pub keepalives: u64,
    /// Digits in the chunk names (8 for xapi and xva-img).
    pub digits: usize,
}

impl Placed {
    /// End of the last chunk's data on the virtual disk.
    pub fn data_end(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.vstart + c.len)
    }
}

/// The result of placing every chunk of the archive.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The chunk size: the length of the first chunk.
    pub unit: u64,
    pub disks: Vec<Placed>,
}

/// The largest chunk accepted (xapi writes 1 MiB chunks; no writer goes near 2^30 bytes).
pub const MAX_UNIT: u64 = 1 << 30;

/// A chunk member not yet placed.
#[derive(Debug)]
struct Unplaced {
    number: u64,
    stem: String,
    offset: u64,
    size: u64,
    sum: Option<ChunkChecksum>,
}

/// One VDI's chunk members, in archive order.
type Group = (usize, Vec<Unplaced>);

/// Groups the members after `ova.xml` by VDI directory and places each disk's chunks.
/// `vdis` are `(id, virtual_size)`; `need_sums` is xapi's `export_vsn > 0`.
pub fn place(members: &[Member], vdis: &[(String, u64)], need_sums: bool) -> Result<Layout, ChunkError> {
    let groups = group(members, vdis, need_sums)?;
    let unit = chunk_size(&groups, vdis)?;
    let disks = groups
        .into_iter()
        .map(|(vdi, raws)| place_disk(vdi, raws, unit, &vdis[vdi].0, vdis[vdi].1))
        .collect::<Result<_, _>>()?;
    Ok(Layout { unit, disks })
}

/// Sorts the members into one group per VDI, each chunk with its checksum.
fn group(members: &[Member], vdis: &[(String, u64)], need_sums: bool) -> Result<Vec<Group>, ChunkError> {
    let mut groups: Vec<Group> = Vec::new();
    // The chunk still waiting for its checksum member.
    let mut pending: Option<String> = None;
    let missing = |member: String| ChunkError::NoChecksum { member };
    for m in members {
        let outside = || ChunkError::Outside {
            member: m.name.clone(),
            listed: if vdis.is_empty() {
                "no VDI".to_string()
            } else {
                vdis.iter().map(|v| v.0.as_str()).collect::<Vec<_>>().join(", ")
            },
        };
        let (dir, file) = m.name.rsplit_once('/').ok_or_else(outside)?;
        let vdi = vdis.iter().position(|v| v.0 == dir).ok_or_else(outside)?;
        if groups.last().is_none_or(|g| g.0 != vdi) {
            if groups.iter().any(|g| g.0 == vdi) {
                return Err(ChunkError::NotContiguous { member: m.name.clone(), dir: dir.to_string() });
            }
            if let Some(p) = pending.take().filter(|_| need_sums) {
                return Err(missing(p));
            }
            groups.push((vdi, Vec::new()));
        }
        let Some(g) = groups.last_mut() else { unreachable!("pushed above") };
        if !file.is_empty() && file.bytes().all(|c| c.is_ascii_digit()) {
            if let Some(p) = pending.take().filter(|_| need_sums) {
                return Err(missing(p));
            }
            let number: u64 = file.parse().map_err(|_| ChunkError::NumberTooLarge { member: m.name.clone() })?;
            if let Some(last) = g.1.last()
                && number <= last.number
            {
                let after = format!("{dir}/{}", last.stem);
                return Err(ChunkError::Backwards { member: m.name.clone(), after });
            }
            g.1.push(Unplaced { number, stem: file.to_string(), offset: m.offset, size: m.size, sum: None });
            pending = Some(m.name.clone());
            continue;
        }
        let (stem, ext) = file.rsplit_once('.').unwrap_or((file, ""));
        if ext != "checksum" && ext != "xxhash" {
            return Err(ChunkError::NotAChunk { member: m.name.clone() });
        }
        match g.1.last_mut() {
            Some(c) if c.stem == stem && pending.as_deref().is_some_and(|p| p.ends_with(&format!("/{stem}"))) => {
                let content = m
                    .content
                    .as_deref()
                    .ok_or_else(|| ChunkError::ChecksumTooLarge { member: m.name.clone(), size: m.size })?;
                let sum = ChunkChecksum::parse(ext, content)
                    .map_err(|source| ChunkError::BadChecksum { member: m.name.clone(), source })?;
                c.sum = Some(sum);
                pending = None;
            }
            _ => return Err(ChunkError::ChecksumAstray { member: m.name.clone(), chunk: format!("{dir}/{stem}") }),
        }
    }
    if let Some(p) = pending.filter(|_| need_sums) {
        return Err(missing(p));
    }
    Ok(groups)
}

/// The chunk size, as xapi takes it: the length of the archive's first chunk. A first disk that
/// fits in one (shorter) chunk would make that wrong for every later disk, so such disks are
/// passed over.
fn chunk_size(groups: &[Group], vdis: &[(String, u64)]) -> Result<u64, ChunkError> {
    let first_nonempty = |g: &Group| g.1.iter().find(|c| c.size > 0).map(|c| c.size);
    let unit = groups
        .iter()
        .filter(|g| g.1.iter().filter(|c| c.size > 0).count() >= 2)
        .find_map(first_nonempty)
        .or_else(|| groups.iter().find_map(first_nonempty))
        .unwrap_or(1 << 20);
    if unit > MAX_UNIT {
        let dir = groups.iter().find(|g| first_nonempty(g).is_some()).map_or("", |g| vdis[g.0].0.as_str());
        return Err(ChunkError::ChunkSizeTooLarge { dir: dir.to_string(), unit });
    }
    Ok(unit)
}

/// Places the chunks of VDI `vdi` (`id`, `size` bytes) on its disk.
fn place_disk(vdi: usize, raws: Vec<Unplaced>, unit: u64, id: &str, size: u64) -> Result<Placed, ChunkError> {
    let digits = raws.first().map_or(8, |r| r.stem.len());
    let mut placed = Placed { vdi, chunks: Vec::with_capacity(raws.len()), keepalives: 0, digits };
    let mut offset = 0u64;
    let mut last: Option<u64> = None;
    for r in raws {
        let member = || format!("{id}/{}", r.stem);
        let gap = r.number - last.map_or(0, |l| l + 1);
        offset = gap
            .checked_mul(unit)
            .and_then(|g| offset.checked_add(g))
            .ok_or_else(|| ChunkError::NumberTooLarge { member: member() })?;
        last = Some(r.number);
        if r.size > unit {
            return Err(ChunkError::TooLong { member: member(), size: r.size, unit });
        }
        if r.size == 0 {
            placed.keepalives += 1;
            continue;
        }
        let end = offset.checked_add(r.size).ok_or_else(|| ChunkError::NumberTooLarge { member: member() })?;
        if end > size {
            return Err(ChunkError::PastEnd { member: member(), end, virtual_size: size });
        }
        placed.chunks.push(Chunk { vstart: offset, len: r.size, data: r.offset, number: r.number, sum: r.sum });
        offset = end;
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Members as an archive lists them: (name, size); data offsets are made up but increasing.
    fn members(list: &[(&str, u64)]) -> Vec<Member> {
        let mut off = 512;
        list.iter()
            .map(|&(n, s)| {
                let content = if n.ends_with(".xxhash") {
                    Some(b"EF46DB3751D8E999".to_vec())
                } else if n.ends_with(".checksum") {
                    Some(b"da39a3ee5e6b4b0d3255bfef95601890afd80709".to_vec())
                } else {
                    None
                };
                let m = Member { name: n.into(), offset: off, size: s, content };
                off += 512 + s.next_multiple_of(512);
                m
            })
            .collect()
    }

    fn starts(l: &Layout, d: usize) -> Vec<(u64, u64)> {
        l.disks[d].chunks.iter().map(|c| (c.vstart, c.len)).collect()
    }

    #[test]
    fn keepalive_chunk_shifts_later_chunks_and_gaps_are_zeros() {
        let m = members(&[
            ("Ref:3/00000000", MIB),
            ("Ref:3/00000000.xxhash", 16),
            ("Ref:3/00000001", 0), // keep-alive: a number, no bytes
            ("Ref:3/00000001.xxhash", 16),
            ("Ref:3/00000002", MIB), // the data of offset 1 MiB
            ("Ref:3/00000002.xxhash", 16),
            ("Ref:3/00000005", MIB), // two all-zero chunks omitted: 3 MiB
            ("Ref:3/00000005.xxhash", 16),
            ("Ref:3/00000006", 4096), // short last chunk
            ("Ref:3/00000006.xxhash", 16),
        ]);
        let l = place(&m, &[("Ref:3".into(), 5 * MIB + 4096)], true).unwrap();
        assert_eq!(l.unit, MIB);
        // 0 → 0; 1 is a keep-alive; 2 → 1 MiB; 3 and 4 omitted (2 MiB of zeros); 5 → 4 MiB; 6 → 5 MiB.
        assert_eq!(starts(&l, 0), vec![(0, MIB), (MIB, MIB), (4 * MIB, MIB), (5 * MIB, 4096)]);
        assert_eq!(l.disks[0].keepalives, 1);
    }

    #[test]
    fn defects_name_the_member() {
        let err = |list: &[(&str, u64)], size| {
            place(&members(list), &[("Ref:3".into(), size)], true).unwrap_err().to_string()
        };
        let e = err(&[("Ref:4/00000000", MIB)], MIB);
        assert!(e.contains("Ref:4/00000000") && e.contains("outside"), "{e}");
        let e = err(&[("Ref:3/00000001", MIB), ("Ref:3/00000001.xxhash", 16), ("Ref:3/00000000", MIB)], 4 * MIB);
        assert!(e.contains("Ref:3/00000000") && e.contains("backwards"), "{e}");
        let e = err(
            &[
                ("Ref:3/00000000", MIB),
                ("Ref:3/00000000.xxhash", 16),
                ("Ref:3/00000001", 2 * MIB),
                ("Ref:3/00000001.xxhash", 16),
            ],
            4 * MIB,
        );
        assert!(e.contains("Ref:3/00000001") && e.contains("longer than the chunk size"), "{e}");
        let e = err(&[("Ref:3/00000000", MIB), ("Ref:3/00000001", MIB)], 4 * MIB);
        assert!(e.contains("Ref:3/00000000") && e.contains("no checksum"), "{e}");
        let e = err(
            &[
                ("Ref:3/00000000", MIB),
                ("Ref:3/00000000.xxhash", 16),
                ("Ref:3/00000009", MIB),
                ("Ref:3/00000009.xxhash", 16),
            ],
            4 * MIB,
        );
        assert!(e.contains("past the disk's virtual_size"), "{e}");
        let e = err(&[("Ref:3/00000000", MIB), ("Ref:3/00000001.checksum", 40)], 4 * MIB);
        assert!(e.contains("does not follow"), "{e}");
    }

    #[test]
    fn a_chunk_size_over_the_bound_is_refused_before_anything_is_read() {
        // A tar header can claim any member size; the chunk size is taken from the first chunk.
        let huge = MAX_UNIT + 1;
        let e = place(
            &members(&[("Ref:3/00000000", huge), ("Ref:3/00000000.xxhash", 16)]),
            &[("Ref:3".into(), 4 * huge)],
            true,
        )
        .unwrap_err();
        assert!(matches!(e, ChunkError::ChunkSizeTooLarge { unit, .. } if unit == huge), "{e}");
        assert!(e.to_string().contains("Ref:3"), "{e}");
    }

    #[test]
    fn checksum_texts_parse_strictly() {
        assert_eq!(
            ChunkChecksum::parse("xxhash", b"EF46DB3751D8E999").unwrap(),
            ChunkChecksum::Xxh64(0xEF46DB3751D8E999)
        );
        assert_eq!(ChunkChecksum::Xxh64(0xEF46DB3751D8E999).compute(b""), ChunkChecksum::Xxh64(0xEF46DB3751D8E999));
        let s = ChunkChecksum::parse("checksum", b"da39a3ee5e6b4b0d3255bfef95601890afd80709\n").unwrap();
        assert_eq!(s.compute(b""), s);
        assert_eq!(s.to_string(), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        let e = ChunkChecksum::parse("checksum", b"not hex at all, not hex at all, not hex").unwrap_err();
        assert!(e.to_string().contains("SHA-1"), "{e}");
        let e = ChunkChecksum::parse("xxhash", b"EF46DB37").unwrap_err();
        assert!(e.to_string().contains("16 hex"), "{e}");
        assert_eq!(ChunkChecksum::parse("md5", b"x"), Err(ChecksumError::UnknownType { ext: "md5".into() }));
        // Hashing in pieces gives what hashing at once does.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 253) as u8).collect();
        for sum in [s, ChunkChecksum::Xxh64(0)] {
            let mut h = sum.hasher();
            data.chunks(7777).for_each(|p| h.update(p));
            assert_eq!(h.finish(), sum.compute(&data));
        }
    }

    #[test]
    fn two_disks_and_chunk_size_from_the_archive() {
        let m = members(&[
            ("Ref:10/00000000", 4096), // a one-chunk disk: not the chunk size
            ("Ref:10/00000000.checksum", 40),
            ("Ref:9/00000000", 2 * MIB),
            ("Ref:9/00000000.checksum", 40),
            ("Ref:9/00000002", MIB),
            ("Ref:9/00000002.checksum", 40),
        ]);
        let l = place(&m, &[("Ref:9".into(), 5 * MIB), ("Ref:10".into(), 4096)], true).unwrap();
        assert_eq!(l.unit, 2 * MIB);
        assert_eq!(l.disks[0].vdi, 1);
        assert_eq!(starts(&l, 1), vec![(0, 2 * MIB), (4 * MIB, MIB)]);
    }
}
