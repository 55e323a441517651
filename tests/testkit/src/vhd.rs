//! A VHD writer: fixed, dynamic and differencing disks in the Windows and XenServer dialects.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

const SECTOR: u64 = 512;

/// Who "wrote" the file: sets creator fields, locators and blktap extras.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Hyper-V / Windows: creator `win `, OS `Wi2k`, locators W2ku (absolute `C:\...`) + W2ru.
    Windows,
    /// XenServer blktap: creator `tap\0` 1.3, OS 0, BAT preallocated beyond the disk, a batmap,
    /// locators MacX `file://./name` + W2ku/W2ru with the same relative path.
    Xen,
}

#[derive(Debug, Clone)]
enum Type {
    Fixed,
    Dynamic,
    Differencing { parent_uuid: [u8; 16], parent_name: String, parent_ts: u32 },
}

#[derive(Debug, Clone)]
struct Block {
    bitmap: Vec<u8>,
    data: Vec<u8>,
}

/// Builds one VHD file.
#[derive(Debug, Clone)]
pub struct VhdBuilder {
    ty: Type,
    size: u64,
    block_size: u64,
    dialect: Dialect,
    uuid: [u8; 16],
    blocks: BTreeMap<u64, Block>,
    hidden: bool,
    hidden_outside_checksum: bool,
    trailing: u64,
    locator_override: Option<Vec<(String, String)>>,
}

/// CHS geometry per the VHD spec's appendix algorithm.
pub fn chs(size: u64) -> (u16, u8, u8) {
    let total = (size / SECTOR).min(65535 * 16 * 255);
    let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let (mut s, mut c) = (17, total / 17);
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            (s, h, c) = (31, 16, total / 31);
        }
        if c >= h * 1024 {
            (s, h, c) = (63, 16, total / 63);
        }
        (s, h, c)
    };
    ((cth / heads) as u16, heads as u8, spt as u8)
}

fn checksum(b: &[u8], skip: usize) -> u32 {
    !b.iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32))
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_le_bytes()).collect()
}

impl VhdBuilder {
    fn new(ty: Type, size: u64) -> Self {
        VhdBuilder {
            ty,
            size,
            block_size: 2 << 20,
            dialect: Dialect::Windows,
            uuid: super::random_uuid(),
            blocks: BTreeMap::new(),
            hidden: false,
            hidden_outside_checksum: false,
            trailing: 0,
            locator_override: None,
        }
    }

    pub fn fixed(size: u64) -> Self {
        Self::new(Type::Fixed, size)
    }
    pub fn dynamic(size: u64) -> Self {
        Self::new(Type::Dynamic, size)
    }
    /// A child of the VHD at `parent` (its size, UUID and timestamp are read from its footer).
    pub fn differencing(parent: &Path) -> io::Result<Self> {
        let data = std::fs::read(parent)?;
        let f = &data[data.len() - 512..];
        let f = if &f[0..8] == b"conectix" { f } else { &data[0..512] };
        let size = u64::from_be_bytes(f[48..56].try_into().expect("8"));
        let parent_uuid: [u8; 16] = f[68..84].try_into().expect("16");
        let parent_ts = u32::from_be_bytes(f[24..28].try_into().expect("4"));
        let parent_name = parent.file_name().expect("file name").to_string_lossy().into_owned();
        Ok(Self::new(Type::Differencing { parent_uuid, parent_name, parent_ts }, size))
    }

    pub fn dialect(mut self, d: Dialect) -> Self {
        self.dialect = d;
        self
    }
    pub fn block_size(mut self, bs: u64) -> Self {
        self.block_size = bs;
        self
    }
    pub fn uuid(mut self, u: [u8; 16]) -> Self {
        self.uuid = u;
        self
    }
    /// blktap's hidden flag; `outside_checksum` reproduces early td-util, which did not
    /// recompute the checksum after setting it.
    pub fn hidden(mut self, outside_checksum: bool) -> Self {
        self.hidden = true;
        self.hidden_outside_checksum = outside_checksum;
        self
    }
    /// Bytes appended after the footer (a VHD on a logical volume larger than itself).
    pub fn trailing(mut self, n: u64) -> Self {
        self.trailing = n;
        self
    }
    /// Replaces the parent locators by these (platform code, path) pairs.
    pub fn locators(mut self, l: Vec<(String, String)>) -> Self {
        self.locator_override = Some(l);
        self
    }
    /// Another virtual size: a leaf grown as XenServer grows a VDI (`vhd-util resize` rewrites
    /// the leaf's footer; its parents keep theirs).
    pub fn resized(mut self, size: u64) -> Self {
        self.size = size;
        self
    }
    pub fn uuid_value(&self) -> [u8; 16] {
        self.uuid
    }

    /// Stores `data` at virtual `offset`; both must be whole sectors. Marks the sectors present.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> &mut Self {
        assert!(
            offset.is_multiple_of(SECTOR) && (data.len() as u64).is_multiple_of(SECTOR),
            "sector-aligned writes only"
        );
        assert!(offset + data.len() as u64 <= self.size, "write past the end");
        let bs = self.block_size;
        let bitmap_len = ((bs / SECTOR).div_ceil(8)).next_multiple_of(SECTOR) as usize;
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let (b, inb) = (off / bs, (off % bs) as usize);
            let n = (bs as usize - inb).min(data.len() - pos);
            let blk = self
                .blocks
                .entry(b)
                .or_insert_with(|| Block { bitmap: vec![0; bitmap_len], data: vec![0; bs as usize] });
            blk.data[inb..inb + n].copy_from_slice(&data[pos..pos + n]);
            for s in inb / 512..(inb + n) / 512 {
                blk.bitmap[s / 8] |= 0x80 >> (s % 8);
            }
            pos += n;
        }
        self
    }

    /// Writes every sector where `new` differs from `old` (both full disk images), rounding
    /// each changed sector out to `unit` bytes (use 4096 to keep libvhdi-readable bitmaps).
    pub fn write_diff(&mut self, old: &[u8], new: &[u8], unit: usize) -> &mut Self {
        assert_eq!(old.len(), new.len());
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

    fn footer(&self, data_offset: u64) -> [u8; 512] {
        let mut f = [0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[24..28].copy_from_slice(&0x2a00_0000u32.to_be_bytes());
        let (app, ver, os): (&[u8; 4], u32, u32) = match self.dialect {
            Dialect::Windows => (b"win ", 0x000a_0000, u32::from_be_bytes(*b"Wi2k")),
            Dialect::Xen => (b"tap\0", 0x0001_0003, 0),
        };
        f[28..32].copy_from_slice(app);
        f[32..36].copy_from_slice(&ver.to_be_bytes());
        f[36..40].copy_from_slice(&os.to_be_bytes());
        f[40..48].copy_from_slice(&self.size.to_be_bytes());
        f[48..56].copy_from_slice(&self.size.to_be_bytes());
        let (c, h, s) = chs(self.size);
        f[56..58].copy_from_slice(&c.to_be_bytes());
        f[58] = h;
        f[59] = s;
        let ty: u32 = match self.ty {
            Type::Fixed => 2,
            Type::Dynamic => 3,
            Type::Differencing { .. } => 4,
        };
        f[60..64].copy_from_slice(&ty.to_be_bytes());
        f[68..84].copy_from_slice(&self.uuid);
        if self.hidden && !self.hidden_outside_checksum {
            f[85] = 1;
        }
        let c = checksum(&f, 64);
        f[64..68].copy_from_slice(&c.to_be_bytes());
        if self.hidden && self.hidden_outside_checksum {
            f[85] = 1;
        }
        f
    }

    fn locator_list(&self) -> Vec<(String, Vec<u8>)> {
        let Type::Differencing { parent_name, .. } = &self.ty else {
            return Vec::new();
        };
        if let Some(l) = &self.locator_override {
            return l
                .iter()
                .map(|(code, p)| {
                    let data = if code.starts_with("W2") { utf16le(p) } else { p.as_bytes().to_vec() };
                    (code.clone(), data)
                })
                .collect();
        }
        match self.dialect {
            Dialect::Windows => vec![
                ("W2ku".into(), utf16le(&format!(r"C:\Hyper-V\Virtual Hard Disks\{parent_name}"))),
                ("W2ru".into(), utf16le(&format!(r".\{parent_name}"))),
            ],
            Dialect::Xen => vec![
                ("MacX".into(), format!("file://./{parent_name}").into_bytes()),
                ("W2ku".into(), utf16le(&format!("./{parent_name}"))),
                ("W2ru".into(), utf16le(&format!("./{parent_name}"))),
            ],
        }
    }

    /// Writes the file.
    pub fn build(&self, path: &Path) -> io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        if let Type::Fixed = self.ty {
            let mut img = vec![0u8; self.size as usize];
            for (b, blk) in &self.blocks {
                let start = (b * self.block_size) as usize;
                let n = (self.block_size as usize).min(img.len() - start);
                img[start..start + n].copy_from_slice(&blk.data[..n]);
            }
            out.write_all(&img)?;
            out.write_all(&self.footer(u64::MAX))?;
            out.write_all(&vec![0u8; self.trailing as usize])?;
            return out.flush();
        }
        let bs = self.block_size;
        let blocks = self.size.div_ceil(bs);
        let entries = match self.dialect {
            Dialect::Windows => blocks,
            Dialect::Xen => (blocks * 2).max(blocks + 3), // preallocated for a later resize
        };
        let table_offset = 0x600u64;
        let mut pos = table_offset + (entries * 4).next_multiple_of(SECTOR);
        let mut batmap_at = None;
        if self.dialect == Dialect::Xen {
            let size = entries.div_ceil(8).next_multiple_of(SECTOR);
            batmap_at = Some((pos, pos + SECTOR, size));
            pos += SECTOR + size;
        }
        let mut locs = Vec::new();
        for (code, data) in self.locator_list() {
            let space = (data.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
            locs.push((code, data, pos, space));
            pos += space;
        }
        let bitmap_len = ((bs / SECTOR).div_ceil(8)).next_multiple_of(SECTOR);
        let mut bat = vec![0xFFu8; (entries * 4) as usize];
        let mut placed = Vec::new();
        for (b, blk) in &self.blocks {
            bat[(*b * 4) as usize..(*b * 4 + 4) as usize].copy_from_slice(&((pos / SECTOR) as u32).to_be_bytes());
            placed.push((pos, blk));
            pos += bitmap_len + bs;
        }
        // Header.
        let mut h = [0u8; 1024];
        h[0..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&table_offset.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(bs as u32).to_be_bytes());
        if let Type::Differencing { parent_uuid, parent_name, parent_ts } = &self.ty {
            h[40..56].copy_from_slice(parent_uuid);
            h[56..60].copy_from_slice(&parent_ts.to_be_bytes());
            for (i, c) in parent_name.encode_utf16().take(255).enumerate() {
                h[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes());
            }
            for (i, (code, data, at, space)) in locs.iter().enumerate().take(8) {
                let e = 576 + 24 * i;
                h[e..e + 4].copy_from_slice(code.as_bytes());
                h[e + 4..e + 8].copy_from_slice(&(*space as u32).to_be_bytes()); // bytes, as Windows and blktap write
                h[e + 8..e + 12].copy_from_slice(&(data.len() as u32).to_be_bytes());
                h[e + 16..e + 24].copy_from_slice(&at.to_be_bytes());
            }
        }
        let c = checksum(&h, 36);
        h[36..40].copy_from_slice(&c.to_be_bytes());

        let footer = self.footer(0x200);
        let mut img = vec![0u8; pos as usize];
        img[0..512].copy_from_slice(&footer);
        img[512..1536].copy_from_slice(&h);
        img[table_offset as usize..table_offset as usize + bat.len()].copy_from_slice(&bat);
        if let Some((hdr, at, size)) = batmap_at {
            let mut map = vec![0u8; size as usize];
            for (b, blk) in &self.blocks {
                let sectors = (bs / SECTOR) as usize;
                let full = (0..sectors).all(|s| blk.bitmap[s / 8] & (0x80 >> (s % 8)) != 0);
                if full {
                    map[(*b / 8) as usize] |= 0x80 >> (*b % 8);
                }
            }
            let sum = !map.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32));
            let mut bh = [0u8; 512];
            bh[0..8].copy_from_slice(b"tdbatmap");
            bh[8..16].copy_from_slice(&at.to_be_bytes());
            bh[16..20].copy_from_slice(&((size / SECTOR) as u32).to_be_bytes());
            bh[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
            bh[24..28].copy_from_slice(&sum.to_be_bytes());
            img[hdr as usize..hdr as usize + 512].copy_from_slice(&bh);
            img[at as usize..(at + size) as usize].copy_from_slice(&map);
        }
        for (_, data, at, _) in &locs {
            img[*at as usize..*at as usize + data.len()].copy_from_slice(data);
        }
        for (at, blk) in placed {
            let at = at as usize;
            img[at..at + blk.bitmap.len()].copy_from_slice(&blk.bitmap);
            img[at + bitmap_len as usize..at + bitmap_len as usize + bs as usize].copy_from_slice(&blk.data);
        }
        out.write_all(&img)?;
        out.write_all(&footer)?;
        out.write_all(&vec![0u8; self.trailing as usize])?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_the_spec_examples() {
        // 4 MiB: 17 sectors/track, 4 heads (as qemu computes for the same size).
        assert_eq!(chs(4 << 20), (120, 4, 17));
        let (c, h, s) = chs(127 << 30);
        assert_eq!((h, s), (16, 255));
        assert!(c > 0);
    }
}
