//! Integration tests: real files, real FUSE mounts, real consumers, independent readers.

mod common;
mod harness;

mod cli;
mod compose;
mod compose_write;
mod corpus;
mod fuzz_corpus;
mod layering;
mod overlay;
mod robust;
mod ssh;
mod sync;
mod vhd;
mod vhd_bad;
mod vhdx;
mod vmdk;
mod vmdk_bad;
mod xva;

fn main() {
    harness::main();
}
