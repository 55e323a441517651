//! VHD: the footer, the dynamic header and the BAT, each fuzzed inside a small dynamic (or
//! differencing, or blktap) VHD that is then opened and read.

use std::sync::Arc;

use vdiskfs::formats::vhd::header::{PLAT_W2KU, PLAT_W2RU, decode_locator};
use vdiskfs::formats::vhd::{BatmapHeader, DynHeader, Footer, VhdLayer, checksum};
use vdiskfs::layer::Layer;
use vdiskfs::source::MemSource;

use super::{DIFFERENCING, DIR, FIX_CHECKSUM, exercise_layer, padded, split_control};

/// Control byte: the fuzzed footer replaces the copy at offset 0, and the one at the end is
/// wiped (a VHD on a larger volume).
const FOOTER_AT_START: u8 = 4;
/// Control byte: a blktap (XenServer) VHD, with a batmap.
const TAP: u8 = 8;

/// A small dynamic VHD to put fuzzed structures in.
struct Plan {
    block_size: u64,
    size: u64,
    differencing: bool,
    tap: bool,
    /// BAT entries (`max_table_entries`); the disk's block count by default.
    entries: Option<u32>,
    /// The BAT's bytes; by default blocks 0, 2 and 5 are allocated.
    bat: Option<Vec<u8>>,
    /// Bytes after the BAT and locators, instead of the default blocks.
    data: Vec<u8>,
}

impl Plan {
    fn new(control: u8) -> Plan {
        Plan {
            block_size: 4096,
            size: 16 * 4096,
            differencing: control & DIFFERENCING != 0,
            tap: control & TAP != 0,
            entries: None,
            bat: None,
            data: Vec::new(),
        }
    }

    fn footer(&self, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[28..32].copy_from_slice(if self.tap { b"tap\0" } else { b"vdfz" });
        f[32..36].copy_from_slice(&0x0001_0003u32.to_be_bytes());
        f[36..40].copy_from_slice(b"Lnux");
        f[40..48].copy_from_slice(&self.size.to_be_bytes());
        f[48..56].copy_from_slice(&self.size.to_be_bytes());
        f[56..60].copy_from_slice(&[0, 2, 4, 17]);
        f[60..64].copy_from_slice(&(if self.differencing { 4u32 } else { 3 }).to_be_bytes());
        f[68..84].copy_from_slice(&[0x5a; 16]);
        seal_footer(&mut f);
        f
    }

    /// The file: footer copy, dynamic header, BAT, batmap (blktap), locator data, blocks, footer.
    fn build(&self) -> Vec<u8> {
        let bs = self.block_size;
        let blocks = self.size.div_ceil(bs);
        let entries = self.entries.unwrap_or(blocks as u32) as u64;
        let bat_at = 1536u64;
        let bat_len = (entries * 4).next_multiple_of(512);
        let mut at = bat_at + bat_len;
        let map_len = entries.div_ceil(8).next_multiple_of(512);
        let batmap_at = at;
        if self.tap {
            at += 512 + map_len;
        }
        let locators = [(PLAT_W2RU, ".\\parent.vhd"), (PLAT_W2KU, "C:\\vms\\parent.vhd")];
        let loc_at = at;
        if self.differencing {
            at += 512 * locators.len() as u64;
        }
        let data_at = at;
        let bitmap = (bs / 512).div_ceil(8).next_multiple_of(512);
        let allocated: Vec<u64> = [0, 2, 5].into_iter().filter(|&b| b < blocks).collect();
        let data_len = if self.bat.is_some() { self.data.len() as u64 } else { allocated.len() as u64 * (bitmap + bs) };
        let mut f = vec![0u8; (data_at + data_len + 512) as usize];
        let foot = self.footer(512);
        f[..512].copy_from_slice(&foot);
        let end = f.len() - 512;
        f[end..].copy_from_slice(&foot);

        let h = &mut f[512..1536];
        h[0..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&bat_at.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(bs as u32).to_be_bytes());
        if self.differencing {
            h[40..56].copy_from_slice(&[0xa5; 16]);
            for (i, c) in "parent.vhd".encode_utf16().enumerate() {
                h[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes());
            }
            for (i, (code, path)) in locators.iter().enumerate() {
                let e = &mut h[576 + 24 * i..600 + 24 * i];
                let len = 2 * path.encode_utf16().count() as u32;
                e[0..4].copy_from_slice(&code.to_be_bytes());
                e[4..8].copy_from_slice(&512u32.to_be_bytes());
                e[8..12].copy_from_slice(&len.to_be_bytes());
                e[16..24].copy_from_slice(&(loc_at + 512 * i as u64).to_be_bytes());
            }
        }
        seal_header(h);
        for (i, (_, path)) in locators.iter().enumerate().filter(|_| self.differencing) {
            let at = (loc_at + 512 * i as u64) as usize;
            for (k, c) in path.encode_utf16().enumerate() {
                f[at + 2 * k..at + 2 * k + 2].copy_from_slice(&c.to_le_bytes());
            }
        }

        let (bat_from, bat_to) = (bat_at as usize, (bat_at + bat_len) as usize);
        f[bat_from..bat_to].fill(0xff);
        match &self.bat {
            Some(b) => {
                let n = b.len().min(bat_to - bat_from);
                f[bat_from..bat_from + n].copy_from_slice(&b[..n]);
                f[data_at as usize..(data_at + data_len) as usize].copy_from_slice(&self.data);
            }
            None => {
                for (k, &b) in allocated.iter().enumerate() {
                    let at = data_at + k as u64 * (bitmap + bs);
                    let e = bat_from + 4 * b as usize;
                    f[e..e + 4].copy_from_slice(&((at / 512) as u32).to_be_bytes());
                    // Block 0 fully present, block 2 in part, block 5 not at all (by its bitmap).
                    let bits: u8 = [0xff, 0b1010_0000, 0][k];
                    f[at as usize..(at + bitmap) as usize].fill(bits);
                    let d = (at + bitmap) as usize;
                    f[d..d + bs as usize].iter_mut().enumerate().for_each(|(i, x)| *x = (i * 7 + k) as u8);
                }
            }
        }
        if self.tap {
            let m = (batmap_at + 512) as usize;
            f[m] = 1; // block 0 is fully allocated
            let sum = !f[m..m + map_len as usize].iter().fold(0u32, |s, &x| s.wrapping_add(x as u32));
            let bh = &mut f[batmap_at as usize..batmap_at as usize + 512];
            bh[0..8].copy_from_slice(b"tdbatmap");
            bh[8..16].copy_from_slice(&(batmap_at + 512).to_be_bytes());
            bh[16..20].copy_from_slice(&((map_len / 512) as u32).to_be_bytes());
            bh[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
            bh[24..28].copy_from_slice(&sum.to_be_bytes());
        }
        f
    }
}

fn seal_footer(f: &mut [u8]) {
    let c = checksum(f, 64);
    f[64..68].copy_from_slice(&c.to_be_bytes());
}

fn seal_header(h: &mut [u8]) {
    let c = checksum(h, 36);
    h[36..40].copy_from_slice(&c.to_be_bytes());
}

fn open(file: Vec<u8>) {
    if let Ok(layer) = VhdLayer::open(Arc::new(MemSource::new(&format!("{DIR}/fuzz.vhd"), file))) {
        exercise_layer(Arc::new(layer));
    }
}

/// `[control][footer]`: `Footer::parse`, then the footer at the end (or, with
/// [`FOOTER_AT_START`], at offset 0) of a dynamic VHD.
pub fn vhd_footer(data: &[u8]) {
    let (c, rest) = split_control(data);
    let mut foot = padded(rest, 512);
    if c & FIX_CHECKSUM != 0 {
        seal_footer(&mut foot);
    }
    if let Ok(f) = Footer::parse(&foot) {
        let _ = (f.chs_size(), f.creator(), f.is_tap());
    }
    let mut file = Plan::new(c).build();
    let end = file.len() - 512;
    if c & FOOTER_AT_START != 0 {
        file[..512].copy_from_slice(&foot);
        file[end..].fill(0);
    } else {
        file[end..].copy_from_slice(&foot);
    }
    open(file);
}

/// `[control][dynamic header]`: `DynHeader::parse`, the locators and the batmap header parsers,
/// then the header in a dynamic VHD.
pub fn vhd_header(data: &[u8]) {
    let (c, rest) = split_control(data);
    let mut h = padded(rest, 1024);
    if c & FIX_CHECKSUM != 0 {
        seal_header(&mut h);
    }
    if let Ok(d) = DynHeader::parse(&h) {
        for l in &d.locators {
            let _ = (l.code_str(), decode_locator(l.code, &rest[rest.len().min(1024)..]));
        }
    }
    if let Some(b) = BatmapHeader::parse(&h[..512]) {
        let _ = b.verify(&h[512..]);
    }
    let mut file = Plan::new(c).build();
    file[512..1536].copy_from_slice(&h);
    open(file);
}

/// `[control][block size][size: u32][entries: u16][BAT…][data…]`: a dynamic VHD of that block
/// size (512 B << n) and size (in sectors) whose BAT of `entries` entries is fuzzed, the bytes
/// after it being the blocks.
pub fn vhd_bat(data: &[u8]) {
    let (c, rest) = split_control(data);
    let Some((p, rest)) = rest.split_first_chunk::<7>() else { return };
    let entries = u16::from_le_bytes([p[5], p[6]]) as u32;
    let (bat, tail) = rest.split_at(rest.len().min(entries as usize * 4));
    let plan = Plan {
        block_size: 512 << (p[0] % 12),
        size: u32::from_le_bytes([p[1], p[2], p[3], p[4]]) as u64 * 512,
        entries: Some(entries),
        bat: Some(bat.to_vec()),
        data: tail.to_vec(),
        ..Plan::new(c)
    };
    open(plan.build());
}

/// The templates open: otherwise every fuzzed structure would be refused for the template's
/// sake, and the fuzzer would learn nothing.
pub fn check_templates() {
    for c in [0, DIFFERENCING, TAP, DIFFERENCING | TAP] {
        let f = Plan::new(c).build();
        let layer = VhdLayer::open(Arc::new(MemSource::new("t.vhd", f))).expect("VHD template");
        assert_eq!(layer.describe().expect("describe").allocated_bytes, 3 * 4096);
    }
}
