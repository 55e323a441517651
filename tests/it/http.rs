//! Remote images over HTTPS, against a real nginx started by the test on 127.0.0.1
//! (`common::nginx`: TLS, basic auth, ESXi's `/folder/…?dcPath=…&dsName=…` layout): chains of
//! every format read the same as the same chains mounted locally, the chunk cache makes a second
//! run fetch nothing, TLS and credentials fail with clear one-line errors. Faults come from a
//! small misbehaving server (`common::faulty`): 200 to a range request, an answer cut short, a
//! server that stalls, a new version mid-mount.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use testkit::vhd::VhdBuilder;

use crate::common::faulty::{Fault, Faulty};
use crate::common::nginx::{self, Nginx};
use crate::common::*;
use crate::ssh::hypervisor_chains;

const MIB: u64 = 1 << 20;
const PW: (&str, &str) = ("VDISKFS_HTTP_PASSWORD", nginx::PASSWORD);

/// `--http-user root --ca-cert CA --cache-dir CACHE` and `extra`.
fn https_args<'a>(ca: &'a Path, cache: &'a Path, extra: &[&'a str]) -> Vec<&'a OsStr> {
    let mut a: Vec<&OsStr> = vec![os("--http-user"), os(nginx::USER), os("--ca-cert"), ca.as_os_str()];
    a.extend([os("--cache-dir"), cache.as_os_str()]);
    a.extend(extra.iter().map(|s| OsStr::new(*s)));
    a
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The chains, laid out in datastore `ds1` under `root`: (top, its path in the datastore, what).
fn datastore(root: &Path) -> Vec<(std::path::PathBuf, String, &'static str)> {
    let ds = root.join("ds1");
    hypervisor_chains(&ds)
        .into_iter()
        .map(|(top, what)| {
            let rel = top.strip_prefix(&ds).unwrap().display().to_string();
            (top, rel, what)
        })
        .collect()
}

crate::register!(chains_of_every_format_over_https_read_the_same_as_mounted_locally);
fn chains_of_every_format_over_https_read_the_same_as_mounted_locally() {
    need_fuse();
    let t = tmpdir();
    let n = Nginx::start(t.path());
    let ca = n.ca();
    let cache = t.path().join("cache");
    for (top, rel, what) in datastore(t.path()) {
        let local = mount(&[top.as_os_str()]);
        let url = n.url("ds1", &rel);
        let mut args = https_args(&ca, &cache, &[]);
        args.push(os(&url));
        let remote = try_mount_env(&args, &[PW]).unwrap_or_else(|e| panic!("{what}: {e}"));
        let names = files_of(&local.dir);
        assert_eq!(files_of(&remote.dir), names, "{what}: the same disks");
        for name in &names {
            let want = std::fs::read(local.file(name)).unwrap();
            let got = std::fs::read(remote.file(name)).unwrap();
            assert_same(&format!("{what}: {name} over https"), &got, &want);
        }
    }
    // ESXi's session cookie comes back on every request after the first.
    let (_, answers) = n.served();
    assert!(answers.len() > 10, "{answers:?}");
    let without = answers.iter().skip(1).filter(|(_, cookie)| !cookie.contains("vmware_soap_session")).count();
    assert!(without * 10 < answers.len(), "{without} of {} requests came without the session cookie", answers.len());
}

fn info_json(n: &Nginx, cache: &Path, url: &str) -> serde_json::Value {
    let ca = n.ca();
    let mut args = vec![os("info"), os("--json")];
    args.extend(https_args(&ca, cache, &[]));
    args.push(os(url));
    let o = vdiskfs_env(args, &[PW]);
    assert!(o.status.success(), "info: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

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

crate::register!(info_over_https_shows_bytes_fetched_and_a_second_run_fetches_nothing);
fn info_over_https_shows_bytes_fetched_and_a_second_run_fetches_nothing() {
    let t = tmpdir();
    let n = Nginx::start(t.path());
    let cache = t.path().join("cache");
    let (_, rel, _) = datastore(t.path()).remove(0);
    let url = n.url("ds1", &rel);
    let first = info_json(&n, &cache, &url);
    let layers = first["disks"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "the base and two snapshots, found through the query-keeping URLs");
    let base = &layers[2]["remote"];
    assert_eq!(base[0]["transport"], "https");
    let flat = base[1]["location"].as_str().unwrap();
    assert!(flat.ends_with("/vm-flat.vmdk?dcPath=ha-datacenter&dsName=ds1"), "{flat}");
    let (fetched, _) = transferred(&first);
    assert!(fetched > 0 && fetched < 4 * MIB, "opening fetched {fetched} bytes");
    let second = info_json(&n, &cache, &url);
    let (again, cached) = transferred(&second);
    assert!(again == 0 && cached > 0, "the second run: {again} fetched, {cached} from the cache: {second:#}");
}

crate::register!(tls_and_login_failures_are_clear_one_line_errors);
fn tls_and_login_failures_are_clear_one_line_errors() {
    let t = tmpdir();
    let n = Nginx::start(t.path());
    let (_, rel, _) = datastore(t.path()).remove(1);
    let url = n.url("ds1", &rel);
    let shown = url.clone();
    let fp = n.fingerprint();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut a = vec!["info", "--cache-size", "0"];
        a.extend(args);
        a.push(&url);
        vdiskfs_env(a, env)
    };
    // No CA given: the system store does not know the test CA; the error shows what to pin.
    let o = run(&["--http-user", "root"], &[PW]);
    assert_one_line_error(&o, &shown, &["TLS with https://127.0.0.1", "UnknownIssuer", &fp, "--pin-sha256"]);
    // A wrong pin.
    let wrong = "00:".repeat(31) + "00";
    let o = run(&["--http-user", "root", "--pin-sha256", &wrong], &[PW]);
    assert_one_line_error(&o, &shown, &["not the one pinned", &fp]);
    // The right pin, as openssl prints it, works without the CA.
    let o = run(&["--http-user", "root", "--pin-sha256", &fp], &[PW]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ca = n.ca().display().to_string();
    // No login, a wrong password, a password from ~/.netrc.
    let o = run(&["--ca-cert", &ca], &[]);
    assert_one_line_error(&o, &shown, &["401", "--http-user"]);
    let o = run(&["--ca-cert", &ca, "--http-user", "root"], &[("VDISKFS_HTTP_PASSWORD", "wrong")]);
    assert_one_line_error(&o, &shown, &["refused the password of root"]);
    let netrc = t.path().join("netrc");
    std::fs::write(&netrc, format!("machine 127.0.0.1 login root password {}\n", nginx::PASSWORD)).unwrap();
    let o = run(&["--ca-cert", &ca, "--http-user", "root"], &[("NETRC", &netrc.display().to_string())]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Not there.
    let missing = n.url("ds1", "nothing/here.vhd");
    let o = vdiskfs_env(["info", "--ca-cert", &ca, "--http-user", "root", &missing], &[PW]);
    assert_one_line_error(&o, &missing, &["not found on the server (404"]);
}

/// A dynamic VHD of `data` served by a [`Faulty`] server, and the vdiskfs options to read it.
fn faulty_vhd(data: &[u8]) -> (tempfile::TempDir, Faulty) {
    let t = tmpdir();
    let img = t.path().join("disk.vhd");
    VhdBuilder::dynamic(data.len() as u64).write(0, data).build(&img).unwrap();
    let f = Faulty::start(std::fs::read(&img).unwrap());
    (t, f)
}

crate::register!(a_server_that_ignores_ranges_is_refused_with_a_clear_error);
fn a_server_that_ignores_ranges_is_refused_with_a_clear_error() {
    let (_t, f) = faulty_vhd(&pattern(51, (4 * MIB) as usize));
    f.set(Fault::Whole200);
    let url = f.url("disk.vhd");
    let o = vdiskfs(["info", "--cache-size", "0", &url]);
    assert_one_line_error(&o, &url, &["200 and the whole file", "byte ranges"]);
}

crate::register!(answers_cut_short_stalls_and_new_versions_give_eio_never_wrong_bytes);
fn answers_cut_short_stalls_and_new_versions_give_eio_never_wrong_bytes() {
    need_fuse();
    let data = pattern(52, (32 * MIB) as usize);
    let (_t, f) = faulty_vhd(&data);
    let url = f.url("disk.vhd");
    let m = mount(&[os("--cache-size"), os("0"), os("--timeout"), os("3"), os(&url)]);
    let raw = m.file("disk.raw");
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(&raw).unwrap();
    // No kernel readahead, so no read fetches ahead of the faults (and vdiskfs's own readahead,
    // which follows 1 MiB of sequential reads, never starts).
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise on a descriptor this test owns.
    assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) }, 0);
    let mut b = vec![0u8; 65536];
    file.read_exact_at(&mut b, 0).unwrap();
    assert_same("a healthy read", &b, &data[..65536]);
    // Mid-block offsets: the chunk holding a VHD block's bitmap also holds the block's first
    // bytes, and the background allocation scan may already have fetched it.
    for (fault, at) in [(Fault::CloseMidway, 9 * MIB), (Fault::Stall, 17 * MIB)] {
        f.set(fault);
        let before = f.requests();
        let t0 = Instant::now();
        let r = file.read_exact_at(&mut b, at);
        let e = r.expect_err(&format!("{fault:?} at {at}: the read succeeded ({before} → {} requests)", f.requests()));
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{fault:?}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(3 + 3), "{fault:?}: EIO after {:?}", t0.elapsed());
        // Past the server's backoff, so that the next fault is met, not a fast failure.
        std::thread::sleep(Duration::from_millis(2500));
    }
    // The server heals: a later read (after the backoff) has the right bytes.
    f.set(Fault::None);
    let mut ok = false;
    wait_for(40, || {
        ok = file.read_exact_at(&mut b, 23 * MIB).is_ok();
        ok
    });
    assert!(ok, "a read after the server healed");
    assert_same("after healing", &b, &data[(23 * MIB) as usize..(23 * MIB) as usize + 65536]);
    // Another version: EIO, and "changed under us" in the log.
    f.set(Fault::NewVersion);
    let e = file.read_exact_at(&mut b, 29 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(wait_for(5, || m.log_text().contains("changed under us")), "{}", m.log_text());
    drop(file);
    m.unmount();
}
