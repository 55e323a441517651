//! A fault-injecting FUSE file system for tests: a read-only passthrough of the regular files in
//! one directory that fails on purpose. Tests mount it, put a chain's images behind it, mount
//! vdiskfs on those, and then arm [`Rule`]s to see what a failing disk does to a mount: reads that
//! fail with EIO, short reads, slow reads, and a file that shrinks. It runs in the test's own
//! process (a background fuser session), so no binary has to be found; the files are opened in
//! `direct_io` mode, so every read reaches it and none is served from the page cache.
//!
//! ```ignore
//! let f = FaultFs::mount(&images_dir, &mnt)?;
//! f.set(vec![Rule::Eio { name: "base.vhd".into(), from: 0x30_0000, to: 0x40_0000 }]);
//! ```

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

/// One fault, for the file `name` (a file name in the served directory). Ranges are byte
/// ranges `[from, to)` of that file; a read touching one is affected as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// The read fails with EIO.
    Eio { name: String, from: u64, to: u64 },
    /// The read returns half of what was asked (at least one byte): a short read before the end.
    Short { name: String, from: u64, to: u64 },
    /// The read waits this long before it is served.
    Delay { name: String, from: u64, to: u64, delay: Duration },
    /// The file is `len` bytes long from now on: its size says so, and reads past it return
    /// nothing, as after a truncate.
    Shrink { name: String, len: u64 },
}

impl Rule {
    fn name(&self) -> &str {
        match self {
            Rule::Eio { name, .. }
            | Rule::Short { name, .. }
            | Rule::Delay { name, .. }
            | Rule::Shrink { name, .. } => name,
        }
    }
    fn touches(&self, off: u64, len: u64) -> bool {
        match self {
            Rule::Eio { from, to, .. } | Rule::Short { from, to, .. } | Rule::Delay { from, to, .. } => {
                off < *to && off + len > *from
            }
            Rule::Shrink { .. } => true,
        }
    }
}

/// What the file system counts, for tests that check the faults were hit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub reads: u64,
    pub failed: u64,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    counts: Counts,
}

struct Fs {
    files: Vec<(String, File)>,
    state: Arc<Mutex<State>>,
}

const TTL: Duration = Duration::ZERO;

impl Fs {
    fn file(&self, ino: INodeNo) -> Option<&(String, File)> {
        (ino.0 as usize).checked_sub(2).and_then(|i| self.files.get(i))
    }

    fn rules_for(&self, name: &str) -> Vec<Rule> {
        self.state.lock().unwrap().rules.iter().filter(|r| r.name() == name).cloned().collect()
    }

    /// The size the file has now: its real size, or less after a [`Rule::Shrink`].
    fn size(&self, name: &str, f: &File) -> u64 {
        let real = f.metadata().map(|m| m.len()).unwrap_or(0);
        self.rules_for(name)
            .iter()
            .filter_map(|r| match r {
                Rule::Shrink { len, .. } => Some(*len),
                _ => None,
            })
            .fold(real, u64::min)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size) = match ino {
            1 => (FileType::Directory, 0o555, 0),
            _ => {
                let (name, f) = self.file(INodeNo(ino))?;
                (FileType::RegularFile, 0o444, self.size(name, f))
            }
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Serves one read of `size` bytes at `off` of `name`, with the faults that apply.
    fn serve(&self, name: &str, f: &File, off: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let rules: Vec<Rule> = self.rules_for(name).into_iter().filter(|r| r.touches(off, size as u64)).collect();
        let mut n = (size as u64).min(self.size(name, f).saturating_sub(off));
        for r in &rules {
            match r {
                Rule::Delay { delay, .. } => std::thread::sleep(*delay),
                Rule::Eio { .. } => return Err(Errno::EIO),
                Rule::Short { .. } if n > 1 => n /= 2,
                Rule::Short { .. } | Rule::Shrink { .. } => {}
            }
        }
        let mut buf = vec![0u8; n as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Errno::EIO),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _r: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.files.iter().position(|(n, _)| parent.0 == 1 && OsStr::new(n) == name);
        match found.and_then(|i| self.attr(i as u64 + 2)) {
            Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }
    fn getattr(&self, _r: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }
    fn open(&self, _r: &Request, _ino: INodeNo, _f: OpenFlags, reply: ReplyOpen) {
        // Every read comes here: no page cache in between to hide a fault.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
    }
    fn read(
        &self,
        _r: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        off: u64,
        size: u32,
        _f: OpenFlags,
        _l: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((name, f)) = self.file(ino) else { return reply.error(Errno::ENOENT) };
        let r = self.serve(name, f, off, size);
        {
            let mut st = self.state.lock().unwrap();
            st.counts.reads += 1;
            st.counts.failed += r.is_err() as u64;
        }
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }
    fn readdir(&self, _r: &Request, _ino: INodeNo, _fh: FileHandle, off: u64, mut reply: ReplyDirectory) {
        for (i, (n, _)) in self.files.iter().enumerate().skip(off as usize) {
            if reply.add(INodeNo(i as u64 + 2), i as u64 + 1, FileType::RegularFile, n) {
                break;
            }
        }
        reply.ok()
    }
}

/// A mounted [`FaultFs`]; unmounted when dropped, waiting up to 10 s for whatever still reads
/// from it to let go (a daemon on its way out), then detached.
pub struct FaultFs {
    state: Arc<Mutex<State>>,
    mountpoint: std::path::PathBuf,
    _session: fuser::BackgroundSession,
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) else { return };
        for _ in 0..100 {
            // SAFETY: umount of the mount point this value made.
            if unsafe { libc::umount(c.as_ptr()) } == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above; a lazy unmount never leaves the mount behind.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

impl FaultFs {
    /// Serves the regular files of `dir` (as they are now) at `mountpoint`, with no faults yet.
    pub fn mount(dir: &Path, mountpoint: &Path) -> io::Result<FaultFs> {
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                files.push((e.file_name().to_string_lossy().into_owned(), File::open(e.path())?));
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let state = Arc::new(Mutex::new(State::default()));
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![fuser::MountOption::RO, fuser::MountOption::FSName("vdiskfs-faultfs".into())];
        // Several threads, so that a delayed read does not hold up the others.
        cfg.n_threads = Some(4);
        let fs = Fs { files, state: state.clone() };
        let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
        Ok(FaultFs { state, mountpoint: mountpoint.to_path_buf(), _session: session })
    }

    /// Replaces the faults; reads from now on follow `rules`.
    pub fn set(&self, rules: Vec<Rule>) {
        self.state.lock().unwrap().rules = rules;
    }

    /// Reads served so far, and how many of them failed.
    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts
    }
}
