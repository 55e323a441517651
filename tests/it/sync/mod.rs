//! Warm migration through the whole stack, once per hypervisor: the base exported with
//! `--exclude-top` while the VM runs, snapshots taken the way the hypervisor takes them (the
//! running top freezes and a new child becomes the running top), a sync with `--exclude-top`,
//! and the last delta synced after the VM stops. Every delta zeroes data the target holds
//! (VHDX ZERO/UNMAPPED blocks, SESparse zero and unmapped grains, VMDK zeroed grains; explicit
//! zeros in VHD, which has no zero blocks). The target is compared with the model and with an
//! independent reader of the chain: libvhdi for VHD and VHDX (except under ZERO/UNMAPPED
//! blocks, which it reads from the parent), qemu-img for VMDK.
//!
//! - `guest.rs`: a guest file system written between snapshots is intact after the last sync.
//! - `refuse.rs`: every wrong move is refused with one line; a sync killed with -9 is finished
//!   by running it again.

mod guest;
mod refuse;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use testkit::vhd::{Dialect, VhdBuilder};
use testkit::vhdx::VhdxBuilder;
use testkit::vmdk::{DeltaBuilder, write_flat};

use crate::common::*;

pub const MIB: u64 = 1 << 20;
/// The disk of every scenario: 32 MiB of base data, then a hole.
pub const SIZE: u64 = 40 * MIB;

/// A hypervisor's chain: frozen layers, and a running top that takes the guest's writes.
pub trait Vm {
    /// The running top: what IMAGE names.
    fn top(&self) -> PathBuf;
    /// The top of the frozen chain below the running top.
    fn frozen(&self) -> PathBuf;
    /// The guest writes `data` at `off` (both multiples of 4 KiB).
    fn write(&mut self, off: u64, data: &[u8]);
    /// The guest zeroes `[off, off + len)` (multiples of 2 MiB): zero or unmapped blocks where
    /// the format has them.
    fn zero(&mut self, off: u64, len: u64);
    /// The hypervisor's snapshot: the running top freezes, a new empty child runs.
    fn snapshot(&mut self);
    /// The VM stops: the running top is complete (ESXi releases the lock on its extent).
    fn stop(&mut self);
    /// An independent reader's bytes of the chain whose top is `top`, and ranges where that
    /// reader is known to be wrong (left out of the comparison).
    fn oracle(&self, top: &Path) -> (Vec<u8>, Vec<(u64, u64)>);
}

/// Writes in 4 KiB-aligned runs of the non-zero parts of `data` (a base as a hypervisor stores
/// it: holes stay unallocated).
fn write_nonzero(data: &[u8], mut w: impl FnMut(u64, &[u8])) {
    let unit = 64 << 10;
    for (i, c) in data.chunks(unit).enumerate() {
        if c.iter().any(|&b| b != 0) {
            w((i * unit) as u64, c);
        }
    }
}

/// XenServer: VHD files; the running VDI keeps its file name, and a snapshot renames the frozen
/// content to a new file below it (its footer UUID unchanged).
pub struct XenVhd {
    dir: PathBuf,
    snaps: usize,
    running: VhdBuilder,
    frozen: PathBuf,
}

impl XenVhd {
    pub fn new(dir: &Path, base: &[u8]) -> XenVhd {
        let frozen = dir.join("base-3f1c.vhd");
        let mut b = VhdBuilder::dynamic(base.len() as u64).dialect(Dialect::Xen);
        write_nonzero(base, |o, d| {
            b.write(o, d);
        });
        b.build(&frozen).unwrap();
        let running = VhdBuilder::differencing(&frozen).unwrap().dialect(Dialect::Xen);
        let vm = XenVhd { dir: dir.to_path_buf(), snaps: 0, running, frozen };
        vm.running.build(&vm.top()).unwrap();
        vm
    }
}

impl Vm for XenVhd {
    fn top(&self) -> PathBuf {
        self.dir.join("e2a27957-vdi.vhd")
    }
    fn frozen(&self) -> PathBuf {
        self.frozen.clone()
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        self.running.write(off, data);
        self.running.build(&self.top()).unwrap();
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.write(off, &vec![0; len as usize]);
    }
    fn snapshot(&mut self) {
        self.snaps += 1;
        self.frozen = self.dir.join(format!("snap{}-c46c.vhd", self.snaps));
        std::fs::rename(self.top(), &self.frozen).unwrap();
        self.running = VhdBuilder::differencing(&self.frozen).unwrap().dialect(Dialect::Xen);
        self.running.build(&self.top()).unwrap();
    }
    fn stop(&mut self) {}
    fn oracle(&self, top: &Path) -> (Vec<u8>, Vec<(u64, u64)>) {
        (vhdimount_top(top), vec![])
    }
}

/// Hyper-V: a `.vhdx` base and `.avhdx` checkpoints named after a GUID; zeroing alternates
/// ZERO and UNMAPPED blocks (libvhdi reads those from the parent, so they are masked).
pub struct HyperV {
    dir: PathBuf,
    running: VhdxBuilder,
    top: PathBuf,
    frozen: PathBuf,
    masked: Vec<(u64, u64)>,
    toggle: bool,
}

impl HyperV {
    pub fn new(dir: &Path, base: &[u8]) -> HyperV {
        let frozen = dir.join("WinSrv2019-1.vhdx");
        let mut b = VhdxBuilder::dynamic(base.len() as u64);
        write_nonzero(base, |o, d| {
            b.write(o, d);
        });
        b.build(&frozen).unwrap();
        let mut vm =
            HyperV { dir: dir.to_path_buf(), running: b, top: frozen.clone(), frozen, masked: vec![], toggle: false };
        vm.start_child();
        vm
    }

    fn start_child(&mut self) {
        self.running = VhdxBuilder::differencing(&self.top).unwrap();
        let g = testkit::vhdx::guid_text(&testkit::random_uuid()).to_uppercase();
        self.top = self.dir.join(format!("WinSrv2019-1_{}.avhdx", g.trim_matches(['{', '}'])));
        self.running.build(&self.top).unwrap();
    }
}

impl Vm for HyperV {
    fn top(&self) -> PathBuf {
        self.top.clone()
    }
    fn frozen(&self) -> PathBuf {
        self.frozen.clone()
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        self.running.write(off, data);
        self.running.build(&self.top).unwrap();
    }
    fn zero(&mut self, off: u64, len: u64) {
        for b in off / (2 * MIB)..(off + len) / (2 * MIB) {
            self.toggle = !self.toggle;
            if self.toggle {
                self.running.zero_block(b)
            } else {
                self.running.unmap_block(b)
            };
        }
        self.masked.push((off, len));
        self.running.build(&self.top).unwrap();
    }
    fn snapshot(&mut self) {
        self.frozen = self.top.clone();
        self.start_child();
    }
    fn stop(&mut self) {}
    fn oracle(&self, top: &Path) -> (Vec<u8>, Vec<(u64, u64)>) {
        (vhdimount_top(top), self.masked.clone())
    }
}

/// ESXi: a descriptor + `-flat.vmdk` base and SESparse snapshots. While the VM runs, the
/// running top's `-sesparse.vmdk` cannot be opened (here: it is moved away); its descriptor
/// reads fine. Zeroing alternates zero and unmapped grains.
pub struct Esxi {
    dir: PathBuf,
    snaps: usize,
    running: DeltaBuilder,
    frozen: PathBuf,
    locked: bool,
    toggle: bool,
}

impl Esxi {
    pub fn new(dir: &Path, base: &[u8]) -> Esxi {
        let (frozen, _) = write_flat(dir, "Windows-2019", base, "vmfs").unwrap();
        let running = DeltaBuilder::sesparse(&frozen).unwrap();
        let mut vm = Esxi { dir: dir.to_path_buf(), snaps: 1, running, frozen, locked: true, toggle: false };
        vm.build();
        vm
    }

    fn name(&self) -> String {
        format!("Windows-2019-{:06}", self.snaps)
    }

    /// Writes the running top; moves its extent away while the VM holds it.
    fn build(&mut self) {
        let ext = self.dir.join(format!("{}-sesparse.vmdk", self.name()));
        let locked = ext.with_extension("vmdk.locked");
        let _ = std::fs::remove_file(&locked);
        self.running.build(&self.dir, &self.name()).unwrap();
        if self.locked {
            std::fs::rename(&ext, &locked).unwrap();
        }
    }
}

impl Vm for Esxi {
    fn top(&self) -> PathBuf {
        self.dir.join(format!("{}.vmdk", self.name()))
    }
    fn frozen(&self) -> PathBuf {
        self.frozen.clone()
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        self.running.write(off, data);
        self.build();
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.toggle = !self.toggle;
        if self.toggle {
            self.running.zero(off, len)
        } else {
            self.running.unmap(off, len)
        };
        self.build();
    }
    fn snapshot(&mut self) {
        let locked = std::mem::replace(&mut self.locked, false);
        self.build();
        self.frozen = self.top();
        self.snaps += 1;
        self.running = DeltaBuilder::sesparse(&self.frozen).unwrap();
        self.locked = locked;
        self.build();
    }
    fn stop(&mut self) {
        self.locked = false;
        self.build();
    }
    fn oracle(&self, top: &Path) -> (Vec<u8>, Vec<(u64, u64)>) {
        (qemu_raw(top, "vmdk"), vec![])
    }
}

/// VMware Workstation style: a monolithicSparse base and sparse children made and written by
/// qemu (zeroed_grain=on, so `write -z` leaves zeroed grains).
pub struct SparseVmdk {
    dir: PathBuf,
    snaps: usize,
}

impl SparseVmdk {
    pub fn new(dir: &Path, base: &[u8]) -> SparseVmdk {
        let raw = dir.join("base.raw");
        std::fs::write(&raw, base).unwrap();
        sh(&format!("qemu-img convert -f raw -O vmdk {} {}/vm.vmdk", raw.display(), dir.display()));
        std::fs::remove_file(&raw).unwrap();
        let mut vm = SparseVmdk { dir: dir.to_path_buf(), snaps: 0 };
        vm.snapshot();
        vm
    }

    fn qemu_io(&self, cmd: &str) {
        sh(&format!("qemu-io -f vmdk -c '{cmd}' {} > /dev/null", self.top().display()));
    }
}

impl Vm for SparseVmdk {
    fn top(&self) -> PathBuf {
        self.dir.join(format!("vm-{:06}.vmdk", self.snaps))
    }
    fn frozen(&self) -> PathBuf {
        match self.snaps {
            1 => self.dir.join("vm.vmdk"),
            n => self.dir.join(format!("vm-{:06}.vmdk", n - 1)),
        }
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        let src = self.dir.join("write.bin");
        std::fs::write(&src, data).unwrap();
        self.qemu_io(&format!("write -s {} {off} {}", src.display(), data.len()));
        std::fs::remove_file(src).unwrap();
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.qemu_io(&format!("write -z {off} {len}"));
    }
    fn snapshot(&mut self) {
        let parent = self.top();
        self.snaps += 1;
        let parent = if self.snaps == 1 { self.dir.join("vm.vmdk") } else { parent };
        sh(&format!(
            "qemu-img create -q -f vmdk -o zeroed_grain=on -b {} -F vmdk {}",
            parent.file_name().unwrap().to_string_lossy(),
            self.top().display()
        ));
    }
    fn stop(&mut self) {}
    fn oracle(&self, top: &Path) -> (Vec<u8>, Vec<(u64, u64)>) {
        (qemu_raw(top, "vmdk"), vec![])
    }
}

/// A VM and the model of its disk as the guest sees it.
pub struct Tracked<V: Vm> {
    pub vm: V,
    pub model: Vec<u8>,
}

impl<V: Vm> Tracked<V> {
    pub fn write(&mut self, off: u64, data: &[u8]) {
        self.vm.write(off, data);
        self.model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    pub fn zero(&mut self, off: u64, len: u64) {
        self.vm.zero(off, len);
        self.model[off as usize..(off + len) as usize].fill(0);
    }
    /// The target equals the model and the independent reader's view of `top`.
    pub fn check(&self, what: &str, got: &[u8], top: &Path) {
        assert_same(&format!("{what}: target vs model"), got, &self.model);
        let (mut want, masked) = self.vm.oracle(top);
        let mut got = got.to_vec();
        for (o, l) in masked {
            got[o as usize..(o + l) as usize].fill(0);
            want[o as usize..(o + l) as usize].fill(0);
        }
        assert_same(&format!("{what}: target vs independent reader"), &got, &want);
    }
}

/// Where a scenario writes: a file (state beside it) or a block device (state with --state).
pub struct Dest {
    pub target: PathBuf,
    pub state: PathBuf,
    explicit_state: bool,
    _lo: Option<Loop>,
}

impl Dest {
    pub fn file(dir: &Path) -> Dest {
        let target = dir.join("vm.raw");
        Dest { state: dir.join("vm.raw.vdiskfs-sync.json"), target, explicit_state: false, _lo: None }
    }
    /// A loop device over a file as large as the disk plus 1 MiB.
    pub fn device(dir: &Path, size: u64) -> Dest {
        let img = dir.join("lun.img");
        std::fs::write(&img, vec![0u8; (size + MIB) as usize]).unwrap();
        let o = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&img).output().unwrap();
        assert!(o.status.success(), "losetup: {}", stderr(&o));
        let lo = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
        Dest { target: PathBuf::from(&lo.0), state: dir.join("vm.state.json"), explicit_state: true, _lo: Some(lo) }
    }
    /// `vdiskfs CMD [--state FILE] EXTRA... IMAGE TARGET`.
    pub fn run(&self, cmd: &str, extra: &[&str], image: &Path) -> std::process::Output {
        let mut args: Vec<&OsStr> = vec![os(cmd)];
        if self.explicit_state {
            args.extend([os("--state"), self.state.as_os_str()]);
        }
        args.extend(extra.iter().map(os));
        args.extend([image.as_os_str(), self.target.as_os_str()]);
        vdiskfs(args)
    }
    pub fn ok(&self, cmd: &str, extra: &[&str], image: &Path) -> String {
        let o = self.run(cmd, extra, image);
        assert!(o.status.success(), "{cmd} {extra:?} {}: {}", image.display(), stderr(&o));
        stderr(&o)
    }
    pub fn read(&self) -> Vec<u8> {
        let mut d = std::fs::read(&self.target).unwrap();
        d.truncate(SIZE as usize);
        d
    }
    pub fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&self.state).unwrap()).unwrap()
    }
}

/// Base data over the first 32 MiB; the rest is a hole.
pub fn base_data() -> Vec<u8> {
    let mut d = vec![0u8; SIZE as usize];
    d[..(32 * MIB) as usize].copy_from_slice(&pattern(1, (32 * MIB) as usize));
    d
}

/// The whole warm migration of `vm` onto `dest`, checked at every step.
fn warm_migration<V: Vm>(vm: V, dest: &Dest) {
    let mut t = Tracked { vm, model: base_data() };
    // 1. The base, while the VM runs: the running top is left out.
    let out = dest.ok("export", &["--exclude-top"], &t.vm.top());
    assert!(out.contains("sync state") && out.contains("names"), "{out}");
    t.check("export --exclude-top", &dest.read(), &t.vm.frozen());
    assert_eq!(dest.state()["layers"].as_array().unwrap().len(), 1);
    // 2-3. The guest writes to the running top (data, and zeros over base data); snapshot.
    t.write(MIB + (64 << 10), &pattern(11, 128 << 10));
    t.write(20 * MIB, &pattern(12, MIB as usize));
    t.write(SIZE - (64 << 10), &pattern(13, 64 << 10));
    t.zero(4 * MIB, 2 * MIB);
    t.zero(10 * MIB, 2 * MIB);
    t.vm.snapshot();
    // 4. Sync what the first snapshot froze; the new running top is left out.
    let out = dest.ok("sync", &["--exclude-top"], &t.vm.top());
    assert!(out.contains("now holds"), "{out}");
    t.check("sync --exclude-top", &dest.read(), &t.vm.frozen());
    assert_eq!(dest.state()["layers"].as_array().unwrap().len(), 2);
    assert!(dest.state()["pending"].is_null());
    // 5. More writes (zeros over the first delta's data too); snapshot; the last delta; stop.
    t.write(5 * MIB, &pattern(21, 64 << 10));
    t.write(30 * MIB, &pattern(22, (2 * MIB) as usize));
    t.zero(20 * MIB, 2 * MIB);
    t.zero(14 * MIB, 2 * MIB);
    t.vm.snapshot();
    t.write(0, &pattern(31, 64 << 10));
    t.write(36 * MIB, &pattern(32, 64 << 10));
    t.zero(24 * MIB, 2 * MIB);
    t.vm.stop();
    // The dry run names the two new layers and writes nothing.
    let before = dest.read();
    let o = dest.run("sync", &["--dry-run", "--json"], &t.vm.top());
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["layers"].as_array().unwrap().len(), 2, "{plan}");
    assert_eq!(plan["held_depth"], 2);
    let ranges: u64 = plan["ranges"].as_array().unwrap().iter().map(|r| r["length"].as_u64().unwrap()).sum();
    assert_eq!(plan["total_bytes"].as_u64(), Some(ranges));
    assert!(plan["data_bytes"].as_u64().unwrap() >= 2 * MIB, "{plan}");
    assert!(dest.read() == before, "a dry run wrote to the target");
    // 6. The last delta, the VM stopped: the target equals the whole chain.
    dest.ok("sync", &[], &t.vm.top());
    t.check("final sync", &dest.read(), &t.vm.top());
    assert_eq!(dest.state()["layers"].as_array().unwrap().len(), 4);
    let out = dest.ok("sync", &[], &t.vm.top());
    assert!(out.contains("nothing to write"), "{out}");
}

crate::register!(xenserver_vhd_chain_warm_migration_equals_the_chain_and_libvhdi);
fn xenserver_vhd_chain_warm_migration_equals_the_chain_and_libvhdi() {
    need("vhdimount");
    need_fuse();
    let t = tmpdir();
    warm_migration(XenVhd::new(t.path(), &base_data()), &Dest::file(t.path()));
}

crate::register!(hyper_v_vhdx_chain_warm_migration_onto_a_block_device_equals_the_chain);
fn hyper_v_vhdx_chain_warm_migration_onto_a_block_device_equals_the_chain() {
    need("vhdimount");
    need("losetup");
    need_fuse();
    let t = tmpdir();
    let dest = Dest::device(t.path(), SIZE);
    warm_migration(HyperV::new(t.path(), &base_data()), &dest);
}

crate::register!(esxi_flat_and_sesparse_warm_migration_never_opens_the_running_extent);
fn esxi_flat_and_sesparse_warm_migration_never_opens_the_running_extent() {
    need("qemu-img");
    let t = tmpdir();
    let vm = Esxi::new(t.path(), &base_data());
    // The running top cannot be opened whole, as on ESXi; left out, its descriptor is enough.
    let o = vdiskfs([os("info"), vm.top().as_os_str()]);
    assert!(!o.status.success() && stderr(&o).contains("sesparse"), "{}", stderr(&o));
    let o = vdiskfs([os("info"), os("--exclude-top"), vm.top().as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("excluded top"));
    warm_migration(vm, &Dest::file(t.path()));
}

crate::register!(vmdk_sparse_chain_warm_migration_equals_qemu);
fn vmdk_sparse_chain_warm_migration_equals_qemu() {
    need("qemu-img");
    need("qemu-io");
    let t = tmpdir();
    warm_migration(SparseVmdk::new(t.path(), &base_data()), &Dest::file(t.path()));
}
