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
