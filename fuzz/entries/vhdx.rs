//! VHDX: the headers, the region table, the metadata region, the log and the BAT, each fuzzed
//! inside a small VHDX (Hyper-V's layout: log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB, blocks
//! from 4 MiB) that is then opened and read.

use std::sync::{Arc, OnceLock};

use vdiskfs::formats::vhdx::header::{self, Guid, VhdxHeader, checksum, guid};
use vdiskfs::formats::vhdx::{BAT_REGION, METADATA_REGION, VhdxLayer, metadata};

use super::{DIFFERENCING, FIX_CHECKSUM, Pieces, exercise_layer, padded, split_control};

const MIB: u64 = 1 << 20;
const LOG_AT: u64 = MIB;
const META_AT: u64 = 2 * MIB;
const BAT_AT: u64 = 3 * MIB;
const DATA_AT: u64 = 4 * MIB;
/// Control byte: the fuzzed header or region table goes to the second slot.
const SECOND: u8 = 4;
const LOG_GUID: Guid = guid(0x3e7c9a10, 0x0155, 0x424b, [0x8e, 0x21, 0x6f, 0x3d, 0x90, 0xaa, 0x12, 0x34]);

/// A small VHDX to put fuzzed structures in.
struct Plan {
    block_size: u64,
    logical: u64,
    size: u64,
    differencing: bool,
    /// The BAT's bytes; by default a few blocks in each state.
    bat: Option<Vec<u8>>,
    /// Bytes at 4 MiB (blocks, sector bitmaps), and the file's length past 4 MiB.
    data: Vec<u8>,
    data_len: u64,
    /// Log bytes at 1 MiB, announced by the headers.
    log: Option<Vec<u8>>,
}

impl Plan {
    fn new(control: u8) -> Plan {
        Plan {
            block_size: MIB,
            logical: 512,
            size: 8 * MIB,
            differencing: control & DIFFERENCING != 0,
            bat: None,
            data: Vec::new(),
            data_len: 4 * MIB,
            log: None,
        }
    }

    fn chunk_ratio(&self) -> u64 {
        (1 << 23) * self.logical / self.block_size
    }

    fn header(&self, seq: u64) -> Vec<u8> {
        let mut h = vec![0u8; header::HEADER_SIZE];
        h[0..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..32].copy_from_slice(&[0x46; 16]);
        h[32..48].copy_from_slice(&[0x44; 16]);
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        if let Some(log) = &self.log {
            let g: Guid = log_guid(log);
            h[48..64].copy_from_slice(&g);
            h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes());
            h[72..80].copy_from_slice(&LOG_AT.to_le_bytes());
        }
        seal(&mut h, 4);
        h
    }

    /// The metadata table and the items that follow it at 64 KiB.
    fn metadata(&self) -> (Vec<u8>, Vec<u8>) {
        let mut fp = (self.block_size as u32).to_le_bytes().to_vec();
        fp.extend_from_slice(&(if self.differencing { 2u32 } else { 0 }).to_le_bytes());
        let mut items: Vec<(Guid, u32, Vec<u8>)> = vec![
            (metadata::FILE_PARAMETERS, 4, fp),
            (metadata::VIRTUAL_DISK_SIZE, 6, self.size.to_le_bytes().to_vec()),
            (metadata::VIRTUAL_DISK_ID, 6, vec![0x17; 16]),
            (metadata::LOGICAL_SECTOR_SIZE, 6, (self.logical as u32).to_le_bytes().to_vec()),
            (metadata::PHYSICAL_SECTOR_SIZE, 6, 4096u32.to_le_bytes().to_vec()),
        ];
        if self.differencing {
            let pairs = [
                ("parent_linkage", "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}"),
                ("relative_path", ".\\parent.vhdx"),
                ("absolute_win32_path", "C:\\vms\\parent.vhdx"),
            ];
            let utf16 = |s: &str| s.encode_utf16().flat_map(|c| c.to_le_bytes()).collect::<Vec<u8>>();
            let mut l = metadata::VHDX_LOCATOR_TYPE.to_vec();
            l.extend_from_slice(&0u16.to_le_bytes());
            l.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
            let mut text = Vec::new();
            let base = 20 + 12 * pairs.len();
            for (k, v) in pairs {
                let (k, v) = (utf16(k), utf16(v));
                l.extend_from_slice(&((base + text.len()) as u32).to_le_bytes());
                l.extend_from_slice(&((base + text.len() + k.len()) as u32).to_le_bytes());
                l.extend_from_slice(&(k.len() as u16).to_le_bytes());
                l.extend_from_slice(&(v.len() as u16).to_le_bytes());
                text.extend_from_slice(&k);
                text.extend_from_slice(&v);
            }
            l.extend_from_slice(&text);
            items.push((metadata::PARENT_LOCATOR, 4, l));
        }
        let mut table = vec![0u8; 32 + 32 * items.len()];
        table[0..8].copy_from_slice(b"metadata");
        table[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut data = Vec::new();
        for (i, (id, flags, bytes)) in items.iter().enumerate() {
            let e = &mut table[32 + 32 * i..64 + 32 * i];
            e[0..16].copy_from_slice(id);
            e[16..20].copy_from_slice(&((metadata::TABLE_SIZE + data.len()) as u32).to_le_bytes());
            e[20..24].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            e[24..28].copy_from_slice(&flags.to_le_bytes());
            data.extend_from_slice(bytes);
            data.resize(data.len().next_multiple_of(8), 0);
        }
        (table, data)
    }

    /// The default BAT: block 0 fully present at 4 MiB, 1 zero, 2 unmapped, 3 undefined, 4
    /// fully present at 5 MiB; in a differencing disk block 5 partially present at 6 MiB with
    /// its chunk's sector bitmap at 7 MiB (first 8 sectors present).
    fn default_bat(&self) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
        let cr = self.chunk_ratio();
        let mut bat = vec![0u8; if self.differencing { 8 * (cr + 1) as usize } else { 40 }];
        let mut put = |i: u64, e: u64| bat[(8 * i) as usize..(8 * i + 8) as usize].copy_from_slice(&e.to_le_bytes());
        put(0, DATA_AT | 6);
        put(1, 2);
        put(2, 3);
        put(3, 1);
        put(4, (DATA_AT + MIB) | 6);
        let mut data = vec![(DATA_AT, vec![0xd0; 512]), (DATA_AT + MIB, vec![0xd4; 512])];
        if self.differencing {
            put(5, (DATA_AT + 2 * MIB) | 7);
            put(cr, (DATA_AT + 3 * MIB) | 6);
            let spb = self.block_size / self.logical;
            let mut bitmap = vec![0u8; (6 * spb / 8) as usize];
            bitmap[(5 * spb / 8) as usize] = 0xff;
            data.push((DATA_AT + 2 * MIB, vec![0xd5; 4096]));
            data.push((DATA_AT + 3 * MIB, bitmap));
        }
        (bat, data)
    }

    fn build(&self) -> Pieces {
        let mut f = Pieces::new("fuzz.vhdx", DATA_AT + self.data_len);
        f.put(0, b"vhdxfile");
        f.put(8, &"vdiskfs fuzz".encode_utf16().flat_map(|c| c.to_le_bytes()).collect::<Vec<u8>>());
        // Past byte 80 a header is zeros; the template pieces are put without them.
        f.put(header::HEADER_OFFSETS[0], &self.header(1)[..80]);
        f.put(header::HEADER_OFFSETS[1], &self.header(2)[..80]);
        static REGIONS: OnceLock<Vec<u8>> = OnceLock::new();
        let rt = REGIONS.get_or_init(|| {
            let r = region_table();
            r[..r.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)].to_vec()
        });
        f.put(header::REGION_OFFSETS[0], rt);
        f.put(header::REGION_OFFSETS[1], rt);
        let (table, items) = self.metadata();
        f.put(META_AT, &table);
        f.put(META_AT + metadata::TABLE_SIZE as u64, &items);
        match &self.bat {
            Some(b) => f.put(BAT_AT, &b[..b.len().min(MIB as usize)]),
            None => {
                let (bat, data) = self.default_bat();
                f.put(BAT_AT, &bat);
                for (at, d) in data {
                    f.put(at, &d);
                }
            }
        }
        f.put(DATA_AT, &self.data);
        if let Some(log) = &self.log {
            f.put(LOG_AT, &log[..log.len().min(MIB as usize)]);
        }
        f
    }
}

/// The region table: the BAT at 3 MiB and the metadata at 2 MiB, 1 MiB each.
fn region_table() -> Vec<u8> {
    let mut r = vec![0u8; header::REGION_SIZE];
    r[0..4].copy_from_slice(b"regi");
    r[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (g, at)) in [(BAT_REGION, BAT_AT), (METADATA_REGION, META_AT)].into_iter().enumerate() {
        let e = &mut r[16 + 32 * i..48 + 32 * i];
        e[0..16].copy_from_slice(&g);
        e[16..24].copy_from_slice(&at.to_le_bytes());
        e[24..28].copy_from_slice(&(MIB as u32).to_le_bytes());
        e[28..32].copy_from_slice(&1u32.to_le_bytes());
    }
    seal(&mut r, 4);
    r
}

/// Stores the CRC-32C of `b` (with the field taken as zero) at `at`.
fn seal(b: &mut [u8], at: usize) {
    let c = checksum(b, at);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// The LogGuid of the first entry in `log` (at a 4 KiB boundary), or a fixed one.
fn log_guid(log: &[u8]) -> Guid {
    (0..log.len())
        .step_by(4096)
        .map(|at| &log[at..])
        .find(|e| e.len() >= 64 && e.starts_with(b"loge") && e[32..48] != [0; 16])
        .map_or(LOG_GUID, |e| e[32..48].try_into().expect("16 bytes"))
}

/// Recomputes the checksum of every entry header at a 4 KiB boundary of `log` (a 1 MiB ring).
fn seal_log(log: &mut [u8]) {
    let n = log.len();
    for at in (0..n).step_by(4096) {
        if !log[at..].starts_with(b"loge") || n - at < 64 {
            continue;
        }
        let len = u32::from_le_bytes(log[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        if len == 0 || !len.is_multiple_of(4096) || len > n {
            continue;
        }
        let c = if at + len <= n {
            checksum(&log[at..at + len], 4)
        } else {
            checksum(&[&log[at..], &log[..at + len - n]].concat(), 4)
        };
        log[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
    }
}

/// The default template for control byte `c` (built once).
fn template(c: u8) -> Pieces {
    static T: [OnceLock<Pieces>; 2] = [OnceLock::new(), OnceLock::new()];
    let d = c & DIFFERENCING;
    T[(d != 0) as usize].get_or_init(|| Plan::new(d).build()).clone()
}

fn open(file: Pieces) {
    if let Ok(layer) = VhdxLayer::open(Arc::new(file)) {
        exercise_layer(Arc::new(layer));
    }
}

/// `[control][header]`: the file identifier and header parsers, then the header in slot 1 (or
/// 2, with [`SECOND`]) of a VHDX whose other header is valid, sequence 1 or 2.
pub fn vhdx_header(data: &[u8]) {
    let (c, rest) = split_control(data);
    let _ = header::parse_file_id(rest);
    let mut h = padded(rest, header::HEADER_SIZE);
    if c & FIX_CHECKSUM != 0 {
        seal(&mut h, 4);
    }
    let parsed = VhdxHeader::parse(&h);
    if let Ok(p) = &parsed {
        let _ = p.has_log();
    }
    let _ = header::current(&[parsed, VhdxHeader::parse(&Plan::new(c).header(2))]);
    let mut file = template(c);
    file.put(header::HEADER_OFFSETS[(c & SECOND != 0) as usize], &h);
    open(file);
}

/// `[control][region table]`: `parse_regions`, then the table as the first copy (with
/// [`SECOND`], both copies) of a VHDX.
pub fn vhdx_regions(data: &[u8]) {
    let (c, rest) = split_control(data);
    let mut r = padded(rest, header::REGION_SIZE);
    if c & FIX_CHECKSUM != 0 {
        seal(&mut r, 4);
    }
    let _ = header::parse_regions(&r);
    let mut file = template(c);
    for (i, at) in header::REGION_OFFSETS.into_iter().enumerate() {
        if i == 0 || c & SECOND != 0 {
            file.put(at, &r);
        }
    }
    open(file);
}

/// `[control][metadata region]`: the metadata table and item parsers, then the region (up to
/// 1 MiB) in a VHDX.
pub fn vhdx_metadata(data: &[u8]) {
    let (c, rest) = split_control(data);
    // At least the template's table and items, so that none of them shows through.
    let region = padded(rest, rest.len().clamp(metadata::TABLE_SIZE + 4096, MIB as usize));
    if let Ok(table) = metadata::parse_table(&region, region.len() as u64) {
        let items: Vec<_> = table
            .into_iter()
            .map(|e| {
                let (at, n) = (e.offset as usize, e.length as usize);
                let bytes = region.get(at..at.saturating_add(n)).unwrap_or_default().to_vec();
                (e, bytes)
            })
            .collect();
        let _ = metadata::Metadata::from_items(&items);
    }
    let mut file = template(c);
    file.put(META_AT, &region);
    open(file);
}

/// `[control][log]`: the log (up to 1 MiB, entry checksums recomputed with [`FIX_CHECKSUM`]) of
/// a VHDX whose headers announce it, replayed when the VHDX is opened.
pub fn vhdx_log(data: &[u8]) {
    let (c, rest) = split_control(data);
    let mut log = rest.to_vec();
    if c & FIX_CHECKSUM != 0 {
        log = padded(rest, MIB as usize);
        seal_log(&mut log);
    }
    let mut file = template(c);
    let plan = Plan { log: Some(log), ..Plan::new(c) };
    for (seq, at) in header::HEADER_OFFSETS.into_iter().enumerate() {
        file.put(at, &plan.header(seq as u64 + 1)[..80]);
    }
    file.put(LOG_AT, plan.log.as_deref().unwrap_or_default());
    open(file);
}

/// `[control][block size][sector][size: u32][file MiB][entries: u16][BAT…][data…]`: a VHDX of
/// that block size (1 MiB << n), logical sector (512, or 4096 with bit 0) and size (in logical
/// sectors), `file MiB` long past 4 MiB, whose BAT of `entries` entries is fuzzed, the bytes after
/// it lying at 4 MiB (blocks, sector bitmaps).
pub fn vhdx_bat(data: &[u8]) {
    let (c, rest) = split_control(data);
    let Some((p, rest)) = rest.split_first_chunk::<9>() else { return };
    let logical = if p[1] & 1 != 0 { 4096 } else { 512 };
    let entries = u16::from_le_bytes([p[7], p[8]]) as usize;
    let (bat, tail) = rest.split_at(rest.len().min(8 * entries));
    let plan = Plan {
        block_size: MIB << (p[0] % 9),
        logical,
        size: u32::from_le_bytes([p[2], p[3], p[4], p[5]]) as u64 * logical,
        bat: Some(bat.to_vec()),
        data: tail.to_vec(),
        data_len: (p[6] % 16) as u64 * MIB,
        ..Plan::new(c)
    };
    open(plan.build());
}

/// The templates open and read as planned.
pub fn check_templates() {
    for c in [0, DIFFERENCING] {
        let layer = VhdxLayer::open(Arc::new(Plan::new(c).build())).expect("VHDX template");
        let info = vdiskfs::layer::Layer::describe(&layer).expect("describe");
        assert_eq!(info.allocated_bytes, if c == 0 { 2 * MIB } else { 3 * MIB }, "{info:?}");
    }
}
