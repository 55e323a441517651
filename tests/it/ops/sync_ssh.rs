//! The README's warm migration with `ssh://` images: `vdiskfs sync` over ssh fetches only the
//! newer layers (counted by the test sshd's SFTP relay), and the target equals qemu-img's
//! reading of the chain at each step.

use std::process::Command;

use crate::common::sshd::Sshd;
use crate::common::*;
use crate::sync::{Esxi, MIB, SIZE, Vm};

fn step(sshd: &Sshd, args: &[&str], image: &str, target: &std::path::Path) -> u64 {
    let before = sshd.served();
    let o = Command::new(bin())
        .args(args)
        .args(["--quiet", "--cache-size", "0", "--ssh-command", &sshd.ssh_command(), image])
        .arg(target)
        .output()
        .unwrap();
    assert!(o.status.success(), "vdiskfs {args:?} failed: {}", stderr(&o));
    sshd.served() - before
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).len()
}

/// Bytes of an ESXi snapshot layer's files: the descriptor and its -sesparse.vmdk.
fn layer_len(desc: &std::path::Path) -> u64 {
    let stem = desc.file_stem().unwrap().to_string_lossy();
    file_len(desc) + file_len(&desc.with_file_name(format!("{stem}-sesparse.vmdk")))
}

fn sync_over_ssh_fetches_only_the_newer_layers() {
    need("qemu-img");
    let sshd = Sshd::start();
    let t = tmpdir();
    let mut base = pattern(81, (32 * MIB) as usize);
    base.resize(SIZE as usize, 0);
    let mut vm = Esxi::new(t.path(), &base);
    vm.write(MIB, &pattern(82, (2 * MIB) as usize));
    vm.snapshot();
    let target = t.path().join("out/vm.raw");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let first = step(&sshd, &["export", "--exclude-top"], &sshd.url(&vm.top()), &target);
    assert_same("export over ssh", &std::fs::read(&target).unwrap(), &vm.oracle(&vm.frozen()).0);
    assert!(first >= 32 * MIB, "the export fetched the base: {first} bytes");

    // A snapshot freezes 3 MiB of new writes; the sync fetches those and the tables, not the base.
    let new = 3 * MIB;
    vm.write(20 * MIB, &pattern(83, new as usize));
    vm.snapshot();
    let second = step(&sshd, &["sync", "--exclude-top"], &sshd.url(&vm.top()), &target);
    assert_same("sync over ssh", &std::fs::read(&target).unwrap(), &vm.oracle(&vm.frozen()).0);
    // At most the newly frozen layer's files (read ahead may take all of them), plus the
    // descriptors and headers the chain opens with: never the base's 32 MiB.
    let layer_files = layer_len(&vm.frozen());
    assert!(second >= new, "the sync fetched the new layer's data: {second} bytes");
    assert!(
        second <= layer_files + MIB,
        "the sync fetched only the newer layer ({layer_files} bytes of files): {second} bytes"
    );
    assert!(second * 4 < first, "the sync fetched much less than the export: {second} vs {first} bytes");

    vm.write(2 * MIB, &pattern(84, 4096));
    vm.stop();
    let last = step(&sshd, &["sync"], &sshd.url(&vm.top()), &target);
    assert_same("cutover over ssh", &std::fs::read(&target).unwrap(), &vm.oracle(&vm.top()).0);
    let top_files = layer_len(&vm.top());
    eprintln!(
        "sync over ssh: export fetched {first} bytes; sync {second} (new layer files {layer_files}, \
         data {new}); cutover {last} (last layer files {top_files}, data 4096)"
    );
    assert!(last <= top_files + MIB, "the cutover fetched only the last delta ({top_files} bytes of files): {last}");
    assert!(last * 4 < first, "the cutover fetched much less than the export: {last} vs {first} bytes");
}
crate::register!(sync_over_ssh_fetches_only_the_newer_layers);
