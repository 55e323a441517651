//! A VHDX writer in Hyper-V's layout: fixed, dynamic and differencing disks, 512- or 4096-byte
//! logical sectors, every payload block state, sector bitmaps for partially present blocks,
//! Hyper-V style parent locators, and an optional pending log whose entries are written here by
//! hand from [MS-VHDX] 2.3.
//!
//! File layout: identifier, header 1 and 2 (64/128 KiB), region table and its copy (192/256 KiB),
//! log at 1 MiB (1 MiB), metadata region at 2 MiB (1 MiB), BAT at 3 MiB, then payload blocks and
//! sector bitmap blocks.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;
const LOG_OFFSET: u64 = MIB;
const LOG_LEN: u64 = MIB;
const META_OFFSET: u64 = 2 * MIB;
const META_LEN: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;
const PAGE: usize = 4096;

/// `a-b-c-d` in the on-disk GUID order (first three fields little-endian).
const fn ms_guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let (a, b, c) = (a.to_le_bytes(), b.to_le_bytes(), c.to_le_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

const REGION_BAT: [u8; 16] = ms_guid(0x2DC27766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
const REGION_META: [u8; 16] = ms_guid(0x8B7CA206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]);
const ITEM_FILE_PARAMS: [u8; 16] =
    ms_guid(0xCAA16737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]);
const ITEM_SIZE: [u8; 16] = ms_guid(0x2FA54224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]);
const ITEM_DISK_ID: [u8; 16] = ms_guid(0xBECA12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]);
const ITEM_LOGICAL: [u8; 16] = ms_guid(0x8141BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]);
const ITEM_PHYSICAL: [u8; 16] = ms_guid(0xCDA348C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]);
const ITEM_LOCATOR: [u8; 16] = ms_guid(0xA8D35F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C]);
const LOCATOR_VHDX: [u8; 16] = ms_guid(0xB04AEFB7, 0xD19E, 0x4A81, [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13]);

/// CRC-32C over `b` with the checksum field at `at` zero; stores it there.
fn seal(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let c = crc32c::crc32c(b);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_le_bytes()).collect()
}

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` in lowercase, from on-disk GUID bytes.
pub fn guid_text(g: &[u8; 16]) -> String {
    let h = |r: &[u8]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let rev = |r: &[u8]| r.iter().rev().copied().collect::<Vec<u8>>();
    format!("{{{}-{}-{}-{}-{}}}", h(&rev(&g[0..4])), h(&rev(&g[4..6])), h(&rev(&g[6..8])), h(&g[8..10]), h(&g[10..16]))
}

#[derive(Debug, Clone)]
enum Kind {
    Dynamic,
    Fixed,
    Differencing { linkage: [u8; 16], parent_name: String },
}

#[derive(Debug, Clone)]
enum Block {
    Zero,
    Unmapped,
    Undefined,
    /// Block bytes and one bit per logical sector (bit 0 of byte 0 first) for sectors present.
    Data {
        data: Vec<u8>,
        present: Vec<u8>,
    },
}

/// A pending log: the file on disk holds the *old* BAT and metadata, the log the writes that make
/// them the ones this builder describes. Replaying it must give the builder's disk.
#[derive(Debug, Clone, Default)]
pub struct LogPlan {
    /// Blocks whose BAT entries are only in the log (NOT_PRESENT in the file's BAT).
    pub stale_blocks: Vec<u64>,
    /// The file's whole BAT is garbage (every entry FULLY_PRESENT at the first payload block);
    /// the log zeroes the BAT region with one zero descriptor, then writes its non-zero pages
    /// back with data descriptors, so replaying out of order gives wrong bytes too.
    pub garbage_bat: bool,
    /// The file's metadata says this virtual size; the log carries the right one.
    pub old_virtual_size: Option<u64>,
    /// Split the descriptors over this many entries (at least 1).
    pub entries: usize,
    /// Log offset of the first entry (a multiple of 4 KiB; near the end to wrap around).
    pub start: u64,
    /// An older complete sequence elsewhere in the log, which must not be replayed.
    pub older_sequence: bool,
    /// A torn entry after the head (valid header, bad checksum), which must not be replayed.
    pub torn_head: bool,
    /// Damage the data of this entry of the sequence after sealing it.
    pub corrupt_entry: Option<usize>,
}

/// Builds one VHDX file.
#[derive(Debug, Clone)]
pub struct VhdxBuilder {
    kind: Kind,
    size: u64,
    block_size: u64,
    logical_sector: u64,
    physical_sector: u32,
    data_write_guid: [u8; 16],
    blocks: BTreeMap<u64, Block>,
    locators: Option<Vec<(String, String)>>,
    log: Option<LogPlan>,
    torn_header: bool,
}

/// (DataWriteGuid, virtual size, logical sector size) of an existing VHDX.
fn parent_facts(path: &Path) -> io::Result<([u8; 16], u64, u64)> {
    let f = File::open(path)?;
    let read = |off: u64, len: usize| -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off)?;
        Ok(b)
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("parent: {what}"));
    let mut best: Option<(u64, [u8; 16])> = None;
    for at in [64 << 10, 128 << 10] {
        let mut h = read(at, PAGE)?;
        let stored = u32::from_le_bytes(h[4..8].try_into().expect("4"));
        h[4..8].fill(0);
        if &h[0..4] == b"head" && crc32c::crc32c(&h) == stored {
            let seq = u64::from_le_bytes(h[8..16].try_into().expect("8"));
            if best.is_none_or(|(s, _)| seq > s) {
                best = Some((seq, h[32..48].try_into().expect("16")));
            }
        }
    }
    let (_, dwg) = best.ok_or_else(|| bad("no valid header"))?;
    let rt = read(192 << 10, 64 << 10)?;
    let n = u32::from_le_bytes(rt[8..12].try_into().expect("4")) as usize;
    let meta = (0..n.min(2047))
        .map(|i| &rt[16 + 32 * i..48 + 32 * i])
        .find(|e| e[0..16] == REGION_META)
        .map(|e| u64::from_le_bytes(e[16..24].try_into().expect("8")))
        .ok_or_else(|| bad("no metadata region"))?;
    let t = read(meta, 64 << 10)?;
    let count = u16::from_le_bytes([t[10], t[11]]) as usize;
    let item = |id: [u8; 16], len: usize| -> io::Result<Vec<u8>> {
        let e = (0..count.min(2047))
            .map(|i| &t[32 + 32 * i..64 + 32 * i])
            .find(|e| e[0..16] == id)
            .ok_or_else(|| bad("item"))?;
        read(meta + u32::from_le_bytes(e[16..20].try_into().expect("4")) as u64, len)
    };
    let size = u64::from_le_bytes(item(ITEM_SIZE, 8)?.try_into().expect("8"));
    let lss = u32::from_le_bytes(item(ITEM_LOGICAL, 4)?.try_into().expect("4")) as u64;
    Ok((dwg, size, lss))
}

impl VhdxBuilder {
    fn new(kind: Kind, size: u64) -> Self {
        let block_size = match kind {
            Kind::Differencing { .. } => 2 * MIB, // Hyper-V's differencing default
            _ => 32 * MIB,                        // Hyper-V's dynamic default
        };
        VhdxBuilder {
            kind,
            size,
            block_size,
            logical_sector: 512,
            physical_sector: 4096,
            data_write_guid: super::random_uuid(),
            blocks: BTreeMap::new(),
            locators: None,
            log: None,
            torn_header: false,
        }
    }

    pub fn dynamic(size: u64) -> Self {
        Self::new(Kind::Dynamic, size)
    }
    /// Every block allocated, LeaveBlockAllocated set.
    pub fn fixed(size: u64) -> Self {
        Self::new(Kind::Fixed, size)
    }
    /// A child of the VHDX at `parent`: its DataWriteGuid, size and logical sector size are read
    /// from it, and the locator names it as Hyper-V does.
    pub fn differencing(parent: &Path) -> io::Result<Self> {
        let (linkage, size, lss) = parent_facts(parent)?;
        let parent_name = parent.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self::new(Kind::Differencing { linkage, parent_name }, size).logical_sector(lss))
    }

    pub fn block_size(mut self, bs: u64) -> Self {
        self.block_size = bs;
        self
    }
    pub fn logical_sector(mut self, n: u64) -> Self {
        self.logical_sector = n;
        self
    }
    pub fn physical_sector(mut self, n: u32) -> Self {
        self.physical_sector = n;
        self
    }
    pub fn data_write_guid(mut self, g: [u8; 16]) -> Self {
        self.data_write_guid = g;
        self
    }
    pub fn data_write_guid_value(&self) -> [u8; 16] {
        self.data_write_guid
    }
    /// Replaces the parent locator's key/value entries.
    pub fn locators(mut self, kv: Vec<(String, String)>) -> Self {
        self.locators = Some(kv);
        self
    }
    pub fn pending_log(mut self, plan: LogPlan) -> Self {
        self.log = Some(plan);
        self
    }
    /// Header 2 (the newer one) is torn: its checksum does not match, header 1 must be used.
    pub fn torn_header(mut self) -> Self {
        self.torn_header = true;
        self
    }

    fn has_parent(&self) -> bool {
        matches!(self.kind, Kind::Differencing { .. })
    }

    fn sectors_per_block(&self) -> usize {
        (self.block_size / self.logical_sector) as usize
    }

    /// Stores `data` at `offset` (whole logical sectors) and marks those sectors present.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> &mut Self {
        let lss = self.logical_sector;
        assert!(offset.is_multiple_of(lss) && (data.len() as u64).is_multiple_of(lss), "whole sectors only");
        assert!(offset + data.len() as u64 <= self.size, "write past the end");
        let (bs, spb) = (self.block_size, self.sectors_per_block());
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let (b, inb) = (off / bs, (off % bs) as usize);
            let n = (bs as usize - inb).min(data.len() - pos);
            let blk = self.blocks.entry(b).or_insert(Block::Undefined);
            if !matches!(blk, Block::Data { .. }) {
                // A zeroed or unmapped block becomes present in full (zeros); an absent or
                // undefined one only where written.
                let full = matches!(blk, Block::Zero | Block::Unmapped);
                *blk = Block::Data { data: vec![0; bs as usize], present: vec![if full { 0xFF } else { 0 }; spb / 8] };
            }
            if let Block::Data { data: d, present } = blk {
                d[inb..inb + n].copy_from_slice(&data[pos..pos + n]);
                for s in inb / lss as usize..(inb + n) / lss as usize {
                    present[s / 8] |= 1 << (s % 8);
                }
            }
            pos += n;
        }
        self
    }

    /// Writes every `unit` where `new` differs from `old` (both whole disks).
    pub fn write_diff(&mut self, old: &[u8], new: &[u8], unit: usize) -> &mut Self {
        let mut i = 0;
        while i < new.len() {
            let end = (i + unit).min(new.len());
            if old[i..end] != new[i..end] {
                self.write(i as u64, &new[i..end]);
            }
            i = end;
        }
        self
    }

    /// Block `b` reads zeros (PAYLOAD_BLOCK_ZERO), masking any parent.
    pub fn zero_block(&mut self, b: u64) -> &mut Self {
        assert!(b < self.size.div_ceil(self.block_size), "block past the end");
        self.blocks.insert(b, Block::Zero);
        self
    }
    /// Block `b` was unmapped (PAYLOAD_BLOCK_UNMAPPED); its stale data stays in the file.
    pub fn unmap_block(&mut self, b: u64) -> &mut Self {
        assert!(b < self.size.div_ceil(self.block_size), "block past the end");
        self.blocks.insert(b, Block::Unmapped);
        self
    }
    /// Block `b` is PAYLOAD_BLOCK_UNDEFINED (the parent shows through, zeros without parent).
    pub fn undefined_block(&mut self, b: u64) -> &mut Self {
        assert!(b < self.size.div_ceil(self.block_size), "block past the end");
        self.blocks.insert(b, Block::Undefined);
        self
    }

    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.logical_sector / self.block_size
    }

    fn bat_entries(&self) -> u64 {
        let (data, cr) = (self.size.div_ceil(self.block_size), self.chunk_ratio());
        if self.has_parent() { data.div_ceil(cr) * (cr + 1) } else { data + (data.max(1) - 1) / cr }
    }

    fn locator_pairs(&self) -> Vec<(String, String)> {
        let Kind::Differencing { linkage, parent_name } = &self.kind else { return Vec::new() };
        if let Some(kv) = &self.locators {
            return kv.clone();
        }
        vec![
            ("parent_linkage".into(), guid_text(linkage)),
            ("relative_path".into(), format!(r".\{parent_name}")),
            (
                "volume_path".into(),
                format!(r"\\?\Volume{{3e1a7f62-0000-0000-0000-100000000000}}\Hyper-V\Virtual Hard Disks\{parent_name}"),
            ),
            ("absolute_win32_path".into(), format!(r"C:\Hyper-V\Virtual Hard Disks\{parent_name}")),
        ]
    }

    fn metadata_region(&self, size: u64) -> Vec<u8> {
        let mut r = vec![0u8; META_LEN as usize];
        let mut fp = (self.block_size as u32).to_le_bytes().to_vec();
        let flags: u32 = match self.kind {
            Kind::Fixed => 1,
            Kind::Dynamic => 0,
            Kind::Differencing { .. } => 2,
        };
        fp.extend_from_slice(&flags.to_le_bytes());
        let mut items: Vec<([u8; 16], u32, Vec<u8>)> = vec![
            (ITEM_FILE_PARAMS, 4, fp),
            (ITEM_SIZE, 6, size.to_le_bytes().to_vec()),
            (ITEM_DISK_ID, 6, self.data_write_guid.iter().rev().copied().collect()),
            (ITEM_LOGICAL, 6, (self.logical_sector as u32).to_le_bytes().to_vec()),
            (ITEM_PHYSICAL, 6, self.physical_sector.to_le_bytes().to_vec()),
        ];
        let pairs = self.locator_pairs();
        if self.has_parent() {
            let mut l = LOCATOR_VHDX.to_vec();
            l.extend_from_slice(&0u16.to_le_bytes());
            l.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
            let mut strings = Vec::new();
            let base = 20 + 12 * pairs.len();
            for (k, v) in &pairs {
                let (k, v) = (utf16le(k), utf16le(v));
                l.extend_from_slice(&((base + strings.len()) as u32).to_le_bytes());
                l.extend_from_slice(&((base + strings.len() + k.len()) as u32).to_le_bytes());
                l.extend_from_slice(&(k.len() as u16).to_le_bytes());
                l.extend_from_slice(&(v.len() as u16).to_le_bytes());
                strings.extend_from_slice(&k);
                strings.extend_from_slice(&v);
            }
            l.extend_from_slice(&strings);
            items.push((ITEM_LOCATOR, 4, l));
        }
        r[0..8].copy_from_slice(b"metadata");
        r[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut at = 64 << 10;
        for (i, (id, flags, data)) in items.iter().enumerate() {
            let e = 32 + 32 * i;
            r[e..e + 16].copy_from_slice(id);
            r[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
            r[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
            r[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
            r[at..at + data.len()].copy_from_slice(data);
            at += data.len().next_multiple_of(8);
        }
        r
    }

    fn header(&self, seq: u64, log_guid: [u8; 16]) -> Vec<u8> {
        let mut h = vec![0u8; PAGE];
        h[0..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..32].copy_from_slice(&[0x46; 16]); // FileWriteGuid
        h[32..48].copy_from_slice(&self.data_write_guid);
        h[48..64].copy_from_slice(&log_guid);
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        h[68..72].copy_from_slice(&(LOG_LEN as u32).to_le_bytes());
        h[72..80].copy_from_slice(&LOG_OFFSET.to_le_bytes());
        seal(&mut h, 4);
        h
    }

    /// Writes the file.
    pub fn build(&self, path: &Path) -> io::Result<()> {
        assert!(self.block_size.is_power_of_two() && self.block_size >= MIB, "block size");
        let (bs, spb, cr) = (self.block_size, self.sectors_per_block(), self.chunk_ratio());
        let data_blocks = self.size.div_ceil(bs);
        let entries = self.bat_entries();
        let bat_len = (entries * 8).next_multiple_of(MIB).max(MIB);
        let mut bat = vec![0u8; bat_len as usize];
        let mut next = BAT_OFFSET + bat_len;
        let mut payload: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut chunks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let fixed = matches!(self.kind, Kind::Fixed);
        let put = |bat: &mut Vec<u8>, i: u64, v: u64| {
            bat[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&v.to_le_bytes())
        };
        for b in 0..data_blocks {
            let blk = self.blocks.get(&b);
            let index = b + b / cr;
            let entry = match blk {
                None if !fixed => 0,
                None => {
                    payload.push((next, vec![0; bs as usize]));
                    next += bs;
                    (next - bs) | 6
                }
                Some(Block::Zero) => 2,
                Some(Block::Undefined) => 1,
                Some(Block::Unmapped) => {
                    // The unmapped block still points at its stale data (allowed by 2.5.1.1).
                    payload.push((next, vec![0xEE; bs as usize]));
                    next += bs;
                    (next - bs) | 3
                }
                Some(Block::Data { data, present }) => {
                    let full = !self.has_parent() || present.iter().all(|&x| x == 0xFF);
                    let mut bytes = data.clone();
                    for s in (0..spb).filter(|_| !full) {
                        if present[s / 8] & (1 << (s % 8)) == 0 {
                            // Sectors not present hold garbage that no reader may return.
                            bytes[s * self.logical_sector as usize..(s + 1) * self.logical_sector as usize].fill(0xEE);
                        }
                    }
                    if self.has_parent() {
                        let map = chunks.entry(b / cr).or_insert_with(|| vec![0; MIB as usize]);
                        let at = ((b % cr) as usize) * spb / 8;
                        map[at..at + spb / 8].copy_from_slice(present);
                    }
                    payload.push((next, bytes));
                    next += bs;
                    (next - bs) | if full { 6 } else { 7 }
                }
            };
            put(&mut bat, index, entry);
        }
        for (c, map) in &chunks {
            put(&mut bat, c * (cr + 1) + cr, next | 6);
            payload.push((next, map.clone()));
            next += MIB;
        }
        let file_len = next;
        let meta = self.metadata_region(self.size);

        // The log, if any: the file gets the old BAT and metadata, the log the difference.
        let mut log_guid = [0u8; 16];
        let mut file_bat = bat.clone();
        let mut file_meta = meta.clone();
        let mut log = vec![0u8; LOG_LEN as usize];
        if let Some(plan) = &self.log {
            log_guid = [0x10, 0x9a, 0x7c, 0x3e, 0x55, 0x01, 0x4b, 0x42, 0x8e, 0x21, 0x6f, 0x3d, 0x90, 0xaa, 0x12, 0x34];
            for &b in &plan.stale_blocks {
                put(&mut file_bat, b + b / cr, 0);
            }
            if let Some(old) = plan.old_virtual_size {
                file_meta = self.metadata_region(old);
            }
            let mut writes = if plan.garbage_bat {
                let junk = (BAT_OFFSET + bat_len) | 6;
                for e in file_bat.chunks_mut(8) {
                    e.copy_from_slice(&junk.to_le_bytes());
                }
                let mut w = vec![LogWrite::Zero(BAT_OFFSET, bat_len)];
                for (p, page) in bat.chunks(PAGE).enumerate() {
                    if page.iter().any(|&x| x != 0) {
                        w.push(LogWrite::Data(BAT_OFFSET + (p * PAGE) as u64, page.to_vec()));
                    }
                }
                w
            } else {
                diff_pages(BAT_OFFSET, &file_bat, &bat)
            };
            writes.extend(diff_pages(META_OFFSET, &file_meta, &meta));
            write_log(&mut log, plan, &log_guid, &writes, file_len);
        }

        let f = File::create(path)?;
        f.set_len(file_len)?;
        let mut id = vec![0u8; 520];
        id[0..8].copy_from_slice(b"vhdxfile");
        let creator = utf16le("vdiskfs testkit");
        id[8..8 + creator.len()].copy_from_slice(&creator);
        f.write_all_at(&id, 0)?;
        let mut h2 = self.header(11, log_guid);
        if self.torn_header {
            h2[3000] ^= 0x5A;
        }
        f.write_all_at(&self.header(10, log_guid), 64 << 10)?;
        f.write_all_at(&h2, 128 << 10)?;
        let mut rt = vec![0u8; 64 << 10];
        rt[0..4].copy_from_slice(b"regi");
        rt[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (g, off, len)) in
            [(REGION_BAT, BAT_OFFSET, bat_len), (REGION_META, META_OFFSET, META_LEN)].iter().enumerate()
        {
            let e = 16 + 32 * i;
            rt[e..e + 16].copy_from_slice(g);
            rt[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
            rt[e + 24..e + 28].copy_from_slice(&(*len as u32).to_le_bytes());
            rt[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
        }
        seal(&mut rt, 4);
        f.write_all_at(&rt, 192 << 10)?;
        f.write_all_at(&rt, 256 << 10)?;
        f.write_all_at(&log, LOG_OFFSET)?;
        f.write_all_at(&file_meta, META_OFFSET)?;
        f.write_all_at(&file_bat, BAT_OFFSET)?;
        for (at, bytes) in &payload {
            if bytes.iter().any(|&x| x != 0) {
                f.write_all_at(bytes, *at)?;
            }
        }
        Ok(())
    }
}

/// A write carried by the log.
enum LogWrite {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// The 4 KiB pages where `old` (in the file) differs from `new`: zero descriptors for runs of
/// pages that become all zero, data descriptors for the rest.
fn diff_pages(base: u64, old: &[u8], new: &[u8]) -> Vec<LogWrite> {
    let mut out: Vec<LogWrite> = Vec::new();
    for (p, (o, n)) in old.chunks(PAGE).zip(new.chunks(PAGE)).enumerate() {
        if o == n {
            continue;
        }
        let at = base + (p * PAGE) as u64;
        if n.iter().all(|&x| x == 0) {
            if let Some(LogWrite::Zero(s, len)) = out.last_mut()
                && *s + *len == at
            {
                *len += PAGE as u64;
                continue;
            }
            out.push(LogWrite::Zero(at, PAGE as u64));
        } else {
            out.push(LogWrite::Data(at, n.to_vec()));
        }
    }
    out
}

/// One log entry (2.3.1): header, descriptors, data sectors, CRC-32C over all of it.
fn log_entry(seq: u64, tail: u64, guid: &[u8; 16], writes: &[&LogWrite], file_len: u64) -> Vec<u8> {
    let n_data = writes.iter().filter(|w| matches!(w, LogWrite::Data(..))).count();
    let desc_sectors = (writes.len() + 2).div_ceil(128);
    let mut e = vec![0u8; (desc_sectors + n_data) * PAGE];
    let len = e.len() as u32;
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&len.to_le_bytes());
    e[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(writes.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&file_len.to_le_bytes());
    e[56..64].copy_from_slice(&file_len.to_le_bytes());
    let mut sector = desc_sectors;
    for (k, w) in writes.iter().enumerate() {
        let d = 64 + 32 * k;
        match w {
            LogWrite::Zero(off, zlen) => {
                e[d..d + 4].copy_from_slice(b"zero");
                e[d + 8..d + 16].copy_from_slice(&zlen.to_le_bytes());
                e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
            }
            LogWrite::Data(off, bytes) => {
                e[d..d + 4].copy_from_slice(b"desc");
                e[d + 4..d + 8].copy_from_slice(&bytes[4092..4096]);
                e[d + 8..d + 16].copy_from_slice(&bytes[0..8]);
                e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
                let s = sector * PAGE;
                e[s..s + 4].copy_from_slice(b"data");
                e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                e[s + 8..s + 4092].copy_from_slice(&bytes[8..4092]);
                e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
                sector += 1;
            }
        }
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
    }
    seal(&mut e, 4);
    e
}

/// Copies `bytes` into the circular log at `at`.
fn put_ring(log: &mut [u8], at: u64, bytes: &[u8]) {
    let n = log.len();
    for (i, b) in bytes.iter().enumerate() {
        log[(at as usize + i) % n] = *b;
    }
}

fn write_log(log: &mut [u8], plan: &LogPlan, guid: &[u8; 16], writes: &[LogWrite], file_len: u64) {
    let n = log.len() as u64;
    let k = plan.entries.max(1);
    let per = writes.len().div_ceil(k).max(1);
    let groups: Vec<Vec<&LogWrite>> =
        (0..k).map(|i| writes.iter().skip(i * per).take(per).collect::<Vec<&LogWrite>>()).collect();
    let base_seq = 1000;
    let tail = plan.start % n;
    let mut at = tail;
    if plan.older_sequence {
        // A complete, older sequence half a log away: replayed, it would mark every block of
        // the first BAT page FULLY_PRESENT at offset 0 (inside the header section).
        let junk = LogWrite::Data(BAT_OFFSET, (0..PAGE).map(|i| if i % 8 == 0 { 6 } else { 0 }).collect());
        let old_at = (tail + n / 2) % n;
        put_ring(log, old_at, &log_entry(base_seq - 10, old_at, guid, &[&junk], file_len));
    }
    for (i, g) in groups.iter().enumerate() {
        let mut e = log_entry(base_seq + i as u64, tail, guid, g, file_len);
        if plan.corrupt_entry == Some(i) {
            let last = e.len() - 100;
            e[last] ^= 0xFF;
        }
        put_ring(log, at, &e);
        at = (at + e.len() as u64) % n;
    }
    if plan.torn_head {
        let junk = LogWrite::Data(BAT_OFFSET, vec![0x77; PAGE]);
        let mut e = log_entry(base_seq + k as u64, tail, guid, &[&junk], file_len);
        e[PAGE + 1000] ^= 0xFF;
        put_ring(log, at, &e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_is_the_microsoft_form() {
        let g = ms_guid(0x83ED0EC3, 0x24C8, 0x49A6, [0xA9, 0x59, 0x5E, 0x4B, 0xF1, 0x28, 0x8B, 0xFB]);
        assert_eq!(guid_text(&g), "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}");
    }

    #[test]
    fn bat_entry_counts_follow_the_spec_formulas() {
        let d = VhdxBuilder::dynamic(100 * MIB).block_size(MIB);
        assert_eq!(d.chunk_ratio(), 4096);
        assert_eq!(d.bat_entries(), 100);
        let mut c = d.clone();
        c.kind = Kind::Differencing { linkage: [0; 16], parent_name: "p".into() };
        assert_eq!(c.bat_entries(), 4097);
    }
}
