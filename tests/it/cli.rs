//! The CLI contract: info/map output against models and qemu-img, daemon readiness, signals,
//! and the loop-device helper.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use testkit::vhd::{Dialect, VhdBuilder};

use crate::common::*;

const MIB: u64 = 1 << 20;

fn uuid_text(u: &[u8]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// base writes [0, 2M) and [6M, 6M+4K); mid [1M, 1M+4K); top [3M, 3M+512) and [1M+512, 1M+1K).
/// Returns paths top..base, uuids top..base, and each sector's owner (None = nowhere).
const WRITES: [&[(u64, u64)]; 3] =
    [&[(0, 2 * MIB), (6 * MIB, 4096)], &[(MIB, 4096)], &[(3 * MIB, 512), (MIB + 512, 512)]];

fn three_layers(dir: &Path) -> (Vec<std::path::PathBuf>, Vec<[u8; 16]>, Vec<Option<usize>>) {
    let size = 8 * MIB;
    let mut owner = vec![None; (size / 512) as usize];
    let writes = WRITES;
    let mut paths: Vec<std::path::PathBuf> = Vec::new();
    let mut uuids = Vec::new();
    for (k, ws) in writes.iter().enumerate() {
        let p = dir.join(["base.vhd", "mid.vhd", "top.vhd"][k]);
        let mut b = if k == 0 { VhdBuilder::dynamic(size) } else { VhdBuilder::differencing(&paths[k - 1]).unwrap() };
        for (i, &(off, len)) in ws.iter().enumerate() {
            b.write(off, &pattern((k * 10 + i) as u64 + 1, len as usize));
            for s in off / 512..(off + len) / 512 {
                owner[s as usize] = Some(2 - k); // depth counts from the top
            }
        }
        uuids.push(b.uuid_value());
        b.build(&p).unwrap();
        paths.push(p);
    }
    paths.reverse();
    uuids.reverse();
    (paths, uuids, owner)
}

crate::register!(map_json_depths_match_the_ownership_model);
fn map_json_depths_match_the_ownership_model() {
    let t = tmpdir();
    let (paths, _, owner) = three_layers(t.path());
    let o = vdiskfs([os("map"), os("--json"), paths[0].as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    // Expand the extents back to a per-sector owner and compare with the model.
    let mut got = vec![None; owner.len()];
    let mut next = 0;
    for e in &v {
        let (start, len, depth) =
            (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["depth"].as_u64().unwrap());
        assert_eq!(start, next, "extents are contiguous");
        next = start + len;
        let data = e["data"].as_bool().unwrap();
        assert_eq!(data, e.get("offset").is_some(), "offset only for data");
        assert_eq!(e["present"].as_bool().unwrap(), depth < 3);
        // Only the base has no parent, so unallocated-everywhere reads as zero at the base (depth 2).
        for s in start / 512..(start + len) / 512 {
            got[s as usize] = if data { Some(depth as usize) } else { None };
        }
        let keys: Vec<&str> = e.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(&keys[..7], ["start", "length", "depth", "present", "zero", "data", "compressed"]);
    }
    assert_eq!(next, 8 * MIB);
    assert_eq!(got, owner);
}

crate::register!(map_json_agrees_with_qemu_img_map_on_a_dynamic_vhd);
fn map_json_agrees_with_qemu_img_map_on_a_dynamic_vhd() {
    need("qemu-img");
    let t = tmpdir();
    let p = t.path().join("d.vhd");
    let mut b = VhdBuilder::dynamic(12 * MIB);
    // Whole blocks only: qemu ignores sector bitmaps, so partial blocks would differ by design.
    b.write(2 * MIB, &pattern(1, (2 * MIB) as usize)).write(8 * MIB, &pattern(2, (4 * MIB) as usize));
    b.build(&p).unwrap();
    let data_extents = |json: &[u8]| -> Vec<(u64, u64, u64)> {
        let v: Vec<Value> = serde_json::from_slice(json).unwrap();
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        for e in v.iter().filter(|e| e["data"].as_bool() == Some(true)) {
            let (s, l, o) =
                (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["offset"].as_u64().unwrap());
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s && last.2 + last.1 == o => last.1 += l,
                _ => out.push((s, l, o)),
            }
        }
        out
    };
    let ours = vdiskfs([os("map"), os("--json"), p.as_os_str()]);
    let qemu = Command::new("qemu-img").args(["map", "--output=json", "-f", "vpc"]).arg(&p).output().unwrap();
    assert!(ours.status.success() && qemu.status.success());
    let ours = data_extents(&ours.stdout);
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert_eq!(ours, data_extents(&qemu.stdout));
}

crate::register!(info_json_reports_each_layer_from_the_images);
fn info_json_reports_each_layer_from_the_images() {
    let t = tmpdir();
    let (paths, uuids, _) = three_layers(t.path());
    let o = vdiskfs([os("info"), os("--json"), paths[0].as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let disk = &v["disks"][0];
    assert_eq!(disk["name"], "top.raw");
    assert_eq!(disk["virtual_size"], 8 * MIB);
    let layers = disk["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    // Blocks each layer's writes touched (top first).
    let allocated_blocks: Vec<u64> = WRITES
        .iter()
        .rev()
        .map(|ws| {
            let mut blocks: Vec<u64> = ws.iter().flat_map(|&(o, l)| o / (2 * MIB)..=(o + l - 1) / (2 * MIB)).collect();
            blocks.sort();
            blocks.dedup();
            blocks.len() as u64
        })
        .collect();
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(l["path"], paths[i].display().to_string());
        assert_eq!(l["format"], "vhd");
        assert_eq!(l["subformat"], if i == 2 { "dynamic" } else { "differencing" });
        assert_eq!(l["identity"], uuid_text(&uuids[i]));
        assert_eq!(l["block_size"], 2 * MIB);
        assert_eq!(l["allocated_bytes"], allocated_blocks[i] * 2 * MIB);
        assert_eq!(l["depth"], i);
        if i < 2 {
            assert_eq!(l["parent"]["expected_identity"], uuid_text(&uuids[i + 1]));
            assert_eq!(l["parent"]["resolved"], paths[i + 1].display().to_string());
        } else {
            assert!(l["parent"].is_null());
        }
    }
    // The text form names the same facts.
    let o = vdiskfs([os("info"), paths[0].as_os_str()]);
    let text = String::from_utf8_lossy(&o.stdout);
    for u in &uuids {
        assert!(text.contains(&uuid_text(u)), "{text}");
    }
}

crate::register!(foreground_mount_stops_cleanly_on_sigterm_and_on_unmount);
fn foreground_mount_stops_cleanly_on_sigterm_and_on_unmount() {
    need_fuse();
    let t = tmpdir();
    let (paths, _, _) = three_layers(t.path());
    for how in ["sigterm", "fusermount"] {
        let mnt = t.path().join(format!("mnt-{how}"));
        std::fs::create_dir(&mnt).unwrap();
        let mut child = Command::new(bin())
            .arg("mount")
            .arg(&paths[0])
            .arg(&mnt)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let raw = mnt.join("top.raw");
        assert!(wait_for(10, || raw.exists()), "foreground mount did not appear");
        assert_eq!(std::fs::read(&raw).unwrap().len() as u64, 8 * MIB);
        match how {
            "sigterm" => {
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
            _ => {
                sh(&format!("fusermount3 -u {}", mnt.display()));
            }
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "{how}: exit {status:?}");
        assert!(!raw.exists(), "{how}: mount left behind");
    }
}

crate::register!(loop_helper_attaches_partitions_and_detaches_cleanly);
fn loop_helper_attaches_partitions_and_detaches_cleanly() {
    need_fuse();
    need("losetup");
    need("sfdisk");
    let t = tmpdir();
    let size = 16 * MIB;
    let mut disk = vec![0u8; size as usize];
    let raw = t.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    sh(&format!(
        "printf 'start=2048, size=8192, type=83\\nstart=12288, size=16384, type=83\\n' | sfdisk -q --label dos {}",
        raw.display()
    ));
    disk[..512].copy_from_slice(&std::fs::read(&raw).unwrap()[..512]);
    disk[(MIB as usize)..(5 * MIB) as usize].copy_from_slice(&pattern(1, (4 * MIB) as usize));
    disk[(6 * MIB) as usize..(14 * MIB) as usize].copy_from_slice(&pattern(2, (8 * MIB) as usize));
    let img = t.path().join("disk.vhd");
    let mut b = VhdBuilder::dynamic(size).dialect(Dialect::Xen);
    b.write_diff(&vec![0; size as usize], &disk, 4096);
    b.build(&img).unwrap();
    let m = mount(&[img.as_os_str()]);
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/vdiskfs-loop");
    let state = t.path().join("state");
    let run = |args: &str| {
        let o = Command::new(&helper)
            .args(args.split(' '))
            .arg(m.file("disk.raw"))
            .env("VDISKFS_LOOP_STATE", &state)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = run("attach");
    let devs: Vec<(String, String)> = out
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string())
        })
        .collect();
    assert_eq!(devs.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["whole", "part1", "part2"], "{out}");
    let read_dev = |d: &str| std::fs::read(d).unwrap();
    assert_same("whole", &read_dev(&devs[0].1), &disk);
    assert_same("part1", &read_dev(&devs[1].1), &disk[MIB as usize..(5 * MIB) as usize]);
    assert_same("part2", &read_dev(&devs[2].1), &disk[(6 * MIB) as usize..(14 * MIB) as usize]);
    // Read-only devices.
    for (_, d) in &devs {
        assert_eq!(sh(&format!("blockdev --getro {d}")).trim(), "1", "{d} must be read-only");
    }
    assert_eq!(run("list"), out);
    run("detach");
    // By backing file, not device name: tests run in parallel, and another test may take a
    // freed /dev/loopN at once.
    let attached = sh("losetup -a");
    let ours = format!("({})", m.file("disk.raw").display());
    assert!(!attached.contains(&ours), "a device is still attached to {ours}: {attached}");
}

crate::register!(a_closed_pipe_ends_info_and_map_quietly);
/// `vdiskfs info IMAGE | head -1`: a reader that has gone away ends the command as it ends
/// `ls` (killed by SIGPIPE, nothing on stderr), never with a panic and a backtrace. Checked with
/// a pipe whose reading end is closed before the command writes (always a broken pipe), and
/// with a real `head -1` (its line is the first line of the whole output).
fn a_closed_pipe_ends_info_and_map_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let t = tmpdir();
    let (paths, _, _) = three_layers(t.path());
    let top = paths[0].as_os_str();
    for cmd in ["info", "map"] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just made by pipe(2) and are owned here only.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read_end);
        let o = Command::new(bin()).args([os(cmd), top]).stdout(Stdio::from(write_end)).output().unwrap();
        assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{cmd}: {:?}, stderr: {}", o.status, stderr(&o));
        assert_eq!(stderr(&o), "", "{cmd}: nothing on stderr");

        let whole = vdiskfs([os(cmd), top]);
        assert!(whole.status.success(), "{}", stderr(&whole));
        let first = String::from_utf8_lossy(&whole.stdout).lines().next().unwrap().to_string();
        let quoted = top.to_str().unwrap().replace('\'', "'\\''");
        let script = format!("'{}' {cmd} '{quoted}' | head -1", bin());
        let o = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim_end(), first, "{cmd} | head -1");
        assert_eq!(stderr(&o), "", "{cmd} | head -1: nothing on stderr");
    }
}
