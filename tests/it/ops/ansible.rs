//! The Ansible playbook mount-helpers/ansible/warm-migration.yml on two conversion hosts (this
//! machine over the local connection, and the test sshd) with three ESXi-style VMs (two on one
//! host, one on the other): export while the VMs run, a sync after a snapshot, the cutover after
//! they stop. Each target is compared with qemu-img's reading of the chain it should hold, and a
//! rerun with nothing new changes nothing (changed=0 in the recap).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::common::sshd::Sshd;
use crate::common::*;
use crate::sync::{Esxi, MIB, SIZE, Vm};

struct Site<'a> {
    t: &'a Path,
    sshd: &'a Sshd,
}

impl Site<'_> {
    /// The inventory: the VMs with an even index on this machine, the others on the sshd host.
    fn inventory(&self, vms: &[(&str, &Esxi, &Path)]) -> std::path::PathBuf {
        let entry = |host: usize| {
            let v: Vec<_> = vms
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == host)
                .map(|(_, (name, vm, target))| json!({"name": name, "image": vm.top(), "target": target}))
                .collect();
            json!(v)
        };
        let d = self.sshd.dir().display().to_string();
        let inv = json!({"all": {
            "vars": {
                "vdiskfs_bin": bin(),
                "vdiskfs_report_dir": self.t.join("report"),
                "ansible_python_interpreter": "/usr/bin/python3",
            },
            "hosts": {
                "localhost": {"ansible_connection": "local", "vdiskfs_vms": entry(0)},
                "sshd": {
                    "ansible_host": "127.0.0.1",
                    "ansible_port": self.sshd.port,
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": format!("{d}/key"),
                    "ansible_ssh_common_args": format!(
                        "-F /dev/null -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
                    ),
                    "vdiskfs_vms": entry(1),
                },
            },
        }});
        let p = self.t.join("inventory.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&inv).unwrap()).unwrap();
        p
    }

    /// Runs the playbook; the recap's counts per host, and the output.
    fn play(&self, inv: &Path, cutover: bool) -> (BTreeMap<String, BTreeMap<String, u64>>, String) {
        let cfg = self.t.join("ansible.cfg");
        std::fs::write(
            &cfg,
            format!(
                "[defaults]\nlocal_tmp = {0}/ansible-local\nremote_tmp = {0}/ansible-remote\nretry_files_enabled = False\n\
                 nocolor = True\nforks = 2\n[ssh_connection]\ncontrol_path_dir = {0}/cp\npipelining = True\n",
                self.t.display()
            ),
        )
        .unwrap();
        let o = Command::new("ansible-playbook")
            .current_dir(self.t)
            .env("HOME", self.t)
            .env("ANSIBLE_CONFIG", &cfg)
            .env("ANSIBLE_NOCOLOR", "1")
            .arg("-i")
            .arg(inv)
            .arg("-e")
            .arg(format!("vdiskfs_cutover={cutover}"))
            .arg(super::helper("ansible/warm-migration.yml"))
            .output()
            .expect("run ansible-playbook");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "ansible-playbook failed:\n{out}\n{}", stderr(&o));
        (recap(&out), out)
    }
}

/// `host : ok=9 changed=1 unreachable=0 failed=0 …` lines of PLAY RECAP.
fn recap(out: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let tail = out.split("PLAY RECAP").nth(1).unwrap_or_else(|| panic!("no PLAY RECAP in:\n{out}"));
    let mut m = BTreeMap::new();
    for l in tail.lines().filter(|l| l.contains(" : ")) {
        let (host, counts) = l.split_once(" : ").unwrap();
        let c = counts
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect();
        m.insert(host.trim().to_string(), c);
    }
    assert_eq!(m.len(), 2, "two hosts in the recap:\n{out}");
    m
}

/// The hosts a task changed: the `changed: [host]` lines of its section of the output.
fn changed_by(out: &str, task: &str) -> Vec<String> {
    let start = out.find(&format!("TASK [{task}")).unwrap_or_else(|| panic!("no task {task} in:\n{out}"));
    let section = &out[start..];
    let section = &section
        [..section[1..].find("TASK [").map(|i| i + 1).or_else(|| section.find("PLAY RECAP")).unwrap_or(section.len())];
    let mut hosts: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("changed: ["))
        .map(|l| l.split(']').next().unwrap().to_string())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

fn changed(r: &BTreeMap<String, BTreeMap<String, u64>>) -> Vec<(String, u64)> {
    r.iter().map(|(h, c)| (h.clone(), c["changed"])).collect()
}

fn assert_target(what: &str, target: &Path, vm: &Esxi, top: &Path) {
    let got = std::fs::read(target).unwrap();
    let (want, _) = vm.oracle(top);
    assert_same(what, &got, &want);
}

fn playbook_exports_syncs_and_cuts_over_on_two_hosts_and_reruns_change_nothing() {
    need("ansible-playbook");
    need("qemu-img");
    let sshd = Sshd::start();
    let t = tmpdir();
    let site = Site { t: t.path(), sshd: &sshd };
    let mut vms = Vec::new();
    for (i, seed) in [(0, 40u64), (1, 50u64), (2, 100u64)] {
        let dir = t.path().join(format!("vm{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut base = pattern(seed, (32 * MIB) as usize);
        base.resize(SIZE as usize, 0);
        let mut vm = Esxi::new(&dir, &base);
        vm.write(MIB, &pattern(seed + 1, (2 * MIB) as usize));
        vm.snapshot();
        vm.write(8 * MIB, &pattern(seed + 2, (MIB) as usize));
        vms.push((vm, dir.join("vm.raw")));
    }
    let names = ["web", "db", "mail"];
    let inv = |vms: &Vec<(Esxi, std::path::PathBuf)>| {
        let v: Vec<(&str, &Esxi, &Path)> = vms.iter().zip(names).map(|((vm, tg), n)| (n, vm, tg.as_path())).collect();
        site.inventory(&v)
    };

    // Warm: the base (everything below the running top).
    let both = vec!["localhost".to_string(), "sshd".to_string()];
    let (r, out) = site.play(&inv(&vms), false);
    assert!(r.values().all(|c| c["failed"] == 0), "{r:?}");
    assert_eq!(changed_by(&out, "export"), both, "the export ran on both hosts:\n{out}");
    for (vm, tg) in &vms {
        assert_target("export --exclude-top", tg, vm, &vm.frozen());
    }
    let (r, _) = site.play(&inv(&vms), false);
    assert!(changed(&r).iter().all(|(_, n)| *n == 0), "a rerun changes nothing: {r:?}");

    // A snapshot and more writes: the sync brings the newer frozen layer.
    for (i, (vm, _)) in vms.iter_mut().enumerate() {
        vm.write(20 * MIB, &pattern(60 + i as u64, (3 * MIB) as usize));
        vm.snapshot();
        vm.write(2 * MIB, &pattern(70 + i as u64, 4096));
    }
    let (_, out) = site.play(&inv(&vms), false);
    assert_eq!(changed_by(&out, "sync - the newer"), both, "the sync ran:\n{out}");
    assert!(changed_by(&out, "export").is_empty() && changed_by(&out, "cutover").is_empty(), "{out}");
    for (vm, tg) in &vms {
        assert_target("sync --exclude-top", tg, vm, &vm.frozen());
    }

    // The VMs stop: the cutover writes the last delta; the targets are the whole chains.
    for (vm, _) in vms.iter_mut() {
        vm.stop();
    }
    let (_, out) = site.play(&inv(&vms), true);
    assert_eq!(changed_by(&out, "cutover"), both, "the cutover ran:\n{out}");
    assert!(changed_by(&out, "sync - the newer").is_empty(), "{out}");
    for (vm, tg) in &vms {
        assert_target("cutover", tg, vm, &vm.top());
    }
    let (r, _) = site.play(&inv(&vms), true);
    assert!(changed(&r).iter().all(|(_, n)| *n == 0), "a rerun after the cutover changes nothing: {r:?}");
    for (n, (vm, _)) in names.iter().zip(&vms) {
        let rep: serde_json::Value =
            serde_json::from_slice(&std::fs::read(t.path().join(format!("report/{n}.json"))).unwrap()).unwrap();
        assert_eq!(rep["stage"], "cutover");
        assert_eq!(rep["holds"], vm.top().display().to_string(), "the report names the top the target holds");
        assert_eq!(rep["pending_layers"], 0);
    }
}
crate::register!(playbook_exports_syncs_and_cuts_over_on_two_hosts_and_reruns_change_nothing);
