//! The metadata log (MS-VHDX 2.3), replayed in memory: entries are validated, the active
//! sequence is found as in 2.3.3, and its data and zero descriptors become the
//! [`ReplayedWrites`] that every later read of the file goes through
//! ([`super::replayed::ReplayedFile`]). The source is never written.
//!
//! Stricter than the spec in one place: if a valid entry newer than the active sequence's head
//! exists, the newest sequence was damaged in the middle (not torn at its head, which is what a
//! crash leaves), and replaying an older sequence would show stale metadata. That is refused.

use std::collections::HashMap;

use byteorder::{ByteOrder, LittleEndian};

use super::Error;
use super::header::{Guid, checksum};
use super::replayed::ReplayedWrites;
use crate::layer::fmt_guid_le;

/// Log entries are made of 4 KiB sectors.
pub const SECTOR: u64 = 4096;
/// Dirty logs larger than this are refused (Hyper-V and qemu write 1 MiB logs).
pub const MAX_LOG: u32 = 64 << 20;
/// Bytes of entries one scan may checksum, as a multiple of the log's length. A log writer
/// appends entries around the ring, so the entries whose headers survive are the ones written
/// within the last lap: they do not overlap and total at most one log length. A crafted log
/// whose every 4 KiB sector claims to start a log-long entry would cost n²/4 KiB of CRC work
/// (1 TiB for a 64 MiB log); it is refused when it passes this bound.
pub const WORK_FACTOR: u64 = 4;
const HEADER_LEN: usize = 64;
const DESC_LEN: usize = 32;

/// An entry header (MS-VHDX 2.3.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHeader {
    pub entry_length: u32,
    pub tail: u32,
    pub sequence: u64,
    pub descriptor_count: u32,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
}

/// One write a descriptor asks for. `Data` holds the whole reassembled 4 KiB sector when the
/// entry was read with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    Data { file_offset: u64, sector: Option<Box<[u8]>> },
    Zero { file_offset: u64, length: u64 },
}

/// What lies at a log offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No entry of this log (no `loge` signature, or another session's LogGuid).
    Nothing,
    /// An entry of this log that fails validation.
    Broken {
        sequence: u64,
        defect: EntryDefect,
    },
    Valid {
        header: EntryHeader,
        writes: Vec<LogWrite>,
    },
}

/// Why a log entry fails validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryDefect {
    #[error("entry length {0:#x} is not a non-zero multiple of 4 KiB within the log")]
    Length(u64),
    #[error("tail {0:#x} is not a 4 KiB offset inside the log")]
    Tail(u32),
    #[error("sequence number 0")]
    SequenceZero,
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("{count} descriptors do not fit in an entry of {len:#x} bytes")]
    DescriptorsDoNotFit { count: u64, len: u64 },
    #[error("descriptor {0} carries another sequence number")]
    DescriptorSequence(usize),
    #[error("descriptor {index} file offset {offset:#x} is not a 4 KiB aligned offset")]
    DescriptorOffset { index: usize, offset: u64 },
    #[error("zero descriptor {index} length {length:#x} is not a multiple of 4 KiB")]
    ZeroLength { index: usize, length: u64 },
    #[error("data descriptor {0} has no data sector inside the entry")]
    NoDataSector(usize),
    #[error("data sector of descriptor {0} has a bad signature or sequence number")]
    DataSector(usize),
    #[error("descriptor {index} has unknown signature {found:02x?}")]
    DescriptorSignature { index: usize, found: [u8; 4] },
}

/// What a broken entry means for the replay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Consequence {
    #[error("the newest valid entry (sequence {sequence}) at {at:#x} depends on it, so the log cannot be replayed")]
    NewerEntryDependsOnIt { sequence: u64, at: u64 },
    #[error("no complete log sequence remains to replay")]
    NothingToReplay,
}

/// Why a log holds no sequence to replay, although no entry of it is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoSequence {
    #[error("the newest valid entry (sequence {sequence}) at {at:#x} does not belong to a complete sequence")]
    Incomplete { sequence: u64, at: u64 },
    #[error("no entry carries the header's LogGuid {{{}}}", fmt_guid_le(.guid))]
    NoEntry { guid: Guid },
    #[error("entry at {0:#x} changed while it was read")]
    Changed(u64),
}

/// `len` (at most the log's length) bytes of the circular log starting at `at`: borrowed, or
/// copied when they wrap around the end.
fn ring(log: &[u8], at: u64, len: u64) -> std::borrow::Cow<'_, [u8]> {
    let (at, len) = (at as usize, len as usize);
    match log.get(at..at + len) {
        Some(b) => std::borrow::Cow::Borrowed(b),
        None => {
            let mut v = Vec::with_capacity(len);
            v.extend_from_slice(&log[at..]);
            v.extend_from_slice(&log[..len - (log.len() - at)]);
            std::borrow::Cow::Owned(v)
        }
    }
}

/// What a scan may still checksum, in bytes ([`WORK_FACTOR`]).
#[derive(Debug)]
pub struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    /// `factor` times the length of `log`.
    pub fn new(log: &[u8], factor: u64) -> Budget {
        let limit = factor.saturating_mul(log.len() as u64);
        Budget { left: limit, limit }
    }

    fn spend(&mut self, at: u64, len: u64) -> Result<(), Error> {
        self.left = self.left.checked_sub(len).ok_or(Error::LogEntriesOverlap { at, limit: self.limit })?;
        Ok(())
    }
}

/// Sectors holding the header and `count` descriptors (126 in the first, 128 in each next one).
fn descriptor_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(128)
}

/// Validates the entry at `at` (a multiple of 4 KiB inside `log`): header fields, LogGuid,
/// checksum over the whole entry, every descriptor and data sector. The checksum is paid from
/// `budget`; a scan that runs out of it is refused. Without `with_data` the descriptors are
/// checked but not returned.
pub fn probe(log: &[u8], at: u64, guid: &Guid, with_data: bool, budget: &mut Budget) -> Result<Probe, Error> {
    let n = log.len() as u64;
    let h = &log[at as usize..at as usize + HEADER_LEN];
    if &h[0..4] != b"loge" || h[32..48] != guid[..] {
        return Ok(Probe::Nothing);
    }
    let header = EntryHeader {
        entry_length: LittleEndian::read_u32(&h[8..12]),
        tail: LittleEndian::read_u32(&h[12..16]),
        sequence: LittleEndian::read_u64(&h[16..24]),
        descriptor_count: LittleEndian::read_u32(&h[24..28]),
        flushed_file_offset: LittleEndian::read_u64(&h[48..56]),
        last_file_offset: LittleEndian::read_u64(&h[56..64]),
    };
    let seq = header.sequence;
    let broken = |defect: EntryDefect| Ok(Probe::Broken { sequence: seq, defect });
    let len = header.entry_length as u64;
    if len == 0 || !len.is_multiple_of(SECTOR) || len > n {
        return broken(EntryDefect::Length(len));
    }
    if !(header.tail as u64).is_multiple_of(SECTOR) || header.tail as u64 >= n {
        return broken(EntryDefect::Tail(header.tail));
    }
    if seq == 0 {
        return broken(EntryDefect::SequenceZero);
    }
    // Checks that cost nothing come before the checksum, which costs the whole entry.
    let count = header.descriptor_count as u64;
    let desc_sectors = descriptor_sectors(count);
    if desc_sectors * SECTOR > len {
        return broken(EntryDefect::DescriptorsDoNotFit { count, len });
    }
    budget.spend(at, len)?;
    let b = ring(log, at, len);
    let stored = LittleEndian::read_u32(&b[4..8]);
    let computed = checksum(&b, 4);
    if stored != computed {
        return broken(EntryDefect::Checksum { stored, computed });
    }
    match descriptors(&b, seq, count as usize, desc_sectors, with_data) {
        Ok(writes) => Ok(Probe::Valid { header, writes }),
        Err(defect) => broken(defect),
    }
}

/// The `count` descriptors of entry `b` (whose sequence number is `seq`) and, for data
/// descriptors, their data sectors, which follow the `desc_sectors` descriptor sectors.
fn descriptors(
    b: &[u8],
    seq: u64,
    count: usize,
    desc_sectors: u64,
    with_data: bool,
) -> Result<Vec<LogWrite>, EntryDefect> {
    let len = b.len() as u64;
    let mut writes = Vec::with_capacity(if with_data { count.min(1 << 16) } else { 0 });
    let mut data_sector = desc_sectors;
    for k in 0..count {
        let d = &b[HEADER_LEN + DESC_LEN * k..HEADER_LEN + DESC_LEN * (k + 1)];
        let file_offset = LittleEndian::read_u64(&d[16..24]);
        if LittleEndian::read_u64(&d[24..32]) != seq {
            return Err(EntryDefect::DescriptorSequence(k));
        }
        if !file_offset.is_multiple_of(SECTOR) || file_offset.checked_add(SECTOR).is_none() {
            return Err(EntryDefect::DescriptorOffset { index: k, offset: file_offset });
        }
        match &d[0..4] {
            b"zero" => {
                let length = LittleEndian::read_u64(&d[8..16]);
                if !length.is_multiple_of(SECTOR) || file_offset.checked_add(length).is_none() {
                    return Err(EntryDefect::ZeroLength { index: k, length });
                }
                if with_data {
                    writes.push(LogWrite::Zero { file_offset, length });
                }
            }
            b"desc" => {
                if (data_sector + 1) * SECTOR > len {
                    return Err(EntryDefect::NoDataSector(k));
                }
                let s = &b[(data_sector * SECTOR) as usize..((data_sector + 1) * SECTOR) as usize];
                let high = LittleEndian::read_u32(&s[4..8]) as u64;
                let low = LittleEndian::read_u32(&s[4092..4096]) as u64;
                if &s[0..4] != b"data" || (high << 32 | low) != seq {
                    return Err(EntryDefect::DataSector(k));
                }
                if with_data {
                    let mut v = vec![0u8; SECTOR as usize];
                    v[0..8].copy_from_slice(&d[8..16]); // leading bytes
                    v[8..4092].copy_from_slice(&s[8..4092]);
                    v[4092..4096].copy_from_slice(&d[4..8]); // trailing bytes
                    writes.push(LogWrite::Data { file_offset, sector: Some(v.into_boxed_slice()) });
                }
                data_sector += 1;
            }
            _ => return Err(EntryDefect::DescriptorSignature { index: k, found: [d[0], d[1], d[2], d[3]] }),
        }
    }
    Ok(writes)
}

/// The active sequence: log offsets of its entries, tail first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub offsets: Vec<u64>,
    pub first: u64,
    pub head: EntryHeader,
}

/// Finds the active sequence (MS-VHDX 2.3.3). Errors when there is none, or when a newer valid
/// entry shows that the newest sequence is damaged.
pub fn active_sequence(log: &[u8], guid: &Guid) -> Result<Sequence, Error> {
    let n = log.len() as u64;
    // Each offset is probed once: at most n / 4 KiB probes, their checksums bounded in total.
    let mut budget = Budget::new(log, WORK_FACTOR);
    let mut memo: HashMap<u64, Probe> = HashMap::new();
    let mut look = |at: u64| -> Result<Probe, Error> {
        if let Some(p) = memo.get(&at) {
            return Ok(p.clone());
        }
        let p = probe(log, at, guid, false, &mut budget)?;
        memo.insert(at, p.clone());
        Ok(p)
    };
    let mut candidate: Option<Sequence> = None;
    let (mut cur_tail, mut old_tail) = (0u64, 0u64);
    loop {
        // Extend a sequence from cur_tail as long as entries are valid and consecutive.
        let mut seq: Vec<(u64, EntryHeader)> = Vec::new();
        let mut head = cur_tail;
        let mut used = 0u64;
        while let Probe::Valid { header, .. } = look(head)? {
            let follows = seq.last().is_none_or(|(_, last)| header.sequence == last.sequence + 1);
            if !follows || used + header.entry_length as u64 > n {
                break;
            }
            used += header.entry_length as u64;
            head = (head + header.entry_length as u64) % n;
            seq.push((head, header));
        }
        // Entry k starts where entry k-1 ended; the first starts at cur_tail.
        let starts: Vec<u64> =
            std::iter::once(cur_tail).chain(seq.iter().map(|(end, _)| *end)).take(seq.len()).collect();
        let valid = seq.last().and_then(|(_, h)| starts.iter().position(|s| *s == h.tail as u64));
        if let (Some(from), Some((_, h))) = (valid, seq.last())
            && candidate.as_ref().is_none_or(|c| h.sequence > c.head.sequence)
        {
            let offsets = starts[from..].to_vec();
            let first = seq[from].1.sequence;
            candidate = Some(Sequence { offsets, first, head: h.clone() });
        }
        cur_tail = if valid.is_none() { (cur_tail + SECTOR) % n } else { head };
        if cur_tail <= old_tail {
            break;
        }
        old_tail = cur_tail;
    }
    let newest = memo
        .iter()
        .filter_map(|(at, p)| match p {
            Probe::Valid { header, .. } => Some((header.sequence, *at)),
            _ => None,
        })
        .max();
    match (candidate, newest) {
        (Some(c), Some((top, _))) if c.head.sequence >= top => Ok(c),
        (c, newest) => Err(why_not_replayable(&memo, c.map_or(0, |c| c.head.sequence), newest, guid)),
    }
}

/// Why no sequence can be replayed: the oldest broken entry newer than the best complete
/// sequence (which ends at sequence number `after`), or else why no complete sequence exists.
/// `newest` is the sequence number and log offset of the newest valid entry.
fn why_not_replayable(memo: &HashMap<u64, Probe>, after: u64, newest: Option<(u64, u64)>, guid: &Guid) -> Error {
    let broken = memo
        .iter()
        .filter_map(|(at, p)| match p {
            Probe::Broken { sequence, defect } if *sequence > after => Some((*sequence, *at, defect)),
            _ => None,
        })
        .min_by_key(|(sequence, at, _)| (*sequence, *at));
    match broken {
        Some((sequence, at, defect)) => Error::LogEntry {
            at,
            sequence,
            defect: defect.clone(),
            consequence: match newest {
                Some((s, newest_at)) if s > sequence => {
                    Consequence::NewerEntryDependsOnIt { sequence: s, at: newest_at }
                }
                _ => Consequence::NothingToReplay,
            },
        },
        None => Error::NoLogSequence(match newest {
            Some((sequence, at)) => NoSequence::Incomplete { sequence, at },
            None => NoSequence::NoEntry { guid: *guid },
        }),
    }
}

/// What a replay did, for `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub entries: usize,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub data_descriptors: usize,
    pub zero_descriptors: usize,
}

/// Replays the active sequence of `log` over a file of `file_len` bytes. Returns the writes, the
/// file length afterwards (extended to LastFileOffset and to the furthest write) and a summary.
pub fn replay(log: &[u8], guid: &Guid, file_len: u64) -> Result<(ReplayedWrites, u64, Summary), Error> {
    let seq = active_sequence(log, guid)?;
    if seq.head.flushed_file_offset > file_len {
        return Err(Error::LogTruncated { flushed: seq.head.flushed_file_offset, len: file_len });
    }
    let mut writes = ReplayedWrites::default();
    let mut summary = Summary {
        entries: seq.offsets.len(),
        first_sequence: seq.first,
        last_sequence: seq.head.sequence,
        data_descriptors: 0,
        zero_descriptors: 0,
    };
    // The active sequence's entries follow one another without overlap: one log length.
    let mut budget = Budget::new(log, 1);
    for &at in &seq.offsets {
        let Probe::Valid { writes: entry, .. } = probe(log, at, guid, true, &mut budget)? else {
            return Err(Error::NoLogSequence(NoSequence::Changed(at)));
        };
        for w in entry {
            match w {
                LogWrite::Data { .. } => summary.data_descriptors += 1,
                LogWrite::Zero { .. } => summary.zero_descriptors += 1,
            }
            writes.apply(w);
        }
    }
    let len = file_len.max(seq.head.last_file_offset).max(writes.end());
    Ok((writes, len, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::formats::vhdx::replayed::ReplayedFile;
    use crate::source::{MemSource, Source};

    const GUID: Guid = [0x5A; 16];

    /// One log entry with `writes` (data sectors filled with `fill`), written by hand per 2.3.1.
    fn entry(seq: u64, tail: u32, writes: &[(bool, u64, u64)], fill: u8, guid: &Guid) -> Vec<u8> {
        let n_data = writes.iter().filter(|w| w.0).count() as u64;
        let ds = descriptor_sectors(writes.len() as u64);
        let len = (ds + n_data) * SECTOR;
        let mut b = vec![0u8; len as usize];
        b[0..4].copy_from_slice(b"loge"); // signature
        b[8..12].copy_from_slice(&(len as u32).to_le_bytes()); // entry length
        b[12..16].copy_from_slice(&tail.to_le_bytes()); // tail
        b[16..24].copy_from_slice(&seq.to_le_bytes()); // sequence number
        b[24..28].copy_from_slice(&(writes.len() as u32).to_le_bytes()); // descriptor count
        b[32..48].copy_from_slice(guid); // log guid
        b[48..56].copy_from_slice(&(4u64 << 20).to_le_bytes()); // flushed file offset
        b[56..64].copy_from_slice(&(5u64 << 20).to_le_bytes()); // last file offset
        let mut data = ds;
        for (k, &(is_data, off, zlen)) in writes.iter().enumerate() {
            let d = 64 + 32 * k;
            if is_data {
                b[d..d + 4].copy_from_slice(b"desc"); // data descriptor signature
                b[d + 4..d + 8].copy_from_slice(&[fill; 4]); // trailing bytes
                b[d + 8..d + 16].copy_from_slice(&[fill; 8]); // leading bytes
                let s = (data * SECTOR) as usize;
                b[s..s + 4].copy_from_slice(b"data"); // data sector signature
                b[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes()); // sequence high
                b[s + 8..s + 4092].fill(fill); // data
                b[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes()); // sequence low
                data += 1;
            } else {
                b[d..d + 4].copy_from_slice(b"zero"); // zero descriptor signature
                b[d + 8..d + 16].copy_from_slice(&zlen.to_le_bytes()); // zero length
            }
            b[d + 16..d + 24].copy_from_slice(&off.to_le_bytes()); // file offset
            b[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes()); // sequence number
        }
        let c = checksum(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes()); // checksum
        b
    }

    fn log_with(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut log = vec![0u8; 1 << 20];
        let n = log.len();
        for (at, e) in entries {
            for (i, x) in e.iter().enumerate() {
                log[(*at as usize + i) % n] = *x;
            }
        }
        log
    }

    #[test]
    fn a_single_self_tailed_entry_is_the_active_sequence() {
        let log = log_with(&[(0, entry(1, 0, &[(true, 0x3000, 0)], 0xAB, &GUID))]);
        let s = active_sequence(&log, &GUID).unwrap();
        assert_eq!(s.offsets, vec![0]);
        assert_eq!(s.head.sequence, 1);
    }

    #[test]
    fn the_newest_complete_sequence_wins_and_starts_at_its_tail() {
        let old = entry(3, 0x10000, &[(true, 0x1000, 0)], 1, &GUID);
        let e5 = entry(5, 0x40000, &[(true, 0x2000, 0)], 2, &GUID);
        let e6 = entry(6, 0x40000 + e5.len() as u32, &[(true, 0x2000, 0)], 3, &GUID);
        let e7 = entry(7, 0x40000 + e5.len() as u32, &[(false, 0x2000, 0x1000)], 0, &GUID);
        let l5 = e5.len() as u64;
        let l6 = e6.len() as u64;
        let log = log_with(&[(0x10000, old), (0x40000, e5), (0x40000 + l5, e6), (0x40000 + l5 + l6, e7)]);
        let s = active_sequence(&log, &GUID).unwrap();
        // e7's tail is e6: e5 was already flushed and is not replayed.
        assert_eq!(s.offsets, vec![0x40000 + l5, 0x40000 + l5 + l6]);
        assert_eq!((s.first, s.head.sequence), (6, 7));
        let (ov, len, sum) = replay(&log, &GUID, 4 << 20).unwrap();
        assert_eq!(len, 5 << 20, "extended to LastFileOffset");
        assert_eq!((sum.data_descriptors, sum.zero_descriptors), (1, 1));
        let v = ReplayedFile::new(Arc::new(MemSource::new("f", vec![1u8; 4 << 20])), ov, 4 << 20, len);
        assert_eq!(
            v.read_vec(0x2000, 0x1000).unwrap(),
            vec![0u8; 0x1000],
            "the zero in entry 7 replaces entry 6's data"
        );
    }

    #[test]
    fn entries_of_another_log_guid_are_ignored() {
        let log = log_with(&[(0, entry(9, 0, &[(true, 0x1000, 0)], 1, &[0x77; 16]))]);
        assert!(matches!(active_sequence(&log, &GUID), Err(Error::NoLogSequence(_))));
    }

    #[test]
    fn a_sequence_may_wrap_around_the_end_of_the_log() {
        let at = (1 << 20) - SECTOR;
        let e = entry(4, at as u32, &[(true, 0x5000, 0), (true, 0x6000, 0)], 9, &GUID);
        let log = log_with(&[(at, e)]);
        let s = active_sequence(&log, &GUID).unwrap();
        assert_eq!(s.offsets, vec![at]);
        let (ov, _, _) = replay(&log, &GUID, 8 << 20).unwrap();
        let v = ReplayedFile::new(Arc::new(MemSource::new("f", vec![1u8; 8 << 20])), ov, 8 << 20, 8 << 20);
        assert_eq!(v.read_vec(0x6000, 0x1000).unwrap(), vec![9u8; 0x1000]);
    }

    #[test]
    fn a_torn_head_is_not_replayed() {
        let e1 = entry(1, 0, &[(true, 0x1000, 0)], 1, &GUID);
        let mut e2 = entry(2, 0, &[(true, 0x1000, 0)], 2, &GUID);
        let l1 = e1.len() as u64;
        e2[5000] ^= 0xFF; // data torn by a crash
        let log = log_with(&[(0, e1), (l1, e2)]);
        let s = active_sequence(&log, &GUID).unwrap();
        assert_eq!(s.head.sequence, 1);
    }

    #[test]
    fn a_bad_checksum_inside_the_active_sequence_is_refused() {
        let e1 = entry(1, 0, &[(true, 0x1000, 0)], 1, &GUID);
        let mut e2 = entry(2, 0, &[(true, 0x1000, 0)], 2, &GUID);
        let e3 = entry(3, 0, &[(true, 0x1000, 0)], 3, &GUID);
        let (l1, l2) = (e1.len() as u64, e2.len() as u64);
        e2[5000] ^= 0xFF;
        let log = log_with(&[(0, e1), (l1, e2), (l1 + l2, e3)]);
        let e = active_sequence(&log, &GUID).unwrap_err();
        assert!(matches!(&e, Error::LogEntry { sequence: 2, .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("checksum mismatch") && text.contains("sequence 3"), "{text}");
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let log = log_with(&[(0, entry(1, 0, &[], 0, &GUID))]);
        assert!(matches!(replay(&log, &GUID, 1 << 20), Err(Error::LogTruncated { .. })));
    }

    #[test]
    fn a_log_whose_every_sector_claims_the_whole_log_is_refused_in_bounded_work() {
        // Every 4 KiB sector starts an entry of this log that claims to be as long as the log:
        // scanning it all would checksum n * n / 4 KiB bytes (4 GiB here, 1 TiB at 64 MiB).
        let n = 4usize << 20;
        let mut log = vec![0u8; n];
        for at in (0..n).step_by(SECTOR as usize) {
            let h = &mut log[at..at + 64];
            h[0..4].copy_from_slice(b"loge"); // signature
            h[8..12].copy_from_slice(&(n as u32).to_le_bytes()); // entry length: the whole log
            h[16..24].copy_from_slice(&1u64.to_le_bytes()); // sequence number
            h[32..48].copy_from_slice(&GUID); // log guid
        }
        let t = std::time::Instant::now();
        let e = active_sequence(&log, &GUID).unwrap_err();
        assert!(matches!(e, Error::LogEntriesOverlap { limit, .. } if limit == WORK_FACTOR * n as u64), "{e}");
        assert!(e.to_string().contains("log entries overlap"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "{:?}", t.elapsed());
        // The budget counts only what is checksummed: a genuine log of back-to-back entries
        // filling the ring costs one pass.
        let mut entries = Vec::new();
        let mut at = 0u64;
        for seq in 1..=120u64 {
            let e = entry(seq, 0, &[(true, 0x1000 * seq, 0)], seq as u8, &GUID);
            let len = e.len() as u64;
            entries.push((at, e));
            at += len;
        }
        let s = active_sequence(&log_with(&entries), &GUID).unwrap();
        assert_eq!((s.first, s.head.sequence), (1, 120));
    }

    #[test]
    fn garbage_logs_never_panic_and_never_yield_a_sequence() {
        for seed in 0..64u64 {
            let mut log = testkit::pattern(seed, 256 << 10);
            // Plant entry headers of this log at random sector starts.
            for k in 0..16u64 {
                let at = ((seed * 7 + k * 13) % 64) as usize * SECTOR as usize;
                log[at..at + 4].copy_from_slice(b"loge");
                log[at + 32..at + 48].copy_from_slice(&GUID);
                log[at + 8..at + 12].copy_from_slice(&(((k % 5) as u32) << 12).to_le_bytes());
            }
            assert!(active_sequence(&log, &GUID).is_err());
        }
    }
}
