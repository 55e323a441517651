//! Integration tests: real files, real FUSE mounts, real consumers, independent readers.

mod common;
mod harness;

mod cli;
mod compose;
mod compose_write;
mod corpus;
mod http;
mod layering;
mod overlay;
mod robust;
mod s3;
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
