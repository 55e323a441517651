//! The FUSE ceiling for benchmarks: a minimal multi-threaded fuser passthrough of one raw file,
//! with the same kernel knobs vdiskfs uses (1 MiB requests and readahead, page cache kept, a
//! reused read buffer per thread). benches/compare.sh also raises its bdi read_ahead_kb to match.
//!
//! cargo run --release --example passthrough -- FILE MOUNTPOINT [THREADS]

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

struct Pass {
    file: File,
    size: u64,
}

const NAME: &str = "disk.raw";

fn attr(ino: u64, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size / 512,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if ino == 1 { FileType::Directory } else { FileType::RegularFile },
        perm: if ino == 1 { 0o555 } else { 0o444 },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

impl Filesystem for Pass {
    fn init(&mut self, _r: &Request, c: &mut KernelConfig) -> std::io::Result<()> {
        let _ = c.set_max_write(1 << 20);
        if let Err(n) = c.set_max_readahead(1 << 20) {
            let _ = c.set_max_readahead(n);
        }
        let _ = c.set_max_background(64);
        Ok(())
    }
    fn lookup(&self, _r: &Request, p: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if p.0 == 1 && name == NAME {
            reply.entry(&Duration::from_secs(60), &attr(2, self.size), fuser::Generation(0))
        } else {
            reply.error(Errno::ENOENT)
        }
    }
    fn getattr(&self, _r: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&Duration::from_secs(60), &attr(ino.0, if ino.0 == 1 { 0 } else { self.size }))
    }
    fn open(&self, _r: &Request, _ino: INodeNo, _f: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }
    fn read(
        &self,
        _r: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        off: u64,
        size: u32,
        _f: OpenFlags,
        _l: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // A reused per-thread buffer, as vdiskfs does, so the ceiling is not lowered by allocation.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let n = (size as u64).min(self.size.saturating_sub(off)) as usize;
        BUF.with_borrow_mut(|buf| {
            buf.resize(n, 0);
            match self.file.read_exact_at(buf, off) {
                Ok(()) => reply.data(buf),
                Err(_) => reply.error(Errno::EIO),
            }
        })
    }
    fn readdir(&self, _r: &Request, _ino: INodeNo, _fh: FileHandle, off: u64, mut reply: ReplyDirectory) {
        if off == 0 {
            let _ = reply.add(INodeNo(2), 1, FileType::RegularFile, NAME);
        }
        reply.ok()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: passthrough FILE MOUNTPOINT [THREADS]");
        std::process::exit(2);
    }
    let file = File::open(&args[1]).expect("open file");
    let size = file.metadata().expect("stat").len();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![fuser::MountOption::RO, fuser::MountOption::FSName("passthrough".into())];
    cfg.n_threads = Some(args.get(3).and_then(|t| t.parse().ok()).unwrap_or(4));
    cfg.clone_fd = true;
    fuser::mount(Pass { file, size }, &args[2], &cfg).expect("mount");
}
