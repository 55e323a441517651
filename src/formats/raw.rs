//! Raw volumes (`raw:PATH`): a file or block device read as is, byte for byte.
//!
//! There is no format to detect: the user says the volume is raw. This is how a Xen guest's
//! partitions (one LV each, xen-tools) or a raw Xen disk (OnApp, `/dev/drbdN`) become parts of a
//! composed disk, or a disk of their own.
//!
//! - Size: the file's or the device's size when opened. A raw volume has no header that fixes
//!   it, so the layer watches it: a read of a volume whose size has changed since it was opened
//!   fails with EIO (`Stale`) and a log line, because the partition table and every offset above
//!   were computed from the old size (an `lvextend` or a truncate while mounted).
//! - Holes: a sparse regular file's holes (`SEEK_HOLE`) read as zeros without a read, so
//!   `export` and `SEEK_DATA` skip them. A block device is all data.
//! - Identity: the location as the user named it and the size. A raw volume carries no UUID;
//!   the name is kept as given (not canonicalised), because `/dev/vg/lv` is stable across
//!   reboots where the `/dev/dm-N` it points to is not.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Kind, Result};
use crate::layer::{Identity, Layer, LayerInfo, ParentRef, Span};
use crate::source::{Location, Source};

/// What a raw volume can do wrong.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error(
        "size changed from {was} to {now} bytes since it was opened; the disk above was laid out for the old size (remount to use the new one)"
    )]
    SizeChanged { was: u64, now: u64 },
    #[error("cannot check the size")]
    Check(#[source] std::io::Error),
}

impl ErrorKind for RawError {
    fn kind(&self) -> Kind {
        match self {
            RawError::SizeChanged { .. } => Kind::Stale,
            RawError::Check(_) => Kind::Io,
        }
    }
}

/// A descriptor of our own on the same object, for size checks and hole lookups (a `Source` has
/// neither, and its descriptor is not ours to move).
#[derive(Debug)]
struct Watch {
    file: File,
    regular: bool,
}

/// A raw volume as a layer without parent.
#[derive(Debug)]
pub struct RawLayer {
    src: Arc<dyn Source>,
    size: u64,
    watch: Option<Watch>,
}

impl RawLayer {
    /// The volume `src` (opened by the gate), as it is now.
    pub fn open(src: Arc<dyn Source>) -> Result<RawLayer> {
        let size = src.len()?;
        let watch = open_watch(src.as_ref());
        if watch.is_none() {
            log::debug!("{}: size changes will not be noticed (not a local file or device)", src.location());
        }
        Ok(RawLayer { src, size, watch })
    }

    /// Fails when the volume's size is no longer the one it was opened with.
    fn check_size(&self) -> Result<()> {
        let Some(w) = &self.watch else { return Ok(()) };
        let now = (&w.file).seek(SeekFrom::End(0)).map_err(|e| self.err(RawError::Check(e)))?;
        if now != self.size {
            return Err(self.err(RawError::SizeChanged { was: self.size, now }));
        }
        Ok(())
    }

    fn err(&self, e: RawError) -> Error {
        Error::from(e).in_file(self.src.location())
    }

    /// `lseek(SEEK_DATA or SEEK_HOLE)` on a regular file: `None` past the last data (ENXIO).
    fn seek(&self, w: &Watch, offset: u64, whence: i32) -> Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; its position is never used for reading.
        let r = unsafe { libc::lseek(w.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(self.err(RawError::Check(e))) }
    }
}

/// Opens the volume again, read-only and without blocking, and keeps it only if it is the
/// object the source holds.
fn open_watch(src: &dyn Source) -> Option<Watch> {
    let path = src.location().as_path()?;
    let id = src.id()?;
    let flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    let file = File::options()
        .read(true)
        .custom_flags(flags | libc::O_NOATIME)
        .open(path)
        .ok()
        .or_else(|| File::options().read(true).custom_flags(flags).open(path).ok())?;
    let md = file.metadata().ok()?;
    let ft = md.file_type();
    let same = if ft.is_block_device() {
        md.rdev() == id.dev
    } else {
        ft.is_file() && md.dev() == id.dev && md.ino() == id.ino
    };
    same.then_some(Watch { file, regular: ft.is_file() })
}

impl Layer for RawLayer {
    fn location(&self) -> &Location {
        self.src.location()
    }
    fn sources(&self) -> Vec<Arc<dyn Source>> {
        vec![self.src.clone()]
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Span> {
        self.check_size()?;
        let Some(w) = self.watch.as_ref().filter(|w| w.regular) else { return Ok(Span::data(max_len, 0, offset)) };
        let end = offset + max_len;
        match self.seek(w, offset, libc::SEEK_DATA)? {
            None => Ok(Span::zero(max_len)),
            Some(d) if d > offset => Ok(Span::zero(d.min(end) - offset)),
            Some(_) => {
                let hole = self.seek(w, offset, libc::SEEK_HOLE)?.unwrap_or(self.size);
                Ok(Span::data(hole.clamp(offset + 1, end) - offset, 0, offset))
            }
        }
    }

    fn read(&self, _source: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_size()?;
        self.src.read_exact_at(buf, offset)
    }

    fn parent(&self) -> Option<&ParentRef> {
        None
    }

    fn identity(&self) -> Vec<Identity> {
        Vec::new()
    }

    fn describe(&self) -> Result<LayerInfo> {
        let kind = match &self.watch {
            Some(w) if w.regular => "file",
            Some(_) => "block device",
            None => "volume",
        };
        Ok(LayerInfo {
            path: self.location().to_string(),
            format: "raw",
            subformat: kind.into(),
            virtual_size: self.size,
            block_size: 0,
            identity: self.location().to_string(),
            parent: None,
            allocated_bytes: self.size,
            details: vec![("size_source".into(), format!("the {kind}'s size when opened"))],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FileTypes, LocalSource};
    use std::os::unix::fs::FileExt;

    fn open(path: &std::path::Path) -> RawLayer {
        RawLayer::open(Arc::new(LocalSource::open(path, FileTypes::RegularOrBlockDevice).unwrap())).unwrap()
    }

    #[test]
    fn a_sparse_file_maps_its_holes_as_zeros() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("vol");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 4 << 20).unwrap();
        f.sync_all().unwrap();
        let l = open(&p);
        assert_eq!(l.virtual_size(), 8 << 20);
        let first = l.map(0, 8 << 20).unwrap();
        // A file system that does not report holes says "all data": both are right.
        if first.kind == crate::layer::SpanKind::Zero {
            assert_eq!(first.len, 4 << 20);
            let d = l.map(4 << 20, 4 << 20).unwrap();
            assert_eq!(d.kind, crate::layer::SpanKind::Data { source: 0, offset: 4 << 20 });
            assert!(d.len >= 4096 && d.len <= 4 << 20);
        }
        let mut b = [0u8; 8];
        l.read(0, (4 << 20) + 10, &mut b).unwrap();
        assert_eq!(b, [7; 8]);
    }

    #[test]
    fn a_volume_whose_size_changes_fails_reads() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("vol");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        let l = open(&p);
        let mut b = [0u8; 512];
        l.read(0, 0, &mut b).unwrap();
        File::options().write(true).open(&p).unwrap().set_len(2 << 20).unwrap();
        let e = l.read(0, 0, &mut b).unwrap_err();
        assert_eq!(e.kind(), Kind::Stale);
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains("size changed from 1048576 to 2097152 bytes"), "{e}");
        assert!(l.map(0, 512).is_err());
    }
}
