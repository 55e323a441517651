//! VMDK writers in ESXi's layouts: a flat base (`name.vmdk` + `name-flat.vmdk`, createType
//! `vmfs`), SESparse snapshots (`name-000001.vmdk` + `name-000001-sesparse.vmdk`) and vmfsSparse
//! redo logs (`name-000001.vmdk` + `name-000001-delta.vmdk`, `COWD`). Written from VMware's Virtual
//! Disk Format notes and qemu's SESparse layout, independently of the reader in
//! `formats::vmdk`; qemu-img and dissect.hypervisor read the output in the tests.
//!
//! Deltas place grain tables and grains out of order, and SESparse clusters start past 4096, so
//! a reader that assumes "table i is the i-th table" or gets the cluster bit rotation wrong reads
//! wrong bytes instead of passing by luck.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;

/// A random content id (never ffffffff, which means "no parent").
pub fn random_cid() -> u32 {
    let u = super::random_uuid();
    let c = u32::from_le_bytes([u[0], u[1], u[2], u[3]]);
    if c == u32::MAX { 0x1234_5678 } else { c }
}

/// One extent line of a descriptor.
#[derive(Debug, Clone)]
pub struct ExtentSpec {
    pub access: String,
    pub sectors: u64,
    pub kind: String,
    pub file: Option<String>,
    pub offset: Option<u64>,
}

impl ExtentSpec {
    pub fn new(sectors: u64, kind: &str, file: Option<&str>) -> Self {
        ExtentSpec { access: "RW".into(), sectors, kind: kind.into(), file: file.map(str::to_string), offset: None }
    }
    fn line(&self) -> String {
        let mut s = format!("{} {} {}", self.access, self.sectors, self.kind);
        if let Some(f) = &self.file {
            s.push_str(&format!(" \"{f}\""));
        }
        if let Some(o) = self.offset {
            s.push_str(&format!(" {o}"));
        }
        s
    }
}

/// A descriptor file as ESXi writes it.
#[derive(Debug, Clone)]
pub struct DescriptorText {
    pub cid: u32,
    /// (parentCID, parentFileNameHint)
    pub parent: Option<(u32, String)>,
    pub create_type: String,
    pub extents: Vec<ExtentSpec>,
    pub ddb: Vec<(String, String)>,
}

impl DescriptorText {
    pub fn text(&self) -> String {
        let mut t = String::from("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n");
        t.push_str(&format!("CID={:08x}\n", self.cid));
        let pcid = self.parent.as_ref().map(|p| p.0).unwrap_or(u32::MAX);
        t.push_str(&format!("parentCID={pcid:08x}\n"));
        if self.parent.is_some() {
            t.push_str("isNativeSnapshot=\"no\"\n");
        }
        t.push_str(&format!("createType=\"{}\"\n", self.create_type));
        if let Some((_, hint)) = &self.parent {
            t.push_str(&format!("parentFileNameHint=\"{hint}\"\n"));
        }
        t.push_str("# Extent description\n");
        for e in &self.extents {
            t.push_str(&e.line());
            t.push('\n');
        }
        t.push_str("\n# The Disk Data Base \n#DDB\n\n");
        for (k, v) in &self.ddb {
            t.push_str(&format!("{k} = \"{v}\"\n"));
        }
        t
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.text())
    }
}

fn esxi_ddb(size: u64, thin: bool) -> Vec<(String, String)> {
    let cyl = (size / SECTOR / (255 * 63)).max(1);
    let mut v = vec![
        ("ddb.adapterType".to_string(), "lsilogic".to_string()),
        ("ddb.geometry.cylinders".into(), cyl.to_string()),
        ("ddb.geometry.heads".into(), "255".into()),
        ("ddb.geometry.sectors".into(), "63".into()),
        ("ddb.longContentID".into(), "8c1c5c4e2d9b7d1c9a0e6f3b5e2c1a47".into()),
    ];
    if thin {
        v.push(("ddb.thinProvisioned".into(), "1".into()));
    }
    v.push(("ddb.uuid".into(), "60 00 C2 9a 4e 11 2d 0c-b6 3f 54 10 8e 5a 7d 21".into()));
    v.push(("ddb.virtualHWVersion".into(), "14".into()));
    v
}

/// Writes an ESXi base disk holding `data`: `dir/name.vmdk` (createType `create_type`, usually
/// `vmfs`) and `dir/name-flat.vmdk`. Returns the descriptor path and its CID.
pub fn write_flat(dir: &Path, name: &str, data: &[u8], create_type: &str) -> io::Result<(PathBuf, u32)> {
    assert!((data.len() as u64).is_multiple_of(SECTOR), "whole sectors");
    let flat = format!("{name}-flat.vmdk");
    std::fs::write(dir.join(&flat), data)?;
    let cid = random_cid();
    let d = DescriptorText {
        cid,
        parent: None,
        create_type: create_type.into(),
        extents: vec![ExtentSpec::new(data.len() as u64 / SECTOR, "VMFS", Some(&flat))],
        ddb: esxi_ddb(data.len() as u64, create_type == "vmfsThin"),
    };
    let path = dir.join(format!("{name}.vmdk"));
    d.write(&path)?;
    Ok((path, cid))
}

/// Reads CID and size (sum of extent sectors) from a descriptor file or from the descriptor
/// embedded in a hosted sparse file.
pub fn read_descriptor_facts(path: &Path) -> io::Result<(u32, u64)> {
    let raw = std::fs::read(path)?;
    let text = if raw.starts_with(b"KDMV") {
        let off = u64::from_le_bytes(raw[28..36].try_into().expect("8")) as usize * 512;
        let n = u64::from_le_bytes(raw[36..44].try_into().expect("8")) as usize * 512;
        let capacity = u64::from_le_bytes(raw[12..20].try_into().expect("8"));
        let t = String::from_utf8_lossy(&raw[off..off + n]).trim_end_matches('\0').to_string();
        let cid = cid_of(&t)?;
        return Ok((cid, capacity * SECTOR));
    } else {
        String::from_utf8_lossy(&raw).into_owned()
    };
    let cid = cid_of(&text)?;
    let mut sectors = 0;
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() >= 3 && matches!(w[0], "RW" | "RDONLY" | "NOACCESS") {
            sectors += w[1].parse::<u64>().map_err(|_| io::Error::other("bad extent line"))?;
        }
    }
    Ok((cid, sectors * SECTOR))
}

fn cid_of(text: &str) -> io::Result<u32> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("CID="))
        .and_then(|v| u32::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("descriptor has no CID"))
}

/// What a delta grain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GrainState {
    Data(Vec<u8>),
    /// SESparse type 2.
    Zero,
    /// SESparse type 1 (SCSI UNMAP).
    Unmapped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeltaKind {
    SeSparse,
    Cowd,
}

/// Builds a snapshot delta over a parent descriptor.
#[derive(Debug, Clone)]
pub struct DeltaBuilder {
    kind: DeltaKind,
    size: u64,
    grain: u64,
    cid: u32,
    parent_cid: u32,
    parent_hint: String,
    grains: BTreeMap<u64, GrainState>,
    first_cluster: u64,
}

impl DeltaBuilder {
    fn over(kind: DeltaKind, parent: &Path, grain: u64) -> io::Result<Self> {
        let (parent_cid, size) = read_descriptor_facts(parent)?;
        let parent_hint = parent.file_name().expect("file name").to_string_lossy().into_owned();
        Ok(DeltaBuilder {
            kind,
            size,
            grain,
            cid: random_cid(),
            parent_cid,
            parent_hint,
            grains: BTreeMap::new(),
            first_cluster: 4090,
        })
    }

    /// A SESparse snapshot (4 KiB grains) of the disk whose descriptor is `parent`.
    pub fn sesparse(parent: &Path) -> io::Result<Self> {
        Self::over(DeltaKind::SeSparse, parent, 4096)
    }
    /// A vmfsSparse (COWD) redo log of `parent`, with one-sector grains as ESX writes them.
    pub fn cowd(parent: &Path) -> io::Result<Self> {
        Self::over(DeltaKind::Cowd, parent, 512)
    }
    /// COWD grain size in sectors (a power of two).
    pub fn grain_sectors(mut self, n: u64) -> Self {
        assert_eq!(self.kind, DeltaKind::Cowd, "SESparse grains are 8 sectors");
        self.grain = n * SECTOR;
        self
    }
    /// Overrides the parent link written in the descriptor.
    pub fn parent_link(mut self, cid: u32, hint: &str) -> Self {
        self.parent_cid = cid;
        self.parent_hint = hint.into();
        self
    }
    /// The first SESparse cluster number handed out (default 4090, so that clusters cross 4096
    /// and both halves of the rotated entry are exercised).
    pub fn first_cluster(mut self, c: u64) -> Self {
        self.first_cluster = c;
        self
    }
    pub fn cid(&self) -> u32 {
        self.cid
    }
    pub fn grain_size(&self) -> u64 {
        self.grain
    }
    pub fn size(&self) -> u64 {
        self.size
    }

    fn grains_of(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        assert!(off.is_multiple_of(self.grain) && len.is_multiple_of(self.grain), "grain-aligned only");
        assert!(off + len <= self.size, "past the end");
        off / self.grain..(off + len) / self.grain
    }

    /// Stores `data` at `offset` (both grain-aligned).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> &mut Self {
        let gs = self.grain as usize;
        for (k, g) in self.grains_of(offset, data.len() as u64).enumerate() {
            self.grains.insert(g, GrainState::Data(data[k * gs..(k + 1) * gs].to_vec()));
        }
        self
    }
    /// Marks grains as zero grains (SESparse type 2).
    pub fn zero(&mut self, offset: u64, len: u64) -> &mut Self {
        assert_eq!(self.kind, DeltaKind::SeSparse);
        for g in self.grains_of(offset, len) {
            self.grains.insert(g, GrainState::Zero);
        }
        self
    }
    /// Marks grains as unmapped (SESparse type 1).
    pub fn unmap(&mut self, offset: u64, len: u64) -> &mut Self {
        assert_eq!(self.kind, DeltaKind::SeSparse);
        for g in self.grains_of(offset, len) {
            self.grains.insert(g, GrainState::Unmapped);
        }
        self
    }
    /// Writes every grain where `new` differs from `old`.
    pub fn write_diff(&mut self, old: &[u8], new: &[u8]) -> &mut Self {
        let gs = self.grain as usize;
        for (g, (a, b)) in old.chunks(gs).zip(new.chunks(gs)).enumerate() {
            if a != b {
                self.write((g * gs) as u64, b);
            }
        }
        self
    }

    /// Writes `dir/name.vmdk` and its extent; returns the descriptor path.
    pub fn build(&self, dir: &Path, name: &str) -> io::Result<PathBuf> {
        let (ext_name, create_type, kind) = match self.kind {
            DeltaKind::SeSparse => (format!("{name}-sesparse.vmdk"), "seSparse", "SESPARSE"),
            DeltaKind::Cowd => (format!("{name}-delta.vmdk"), "vmfsSparse", "VMFSSPARSE"),
        };
        let f = File::create(dir.join(&ext_name))?;
        match self.kind {
            DeltaKind::SeSparse => self.write_sesparse(&f)?,
            DeltaKind::Cowd => self.write_cowd(&f)?,
        }
        let mut ddb = vec![("ddb.longContentID".to_string(), format!("{:032x}", self.cid as u128 * 0x1_0001))];
        if self.kind == DeltaKind::SeSparse {
            ddb.insert(0, ("ddb.grain".into(), "8".into()));
        }
        let d = DescriptorText {
            cid: self.cid,
            parent: Some((self.parent_cid, self.parent_hint.clone())),
            create_type: create_type.into(),
            extents: vec![ExtentSpec::new(self.size / SECTOR, kind, Some(&ext_name))],
            ddb,
        };
        let path = dir.join(format!("{name}.vmdk"));
        d.write(&path)?;
        Ok(path)
    }

    /// Grain tables in use (table number → grains), in a scrambled placement order.
    fn tables(&self, per_table: u64) -> Vec<u64> {
        let mut t: Vec<u64> = self.grains.keys().map(|g| g / per_table).collect();
        t.dedup();
        t.reverse();
        t
    }

    fn write_sesparse(&self, f: &File) -> io::Result<()> {
        let per_table = 4096u64;
        let capacity = self.size / SECTOR;
        let gd_entries = capacity.div_ceil(8 * per_table);
        let gd_sectors = (gd_entries * 8).div_ceil(SECTOR).next_multiple_of(8);
        let gd_offset = 4096u64;
        let gt_offset = (gd_offset + gd_sectors).next_multiple_of(2048);
        let gt_size = gd_entries * 64;
        let bitmap_offset = gt_offset + gt_size;
        let backmap_offset = bitmap_offset + 8;
        let grains_offset = (backmap_offset + 8).next_multiple_of(2048);
        let grains_size = (self.size / 4096 + self.first_cluster + self.grains.len() as u64) * 8;

        let mut h = [0u8; 512];
        let fields: [u64; 26] = [
            0xcafe_babe,
            0x0000_0002_0000_0001,
            capacity,
            8,
            64,
            0,
            0,
            0,
            0,
            0,
            8, // volatile header
            8,
            16, // journal header
            8,
            2048, // journal
            2048,
            gd_offset,
            gd_sectors,
            gt_offset,
            gt_size,
            bitmap_offset,
            8,
            backmap_offset,
            8,
            grains_offset,
            grains_size,
        ];
        for (i, v) in fields.iter().enumerate() {
            h[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        f.write_all_at(&h, 0)?;
        let tables = self.tables(per_table);
        let mut v = [0u8; 512];
        v[0..8].copy_from_slice(&0xcafe_cafeu64.to_le_bytes());
        v[8..16].copy_from_slice(&(tables.len() as u64).to_le_bytes());
        v[16..24].copy_from_slice(&1u64.to_le_bytes());
        f.write_all_at(&v, 8 * SECTOR)?;

        let mut gd = vec![0u8; (gd_sectors * SECTOR) as usize];
        let mut next_cluster = self.first_cluster;
        for (slot, t) in tables.iter().enumerate() {
            gd[*t as usize * 8..*t as usize * 8 + 8]
                .copy_from_slice(&(0x1000_0000_0000_0000 | slot as u64).to_le_bytes());
            let mut gt = vec![0u8; (per_table * 8) as usize];
            // Grains of this table, placed in reverse order.
            for (g, st) in self.grains.range(t * per_table..(t + 1) * per_table).rev() {
                let e: u64 = match st {
                    GrainState::Unmapped => 0x1000_0000_0000_0000,
                    GrainState::Zero => 0x2000_0000_0000_0000,
                    GrainState::Data(d) => {
                        let c = next_cluster;
                        next_cluster += 1;
                        f.write_all_at(d, (grains_offset + c * 8) * SECTOR)?;
                        0x3000_0000_0000_0000 | ((c & 0xfff) << 48) | (c >> 12)
                    }
                };
                let k = (g % per_table) as usize;
                gt[k * 8..k * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            f.write_all_at(&gt, (gt_offset + slot as u64 * 64) * SECTOR)?;
        }
        f.write_all_at(&gd, gd_offset * SECTOR)?;
        let end = (grains_offset + next_cluster * 8) * SECTOR;
        if f.metadata()?.len() < end {
            f.set_len(end)?;
        }
        Ok(())
    }

    fn write_cowd(&self, f: &File) -> io::Result<()> {
        let per_table = 4096u64;
        let gs = self.grain / SECTOR;
        let sectors = self.size / SECTOR;
        let gd_entries = sectors.div_ceil(per_table * gs);
        let gd_offset = 4u64;
        let mut pos = gd_offset + (gd_entries * 4).div_ceil(SECTOR);
        let mut gd = vec![0u8; (gd_entries * 4) as usize];
        let tables = self.tables(per_table);
        let mut gt_at = BTreeMap::new();
        for t in &tables {
            gd[*t as usize * 4..*t as usize * 4 + 4].copy_from_slice(&(pos as u32).to_le_bytes());
            gt_at.insert(*t, pos);
            pos += per_table * 4 / SECTOR;
        }
        for t in &tables {
            let mut gt = vec![0u8; (per_table * 4) as usize];
            for (g, st) in self.grains.range(t * per_table..(t + 1) * per_table).rev() {
                let GrainState::Data(d) = st else { unreachable!("COWD has data grains only") };
                f.write_all_at(d, pos * SECTOR)?;
                let k = (g % per_table) as usize;
                gt[k * 4..k * 4 + 4].copy_from_slice(&(pos as u32).to_le_bytes());
                pos += gs;
            }
            f.write_all_at(&gt, gt_at[t] * SECTOR)?;
        }
        f.write_all_at(&gd, gd_offset * SECTOR)?;
        let mut h = vec![0u8; 2048];
        h[0..4].copy_from_slice(b"COWD");
        let words: [u32; 7] = [1, 3, sectors as u32, gs as u32, gd_offset as u32, gd_entries as u32, pos as u32];
        for (i, w) in words.iter().enumerate() {
            h[4 + i * 4..8 + i * 4].copy_from_slice(&w.to_le_bytes());
        }
        let pname = self.parent_hint.as_bytes();
        h[32..32 + pname.len().min(1023)].copy_from_slice(&pname[..pname.len().min(1023)]);
        h[1056..1060].copy_from_slice(&1u32.to_le_bytes()); // parentGeneration
        h[1060..1064].copy_from_slice(&1u32.to_le_bytes()); // generation
        f.write_all_at(&h, 0)?;
        if f.metadata()?.len() < pos * SECTOR {
            f.set_len(pos * SECTOR)?;
        }
        Ok(())
    }
}

/// A stream-optimized extent as VMware's ovftool and VirtualBox export it: header version 3 with
/// `gdOffset` = GD_AT_END, the descriptor at sector 1, deflate grains behind grain markers, then
/// grain table and grain directory markers, a footer (the real header) and end-of-stream marker.
/// All-zero grains are left out; a last grain cut by the capacity is compressed short.
#[derive(Debug, Clone)]
pub struct StreamBuilder {
    size: u64,
    grains: BTreeMap<u64, Vec<u8>>,
    cid: u32,
}

const STREAM_GRAIN: u64 = 65536;

impl StreamBuilder {
    /// A disk of `size` bytes (whole sectors).
    pub fn new(size: u64) -> Self {
        assert!(size.is_multiple_of(SECTOR));
        StreamBuilder { size, grains: BTreeMap::new(), cid: random_cid() }
    }

    /// Stores a whole disk image, keeping the grains that are not all zero.
    pub fn from_raw(raw: &[u8]) -> Self {
        let mut b = Self::new(raw.len() as u64);
        for (g, chunk) in raw.chunks(STREAM_GRAIN as usize).enumerate() {
            if chunk.iter().any(|&x| x != 0) {
                b.grains.insert(g as u64, chunk.to_vec());
            }
        }
        b
    }

    fn header(&self, gd_offset: u64, desc_sectors: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[0..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&0x0003_0001u32.to_le_bytes());
        h[12..20].copy_from_slice(&(self.size / SECTOR).to_le_bytes());
        h[20..28].copy_from_slice(&(STREAM_GRAIN / SECTOR).to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&desc_sectors.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
        h[64..72].copy_from_slice(&128u64.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        h
    }

    fn marker(sectors: u64, kind: u32) -> [u8; 512] {
        let mut m = [0u8; 512];
        m[0..8].copy_from_slice(&sectors.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        m
    }

    /// Writes the file.
    pub fn build(&self, path: &Path) -> io::Result<()> {
        use std::io::Write;
        let name = path.file_name().expect("file name").to_string_lossy().into_owned();
        let desc = format!(
            "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
             # Extent description\nRDONLY {} SPARSE \"{name}\"\n\n# The Disk Data Base \n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.adapterType=\"ide\"\n",
            self.cid,
            self.size / SECTOR
        );
        let desc_sectors = (desc.len() as u64).div_ceil(SECTOR);
        let mut out = vec![0u8; 128 * SECTOR as usize];
        out[..512].copy_from_slice(&self.header(u64::MAX, desc_sectors));
        out[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        let grains_total = self.size.div_ceil(STREAM_GRAIN);
        let mut gtes = vec![0u32; grains_total.next_multiple_of(512) as usize];
        for (g, data) in &self.grains {
            let keep = (self.size - g * STREAM_GRAIN).min(STREAM_GRAIN) as usize;
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(&data[..keep.min(data.len())])?;
            let z = z.finish()?;
            gtes[*g as usize] = (out.len() as u64 / SECTOR) as u32;
            out.extend_from_slice(&(g * STREAM_GRAIN / SECTOR).to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
            out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
        }
        let mut gd = Vec::new();
        for table in gtes.chunks(512) {
            if table.iter().all(|&e| e == 0) {
                gd.push(0u32);
                continue;
            }
            out.extend_from_slice(&Self::marker(4, 1));
            gd.push((out.len() as u64 / SECTOR) as u32);
            table.iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
        }
        let gd_bytes: Vec<u8> = gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        let gd_sectors = (gd_bytes.len() as u64).div_ceil(SECTOR);
        out.extend_from_slice(&Self::marker(gd_sectors, 2));
        let gd_offset = out.len() as u64 / SECTOR;
        out.extend_from_slice(&gd_bytes);
        out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
        out.extend_from_slice(&Self::marker(1, 3));
        out.extend_from_slice(&self.header(gd_offset, desc_sectors));
        out.extend_from_slice(&[0u8; 512]);
        std::fs::write(path, out)
    }
}
