//! Shared helpers: running vdiskfs, real FUSE mounts, and the independent readers used as oracles.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod faulty;
pub mod nginx;
pub mod sshd;

pub use testkit::pattern;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vdiskfs")
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Skips the test when `tool` is not on PATH (locally); in CI a missing tool is a failure.
pub fn need(tool: &str) {
    if !on_path(tool) {
        assert!(!in_ci(), "{tool} is required in CI but is not installed");
        crate::harness::skip(format!("{tool} not installed"));
    }
}

/// Skips the test when FUSE mounts cannot be made here (locally); in CI that is a failure.
pub fn need_fuse() {
    if !Path::new("/dev/fuse").exists() {
        assert!(!in_ci(), "FUSE (/dev/fuse) is required in CI");
        crate::harness::skip("no /dev/fuse");
    }
    need("fusermount3");
}

/// For an optional extra check inside a test that runs anyway: true when `tool` is on PATH.
/// Missing locally, the check is left out and the harness lists it; missing in CI, a failure.
pub fn have(tool: &str) -> bool {
    let found = on_path(tool);
    if !found {
        assert!(!in_ci(), "{tool} is required in CI but is not installed");
        crate::harness::note(format!("{tool} not installed"));
    }
    found
}

/// True when FUSE mounts can be made here (for helpers that can also work without).
/// Whether the mount half of a test can run; when it cannot, the test's summary line says so
/// ("passed without an optional extra check"), so a half-run test is never counted silently.
pub fn fuse_ok() -> bool {
    let ok = Path::new("/dev/fuse").exists() && have("fusermount3");
    if !ok {
        assert!(!in_ci(), "FUSE is required in CI");
        crate::harness::note("the mount half (no /dev/fuse or fusermount3)");
    }
    ok
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vdiskfs-test-").tempdir().expect("tempdir")
}

/// Runs `vdiskfs ARGS`.
pub fn vdiskfs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(bin()).args(args).output().expect("run vdiskfs")
}

/// Runs `vdiskfs ARGS` with `env` added to its environment.
pub fn vdiskfs_env<I, S>(args: I, env: &[(&str, &str)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(bin()).args(args).envs(env.iter().copied()).output().expect("run vdiskfs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run: exit code 1, and exactly one stderr line, `vdiskfs: <file>: ...`
/// containing every piece of `needles`.
pub fn assert_one_line_error(o: &Output, file: &str, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with(&format!("vdiskfs: {file}")), "line should name {file}: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "expected {n:?} in: {err}");
    }
}

fn is_mounted(mnt: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let m = mnt.to_string_lossy().into_owned();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(m.as_str()))
}

/// A live vdiskfs mount; unmounted (and checked gone) on drop.
#[derive(Debug)]
pub struct Mount {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub log: PathBuf,
}

impl Mount {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn unmount(&self) {
        for _ in 0..50 {
            if !is_mounted(&self.dir) {
                return;
            }
            let _ = Command::new("fusermount3").arg("-u").arg(&self.dir).stderr(Stdio::null()).status();
            if !is_mounted(&self.dir) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// `vdiskfs mount --daemon ARGS... <new dir>`; panics with stderr when it fails.
pub fn mount(args: &[&OsStr]) -> Mount {
    try_mount(args).unwrap_or_else(|e| panic!("mount failed: {e}"))
}

pub fn try_mount(args: &[&OsStr]) -> Result<Mount, String> {
    try_mount_env(args, &[])
}

/// [`try_mount`] with `env` added to vdiskfs's environment.
pub fn try_mount_env(args: &[&OsStr], env: &[(&str, &str)]) -> Result<Mount, String> {
    let tmp = tmpdir();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).expect("mkdir");
    let log = tmp.path().join("vdiskfs.log");
    let o = Command::new(bin())
        .arg("mount")
        .arg("--daemon")
        .arg("--log-file")
        .arg(&log)
        .args(args)
        .arg(&dir)
        .envs(env.iter().copied())
        .output()
        .expect("run vdiskfs mount");
    if !o.status.success() {
        assert!(!is_mounted(&dir), "a failed mount left a mount behind");
        return Err(stderr(&o));
    }
    assert!(is_mounted(&dir), "--daemon returned 0 before the mount was ready");
    Ok(Mount { dir, _tmp: Some(tmp), log })
}

pub fn os<P: AsRef<OsStr> + ?Sized>(p: &P) -> &OsStr {
    p.as_ref()
}

/// `qemu-img convert -f FMT -O raw IMG` into memory.
pub fn qemu_raw(img: &Path, fmt: &str) -> Vec<u8> {
    let t = tmpdir();
    let out = t.path().join("q.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(img)
        .arg(&out)
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "qemu-img convert {}: {}", img.display(), stderr(&o));
    std::fs::read(&out).expect("read qemu output")
}

/// libvhdi's view of a VHD chain: the merged top file `vhdiN` of `vhdimount`.
pub fn vhdimount_top(img: &Path) -> Vec<u8> {
    let t = tmpdir();
    let mnt = t.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let o = Command::new("vhdimount").arg(img).arg(&mnt).output().expect("vhdimount");
    assert!(o.status.success(), "vhdimount: {}", stderr(&o));
    let mut names: Vec<String> =
        std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort_by_key(|n| n.trim_start_matches("vhdi").parse::<u32>().unwrap_or(0));
    let data = std::fs::read(mnt.join(names.last().expect("vhdimount shows files")));
    let m = Mount { dir: mnt, _tmp: None, log: PathBuf::new() };
    drop(m);
    data.expect("read vhdimount file")
}

/// Hex-dumps the first differing region, for failures that compare disks.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
    panic!(
        "{what}: first difference at {i:#x}: got {:02x?} want {:02x?}",
        &got[i..(i + 16).min(got.len())],
        &want[i..(i + 16).min(want.len())]
    );
}

/// Runs a shell command, panicking with its output on failure.
pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(o.status.success(), "`{cmd}` failed: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits until `f` is true or `secs` pass.
pub fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A loop device, detached on drop.
pub struct Loop(pub String);

impl Loop {
    /// `losetup -r [-o OFF --sizelimit N] -f --show FILE`.
    pub fn attach(file: &Path, range: Option<(u64, u64)>) -> Loop {
        let mut c = Command::new("losetup");
        c.args(["-r", "-f", "--show"]);
        if let Some((off, len)) = range {
            c.args(["-o", &off.to_string(), "--sizelimit", &len.to_string()]);
        }
        let o = c.arg(file).output().expect("losetup");
        assert!(o.status.success(), "losetup: {}", stderr(&o));
        Loop(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..20 {
            if Command::new("losetup").args(["-d", &self.0]).status().is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A partitioned disk holding ext4 (MBR, one Linux partition at 1 MiB), before and after a
/// file was added to the filesystem. Built with sfdisk, mkfs.ext4 -d and debugfs, no mounting.
pub struct FsPair {
    pub base: Vec<u8>,
    pub child: Vec<u8>,
    /// Partition offset and length in bytes.
    pub part: (u64, u64),
    pub base_file: (String, Vec<u8>),
    pub child_file: (String, Vec<u8>),
}

pub fn fs_pair(disk_size: u64) -> Option<FsPair> {
    for tool in ["sfdisk", "mkfs.ext4", "debugfs"] {
        need(tool);
    }
    let t = tmpdir();
    let p = t.path();
    let part = (1u64 << 20, disk_size - (2 << 20));
    std::fs::create_dir(p.join("root")).unwrap();
    let base_content = pattern(11, 100_000);
    std::fs::write(p.join("root/in-base.bin"), &base_content).unwrap();
    let child_content = format!("only in the child layer {}\n", std::process::id()).repeat(300).into_bytes();
    std::fs::write(p.join("child-only.txt"), &child_content).unwrap();
    let d = p.display();
    sh(&format!(
        "mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 -d {d}/root {d}/fs.img {}k",
        part.1 / 1024
    ));
    sh(&format!("cp {d}/fs.img {d}/fs2.img && debugfs -w -R 'write {d}/child-only.txt child-only.txt' {d}/fs2.img"));
    let mut base = vec![0u8; disk_size as usize];
    std::fs::write(p.join("disk.raw"), &base).unwrap();
    sh(&format!("echo 'start={}, size={}, type=83' | sfdisk -q --label dos {d}/disk.raw", part.0 / 512, part.1 / 512));
    base = std::fs::read(p.join("disk.raw")).unwrap();
    let mut child = base.clone();
    let fs1 = std::fs::read(p.join("fs.img")).unwrap();
    let fs2 = std::fs::read(p.join("fs2.img")).unwrap();
    base[part.0 as usize..part.0 as usize + fs1.len()].copy_from_slice(&fs1);
    child[part.0 as usize..part.0 as usize + fs2.len()].copy_from_slice(&fs2);
    Some(FsPair {
        base,
        child,
        part,
        base_file: ("in-base.bin".into(), base_content),
        child_file: ("child-only.txt".into(), child_content),
    })
}

/// Attaches `raw` (a mounted raw file) read-only, mounts the ext4 partition at `part` with
/// `losetup -o`, and returns the bytes of each named file.
pub fn read_files_in_partition(raw: &Path, part: (u64, u64), names: &[&str]) -> Vec<Vec<u8>> {
    let lo = Loop::attach(raw, Some(part));
    let t = tmpdir();
    let m = t.path().join("fs");
    std::fs::create_dir(&m).unwrap();
    sh(&format!("mount -t ext4 -o ro,noload {} {}", lo.0, m.display()));
    let out = names.iter().map(|n| std::fs::read(m.join(n))).collect::<Vec<_>>();
    // A child another test forks right then holds our descriptors until it execs: a moment.
    let umount = || Command::new("umount").arg(&m).status().is_ok_and(|s| s.success());
    assert!(wait_for(5, umount), "umount {} stays busy", m.display());
    drop(lo);
    out.into_iter().map(|r| r.expect("read file in guest fs")).collect()
}

/// A file from tests/data, decompressed (`.xz`) or decoded (`.hex`, `hexdump -C` form) into `dir`.
pub fn corpus(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
    if let Some(stem) = name.strip_suffix(".xz") {
        let out = dir.join(stem);
        sh(&format!("xz -dc {} > {}", src.display(), out.display()));
        return out;
    }
    let stem = name.strip_suffix(".hex").expect(".xz or .hex");
    let out = dir.join(stem);
    std::fs::write(&out, decode_hexdump(&std::fs::read_to_string(&src).unwrap())).unwrap();
    out
}

/// Decodes `hexdump -C` output: `*` repeats the previous line up to the next offset.
pub fn decode_hexdump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut last: Vec<u8> = Vec::new();
    let mut repeat = false;
    for line in text.lines() {
        let line = line.trim_end();
        if line == "*" {
            repeat = true;
            continue;
        }
        let mut parts = line.split_whitespace();
        let Some(off) = parts.next().and_then(|o| usize::from_str_radix(o, 16).ok()) else {
            continue;
        };
        if repeat {
            while out.len() < off {
                out.extend_from_slice(&last);
            }
            out.truncate(off);
            repeat = false;
        }
        let hex: Vec<u8> = line[8..]
            .split('|')
            .next()
            .unwrap()
            .split_whitespace()
            .take(16)
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        if hex.is_empty() {
            out.truncate(off); // the final line holds only the total length
            out.resize(off, 0);
            continue;
        }
        out.extend_from_slice(&hex);
        last = hex;
    }
    out
}

/// `info` and `mount` both refuse `img` with one line naming `file` and every needle.
pub fn refused(img: &Path, file: &Path, needles: &[&str]) {
    let o = vdiskfs([OsStr::new("info"), img.as_os_str()]);
    assert_one_line_error(&o, &file.display().to_string(), needles);
    if fuse_ok() {
        let e = try_mount(&[img.as_os_str()]).expect_err("mount must fail");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(&file.display().to_string()), "{e}");
    }
}

/// The real-consumer checks on a mounted raw file holding `fs.child`: qemu-img convert from the
/// mount, dd with large direct and small buffered reads, and the ext4 partition through
/// `losetup -o` (a file only in the child layer, and one from the base).
pub fn assert_real_consumers(raw: &Path, fs: &FsPair) {
    let t = tmpdir();
    let out = t.path().join("conv.raw");
    sh(&format!("qemu-img convert -f raw -O raw {} {}", raw.display(), out.display()));
    assert_same("qemu-img convert of the mount", &std::fs::read(&out).unwrap(), &fs.child);
    let dd = t.path().join("dd.raw");
    sh(&format!("dd if={} of={} bs=1M iflag=direct status=none", raw.display(), dd.display()));
    assert_same("dd iflag=direct", &std::fs::read(&dd).unwrap(), &fs.child);
    sh(&format!("dd if={} of={} bs=4k skip=100 count=1000 status=none", raw.display(), dd.display()));
    assert_same("dd bs=4k", &std::fs::read(&dd).unwrap(), &fs.child[409600..409600 + 4096000]);
    let files = read_files_in_partition(raw, fs.part, &[&fs.child_file.0, &fs.base_file.0]);
    assert_eq!(files[0], fs.child_file.1, "file written only in the child layer");
    assert_eq!(files[1], fs.base_file.1, "file from the base layer");
}
