//! Who holds a file: the loop devices backed by it and the processes that have it open, found in
//! sysfs and procfs. `export` refuses a target a loop device holds; a mount that cannot be
//! unmounted names what holds it.

use std::path::{Path, PathBuf};

/// Every attached loop device, as (`/dev/loopN`, backing file).
pub fn loop_devices() -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let mut v: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bf = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Some((format!("/dev/{name}"), PathBuf::from(bf.trim_end_matches('\n'))))
        })
        .collect();
    v.sort();
    v
}

/// What holds files at or under `path` (a mount point): "loop device /dev/loop3 (backing FILE)"
/// and "process PID (COMM) has FILE open", one entry each, this process left out.
pub fn holders_under(path: &Path) -> Vec<String> {
    let Ok(root) = std::fs::canonicalize(path) else { return Vec::new() };
    let under = |p: &Path| p.starts_with(&root);
    let mut v: Vec<String> = loop_devices()
        .into_iter()
        .filter(|(_, b)| under(b))
        .map(|(d, b)| format!("loop device {d} (backing {})", b.display()))
        .collect();
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else { return v };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        if let Some(f) = fds.flatten().filter_map(|f| std::fs::read_link(f.path()).ok()).find(|t| under(t)) {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            v.push(format!("process {pid} ({}) has {} open", comm.trim(), f.display()));
        }
    }
    v
}
