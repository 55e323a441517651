//! Remote images over ssh, against a real OpenSSH server started by the test on 127.0.0.1
//! (`common::sshd`): chains of every format read the same as the same chains mounted locally,
//! the chunk cache makes a second command or a remount fetch (almost) nothing, and the faults:
//! a server killed in the middle of a `dd`, a server without SFTP, a file changed on the host.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::vhd::{Dialect, VhdBuilder};
use testkit::vhdx::VhdxBuilder;
use testkit::vmdk::{DeltaBuilder, write_flat};
use testkit::xva::XvaBuilder;

use crate::common::sshd::Sshd;
use crate::common::*;

const MIB: u64 = 1 << 20;

/// The chains a hypervisor leaves behind, written into `dir`: (top image, what it is).
pub fn hypervisor_chains(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    // ESXi: a flat base (vm.vmdk + vm-flat.vmdk) and two SESparse snapshots.
    let esx = dir.join("vmfs/volumes/ds1/vm");
    std::fs::create_dir_all(&esx).unwrap();
    let (base, _) = write_flat(&esx, "vm", &pattern(1, (24 * MIB) as usize), "vmfs").unwrap();
    let mut s1 = DeltaBuilder::sesparse(&base).unwrap();
    s1.write(0, &pattern(2, 8192)).write(5 * MIB, &pattern(3, (MIB + 4096) as usize)).zero(9 * MIB, 4096);
    let snap1 = s1.build(&esx, "vm-000001").unwrap();
    let mut s2 = DeltaBuilder::sesparse(&snap1).unwrap();
    s2.write(4096, &pattern(4, 4096)).write(17 * MIB, &pattern(5, (2 * MIB) as usize));
    out.push((s2.build(&esx, "vm-000002").unwrap(), "ESXi flat base + SESparse snapshots"));
    // XenServer file SR: a VHD chain in the blktap dialect.
    let sr = dir.join("var/run/sr-mount/sr1");
    std::fs::create_dir_all(&sr).unwrap();
    let xbase = sr.join("1d0c4e4a-base.vhd");
    VhdBuilder::dynamic(20 * MIB)
        .dialect(Dialect::Xen)
        .write(0, &pattern(6, (12 * MIB) as usize))
        .build(&xbase)
        .unwrap();
    let xtop = sr.join("e2a27957-top.vhd");
    let mut c = VhdBuilder::differencing(&xbase).unwrap().dialect(Dialect::Xen);
    c.write(3 * MIB, &pattern(7, (3 * MIB) as usize)).write(15 * MIB, &pattern(8, 4096));
    c.build(&xtop).unwrap();
    out.push((xtop, "XenServer VHD chain"));
    // Hyper-V: a VHDX and an AVHDX checkpoint.
    let hv = dir.join("C:/Hyper-V/vm");
    std::fs::create_dir_all(&hv).unwrap();
    let hbase = hv.join("disk.vhdx");
    VhdxBuilder::dynamic(20 * MIB)
        .block_size(2 * MIB)
        .write(MIB, &pattern(9, (10 * MIB) as usize))
        .build(&hbase)
        .unwrap();
    let htop = hv.join("disk_6A1F.avhdx");
    let mut c = VhdxBuilder::differencing(&hbase).unwrap();
    c.write(2 * MIB, &pattern(10, (4 * MIB) as usize)).zero_block(6);
    c.build(&htop).unwrap();
    out.push((htop, "Hyper-V VHDX + AVHDX"));
    // An XVA export with two disks.
    let xva = dir.join("exports/vm.xva");
    std::fs::create_dir_all(xva.parent().unwrap()).unwrap();
    let mut x = XvaBuilder::xapi("vm");
    x.disk("root", pattern(11, (6 * MIB) as usize), 3, 0).disk("data", pattern(12, (3 * MIB) as usize), 4, 1);
    x.build(&xva).unwrap();
    out.push((xva, "XVA"));
    out
}

/// The options that reach `sshd`, with the chunk cache in `cache`.
fn remote_args<'a>(sshd_cmd: &'a str, cache: &'a Path, extra: &[&'a str]) -> Vec<&'a OsStr> {
    let mut a: Vec<&OsStr> = vec![os("--ssh-command"), os(sshd_cmd), os("--cache-dir"), cache.as_os_str()];
    a.extend(extra.iter().map(|s| OsStr::new(*s)));
    a
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

crate::register!(remote_chains_of_every_format_read_the_same_as_mounted_locally);
fn remote_chains_of_every_format_read_the_same_as_mounted_locally() {
    need_fuse();
    let sshd = Sshd::start();
    let t = tmpdir();
    let cache = t.path().join("cache");
    let cmd = sshd.ssh_command();
    for (top, what) in hypervisor_chains(t.path()) {
        let local = mount(&[top.as_os_str()]);
        let url = sshd.url(&top);
        let mut args = remote_args(&cmd, &cache, &[]);
        args.push(os(&url));
        let remote = mount(&args);
        let names = files_of(&local.dir);
        assert_eq!(files_of(&remote.dir), names, "{what}: the same disks");
        for n in &names {
            let want = std::fs::read(local.file(n)).unwrap();
            let got = std::fs::read(remote.file(n)).unwrap();
            assert_same(&format!("{what}: {n} over ssh"), &got, &want);
        }
    }
}

fn info_json(sshd: &Sshd, cache: &Path, url: &str) -> serde_json::Value {
    let cmd = sshd.ssh_command();
    let mut args = vec![os("info"), os("--json")];
    args.extend(remote_args(&cmd, cache, &[]));
    args.push(os(url));
    let o = vdiskfs(args);
    assert!(o.status.success(), "info: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// (fetched, from the cache) over every remote source of every layer.
fn transferred(v: &serde_json::Value) -> (u64, u64) {
    let mut t = (0, 0);
    for l in v["disks"][0]["layers"].as_array().unwrap() {
        for r in l["remote"].as_array().expect("every layer says where it lives") {
            t.0 += r["fetched_bytes"].as_u64().unwrap();
            t.1 += r["cache_bytes"].as_u64().unwrap();
        }
    }
    t
}

crate::register!(info_shows_where_each_layer_lives_and_a_second_run_fetches_nothing);
fn info_shows_where_each_layer_lives_and_a_second_run_fetches_nothing() {
    let sshd = Sshd::start();
    let t = tmpdir();
    let cache = t.path().join("cache");
    let (top, _) = hypervisor_chains(t.path()).remove(0);
    let url = sshd.url(&top);
    let first = info_json(&sshd, &cache, &url);
    let layers = first["disks"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    let base = &layers[2]["remote"];
    assert_eq!(base.as_array().unwrap().len(), 2, "the base's descriptor and its flat extent: {base}");
    assert!(base[1]["location"].as_str().unwrap().ends_with("/vmfs/volumes/ds1/vm/vm-flat.vmdk"), "{base}");
    assert_eq!(base[0]["transport"], "sftp");
    let (fetched, _) = transferred(&first);
    assert!(fetched > 0 && fetched < 4 * MIB, "opening fetched {fetched} bytes");
    let second = info_json(&sshd, &cache, &url);
    let (again, cached) = transferred(&second);
    assert!(
        again == 0 && cached > 0,
        "the second run is served from the chunk cache: {again} fetched, {cached} cached"
    );
    // The text form says the same.
    let cmd = sshd.ssh_command();
    let mut args = vec![os("info")];
    args.extend(remote_args(&cmd, &cache, &[]));
    args.push(os(&url));
    let text = String::from_utf8_lossy(&vdiskfs(args).stdout).into_owned();
    assert!(text.contains(&format!("remote:        {url} (read with sftp)")), "{text}");
    assert!(text.contains("0 B fetched over the network"), "{text}");
}

crate::register!(a_remount_after_a_full_read_fetches_almost_nothing);
fn a_remount_after_a_full_read_fetches_almost_nothing() {
    need_fuse();
    let sshd = Sshd::start();
    let t = tmpdir();
    let cache = t.path().join("cache");
    let (top, _) = hypervisor_chains(t.path()).remove(1);
    let cmd = sshd.ssh_command();
    let url = sshd.url(&top);
    let mut args = remote_args(&cmd, &cache, &[]);
    args.push(os(&url));
    let first = {
        let m = mount(&args);
        std::fs::read(m.file("e2a27957-top.raw")).unwrap()
    };
    let cold = sshd.served();
    assert!(cold > 12 * MIB, "the first read fetched the data ({cold} bytes)");
    let m = mount(&args);
    let again = std::fs::read(m.file("e2a27957-top.raw")).unwrap();
    assert_same("remount", &again, &first);
    let warm = sshd.served() - cold;
    assert!(warm < 64 << 10, "the remount fetched {warm} bytes (the first mount {cold})");
}

/// `dd` of `file` in the background: (child, when it started).
fn start_dd(file: &Path) -> std::process::Child {
    Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["of=/dev/null", "bs=1M", "iflag=direct"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

crate::register!(a_server_killed_during_a_dd_gives_eio_within_the_timeout_and_a_restart_heals);
fn a_server_killed_during_a_dd_gives_eio_within_the_timeout_and_a_restart_heals() {
    need_fuse();
    let mut sshd = Sshd::start();
    let t = tmpdir();
    let img = t.path().join("big.vhd");
    let data = pattern(21, (48 * MIB) as usize);
    VhdBuilder::dynamic(48 * MIB).write(0, &data).build(&img).unwrap();
    let cmd = sshd.ssh_command();
    let url = sshd.url(&img);
    let cache = t.path().join("cache");
    let mut args = remote_args(&cmd, &cache, &["--timeout", "5"]);
    args.push(os(&url));
    let m = mount(&args);
    let raw = m.file("big.raw");
    sshd.slow(true);
    let before = sshd.served();
    let mut dd = start_dd(&raw);
    assert!(wait_for(20, || sshd.served() > before + 2 * MIB), "the dd got going");
    sshd.kill();
    let killed = Instant::now();
    let mut status = None;
    assert!(
        wait_for(15, || {
            status = dd.try_wait().unwrap();
            status.is_some()
        }),
        "dd still hangs 15 s after the server died"
    );
    let took = killed.elapsed();
    let out = dd.wait_with_output().unwrap();
    assert!(!status.unwrap().success(), "dd must fail");
    assert!(stderr(&out).contains("Input/output error"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(5 + 3), "EIO came {took:?} after the kill (timeout 5 s)");
    // While the host is gone, a read fails fast.
    let t0 = Instant::now();
    let r = std::fs::read(&raw);
    assert!(r.is_err() && t0.elapsed() < Duration::from_secs(7), "{r:?} after {:?}", t0.elapsed());
    // The server comes back: a later read succeeds (after the backoff) with the right bytes.
    sshd.slow(false);
    sshd.restart();
    let mut got = None;
    wait_for(40, || {
        got = std::fs::read(&raw).ok();
        got.is_some()
    });
    assert_same("after the restart", &got.expect("a read after the restart succeeds"), &data);
    assert!(m.log_text().contains("big.vhd"), "the failures are logged: {}", m.log_text());
    m.unmount();
}

crate::register!(a_file_changed_on_the_host_while_mounted_gives_eio);
fn a_file_changed_on_the_host_while_mounted_gives_eio() {
    need_fuse();
    let sshd = Sshd::start();
    let t = tmpdir();
    let img = t.path().join("active.vhd");
    VhdBuilder::dynamic(32 * MIB).write(0, &pattern(31, (32 * MIB) as usize)).build(&img).unwrap();
    let cmd = sshd.ssh_command();
    let url = sshd.url(&img);
    let cache = t.path().join("cache");
    let mut args = remote_args(&cmd, &cache, &[]);
    args.push(os(&url));
    let m = mount(&args);
    let raw = m.file("active.raw");
    let f = std::fs::File::open(&raw).unwrap();
    let mut b = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut b, 0).unwrap();
    // The VM writes: a new block appended, the mtime moves.
    VhdBuilder::dynamic(32 * MIB).write(0, &pattern(32, (32 * MIB) as usize)).build(&img).unwrap();
    sh(&format!("touch -d '+1 min' {}", img.display()));
    // Far beyond what the first read brought or read ahead, and inside a block (the chunk
    // holding a block's bitmap, read to map allocation, holds the block's first bytes too).
    let e = f.read_exact_at(&mut b, 29 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(wait_for(5, || m.log_text().contains("changed under us")), "{}", m.log_text());
    // What vdiskfs already holds of the old version is refused too (the kernel's page cache of
    // the mounted file, which vdiskfs does not control, is dropped first).
    use std::os::fd::AsRawFd;
    // SAFETY: fadvise on a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let e = f.read_exact_at(&mut b, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "no old bytes once a change was seen: {e}");
}

crate::register!(a_host_without_sftp_is_read_with_dd_and_says_so);
fn a_host_without_sftp_is_read_with_dd_and_says_so() {
    need_fuse();
    let mut sshd = Sshd::start();
    sshd.write_config("");
    sshd.restart();
    let t = tmpdir();
    let (top, _) = hypervisor_chains(t.path()).remove(1);
    let cmd = sshd.ssh_command();
    let url = sshd.url(&top);
    let cache = t.path().join("cache");
    let mut args = vec![os("info")];
    args.extend(remote_args(&cmd, &cache, &[]));
    args.push(os(&url));
    let o = vdiskfs(args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("(read with dd (the host has no SFTP subsystem))"), "{text}");
    let local = mount(&[top.as_os_str()]);
    let mut args = remote_args(&cmd, &cache, &["--cache-size", "0"]);
    args.push(os(&url));
    let remote = mount(&args);
    let want = std::fs::read(local.file("e2a27957-top.raw")).unwrap();
    assert_same("over dd", &std::fs::read(remote.file("e2a27957-top.raw")).unwrap(), &want);
}

crate::register!(remote_names_keep_the_gate_rules);
fn remote_names_keep_the_gate_rules() {
    let sshd = Sshd::start();
    let t = tmpdir();
    let (img, other) = (t.path().join("img"), t.path().join("elsewhere"));
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let base = other.join("base.vhd");
    VhdBuilder::dynamic(4 * MIB).dialect(Dialect::Xen).write(0, &pattern(41, 4096)).build(&base).unwrap();
    let child = img.join("child.vhd");
    VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen).build(&child).unwrap();
    let cmd = sshd.ssh_command();
    let cache = t.path().join("cache");
    let url = sshd.url(&child);
    let run = |extra: &[&str]| {
        let mut args = vec![os("info")];
        args.extend(remote_args(&cmd, &cache, extra));
        args.push(os(&url));
        vdiskfs(args)
    };
    // The parent is outside the child's directory: not found, until a remote --parent-dir says where.
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let pd = sshd.url(&other);
    let o = run(&["--parent-dir", &pd]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&sshd.url(&base)));
    // A symlink beside the child pointing out of the confinement is refused, in one line.
    std::os::unix::fs::symlink(&base, img.join("base.vhd")).unwrap();
    let o = run(&[]);
    assert_one_line_error(&o, &sshd.url(&img.join("base.vhd")), &["symbolic link", "outside"]);
    // The type rule: a directory is not an image.
    let o = vdiskfs(["info", "--ssh-command", &cmd, &sshd.url(Path::new("/etc"))]);
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with(&format!("vdiskfs: {}: is a directory", sshd.url(Path::new("/etc")))), "{e}");
}
