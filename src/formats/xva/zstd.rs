//! zstd (RFC 8878) with random access at frame boundaries.
//!
//! Frames are independent, so the start of every frame is a restart point (a `pzstd` file, or
//! any multi-frame stream, is indexed at its frames). Inside one frame there is no restart
//! point a decoder can be given: a block may use the previous blocks' entropy tables, repeat
//! offsets and up to a whole window of history, and libzstd offers no way to load such state.
//! A single-frame stream (plain `zstd`, `zstd -T0`, and so xapi's `compress=zstd`) therefore
//! has one restart point, and [`super::compressed`] serves it through its bounded on-disk cache of
//! decompressed blocks. The decoder keeps libzstd's default window limit (128 MiB) so a crafted
//! frame header cannot make each cursor allocate gigabytes.

use std::sync::Arc;

use zstd::stream::raw::{Decoder, Operation};

use super::compressed::ForwardDecoder;
use super::restart::{Recorder, RestartPoint};
use crate::error::{Error, ErrorKind, Kind, Result};
use crate::source::Source;

/// What can be wrong with a zstd stream.
#[derive(Debug, thiserror::Error)]
pub enum ZstdError {
    /// libzstd refused the frame's window: `detail` is its message.
    #[error("zstd frame at {at:#x} needs a window over 128 MiB ({detail})")]
    Window { at: u64, detail: String },
    #[error("zstd data error at about {at:#x}")]
    Data {
        at: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("zstd stream ends early: the file ends at {len:#x} inside a frame (decompressed {out:#x} bytes so far)")]
    EndsEarly { len: u64, out: u64 },
    #[error("zstd stream stalls at {0:#x}")]
    Stalls(u64),
}

impl ErrorKind for ZstdError {
    fn kind(&self) -> Kind {
        match self {
            ZstdError::Window { .. } => Kind::Unsupported,
            ZstdError::Data { .. } | ZstdError::EndsEarly { .. } | ZstdError::Stalls(_) => Kind::Corrupt,
        }
    }
}

const INBUF: usize = 256 << 10;

/// A forward zstd decoder over a source: the indexing pass (with a [`Recorder`]) and the
/// decoders that serve reads (started at a frame).
pub struct ZstdDecoder {
    src: Arc<dyn Source>,
    len: u64,
    dec: Decoder<'static>,
    inbuf: Vec<u8>,
    in_start: u64,
    in_pos: usize,
    in_len: usize,
    out_pos: u64,
    /// Inside a frame (some of it consumed, not all of it flushed).
    in_frame: bool,
    rec: Option<Box<Recorder>>,
}

impl ZstdDecoder {
    /// A decoder at the start of the file that records frame starts.
    pub fn scanner(src: Arc<dyn Source>, mut rec: Recorder) -> Result<Self> {
        rec.point(RestartPoint::new(0, 0, 0, true), &[])?;
        let mut d = Self::at(src, &RestartPoint::new(0, 0, 0, true))?;
        d.rec = Some(Box::new(rec));
        Ok(d)
    }

    /// A decoder at frame start `p`.
    pub fn at(src: Arc<dyn Source>, p: &RestartPoint) -> Result<Self> {
        let len = src.len()?;
        let dec = Decoder::new().map_err(|e| Error::io("zstd decoder", e))?;
        Ok(ZstdDecoder {
            src,
            len,
            dec,
            inbuf: vec![0; INBUF],
            in_start: p.inp,
            in_pos: 0,
            in_len: 0,
            out_pos: p.out,
            in_frame: false,
            rec: None,
        })
    }

    pub fn into_recorder(self) -> Option<Recorder> {
        self.rec.map(|r| *r)
    }

    fn cpos(&self) -> u64 {
        self.in_start + self.in_pos as u64
    }
}

impl ForwardDecoder for ZstdDecoder {
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
            if self.in_pos == self.in_len {
                let at = self.cpos();
                self.in_start = at;
                self.in_pos = 0;
                let n = self.inbuf.len().min(self.len.saturating_sub(at) as usize);
                self.src.read_exact_at(&mut self.inbuf[..n], at)?;
                self.in_len = n;
                if n == 0 && !self.in_frame {
                    return Ok(0);
                }
            }
            let frame_start = !self.in_frame;
            let st = self.dec.run_on_buffers(&self.inbuf[self.in_pos..self.in_len], out).map_err(|e| {
                let (at, m) = (self.cpos(), e.to_string());
                if m.contains("memory") || m.contains("window") {
                    ZstdError::Window { at, detail: m }
                } else {
                    ZstdError::Data { at, source: e }
                }
            })?;
            if frame_start && st.bytes_read > 0 {
                self.in_frame = true;
            }
            self.in_pos += st.bytes_read;
            self.out_pos += st.bytes_written as u64;
            if st.remaining == 0 && self.in_frame {
                // A frame ended: the next one (if any) starts here.
                self.in_frame = false;
                let (out_pos, cpos, len) = (self.out_pos, self.cpos(), self.len);
                if let Some(r) = self.rec.as_mut()
                    && cpos < len
                {
                    r.point(RestartPoint::new(out_pos, cpos, 0, true), &[])?;
                }
            }
            if st.bytes_written > 0 {
                return Ok(st.bytes_written);
            }
            if self.in_len == 0 {
                return Err(ZstdError::EndsEarly { len: self.len, out: self.out_pos }.into());
            }
            if st.bytes_read == 0 && self.in_pos < self.in_len {
                return Err(ZstdError::Stalls(self.cpos()).into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    fn drain(d: &mut ZstdDecoder) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = d.decode(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn frames_are_restart_points_and_truncation_is_reported() {
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 20) as u8).collect();
        let mut file = Vec::new();
        for part in data.chunks(1 << 20) {
            file.extend(zstd::bulk::compress(part, 3).unwrap());
        }
        let src: Arc<dyn Source> = Arc::new(MemSource::new("x.zst", file.clone()));
        let mut d = ZstdDecoder::scanner(src.clone(), Recorder::memory()).unwrap();
        assert!(drain(&mut d).unwrap() == data);
        let rec = d.into_recorder().unwrap();
        let outs: Vec<u64> = rec.points.iter().map(|p| p.out).collect();
        assert_eq!(outs, [0, 1 << 20, 2 << 20]);
        let mut c = ZstdDecoder::at(src, &rec.points[2]).unwrap();
        assert!(drain(&mut c).unwrap() == data[2 << 20..]);
        let cut: Arc<dyn Source> = Arc::new(MemSource::new("x.zst", file[..file.len() - 100].to_vec()));
        let e = drain(&mut ZstdDecoder::scanner(cut, Recorder::memory()).unwrap()).unwrap_err().to_string();
        assert!(e.contains("ends early"), "{e}");
    }
}
