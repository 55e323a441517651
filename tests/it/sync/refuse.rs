//! Every wrong move is refused with one line saying why, and touches neither the target nor its
//! state; a sync killed with -9 is finished by running it again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::vhd::{Dialect, VhdBuilder};

use super::{Dest, MIB, SIZE, base_data};
use crate::common::*;

/// A XenServer-dialect VHD at `path`: a child of `parent` (or a base of `size`) with `writes`.
fn vhd(path: &Path, parent: Option<&Path>, writes: &[(u64, Vec<u8>)]) -> PathBuf {
    let mut b = match parent {
        Some(p) => VhdBuilder::differencing(p).unwrap(),
        None => VhdBuilder::dynamic(SIZE),
    }
    .dialect(Dialect::Xen);
    for (o, d) in writes {
        b.write(*o, d);
    }
    b.build(path).unwrap();
    path.to_path_buf()
}

fn digest(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// `vdiskfs ARGS` fails with one line naming `file` and every needle, and leaves the target
/// and the state as they were.
fn refused(dest: &Dest, args: &[&OsStr], file: &Path, needles: &[&str]) {
    let (target, state) = (digest(&dest.target), digest(&dest.state));
    let o = vdiskfs(args);
    assert_one_line_error(&o, &file.display().to_string(), needles);
    assert!(digest(&dest.target) == target, "a refused step wrote the target");
    assert_eq!(digest(&dest.state), state, "a refused step changed the state");
}

crate::register!(sync_refuses_wrong_moves_with_one_line_and_touches_nothing);
fn sync_refuses_wrong_moves_with_one_line_and_touches_nothing() {
    let t = tmpdir();
    let d = t.path();
    let base = vhd(&d.join("base.vhd"), None, &[(0, base_data()[..(32 * MIB) as usize].to_vec())]);
    let s1 = vhd(&d.join("s1.vhd"), Some(&base), &[(MIB, pattern(2, MIB as usize))]);
    let s2 = vhd(&d.join("s2.vhd"), Some(&s1), &[(3 * MIB, pattern(3, MIB as usize))]);
    let s3 = vhd(&d.join("s3.vhd"), Some(&s2), &[]);
    let dest = Dest::file(d);
    let (tgt, st) = (dest.target.clone(), dest.state.clone());
    // No state yet.
    let o = vdiskfs([os("sync"), s2.as_os_str(), tgt.as_os_str()]);
    assert_one_line_error(&o, &st.display().to_string(), &["no sync state", "export"]);
    dest.ok("export", &["--exclude-top"], &s2);
    dest.ok("sync", &["--exclude-top"], &s3);
    let sync = |img: &Path, extra: &[&'static str]| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["sync".into()];
        a.extend(extra.iter().map(|s| s.into()));
        a.extend([img.as_os_str().into(), tgt.as_os_str().into()]);
        a
    };
    let run = |args: Vec<std::ffi::OsString>, file: &Path, needles: &[&str]| {
        let a: Vec<&OsStr> = args.iter().map(|s| s.as_os_str()).collect();
        refused(&dest, &a, file, needles);
    };

    // Another VM's chain.
    let other = vhd(&d.join("other-base.vhd"), None, &[(0, pattern(9, MIB as usize))]);
    let other_top = vhd(&d.join("other.vhd"), Some(&other), &[]);
    run(sync(&other_top, &["--exclude-top"]), &st, &["does not contain", "another VM"]);
    // The VM reverted to snapshot s1: a new running top over s1, then a snapshot of it.
    let r1 = vhd(&d.join("r1.vhd"), Some(&s1), &[(5 * MIB, pattern(5, MIB as usize))]);
    let r2 = vhd(&d.join("r2.vhd"), Some(&r1), &[]);
    run(sync(&r2, &["--exclude-top"]), &st, &["does not contain", "reverted"]);
    run(sync(&r2, &["--exclude-top", "--dry-run"]), &st, &["does not contain"]);
    // XenServer grew the VDI: the leaf's footer says a larger size.
    let grown = d.join("grown.vhd");
    VhdBuilder::differencing(&s2).unwrap().dialect(Dialect::Xen).resized(SIZE + 8 * MIB).build(&grown).unwrap();
    run(sync(&grown, &[]), &st, &["virtual size changed", "resized"]);
    // The state of another target (a copy of this one).
    let copy = d.join("copy.raw");
    std::fs::copy(&tgt, &copy).unwrap();
    let a = [os("sync"), os("--state"), st.as_os_str(), s3.as_os_str(), copy.as_os_str()];
    refused(&dest, &a, &st, &["another target", "copy.raw"]);
    // The target changed behind vdiskfs's back (a byte in its first MiB).
    let mut bytes = std::fs::read(&tgt).unwrap();
    bytes[4096] ^= 0xff;
    std::fs::write(&tgt, &bytes).unwrap();
    run(sync(&s3, &[]), &tgt, &["changed since vdiskfs last wrote it"]);
    bytes[4096] ^= 0xff;
    std::fs::write(&tgt, &bytes).unwrap();
    // Restored, it is accepted: s3 decides nothing new, and becomes the recorded top.
    let out = dest.ok("sync", &[], &s3);
    assert!(out.contains("nothing to write") && out.contains("s3.vhd"), "{out}");
    assert_eq!(dest.state()["layers"].as_array().unwrap().len(), 4);
    // The VM started again on XenServer and wrote its leaf: a VHD keeps its UUID when written,
    // its size and modification time tell.
    let f = std::fs::read(&s3).unwrap();
    let uuid: [u8; 16] = f[f.len() - 512 + 68..f.len() - 512 + 84].try_into().unwrap();
    let mut b = VhdBuilder::differencing(&s2).unwrap().dialect(Dialect::Xen).uuid(uuid);
    b.write(7 * MIB, &pattern(7, MIB as usize));
    b.build(&s3).unwrap();
    run(sync(&s3, &[]), &st, &["s3.vhd", "was written since", "export again"]);
    // A block device needs --state.
    if have("losetup") {
        let dev = Dest::device(d, SIZE);
        let o = vdiskfs([os("sync"), s3.as_os_str(), dev.target.as_os_str()]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "a usage error: {e}");
        assert!(e.lines().count() == 1 && e.contains("needs --state FILE"), "{e}");
    }
}

/// Whether the state at `p` says a sync is in progress.
fn pending(p: &Path) -> bool {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| !v["pending"].is_null())
}

crate::register!(a_sync_killed_with_kill_9_is_finished_by_running_it_again);
/// The sync is killed as soon as its state says "in progress" (and once a little later): the
/// target then holds part of the delta and a fingerprint that moved. A sync toward a chain
/// without the pending top is refused; the same sync run again finishes, and the target equals
/// the chain.
fn a_sync_killed_with_kill_9_is_finished_by_running_it_again() {
    let t = tmpdir();
    let d = t.path();
    let size = 320 * MIB;
    let mut model = vec![0u8; size as usize];
    model[..(4 * MIB) as usize].copy_from_slice(&pattern(1, (4 * MIB) as usize));
    let mut b = VhdBuilder::dynamic(size).dialect(Dialect::Xen);
    b.write(0, &model[..(4 * MIB) as usize]);
    let base = d.join("base.vhd");
    b.build(&base).unwrap();
    // A 256 MiB delta, so that the copy takes a while.
    let delta = pattern(2, (256 * MIB) as usize);
    let s1 = d.join("s1.vhd");
    let mut b = VhdBuilder::differencing(&base).unwrap().dialect(Dialect::Xen);
    b.write(0, &delta);
    b.build(&s1).unwrap();
    drop(b);
    model[..delta.len()].copy_from_slice(&delta);
    drop(delta);
    let s2 = vhd(&d.join("s2.vhd"), Some(&s1), &[]);
    let dest = Dest::file(d);
    let mut interrupted = 0;
    for delay in [0u64, 0, 150] {
        let _ = std::fs::remove_file(&dest.target);
        dest.ok("export", &["--exclude-top"], &s1);
        let mut child = std::process::Command::new(bin())
            .args([os("sync"), os("--threads"), os("1"), os("--exclude-top"), s2.as_os_str(), dest.target.as_os_str()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !pending(&dest.state) && t0.elapsed() < Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        child.wait().unwrap();
        if !pending(&dest.state) {
            continue; // it finished before the kill: nothing to learn from this round
        }
        if std::fs::read(&dest.target).unwrap() != model {
            interrupted += 1; // killed before the copy was complete
        }
        // The VM reverted to the base meanwhile: the target holds part of s1, refused.
        let r1 = vhd(&d.join("r1.vhd"), Some(&base), &[]);
        let o = vdiskfs([os("sync"), r1.as_os_str(), dest.target.as_os_str()]);
        assert_one_line_error(&o, &dest.state.display().to_string(), &["interrupted", "s1.vhd"]);
        // The same sync again: accepted although the fingerprint moved, and finished.
        let out = dest.ok("sync", &["--exclude-top"], &s2);
        assert!(out.contains("finishing the interrupted sync"), "{out}");
        assert_same("after the rerun", &std::fs::read(&dest.target).unwrap(), &model);
        assert!(!pending(&dest.state));
        assert_eq!(dest.state()["layers"].as_array().unwrap().len(), 2);
    }
    assert!(interrupted > 0, "no kill landed while the sync was copying");
}
