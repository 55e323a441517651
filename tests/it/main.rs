//! Integration tests: real files, real FUSE mounts, real consumers, independent readers.

mod common;
mod harness;

mod cli;
mod compose;
mod compose_write;
mod corpus;
mod faults;
mod fuzz_corpus;
mod gate;
mod http;
mod layering;
mod ops;
mod overlay;
mod overlay_crash;
mod overlay_disks;
mod overlay_faults;
mod overlay_io;
mod races;
mod robust;
mod s3;
mod safety;
mod ssh;
mod sync;
mod target;
mod vhd;
mod vhd_bad;
mod vhdx;
mod vmdk;
mod vmdk_bad;
mod xva;

fn main() {
    harness::main();
}
