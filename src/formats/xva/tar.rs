//! The tar container of an XVA: member headers are indexed, nothing is extracted.
//!
//! Accepted dialects (POSIX.1-2001 "pax" / ustar, GNU tar, 7th Edition): V7 headers as xva-img
//! writes them (no magic, typeflag NUL), ustar headers (name split into `prefix` + `name`) as
//! the OCaml `tar` library in xapi writes them, GNU long names (`L` members) and pax extended
//! headers (`x`, whose `path` and `size` records override the next header). Numbers may be
//! octal or GNU base-256. Directory entries (a re-tarred unpacked export) are skipped.
//! Refused with [`Error`]: a header whose checksum does not match (both the unsigned and the
//! historic signed sum are accepted), a number field that is not a number, links, devices and
//! GNU sparse members (an XVA holds only regular files), and a stream that ends inside a header
//! or a member. End of stream at a header boundary without the two zero blocks is accepted and
//! reported, so the caller can decide whether the export is complete.

use super::Error;
use crate::error::Result as CrateResult;

pub const BLOCK: u64 = 512;
/// Member contents kept in the index (checksums are 16 or 40 bytes).
pub const SMALL: u64 = 128;
/// Bounds on metadata members: pax headers and GNU long names.
const MAX_META: u64 = 64 << 10;

/// Forward-only reads of the tar stream: a plain file, or a decompressor's output.
pub trait Forward {
    /// Reads up to `buf.len()` bytes at `off`, which never goes backwards between calls.
    /// Returns fewer bytes only at the end of the stream.
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> CrateResult<usize>;
    /// What the reader is positioned in, for progress and messages (called rarely).
    fn progress(&self) -> u64 {
        0
    }
    /// Length of the stream, once the end has been seen (or known from the start).
    fn stream_end(&self) -> Option<u64>;
}

/// One regular file in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Offset of the member's data in the (decompressed) tar stream.
    pub offset: u64,
    pub size: u64,
    /// The data of small members (checksums) and of `ova.xml`.
    pub content: Option<Vec<u8>>,
}

/// A parsed header block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub size: u64,
    pub typeflag: u8,
}

/// Parses one 512-byte header. `Ok(None)` for an all-zero block (end of archive).
pub fn parse_header(b: &[u8], at: u64) -> Result<Option<Header>, Error> {
    let b: &[u8; 512] = b.get(..512).and_then(|s| s.try_into().ok()).ok_or(Error::BadHeader {
        at,
        name: String::new(),
        what: "short header block".into(),
    })?;
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let raw_name = cstr(&b[0..100]);
    let stored = parse_num(&b[148..156]);
    let unsigned: u64 = b.iter().enumerate().map(|(i, &x)| if (148..156).contains(&i) { 32 } else { x as u64 }).sum();
    let signed: i64 =
        b.iter().enumerate().map(|(i, &x)| if (148..156).contains(&i) { 32 } else { x as i8 as i64 }).sum();
    match stored {
        Some(s) if s == unsigned || s as i64 == signed => {}
        _ => {
            return Err(Error::HeaderChecksum {
                at,
                name: raw_name,
                stored: String::from_utf8_lossy(&b[148..156]).trim_matches(['\0', ' ']).to_string(),
                computed: unsigned,
            });
        }
    }
    let size = parse_num(&b[124..136]).ok_or_else(|| Error::BadHeader {
        at,
        name: raw_name.clone(),
        what: format!("size field {:?} is not a number", String::from_utf8_lossy(&b[124..136])),
    })?;
    let ustar = &b[257..263] == b"ustar\0";
    let name = if ustar && b[345] != 0 { format!("{}/{}", cstr(&b[345..500]), raw_name) } else { raw_name };
    Ok(Some(Header { name, size, typeflag: b[156] }))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// An octal field (spaces and NULs around it), or GNU base-256 (high bit of the first byte).
pub fn parse_num(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|&c| c & 0x80 != 0) {
        if f[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = (f[0] & 0x3f) as u64;
        for &c in &f[1..] {
            v = v.checked_mul(256)?.checked_add(c as u64)?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(f).ok()?.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The `path` and `size` records of a pax extended header (`"%d %s=%s\n"` records).
pub fn parse_pax(data: &[u8]) -> Result<(Option<String>, Option<u64>), String> {
    let (mut path, mut size) = (None, None);
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|&c| c == b' ').ok_or("pax record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= rest.len())
            .ok_or("pax record with a bad length")?;
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").ok_or("pax record not ending in a newline")?;
        if let Some(eq) = rec.iter().position(|&c| c == b'=') {
            let (k, v) = (&rec[..eq], &rec[eq + 1..]);
            match k {
                b"path" => path = Some(String::from_utf8_lossy(v).into_owned()),
                b"size" => {
                    size = Some(
                        std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).ok_or("pax size is not a number")?,
                    )
                }
                _ => {}
            }
        }
        rest = &rest[len..];
    }
    Ok((path, size))
}

/// How the walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The end-of-archive zero block.
    Marker,
    /// The stream ended at a header boundary without the marker.
    Eof,
}

/// Walks the headers from offset 0, calling `f` for each regular file in order. `keep(name,
/// size)` says whether a member's data should be read into `content`.
pub fn walk(
    r: &mut dyn Forward,
    keep: &dyn Fn(&str, u64) -> bool,
    f: &mut dyn FnMut(Member) -> CrateResult<()>,
) -> CrateResult<End> {
    let mut at = 0u64;
    let mut hdr = [0u8; 512];
    let mut long_name: Option<String> = None;
    let mut pax: (Option<String>, Option<u64>) = (None, None);
    let mut last = String::from("(start of archive)");
    loop {
        let n = read_full(r, at, &mut hdr).map_err(|e| context(e, &last))?;
        if n == 0 {
            return match r.stream_end() {
                Some(end) if end < at => Err(Error::Truncated { member: last, need: at, end }.into()),
                _ => Ok(End::Eof),
            };
        }
        if n < 512 {
            return Err(Error::Truncated {
                member: format!("header after {last}"),
                need: at + BLOCK,
                end: at + n as u64,
            }
            .into());
        }
        let Some(h) = parse_header(&hdr, at).map_err(|e| match e {
            Error::HeaderChecksum { at, name, stored, computed } => {
                Error::HeaderChecksum { at, name: format!("{name}', after member '{last}"), stored, computed }
            }
            e => e,
        })?
        else {
            return Ok(End::Marker);
        };
        let data = at + BLOCK;
        let size = pax.1.take().unwrap_or(h.size);
        let name = pax.0.take().or(long_name.take()).unwrap_or(h.name);
        let padded = size
            .div_ceil(BLOCK)
            .checked_mul(BLOCK)
            .and_then(|p| data.checked_add(p))
            .ok_or_else(|| Error::BadHeader { at, name: name.clone(), what: format!("impossible size {size}") })?;
        match h.typeflag {
            b'L' | b'x' => {
                if size > MAX_META {
                    return Err(Error::BadHeader { at, name, what: format!("metadata member of {size} bytes") }.into());
                }
                let v = read_member(r, data, size, &name)?;
                if h.typeflag == b'L' {
                    long_name = Some(cstr(&v));
                } else {
                    pax = parse_pax(&v).map_err(|what| Error::BadHeader { at, name: name.clone(), what })?;
                }
            }
            b'g' | b'K' | b'5' => {} // global pax header, long link name, directory
            b'0' | 0 | b'7' => {
                let name = name.strip_prefix("./").unwrap_or(&name).to_string();
                let content = if keep(&name, size) { Some(read_member(r, data, size, &name)?) } else { None };
                last = name.clone();
                f(Member { name, offset: data, size, content })?;
            }
            t => {
                let what = match t {
                    b'1' | b'2' => "a link",
                    b'3' | b'4' | b'6' => "a device or FIFO",
                    b'S' => "a GNU sparse file",
                    _ => "of an unknown type",
                };
                return Err(Error::BadHeader {
                    at,
                    name,
                    what: format!("member is {what} (typeflag {:?}); an XVA holds only regular files", t as char),
                }
                .into());
            }
        }
        at = padded;
    }
}

/// Names the member whose data (or the header after it) was being read when `e` happened.
fn context(e: crate::error::Error, member: &str) -> crate::error::Error {
    crate::error::Error::new(e.kind(), format!("{member}: {}", e.message()))
}

/// Reads a whole member's data; running out is truncation of that member.
fn read_member(r: &mut dyn Forward, off: u64, size: u64, name: &str) -> CrateResult<Vec<u8>> {
    let mut v = vec![0u8; size as usize];
    let n = read_full(r, off, &mut v).map_err(|e| context(e, name))?;
    if n < v.len() {
        return Err(Error::Truncated { member: name.to_string(), need: off + size, end: off + n as u64 }.into());
    }
    Ok(v)
}

fn read_full(r: &mut dyn Forward, off: u64, buf: &mut [u8]) -> CrateResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = r.read_at(off + done as u64, &mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// A plain tar file read positionally, with the member after a chunk's data checked for
/// truncation: the last member must fit in the file.
pub struct PlainForward<'a> {
    pub src: &'a dyn crate::source::Source,
    pub len: u64,
    pub pos: u64,
}

impl Forward for PlainForward<'_> {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> CrateResult<usize> {
        self.pos = off;
        if off >= self.len {
            return Ok(0);
        }
        let n = buf.len().min((self.len - off) as usize);
        self.src.read_exact_at(&mut buf[..n], off)?;
        Ok(n)
    }
    fn progress(&self) -> u64 {
        self.pos
    }
    fn stream_end(&self) -> Option<u64> {
        Some(self.len)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header built field by field, as tar writers do (checksum computed last).
    pub fn header(name: &str, size: u64, typeflag: u8, ustar: bool) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes()); // name[100]
        h[100..107].copy_from_slice(b"0000400"); // mode
        h[108..115].copy_from_slice(b"0000000"); // uid
        h[116..123].copy_from_slice(b"0000000"); // gid
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes()); // size[12]
        h[136..147].copy_from_slice(b"00000000000"); // mtime[12]
        h[156] = typeflag;
        if ustar {
            h[257..263].copy_from_slice(b"ustar\0"); // magic
            h[263..265].copy_from_slice(b"00"); // version
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes()); // chksum: 6 octal digits, NUL, space
        h
    }

    #[test]
    fn v7_and_ustar_headers_parse() {
        let h = parse_header(&header("Ref:3/00000000", 1 << 20, 0, false), 0).unwrap().unwrap();
        assert_eq!(h, Header { name: "Ref:3/00000000".into(), size: 1 << 20, typeflag: 0 });
        let mut u = header("00000001.xxhash", 16, b'0', true);
        u[345..350].copy_from_slice(b"Ref:3"); // ustar prefix
        u[148..156].fill(b' ');
        let sum: u32 = u.iter().map(|&b| b as u32).sum();
        u[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        assert_eq!(parse_header(&u, 0).unwrap().unwrap().name, "Ref:3/00000001.xxhash");
        assert_eq!(parse_header(&[0u8; 512], 0).unwrap(), None);
    }

    #[test]
    fn header_checksum_mismatch_is_refused() {
        let mut h = header("ova.xml", 10, b'0', true);
        h[0] = b'O';
        let e = parse_header(&h, 0x400).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch") && e.contains("0x400"), "{e}");
    }

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(parse_num(b"00000001750\0"), Some(1000));
        assert_eq!(parse_num(b"  1750 \0"), Some(1000));
        assert_eq!(parse_num(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_num(b"12x"), None);
    }

    #[test]
    fn pax_records_override_path_and_size() {
        let (p, s) = parse_pax(b"31 path=Ref:12/00000003.xxhash\n11 size=16\n").unwrap();
        assert_eq!(p.as_deref(), Some("Ref:12/00000003.xxhash"));
        assert_eq!(s, Some(16));
        assert!(parse_pax(b"99 path=x\n").is_err());
    }

    struct Mem(Vec<u8>);
    impl Forward for Mem {
        fn read_at(&mut self, off: u64, buf: &mut [u8]) -> CrateResult<usize> {
            let s = self.0.get(off as usize..).unwrap_or(&[]);
            let n = s.len().min(buf.len());
            buf[..n].copy_from_slice(&s[..n]);
            Ok(n)
        }
        fn stream_end(&self) -> Option<u64> {
            Some(self.0.len() as u64)
        }
    }

    fn walk_all(b: Vec<u8>) -> CrateResult<(Vec<Member>, End)> {
        let mut out = Vec::new();
        let end = walk(&mut Mem(b), &|_, s| s <= SMALL, &mut |m| {
            out.push(m);
            Ok(())
        })?;
        Ok((out, end))
    }

    #[test]
    fn gnu_long_names_and_directories() {
        let long = format!("Ref:3/{}", "x".repeat(150));
        let mut t = header("././@LongLink", long.len() as u64 + 1, b'L', false);
        let mut data = long.clone().into_bytes();
        data.push(0);
        data.resize(512, 0);
        t.extend(data);
        t.extend(header(&long[..99], 3, b'0', false));
        t.extend(b"abc".iter().copied().chain(std::iter::repeat_n(0, 509)));
        t.extend(header("Ref:3/", 0, b'5', true));
        t.extend([0u8; 1024]);
        let (m, end) = walk_all(t).unwrap();
        assert_eq!(end, End::Marker);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].name, long);
        assert_eq!(m[0].offset, 3 * 512);
        assert_eq!(m[0].content.as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn truncated_member_names_it() {
        let mut t = header("Ref:3/00000000", 4096, 0, false);
        t.extend([7u8; 1000]);
        let e = walk_all(t.clone()).unwrap_err().to_string();
        assert!(e.contains("Ref:3/00000000") && e.contains("truncated"), "{e}");
        let mut big = header("Ref:3/00000000", 1 << 20, 0, false);
        big.extend([7u8; 4096]);
        let e = walk_all(big).unwrap_err().to_string();
        assert!(e.contains("Ref:3/00000000") && e.contains("truncated"), "skipped member: {e}");
        let (m, end) = walk_all(header("ova.xml", 0, b'0', true)).unwrap();
        assert_eq!((m.len(), end), (1, End::Eof));
    }

    #[test]
    fn links_are_refused() {
        let e = walk_all(header("Ref:3/00000000", 0, b'2', true)).unwrap_err().to_string();
        assert!(e.contains("a link"), "{e}");
    }
}
