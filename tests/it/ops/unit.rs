//! The systemd template unit passes `systemd-analyze verify` without a warning.

use std::process::Command;

use crate::common::*;

fn systemd_unit_verifies_without_warnings() {
    need("systemd-analyze");
    let t = tmpdir();
    // verify needs an instance of a template: the unit file under an instance name.
    let unit = t.path().join("vdiskfs@web1.service");
    std::fs::copy(super::helper("vdiskfs@.service"), &unit).unwrap();
    let o = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("run systemd-analyze");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(o.status.success(), "systemd-analyze verify failed: {out}");
    let ours: Vec<&str> = out.lines().filter(|l| l.contains("vdiskfs")).collect();
    assert!(ours.is_empty(), "warnings about the unit: {ours:?}");
    let text = std::fs::read_to_string(&unit).unwrap();
    for want in ["After=network-online.target", "EnvironmentFile=/etc/vdiskfs/%i.conf", "--foreground"] {
        assert!(text.contains(want), "the unit has {want}");
    }
}
crate::register!(systemd_unit_verifies_without_warnings);

/// What the unit's ExecStart runs: `mount.vdiskfs --foreground` stays in the foreground while
/// mounted, and SIGTERM (systemctl stop) unmounts and ends it.
fn foreground_helper_mounts_until_sigterm() {
    need_fuse();
    need("qemu-img");
    let t = tmpdir();
    let base = t.path().join("base.vmdk");
    let top = t.path().join("top.vmdk");
    let data = pattern(91, 1 << 20);
    std::fs::write(t.path().join("data.raw"), &data).unwrap();
    sh(&format!(
        "qemu-img convert -q -f raw -O vmdk {0}/data.raw {1} && qemu-img create -q -f vmdk -b {1} -F vmdk {2}",
        t.path().display(),
        base.display(),
        top.display()
    ));
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // The unit's command line, with OPTIONS as systemd passes ${OPTIONS}: one argument.
    let mut child = Command::new(super::helper("mount.vdiskfs"))
        .env("PATH", format!("{}:/usr/bin:/bin", std::path::Path::new(bin()).parent().unwrap().display()))
        .env_remove("HOME")
        .arg("--foreground")
        .arg(&top)
        .arg(&mnt)
        .args(["-o", &format!("log-file={}/log,threads=2", t.path().display())])
        .spawn()
        .unwrap();
    let raw = mnt.join("top.raw");
    assert!(wait_for(10, || raw.exists()), "mounted in the foreground");
    assert!(child.try_wait().unwrap().is_none(), "still running while mounted");
    assert_same("foreground mount", &std::fs::read(&raw).unwrap(), &qemu_raw(&top, "vmdk"));
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    assert!(
        wait_for(10, || {
            status = child.try_wait().unwrap();
            status.is_some()
        }),
        "SIGTERM ends it"
    );
    let st = status.unwrap();
    assert!(st.success(), "a clean stop (systemd counts a failure otherwise): {st:?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&*mnt.to_string_lossy()), "SIGTERM unmounted it");
}
crate::register!(foreground_helper_mounts_until_sigterm);
