//! The thin `fuser::Filesystem` adapter: calls into [`VdiskFs`], turns `Result` into replies and
//! [`crate::Error`] into an errno, and logs read-time failures (the one place they surface).

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, WriteFlags,
};

use super::{Attr, NodeKind, VdiskFs, Whence};
use crate::error::Error;

/// Knobs of the kernel connection.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Largest read/write request (bytes); the kernel's max_pages follows from it.
    pub max_request: u32,
    /// Kernel readahead per file (bytes).
    pub readahead: u32,
    /// Keep the page cache across opens (safe for read-only disks: the data cannot change).
    pub keep_cache: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions { max_request: 1 << 20, readahead: 1 << 20, keep_cache: true }
    }
}

/// The adapter.
#[derive(Debug)]
pub struct FuseFs {
    fs: Arc<VdiskFs>,
    opts: FuseOptions,
}

const TTL: Duration = Duration::from_secs(10);

impl FuseFs {
    pub fn new(fs: Arc<VdiskFs>, opts: FuseOptions) -> Self {
        FuseFs { fs, opts }
    }

    fn sync(&self, ino: INodeNo, reply: ReplyEmpty, what: &str) {
        match self.fs.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log::error!("{what} ino={}: {e}", ino.0);
                reply.error(errno(&e))
            }
        }
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.allocated.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            NodeKind::Dir => FileType::Directory,
            NodeKind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: if a.kind == NodeKind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(n) = config.set_max_write(self.opts.max_request) {
            let _ = config.set_max_write(n);
        }
        if let Err(n) = config.set_max_readahead(self.opts.readahead) {
            log::debug!("kernel caps readahead at {n} bytes");
            let _ = config.set_max_readahead(n);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &to_attr(&a), fuser::Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &to_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.fs.open(ino.0, write) {
            Ok(()) => {
                let f = if self.opts.keep_cache { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                // The handle says whether it may write: closing a read-only one needs no checkpoint.
                reply.opened(FileHandle(u64::from(write)), f)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // One buffer per FUSE thread, reused: a fresh 1 MiB allocation per request costs page
        // faults and zeroing that show up in O_DIRECT throughput.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| match self.fs.read_into(ino.0, offset, size, buf) {
            Ok(()) => reply.data(buf),
            Err(e) => {
                log::error!("read ino={} off={offset:#x} len={size}: {e}", ino.0);
                reply.error(errno(&e))
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                log::warn!("write ino={} off={offset:#x} len={}: {e}", ino.0, data.len());
                reply.error(errno(&e))
            }
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        // flush runs at every close(); a reader's close must not stall on (or fail with) a
        // checkpoint of what writers did.
        if fh.0 == 0 {
            return reply.ok();
        }
        self.sync(ino, reply, "flush")
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.sync(ino, reply, "fsync")
    }

    // No extended attributes: ENOSYS tells the kernel once, and it stops asking.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.flush_all() {
            log::error!("final checkpoint: {e}");
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fs.fallocate(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log::warn!("fallocate ino={} off={offset:#x} len={length} mode={mode:#x}: {e}", ino.0);
                reply.error(errno(&e))
            }
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = match size {
            Some(s) => self.fs.setattr_size(ino.0, s),
            None => self.fs.getattr(ino.0),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &to_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fs.readdir(ino.0) {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    let kind = if kind == NodeKind::Dir { FileType::Directory } else { FileType::RegularFile };
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, s.bfree, s.bfree, s.files, 0, s.bsize, 255, s.bsize);
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let whence = match whence {
            libc::SEEK_DATA => Whence::Data,
            libc::SEEK_HOLE => Whence::Hole,
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        match self.fs.lseek(ino.0, offset as u64, whence) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => {
                log::error!("lseek ino={} off={offset:#x}: {e}", ino.0);
                reply.error(errno(&e))
            }
        }
    }
}
