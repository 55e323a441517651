//! An XVA writer for the cases xva-img cannot make: exports written the way xapi writes them
//! (`stream_vdi.ml` `send_one`: ustar headers from the OCaml `tar` library, `.xxhash` checksums,
//! all-zero chunks omitted, zero-length keep-alive chunks that use up a chunk number, disks
//! streamed in lexicographic order of their `Ref:N` directory), with a realistic `ova.xml`
//! (fields and layout of XenServer 7.1 exports: VM, VBDs including a CD, VDIs, SR), and the
//! older dialect (V7 headers and `.checksum` SHA-1, as xva-img writes them).

use std::io::{self, Write};
use std::path::Path;

use sha1::{Digest, Sha1};

/// Tar header dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// xapi: ustar magic, mode 0400, mtime 0 (OCaml `tar`).
    Xapi,
    /// xva-img: 7th Edition headers, no magic, typeflag NUL.
    V7,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// `.xxhash`, XXH64 as 16 upper-case hex digits (current xapi).
    Xxh64,
    /// `.checksum`, SHA-1 as 40 lower-case hex digits (older xapi, xva-img).
    Sha1,
    /// No checksum members (`export_vsn` 0).
    None,
}

#[derive(Debug, Clone)]
struct Disk {
    label: String,
    data: Vec<u8>,
    vdi_ref: u32,
    userdevice: u32,
}

/// Builds one `.xva`.
#[derive(Debug, Clone)]
pub struct XvaBuilder {
    vm: String,
    disks: Vec<Disk>,
    chunk: u64,
    dialect: Dialect,
    sum: Checksum,
    omit_zero: bool,
    /// (disk index, chunk index): a keep-alive is written before that chunk.
    keepalives: Vec<(usize, u64)>,
    cd: bool,
    end_marker: bool,
}

impl XvaBuilder {
    /// xapi's defaults: 1 MiB chunks, ustar, XXH64, zero chunks omitted, a CD drive with an ISO.
    pub fn xapi(vm: &str) -> Self {
        XvaBuilder {
            vm: vm.into(),
            disks: Vec::new(),
            chunk: 1 << 20,
            dialect: Dialect::Xapi,
            sum: Checksum::Xxh64,
            omit_zero: true,
            keepalives: Vec::new(),
            cd: true,
            end_marker: true,
        }
    }

    /// Adds a disk (its whole virtual content); `vdi_ref` names its directory `Ref:<vdi_ref>`.
    pub fn disk(&mut self, label: &str, data: Vec<u8>, vdi_ref: u32, userdevice: u32) -> &mut Self {
        self.disks.push(Disk { label: label.into(), data, vdi_ref, userdevice });
        self
    }
    pub fn dialect(&mut self, d: Dialect) -> &mut Self {
        self.dialect = d;
        self
    }
    pub fn checksum(&mut self, c: Checksum) -> &mut Self {
        self.sum = c;
        self
    }
    pub fn chunk_size(&mut self, c: u64) -> &mut Self {
        self.chunk = c;
        self
    }
    pub fn omit_zero_chunks(&mut self, yes: bool) -> &mut Self {
        self.omit_zero = yes;
        self
    }
    /// A keep-alive (zero-length chunk) before data chunk `chunk` of disk `disk`, as xapi
    /// writes one when nothing was sent for 5 s. Never before the first or the last chunk.
    pub fn keepalive(&mut self, disk: usize, chunk: u64) -> &mut Self {
        self.keepalives.push((disk, chunk));
        self
    }
    pub fn cd_drive(&mut self, yes: bool) -> &mut Self {
        self.cd = yes;
        self
    }
    /// Leave out the two zero blocks that end a tar archive.
    pub fn end_marker(&mut self, yes: bool) -> &mut Self {
        self.end_marker = yes;
        self
    }

    /// The tar stream.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let xml = self.ova_xml();
        self.member(&mut out, "ova.xml", xml.as_bytes());
        let mut order: Vec<usize> = (0..self.disks.len()).collect();
        order.sort_by_key(|&i| format!("Ref:{}", self.disks[i].vdi_ref)); // lexicographic, as xapi
        for i in order {
            let d = &self.disks[i];
            let size = d.data.len() as u64;
            let mut counter = 0u64;
            let mut offset = 0u64;
            let mut pending: Vec<u64> = self.keepalives.iter().filter(|(k, _)| *k == i).map(|(_, c)| *c).collect();
            while offset < size {
                let len = self.chunk.min(size - offset);
                let idx = offset / self.chunk;
                let first_or_last = offset == 0 || offset + len == size;
                if !first_or_last && let Some(p) = pending.iter().position(|&c| c == idx) {
                    pending.swap_remove(p);
                    self.chunk_member(&mut out, d.vdi_ref, counter, &[]);
                    counter += 1;
                    continue;
                }
                let data = &d.data[offset as usize..(offset + len) as usize];
                if first_or_last || !self.omit_zero || data.iter().any(|&b| b != 0) {
                    self.chunk_member(&mut out, d.vdi_ref, counter, data);
                }
                counter += 1;
                offset += len;
            }
        }
        if self.end_marker {
            out.extend_from_slice(&[0u8; 1024]);
        }
        out
    }

    pub fn build(&self, path: &Path) -> io::Result<()> {
        std::fs::File::create(path)?.write_all(&self.to_bytes())
    }

    /// gzip (`compress=true`), as one member.
    pub fn build_gzip(&self, path: &Path) -> io::Result<()> {
        let mut e = flate2::write::GzEncoder::new(std::fs::File::create(path)?, flate2::Compression::new(1));
        e.write_all(&self.to_bytes())?;
        e.finish()?.flush()
    }

    /// zstd (`compress=zstd`): one frame, or independent frames of `frame` input bytes.
    pub fn build_zstd(&self, path: &Path, frame: Option<usize>) -> io::Result<()> {
        let data = self.to_bytes();
        let mut f = std::fs::File::create(path)?;
        match frame {
            None => f.write_all(&zstd::stream::encode_all(&data[..], 3)?),
            Some(n) => data.chunks(n.max(1)).try_for_each(|c| f.write_all(&zstd::bulk::compress(c, 3)?)),
        }
    }

    fn chunk_member(&self, out: &mut Vec<u8>, vdi: u32, n: u64, data: &[u8]) {
        let name = format!("Ref:{vdi}/{n:08}");
        self.member(out, &name, data);
        match self.sum {
            Checksum::Xxh64 => {
                let s = format!("{:016X}", xxhash_rust::xxh64::xxh64(data, 0));
                self.member(out, &format!("{name}.xxhash"), s.as_bytes());
            }
            Checksum::Sha1 => {
                let s: String = Sha1::digest(data).iter().map(|b| format!("{b:02x}")).collect();
                self.member(out, &format!("{name}.checksum"), s.as_bytes());
            }
            Checksum::None => {}
        }
    }

    fn member(&self, out: &mut Vec<u8>, name: &str, data: &[u8]) {
        out.extend_from_slice(&header(name, data.len() as u64, self.dialect));
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }

    /// ova.xml in the layout XenServer writes (one `<member>` per field, strings as bare text).
    pub fn ova_xml(&self) -> String {
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<value><struct>");
        let m = |n: &str, v: &str| format!("<member><name>{n}</name><value>{v}</value></member>");
        let arr = |refs: &[String]| {
            format!(
                "<array><data>{}</data></array>",
                refs.iter().map(|r| format!("<value>{r}</value>")).collect::<String>()
            )
        };
        let boolean = |b: bool| format!("<boolean>{}</boolean>", b as u8);
        let export_vsn = if self.sum == Checksum::None { "0" } else { "2" };
        x += &m(
            "version",
            &format!(
                "<struct>{}{}{}{}{}{}{}{}</struct>",
                m("hostname", "xs-test-1"),
                m("date", "2017-02-16"),
                m("product_version", "7.1.0"),
                m("product_brand", "XenServer"),
                m("build_number", "137272c"),
                m("xapi_major", "1"),
                m("xapi_minor", "9"),
                m("export_vsn", export_vsn)
            ),
        );
        let obj = |class: &str, id: &str, fields: String| {
            format!(
                "<value><struct>{}{}{}</struct></value>",
                m("class", class),
                m("id", id),
                m("snapshot", &format!("<struct>{fields}</struct>"))
            )
        };
        let vbd_ref = |i: usize| format!("Ref:{}", 100 + i);
        let mut vbds: Vec<String> = (0..self.disks.len()).map(vbd_ref).collect();
        if self.cd {
            vbds.push("Ref:90".into());
        }
        let mut objs = obj(
            "VM",
            "Ref:0",
            [
                m("uuid", "5f1ac1c7-6a8c-2e2b-7f4b-8d4a3bb2c0de"),
                m("power_state", "Halted"),
                m("name_label", &escape(&self.vm)),
                m("name_description", ""),
                m("is_a_template", &boolean(false)),
                m("is_a_snapshot", &boolean(false)),
                m("suspend_VDI", "OpaqueRef:NULL"),
                m("memory_static_max", "1073741824"),
                m("VCPUs_max", "2"),
                m("VBDs", &arr(&vbds)),
                m("HVM_boot_policy", "BIOS order"),
                m("recommendations", "&lt;restrictions&gt;&lt;restriction field=&quot;vcpus-max&quot; max=&quot;32&quot; /&gt;&lt;/restrictions&gt;"),
                m("other_config", &format!("<struct>{}</struct>", m("install-methods", "cdrom"))),
            ]
            .concat(),
        );
        for (i, d) in self.disks.iter().enumerate() {
            let vdi = format!("Ref:{}", d.vdi_ref);
            objs += &obj(
                "VBD",
                &vbd_ref(i),
                [
                    m("uuid", &format!("0b5e6c1e-0000-4000-8000-{:012x}", 100 + i)),
                    m("VM", "Ref:0"),
                    m("VDI", &vdi),
                    m("device", &format!("xvd{}", (b'a' + d.userdevice as u8) as char)),
                    m("userdevice", &d.userdevice.to_string()),
                    m("bootable", &boolean(d.userdevice == 0)),
                    m("mode", "RW"),
                    m("type", "Disk"),
                    m("empty", &boolean(false)),
                ]
                .concat(),
            );
            objs += &obj(
                "VDI",
                &vdi,
                [
                    m("uuid", &format!("ebe16ffc-7f5d-4761-9cfe-{:012x}", d.vdi_ref)),
                    m("name_label", &escape(&d.label)),
                    m("name_description", ""),
                    m("SR", "Ref:5"),
                    m("VBDs", &arr(&[vbd_ref(i)])),
                    m("virtual_size", &d.data.len().to_string()),
                    m("physical_utilisation", &d.data.len().to_string()),
                    m("type", "system"),
                    m("sharable", &boolean(false)),
                    m("read_only", &boolean(false)),
                    m("sm_config", &format!("<struct>{}</struct>", m("vdi_type", "vhd"))),
                    m("parent", "OpaqueRef:NULL"),
                ]
                .concat(),
            );
        }
        if self.cd {
            objs += &obj(
                "VBD",
                "Ref:90",
                [
                    m("VM", "Ref:0"),
                    m("VDI", "Ref:91"),
                    m("userdevice", "3"),
                    m("mode", "RO"),
                    m("type", "CD"),
                    m("empty", &boolean(false)),
                ]
                .concat(),
            );
            objs += &obj(
                "VDI",
                "Ref:91",
                [
                    m("uuid", "6a1d2f77-1d3c-4a8e-9b57-0c2f3e4d5a6b"),
                    m("name_label", "debian-12.5.0-amd64-netinst.iso"),
                    m("SR", "Ref:92"),
                    m("VBDs", &arr(&["Ref:90".into()])),
                    m("virtual_size", "659554304"),
                    m("type", "user"),
                    m("read_only", &boolean(true)),
                ]
                .concat(),
            );
        }
        objs += &obj("SR", "Ref:5", [m("name_label", "Local storage"), m("type", "lvm")].concat());
        x += &m("objects", &format!("<array><data>{objs}</data></array>"));
        x += "</struct></value>\n";
        x
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A tar header in the given dialect (the name must fit: XVA member names are short).
pub fn header(name: &str, size: u64, dialect: Dialect) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.as_bytes();
    h[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
    let put = |h: &mut [u8; 512], at: usize, s: String| h[at..at + s.len()].copy_from_slice(s.as_bytes());
    match dialect {
        Dialect::Xapi => {
            put(&mut h, 100, "0000400\0".into());
            put(&mut h, 108, "0000000\0".into());
            put(&mut h, 116, "0000000\0".into());
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
        }
        Dialect::V7 => {
            put(&mut h, 100, "0000000\0".into());
            put(&mut h, 108, "0000000\0".into());
            put(&mut h, 116, "0000000\0".into());
        }
    }
    put(&mut h, 124, format!("{size:011o}\0"));
    put(&mut h, 136, "00000000000\0".into());
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    put(&mut h, 148, format!("{sum:06o}\0 "));
    h
}
