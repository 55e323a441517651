//! gzip (RFC 1952) with random access: zlib's `zran.c` technique, reimplemented.
//!
//! One streaming pass inflates the whole file (every member of a multi-member file) and, about
//! every [`SPAN`] bytes of output, stops at a deflate block boundary (`Z_BLOCK`) to record a
//! restart point: the input offset, the number of bits of the previous byte that belong to the
//! next block, and the 32 KiB of output before it (the dictionary that later back-references
//! may reach). A read later starts a raw inflater at the nearest point before it
//! (`inflatePrime` for the bits, `inflateSetDictionary` for the window), so it inflates at most
//! one span. The pass also checks each member's CRC-32 and length trailer. Raw zlib calls go
//! through `libz-sys` because flate2 exposes neither `inflatePrime` nor raw dictionaries.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use libz_sys as z;

use super::compressed::ForwardDecoder;
use super::restart::{Recorder, RestartPoint};
use crate::error::{ErrorKind, Kind, Result};
use crate::source::Source;

/// What can be wrong with a gzip stream.
#[derive(Debug, thiserror::Error)]
pub enum GzipError {
    #[error("zlib inflateInit2 failed ({0})")]
    Init(c_int),
    #[error("cannot restart inflate at an index point ({prime}, {dictionary})")]
    Restart { prime: c_int, dictionary: c_int },
    #[error("not a gzip stream")]
    NotGzip(#[source] GzipHeaderError),
    #[error("data after gzip member {members} at {at:#x} is not another member")]
    NotAMember {
        members: u64,
        at: u64,
        #[source]
        source: GzipHeaderError,
    },
    #[error("gzip data error at about {at:#x}")]
    Data {
        at: u64,
        #[source]
        source: ZlibError,
    },
    #[error(
        "gzip stream ends early: the file ends at {len:#x} inside a compressed member (decompressed {out:#x} bytes so far)"
    )]
    EndsEarly { len: u64, out: u64 },
    #[error(
        "gzip member {member} ending at {at:#x}: CRC-32/length trailer mismatch (stored {stored_crc:08x}/{stored_len}, computed {crc:08x}/{len})"
    )]
    Trailer { member: u64, at: u64, stored_crc: u32, stored_len: u32, crc: u32, len: u32 },
    #[error("gzip stream stalls at {0:#x}")]
    Stalls(u64),
}

impl ErrorKind for GzipError {
    fn kind(&self) -> Kind {
        match self {
            GzipError::Init(_) => Kind::Io,
            GzipError::Restart { .. }
            | GzipError::NotGzip(_)
            | GzipError::NotAMember { .. }
            | GzipError::Data { .. }
            | GzipError::EndsEarly { .. }
            | GzipError::Trailer { .. }
            | GzipError::Stalls(_) => Kind::Corrupt,
        }
    }
}

/// Why bytes are not a gzip member header (RFC 1952 section 2.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GzipHeaderError {
    #[error("no gzip magic")]
    NoMagic,
    #[error("compression method {0} is not deflate")]
    Method(u8),
    #[error("gzip header runs past the end of the file")]
    Short,
}

/// What zlib said when it refused the data: its message, else its return code.
#[derive(Debug)]
pub struct ZlibError {
    code: c_int,
    msg: Option<String>,
}

impl std::fmt::Display for ZlibError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.msg {
            Some(m) => f.write_str(m),
            None => write!(f, "inflate error {}", self.code),
        }
    }
}

impl std::error::Error for ZlibError {}

/// Output bytes between restart points.
pub const SPAN: u64 = 4 << 20;
/// The deflate window.
pub const WINDOW: usize = 32 << 10;
const INBUF: usize = 256 << 10;

unsafe extern "C" fn zalloc(_: *mut c_void, items: z::uInt, size: z::uInt) -> *mut c_void {
    // SAFETY: plain calloc; zlib checks for NULL.
    unsafe { libc::calloc(items as usize, size as usize) }
}
unsafe extern "C" fn zfree(_: *mut c_void, p: *mut c_void) {
    // SAFETY: `p` came from zalloc.
    unsafe { libc::free(p) }
}

/// A raw (headerless) inflate stream. Boxed: zlib keeps a pointer back to the `z_stream`.
struct RawInflate {
    s: Box<z::z_stream>,
}

// SAFETY: the stream is owned and only used through `&mut self`.
unsafe impl Send for RawInflate {}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe { z::inflateEnd(&mut *self.s) };
    }
}

impl RawInflate {
    fn new() -> Result<Self> {
        let mut s = Box::new(z::z_stream {
            next_in: std::ptr::null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: std::ptr::null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: std::ptr::null_mut(),
            state: std::ptr::null_mut(),
            zalloc,
            zfree,
            opaque: std::ptr::null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        });
        // SAFETY: a fresh stream with valid allocators; version and size as zlib.h's macro passes them.
        let r =
            unsafe { z::inflateInit2_(&mut *s, -15, z::zlibVersion(), std::mem::size_of::<z::z_stream>() as c_int) };
        if r != z::Z_OK {
            return Err(GzipError::Init(r).into());
        }
        Ok(RawInflate { s })
    }

    fn reset(&mut self) {
        // SAFETY: initialised stream.
        unsafe { z::inflateReset(&mut *self.s) };
    }

    /// Positions the stream at a restart point.
    fn restart(&mut self, bits: u8, byte: u8, window: &[u8]) -> Result<()> {
        self.reset();
        // SAFETY: initialised stream; the dictionary pointer is valid for its length.
        let (a, b) = unsafe {
            let a =
                if bits > 0 { z::inflatePrime(&mut *self.s, bits as c_int, (byte >> (8 - bits)) as c_int) } else { 0 };
            let b = if window.is_empty() {
                0
            } else {
                z::inflateSetDictionary(&mut *self.s, window.as_ptr(), window.len() as z::uInt)
            };
            (a, b)
        };
        if a != z::Z_OK || b != z::Z_OK {
            return Err(GzipError::Restart { prime: a, dictionary: b }.into());
        }
        Ok(())
    }

    /// Inflates; returns (consumed, produced, end of deflate stream).
    fn run(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        flush: c_int,
    ) -> std::result::Result<(usize, usize, bool), ZlibError> {
        let s = &mut *self.s;
        s.next_in = input.as_ptr() as *mut u8;
        s.avail_in = input.len().min(u32::MAX as usize) as z::uInt;
        s.next_out = out.as_mut_ptr();
        s.avail_out = out.len().min(u32::MAX as usize) as z::uInt;
        let (ai, ao) = (s.avail_in, s.avail_out);
        // SAFETY: the pointers are valid for the lengths given, for the duration of the call.
        let r = unsafe { z::inflate(s, flush) };
        let consumed = (ai - s.avail_in) as usize;
        let produced = (ao - s.avail_out) as usize;
        s.next_in = std::ptr::null_mut();
        s.next_out = std::ptr::null_mut();
        match r {
            z::Z_OK | z::Z_BUF_ERROR => Ok((consumed, produced, false)),
            z::Z_STREAM_END => Ok((consumed, produced, true)),
            _ => {
                let msg = (!s.msg.is_null()).then(|| {
                    // SAFETY: zlib's messages are static NUL-terminated strings.
                    unsafe { std::ffi::CStr::from_ptr(s.msg) }.to_string_lossy().into_owned()
                });
                Err(ZlibError { code: r, msg })
            }
        }
    }
}

fn crc32(crc: u32, data: &[u8]) -> u32 {
    // SAFETY: valid buffer; zlib's crc32 takes (crc, ptr, len).
    unsafe { z::crc32(crc as _, data.as_ptr(), data.len() as z::uInt) as u32 }
}

/// Length of the gzip member header at the start of `b`, or why it is not one.
pub fn header_len(b: &[u8]) -> std::result::Result<usize, GzipHeaderError> {
    if b.len() < 10 || b[0] != 0x1f || b[1] != 0x8b {
        return Err(GzipHeaderError::NoMagic);
    }
    if b[2] != 8 {
        return Err(GzipHeaderError::Method(b[2]));
    }
    let flg = b[3];
    let mut i = 10;
    let short = GzipHeaderError::Short;
    if flg & 4 != 0 {
        let xlen = u16::from_le_bytes([*b.get(i).ok_or(short.clone())?, *b.get(i + 1).ok_or(short.clone())?]);
        i += 2 + xlen as usize;
    }
    for bit in [8u8, 16] {
        if flg & bit != 0 {
            let z = b.get(i..).and_then(|r| r.iter().position(|&c| c == 0)).ok_or(short.clone())?;
            i += z + 1;
        }
    }
    if flg & 2 != 0 {
        i += 2;
    }
    if i > b.len() {
        return Err(short);
    }
    Ok(i)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Body,
    Trailer,
    Done,
}

/// A forward gzip decoder over a source: the indexing pass (with a [`Recorder`]) and the
/// decoders that serve reads (started at a restart point).
pub struct GzDecoder {
    src: Arc<dyn Source>,
    len: u64,
    inf: RawInflate,
    inbuf: Vec<u8>,
    in_start: u64,
    in_pos: usize,
    in_len: usize,
    state: State,
    out_pos: u64,
    /// Check member trailers (only when decoding members from their start).
    check: bool,
    crc: u32,
    member_len: u64,
    member_out_start: u64,
    members: u64,
    rec: Option<Box<Recorder>>,
    /// The last WINDOW bytes of output (indexing pass only).
    hist: Vec<u8>,
}

impl GzDecoder {
    /// A decoder at the start of the file that records restart points.
    pub fn scanner(src: Arc<dyn Source>, rec: Recorder) -> Result<Self> {
        let len = src.len()?;
        let mut d = Self::blank(src, len)?;
        d.rec = Some(Box::new(rec));
        d.check = true;
        Ok(d)
    }

    /// A decoder positioned at restart point `p`, whose window is `window`.
    pub fn at(src: Arc<dyn Source>, p: &RestartPoint, window: &[u8]) -> Result<Self> {
        let len = src.len()?;
        let mut d = Self::blank(src, len)?;
        d.out_pos = p.out;
        if p.member_start {
            d.state = State::Header;
            d.in_start = p.inp;
            return Ok(d);
        }
        // The point's first bits are the high bits of the byte before `inp` (zran.c).
        let mut byte = [0u8];
        if p.bits > 0 {
            d.src.read_exact_at(&mut byte, p.inp.saturating_sub(1))?;
        }
        d.inf.restart(p.bits, byte[0], window)?;
        d.in_start = p.inp;
        d.state = State::Body;
        Ok(d)
    }

    fn blank(src: Arc<dyn Source>, len: u64) -> Result<Self> {
        Ok(GzDecoder {
            src,
            len,
            inf: RawInflate::new()?,
            inbuf: vec![0; INBUF],
            in_start: 0,
            in_pos: 0,
            in_len: 0,
            state: State::Header,
            out_pos: 0,
            check: false,
            crc: 0,
            member_len: 0,
            member_out_start: 0,
            members: 0,
            rec: None,
            hist: Vec::new(),
        })
    }

    pub fn into_recorder(self) -> Option<Recorder> {
        self.rec.map(|r| *r)
    }

    fn cpos(&self) -> u64 {
        self.in_start + self.in_pos as u64
    }

    fn refill(&mut self) -> Result<usize> {
        let at = self.cpos();
        self.in_start = at;
        self.in_pos = 0;
        let n = self.inbuf.len().min(self.len.saturating_sub(at) as usize);
        self.src.read_exact_at(&mut self.inbuf[..n], at)?;
        self.in_len = n;
        Ok(n)
    }

    fn early_end(&self) -> GzipError {
        GzipError::EndsEarly { len: self.len, out: self.out_pos }
    }

    fn start_member(&mut self) -> Result<bool> {
        let at = self.cpos();
        if at >= self.len {
            return Ok(false);
        }
        let n = (self.len - at).min(64 << 10) as usize;
        let head = self.src.read_vec(at, n)?;
        let hl = match header_len(&head) {
            Ok(l) => l,
            Err(_) if self.members > 0 && head.iter().all(|&b| b == 0) && at + n as u64 == self.len => {
                return Ok(false); // zero padding after the last member
            }
            Err(e) if self.members == 0 => return Err(GzipError::NotGzip(e).into()),
            Err(source) => return Err(GzipError::NotAMember { members: self.members, at, source }.into()),
        };
        self.in_start = at + hl as u64;
        self.in_pos = 0;
        self.in_len = 0;
        self.inf.reset();
        self.crc = 0;
        self.member_len = 0;
        self.member_out_start = self.out_pos;
        self.members += 1;
        if let Some(r) = self.rec.as_mut() {
            r.point(RestartPoint::new(self.out_pos, at, 0, true), &[])?;
        }
        Ok(true)
    }

    fn trailer(&mut self) -> Result<()> {
        let at = self.cpos();
        let mut t = [0u8; 8];
        if at + 8 > self.len {
            return Err(self.early_end().into());
        }
        self.src.read_exact_at(&mut t, at)?;
        if self.check {
            let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
            let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            if crc != self.crc || isize != self.member_len as u32 {
                let (member, crc_now, len) = (self.members, self.crc, self.member_len as u32);
                let e = GzipError::Trailer { member, at, stored_crc: crc, stored_len: isize, crc: crc_now, len };
                return Err(e.into());
            }
        }
        self.in_start = at + 8;
        self.in_pos = 0;
        self.in_len = 0;
        Ok(())
    }

    fn body(&mut self, out: &mut [u8]) -> Result<usize> {
        loop {
            if self.in_pos == self.in_len && self.refill()? == 0 {
                return Err(self.early_end().into());
            }
            let want_point = self.rec.as_ref().is_some_and(|r| self.out_pos - r.last_out() >= SPAN);
            let flush = if want_point { z::Z_BLOCK } else { z::Z_NO_FLUSH };
            let (c, p, end) = self
                .inf
                .run(&self.inbuf[self.in_pos..self.in_len], out, flush)
                .map_err(|source| GzipError::Data { at: self.cpos(), source })?;
            self.in_pos += c;
            let produced = &out[..p];
            self.out_pos += p as u64;
            if self.check {
                self.crc = crc32(self.crc, produced);
                self.member_len += p as u64;
            }
            if let Some(rec) = self.rec.as_mut() {
                self.hist.extend_from_slice(produced);
                if self.hist.len() > 4 * WINDOW {
                    self.hist.drain(..self.hist.len() - WINDOW);
                }
                let dt = self.inf.s.data_type;
                if want_point && dt & 128 != 0 && dt & 64 == 0 && !end {
                    let avail = (self.out_pos - self.member_out_start).min(WINDOW as u64) as usize;
                    let w = &self.hist[self.hist.len() - avail..];
                    let p = RestartPoint::new(self.out_pos, self.in_start + self.in_pos as u64, (dt & 7) as u8, false);
                    rec.point(p, w)?;
                }
            }
            if end {
                self.state = State::Trailer;
                return Ok(p);
            }
            if p > 0 {
                return Ok(p);
            }
            if c == 0 && self.in_pos < self.in_len {
                return Err(GzipError::Stalls(self.cpos()).into());
            }
        }
    }
}

impl ForwardDecoder for GzDecoder {
    fn pos(&self) -> u64 {
        self.out_pos
    }

    fn compressed_pos(&self) -> u64 {
        self.cpos()
    }

    fn decode(&mut self, out: &mut [u8]) -> Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Header => {
                    if !self.start_member()? {
                        self.state = State::Done;
                        return Ok(0);
                    }
                    self.state = State::Body;
                }
                State::Trailer => {
                    self.trailer()?;
                    self.state = State::Header;
                    self.check = self.rec.is_some();
                }
                State::Body => {
                    let n = self.body(out)?;
                    if n > 0 {
                        return Ok(n);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn header_lengths_follow_flags() {
        assert_eq!(header_len(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]).unwrap(), 10);
        let mut h = vec![0x1f, 0x8b, 8, 8, 0, 0, 0, 0, 0, 3];
        h.extend(b"vm.xva\0");
        assert_eq!(header_len(&h).unwrap(), 17);
        assert_eq!(header_len(&[0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 3]), Err(GzipHeaderError::Method(7)));
        assert!(GzipHeaderError::Method(7).to_string().contains("not deflate"));
        assert_eq!(header_len(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 3, 9]), Err(GzipHeaderError::Short));
    }

    #[test]
    fn restart_points_reproduce_the_stream() {
        let data: Vec<u8> = (0..(12u64 << 20)).map(|i| ((i * 2654435761) >> 13) as u8 & 0x3f).collect();
        let mut file = gz(&data[..5 << 20]);
        file.extend(gz(&data[5 << 20..])); // two members
        let src: Arc<dyn Source> = Arc::new(MemSource::new("x.gz", file.clone()));
        let mut d = GzDecoder::scanner(src.clone(), Recorder::memory()).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 100_000];
        loop {
            let n = d.decode(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert!(out == data);
        let rec = d.into_recorder().unwrap();
        assert!(rec.points.len() >= 3, "{:?}", rec.points);
        for p in &rec.points {
            let w = rec.window(p).unwrap();
            let mut c = GzDecoder::at(src.clone(), p, &w).unwrap();
            let mut got = vec![0u8; 4096];
            let n = c.decode(&mut got).unwrap();
            assert!(n > 0);
            assert_eq!(&got[..n], &data[p.out as usize..p.out as usize + n], "point {p:?}");
        }
        // A truncated file ends early, with a message saying so.
        let cut: Arc<dyn Source> = Arc::new(MemSource::new("x.gz", file[..file.len() / 2].to_vec()));
        let mut d = GzDecoder::scanner(cut, Recorder::memory()).unwrap();
        let e = loop {
            match d.decode(&mut buf) {
                Ok(0) => panic!("no error"),
                Ok(_) => {}
                Err(e) => break e.to_string(),
            }
        };
        assert!(e.contains("ends early"), "{e}");
    }
}
