//! `vdiskfs-discover` against the test sshd, whose account finds fake `vim-cmd`, `xe` and
//! `powershell` first on its PATH. The fakes print what the real commands print (the formats
//! quoted in the StorPool migration paper: vim-cmd's table, .vmx/.vmsd files, xe's
//! `key ( RO): value` records, PowerShell's CRLF lines) for VMs with several disks, snapshots,
//! CD drives, a disk not present and a decoy VM of a similar name. The expected ssh:// lines are
//! derived from the same data the fakes print.

use std::path::Path;
use std::process::{Command, Output};

use testkit::vmdk::{DeltaBuilder, write_flat};

use crate::common::sshd::Sshd;
use crate::common::*;

/// The sshd, its account's PATH starting with `fake` (which holds the fake commands).
fn sshd_with_fakes(fake: &Path) -> Sshd {
    let mut sshd = Sshd::start();
    let wrapper = sshd.dir().join("sftp-counting");
    sshd.write_config(&format!(
        "Subsystem sftp {}\nSetEnv PATH={}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        wrapper.display(),
        fake.display()
    ));
    sshd.restart();
    sshd
}

fn write_exe(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    sh(&format!("chmod 755 '{}'", path.display()));
}

fn discover(sshd: &Sshd, kind: &str, vm: &str) -> Output {
    Command::new(super::helper("vdiskfs-discover"))
        .args(["-e", &sshd.ssh_command(), kind, &format!("root@127.0.0.1:{}", sshd.port), vm])
        .output()
        .expect("run vdiskfs-discover")
}

/// stdout lines of a successful run.
fn lines(o: &Output) -> Vec<String> {
    assert!(o.status.success(), "vdiskfs-discover failed: {}", stderr(o));
    String::from_utf8(o.stdout.clone()).unwrap().lines().map(str::to_string).collect()
}

fn url(sshd: &Sshd, path: &str) -> String {
    format!("ssh://root@127.0.0.1:{}{}", sshd.port, path.replace('%', "%25").replace(' ', "%20"))
}

/// A .vmx device: (node, present, fileName, deviceType).
type VmxDev = (&'static str, bool, &'static str, &'static str);

/// `/vmfs` pointing into a test directory while the guard lives (the real ESXi path of .vmx
/// files, read with a real `cat` over ssh).
struct VmfsLink;

impl VmfsLink {
    fn make(to: &Path) -> VmfsLink {
        if std::fs::symlink_metadata("/vmfs").is_ok() {
            crate::harness::skip("/vmfs exists on this machine");
        }
        std::os::unix::fs::symlink(to, "/vmfs").unwrap();
        VmfsLink
    }
}

impl Drop for VmfsLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file("/vmfs");
    }
}

fn vmx_text(devs: &[VmxDev]) -> String {
    let mut s = String::from(".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"14\"\n");
    for (node, present, file, dtype) in devs {
        s += &format!("{node}.present = \"{}\"\n", if *present { "TRUE" } else { "FALSE" });
        if !dtype.is_empty() {
            s += &format!("{node}.deviceType = \"{dtype}\"\n");
        }
        s += &format!("{node}.fileName = \"{file}\"\n");
    }
    s + "displayName = \"x\"\nguestOS = \"windows2019srv-64\"\n"
}

fn esxi_fixture(root: &Path, fake: &Path) -> Vec<VmxDev> {
    // The VM `web`: two snapshots of scsi0:0, a data disk on another datastore added after the
    // first snapshot, an ISO, an empty CD drive and a removed disk (present = FALSE).
    let devs: Vec<VmxDev> = vec![
        ("scsi0:0", true, "web-000002.vmdk", "scsi-hardDisk"),
        ("scsi0:1", true, "/vmfs/volumes/ds2/web data/data-000001.vmdk", "scsi-hardDisk"),
        ("sata0:0", true, "/vmfs/volumes/ds1/iso/install.iso", "cdrom-image"),
        ("sata0:1", true, "", "atapi-cdrom"),
        ("nvme0:0", true, "web_1.vmdk", ""),
        ("scsi1:0", false, "old-disk.vmdk", "scsi-hardDisk"),
    ];
    let decoy: Vec<VmxDev> = vec![("scsi0:0", true, "web-old.vmdk", "scsi-hardDisk")];
    for (dir, name, d) in [("web", "web", &devs), ("web-old", "web-old", &decoy)] {
        let vmdir = root.join("volumes/ds1").join(dir);
        std::fs::create_dir_all(&vmdir).unwrap();
        std::fs::write(vmdir.join(format!("{name}.vmx")), vmx_text(d)).unwrap();
    }
    std::fs::write(
        root.join("volumes/ds1/web/web.vmsd"),
        ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"2\"\nsnapshot.current = \"2\"\n\
         snapshot0.uid = \"1\"\nsnapshot0.filename = \"web-Snapshot1.vmsn\"\nsnapshot0.displayName = \"snap1\"\n\
         snapshot0.numDisks = \"1\"\nsnapshot0.disk0.fileName = \"web.vmdk\"\nsnapshot0.disk0.node = \"scsi0:0\"\n\
         snapshot1.uid = \"2\"\nsnapshot1.filename = \"web-Snapshot2.vmsn\"\nsnapshot1.displayName = \"snap2\"\n\
         snapshot1.numDisks = \"2\"\nsnapshot1.disk0.fileName = \"web-000001.vmdk\"\nsnapshot1.disk0.node = \"scsi0:0\"\n\
         snapshot1.disk1.fileName = \"data.vmdk\"\nsnapshot1.disk1.node = \"scsi0:1\"\nsnapshot.numSnapshots = \"2\"\n",
    )
    .unwrap();
    let table = "Vmid        Name                       File                       Guest OS          Version   Annotation\n\
                 12     web-old           [ds1] web-old/web-old.vmx   windows2019srv_64Guest   vmx-14              \n\
                 95     web               [ds1] web/web.vmx           windows2019srv_64Guest   vmx-14    front end\n\
                 96     my web            [ds1] my web/my web.vmx     otherGuest64             vmx-14              \n";
    std::fs::write(fake.join("getallvms.txt"), table).unwrap();
    write_exe(
        &fake.join("vim-cmd"),
        &format!(
            "#!/bin/sh\ncase $1 in\n  vmsvc/getallvms) cat '{0}/getallvms.txt' ;;\n  \
             vmsvc/power.getstate) echo 'Retrieved runtime info'; [ \"$2\" = 95 ] && echo 'Powered on' || echo 'Powered off' ;;\n  \
             *) echo \"(vim.fault.NotFound) {{ msg = \\\"$1\\\" }}\" >&2; exit 1 ;;\nesac\n",
            fake.display()
        ),
    );
    devs
}

fn discovers_the_top_of_each_esxi_disk() {
    let t = tmpdir();
    let (root, fake) = (t.path().join("vmfs"), t.path().join("bin"));
    std::fs::create_dir_all(&fake).unwrap();
    let devs = esxi_fixture(&root, &fake);
    let _link = VmfsLink::make(&root);
    let sshd = sshd_with_fakes(&fake);
    let want: Vec<String> = devs
        .iter()
        .filter(|(_, present, file, dtype)| *present && file.ends_with(".vmdk") && !dtype.contains("cdrom"))
        .map(|(_, _, file, _)| {
            let p = if file.starts_with('/') { file.to_string() } else { format!("/vmfs/volumes/ds1/web/{file}") };
            url(&sshd, &p)
        })
        .collect();
    // scsi0:0 is a real chain (flat base, two SESparse snapshots): the line the helper prints
    // is an IMAGE vdiskfs reads over ssh, the same bytes as qemu-img's reading of the chain.
    let vmdir = root.join("volumes/ds1/web");
    let (base, _) = write_flat(&vmdir, "web", &pattern(31, 6 << 20), "vmfs").unwrap();
    let mut s1 = DeltaBuilder::sesparse(&base).unwrap();
    s1.write(4096, &pattern(32, 1 << 20));
    let snap1 = s1.build(&vmdir, "web-000001").unwrap();
    let mut s2 = DeltaBuilder::sesparse(&snap1).unwrap();
    s2.write(3 << 20, &pattern(33, 8192));
    let top = s2.build(&vmdir, "web-000002").unwrap();
    let o = discover(&sshd, "esxi", "web");
    // Device order: nvme0 < scsi0 (sorted by controller name, then number).
    let mut want_sorted = want.clone();
    want_sorted.sort_by_key(|u| !u.contains("web_1"));
    assert_eq!(lines(&o), want_sorted, "stderr: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("--exclude-top"), "a running VM gets the note: {err}");
    assert!(err.contains("2 snapshot(s): snap1, snap2 (current)"), "{err}");
    assert!(err.contains("nvme0:0 is in no snapshot"), "{err}");
    if fuse_ok() {
        let cache = t.path().join("cache");
        let cmd = sshd.ssh_command();
        let m = mount(&[os("--ssh-command"), os(&cmd), os("--cache-dir"), cache.as_os_str(), os(&lines(&o)[1])]);
        assert_same(
            "the discovered image over ssh",
            &std::fs::read(m.file("web-000002.raw")).unwrap(),
            &qemu_raw(&top, "vmdk"),
        );
    }
    // The decoy's name is a prefix of the VM's; the VM with a space in its name is found by
    // its whole name only.
    let o = discover(&sshd, "esxi", "web-old");
    assert_eq!(lines(&o), vec![url(&sshd, "/vmfs/volumes/ds1/web-old/web-old.vmdk")]);
    assert!(!stderr(&o).contains("exclude-top"), "a stopped VM gets no note: {}", stderr(&o));
    let o = discover(&sshd, "esxi", "we");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no VM named 'we'"), "{}", stderr(&o));
}
crate::register!(discovers_the_top_of_each_esxi_disk);

/// One xe record, in xe's layout: the first key flush left, the rest indented, `( RO)` marks.
fn xe_record(fields: &[(&str, &str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, mode, v)) in fields.iter().enumerate() {
        let key = format!("{k} ({mode})");
        s += &if i == 0 { format!("{key:<20}: {v}\n") } else { format!("{key:>22}: {v}\n") };
    }
    s + "\n\n"
}

struct XenVbd {
    userdevice: &'static str,
    device: &'static str,
    kind: &'static str,
    empty: bool,
    vdi: &'static str,
}

/// (VDI, SR, sm-config) of each VDI.
type XenVdi = (&'static str, &'static str, &'static str);

fn xen_fixture(fake: &Path) -> (Vec<XenVbd>, Vec<(&'static str, &'static str)>, Vec<XenVdi>) {
    let vm = "4b8d335e-a149-c3c5-83bc-490f38af72ce";
    let decoy = "9c0ffee0-0000-4000-8000-000000000001";
    let vms = [
        (vm, "CentOS 7", "running"),
        (decoy, "CentOS 7 copy", "halted"),
        ("0d0d", "Control domain on host: xs1", "running"),
    ];
    let list: String = vms
        .iter()
        .map(|(u, n, p)| xe_record(&[("uuid", "RO", u), ("name-label", "RW", n), ("power-state", "RO", p)]))
        .collect();
    std::fs::write(fake.join("vm-list"), list).unwrap();
    // Listed out of order: disk 1 on LVM storage before disk 0; the CD as in the paper.
    let vbds = vec![
        XenVbd {
            userdevice: "1",
            device: "xvdb",
            kind: "Disk",
            empty: false,
            vdi: "77aa0000-1111-4222-8333-444455556666",
        },
        XenVbd { userdevice: "3", device: "xvdd", kind: "CD", empty: true, vdi: "<not in database>" },
        XenVbd {
            userdevice: "2",
            device: "xvdc",
            kind: "Disk",
            empty: false,
            vdi: "33dd0000-1111-4222-8333-444455556666",
        },
        XenVbd {
            userdevice: "0",
            device: "xvda",
            kind: "Disk",
            empty: false,
            vdi: "e2a27957-40f1-4ed3-a145-99c9c2aba4c9",
        },
    ];
    let text: String = vbds
        .iter()
        .map(|b| {
            xe_record(&[
                ("userdevice", "RW", b.userdevice),
                ("device", "RO", b.device),
                ("type", "RW", b.kind),
                ("empty", "RO", if b.empty { "true" } else { "false" }),
                ("vdi-uuid", "RO", b.vdi),
            ])
        })
        .collect();
    std::fs::write(fake.join(format!("vbd-{vm}")), text).unwrap();
    std::fs::write(
        fake.join(format!("vbd-{decoy}")),
        xe_record(&[
            ("userdevice", "RW", "0"),
            ("device", "RO", "xvda"),
            ("type", "RW", "Disk"),
            ("empty", "RO", "false"),
            ("vdi-uuid", "RO", "dec0dec0-0000-4000-8000-000000000000"),
        ]),
    )
    .unwrap();
    let (srs, vdis) = xen_storage(fake);
    (vbds, srs.to_vec(), vdis)
}

/// The SRs (a file SR and an LVM-over-iSCSI SR; the LVM disk has two VHD parents), the VDIs,
/// and the fake `xe` that prints them.
fn xen_storage(fake: &Path) -> ([(&'static str, &'static str); 2], Vec<XenVdi>) {
    let srs = [("93a3cf4c-0061-0dc9-2a70-dc1a42b2b1a1", "ext"), ("5b5b0000-aaaa-4bbb-8ccc-dddddddddddd", "lvmoiscsi")];
    for (sr, kind) in srs {
        std::fs::write(fake.join(format!("sr-{sr}")), xe_record(&[("uuid", "RO", sr), ("type", "RO", kind)])).unwrap();
    }
    let vdis = vec![
        (
            "e2a27957-40f1-4ed3-a145-99c9c2aba4c9",
            srs[0].0,
            "vhd-parent: ba7ef3e7-0724-445a-928d-3a283b70ae10; vdi_type: vhd",
        ),
        ("dec0dec0-0000-4000-8000-000000000000", srs[0].0, "vdi_type: vhd"),
        (
            "77aa0000-1111-4222-8333-444455556666",
            srs[1].0,
            "host_OpaqueRef:1: RW; vhd-parent: 66bb0000-1111-4222-8333-444455556666; vdi_type: vhd",
        ),
        (
            "66bb0000-1111-4222-8333-444455556666",
            srs[1].0,
            "vhd-parent: 55cc0000-1111-4222-8333-444455556666; vdi_type: vhd",
        ),
        ("55cc0000-1111-4222-8333-444455556666", srs[1].0, "vdi_type: vhd"),
        ("33dd0000-1111-4222-8333-444455556666", srs[1].0, "vdi_type: raw"),
    ];
    for &(vdi, sr, sm) in &vdis {
        std::fs::write(
            fake.join(format!("vdi-{vdi}")),
            xe_record(&[("uuid", "RO", vdi), ("sr-uuid", "RO", sr), ("sm-config", "MRO", sm)]),
        )
        .unwrap();
    }
    write_exe(
        &fake.join("xe"),
        &format!(
            "#!/bin/sh\nd='{}'\ncmd=$1; shift\nkey() {{ k=$1; shift; for a in \"$@\"; do case $a in \"$k\"=*) echo \"${{a#*=}}\"; return ;; esac; done; }}\n\
             case $cmd in\n  vm-list) cat \"$d/vm-list\" ;;\n  vbd-list) cat \"$d/vbd-$(key vm-uuid \"$@\")\" ;;\n  \
             vdi-list) cat \"$d/vdi-$(key uuid \"$@\")\" ;;\n  sr-list) cat \"$d/sr-$(key uuid \"$@\")\" ;;\n  \
             *) echo \"Unknown command: $cmd\" >&2; exit 1 ;;\nesac\n",
            fake.display()
        ),
    );
    (srs, vdis)
}

fn discovers_the_top_of_each_xenserver_disk() {
    let t = tmpdir();
    let fake = t.path().join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    let (mut vbds, srs, vdis) = xen_fixture(&fake);
    let sshd = sshd_with_fakes(&fake);
    vbds.retain(|b| b.kind == "Disk" && !b.empty);
    vbds.sort_by_key(|b| b.userdevice.parse::<u32>().unwrap());
    // A file SR holds <vdi>.vhd; an LVM SR VHD-<vdi>, or LV-<vdi> for a raw VDI.
    let want: Vec<String> = vbds
        .iter()
        .map(|b| {
            let &(vdi, sr, sm) = vdis.iter().find(|v| v.0 == b.vdi).unwrap();
            match srs.iter().find(|s| s.0 == sr).unwrap().1 {
                "ext" => url(&sshd, &format!("/var/run/sr-mount/{sr}/{vdi}.vhd")),
                _ if sm.contains("vdi_type: raw") => {
                    format!("raw:{}", url(&sshd, &format!("/dev/VG_XenStorage-{sr}/LV-{vdi}")))
                }
                _ => url(&sshd, &format!("/dev/VG_XenStorage-{sr}/VHD-{vdi}")),
            }
        })
        .collect();
    let o = discover(&sshd, "xen", "CentOS 7");
    assert_eq!(lines(&o), want, "stderr: {}", stderr(&o));
    let err = stderr(&o);
    let vg = format!("/dev/VG_XenStorage-{}", srs[1].0);
    for v in ["VHD-77aa0000", "VHD-66bb0000", "VHD-55cc0000", "LV-33dd0000"] {
        assert!(err.contains(&format!("{vg}/{v}-1111-4222-8333-444455556666")), "LVs to activate: {err}");
    }
    assert!(err.contains("lvchange -ay") && err.contains("--exclude-top"), "{err}");
    let o = discover(&sshd, "xen", "CentOS 7 copy");
    assert_eq!(
        lines(&o),
        vec![url(&sshd, &format!("/var/run/sr-mount/{}/dec0dec0-0000-4000-8000-000000000000.vhd", srs[0].0))]
    );
    let o = discover(&sshd, "xen", "CentOS");
    assert_eq!(o.status.code(), Some(1), "a prefix names no VM: {}", stderr(&o));
}
crate::register!(discovers_the_top_of_each_xenserver_disk);

fn discovers_the_top_of_each_hyperv_disk() {
    let t = tmpdir();
    let fake = t.path().join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    let base = r"C:\ProgramData\Microsoft\Windows\Hyper-V\Virtual Machines\WinSrv2019-1\Virtual Hard Disks";
    // HardDrives.Path of a pass-through disk is empty.
    let vms: [(&str, &str, Vec<String>); 2] = [
        (
            "WinSrv2019-1",
            "Running",
            vec![
                format!(r"{base}\WinSrv2019-1_268F4E46-B05F-4811-9B5A-7B2A5C8C9798.avhdx"),
                String::new(),
                r"D:\VMs\data 100%.vhdx".into(),
            ],
        ),
        ("WinSrv2019-10", "Off", vec![r"D:\VMs\WinSrv2019-10.vhdx".into()]),
    ];
    for (name, state, paths) in &vms {
        let mut out = format!("@state\r\n{state}\r\n@disks\r\n");
        for p in paths {
            out += &format!("{p}\r\n");
        }
        std::fs::write(fake.join(format!("vm-{name}")), out).unwrap();
    }
    // The fake prints what PowerShell prints for the script the helper sends: it only picks
    // the VM named in `Where-Object Name -eq '…'` (a name PowerShell would not find prints
    // nothing but the markers).
    write_exe(
        &fake.join("powershell"),
        &format!(
            "#!/bin/sh\n[ \"$1 $2 $3\" = '-NoProfile -NonInteractive -Command' ] || {{ echo \"bad args: $*\" >&2; exit 1; }}\n\
             n=$(printf '%s' \"$4\" | sed -n \"s/.*Where-Object Name -eq '\\([^']*\\)').State.*/\\1/p\")\n\
             f='{}'/vm-\"$n\"\nif [ -n \"$n\" ] && [ -f \"$f\" ]; then cat \"$f\"; else printf '@state\\r\\n@disks\\r\\n'; fi\n",
            fake.display()
        ),
    );
    let sshd = sshd_with_fakes(&fake);
    let want: Vec<String> =
        vms[0].2.iter().filter(|p| !p.is_empty()).map(|p| url(&sshd, &format!("/{}", p.replace('\\', "/")))).collect();
    let o = discover(&sshd, "hyperv", "WinSrv2019-1");
    assert_eq!(lines(&o), want, "stderr: {}", stderr(&o));
    assert!(lines(&o)[0].contains("Virtual%20Machines"), "spaces are escaped");
    assert!(stderr(&o).contains("--exclude-top"), "{}", stderr(&o));
    let o = discover(&sshd, "hyperv", "WinSrv2019-10");
    assert_eq!(lines(&o), vec![url(&sshd, "/D:/VMs/WinSrv2019-10.vhdx")]);
    let o = discover(&sshd, "hyperv", "WinSrv2019");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}
crate::register!(discovers_the_top_of_each_hyperv_disk);
