//! Integration tests: real files, real FUSE mounts, real consumers, independent readers.

mod common;

mod cli;
mod corpus;
mod overlay;
mod robust;
mod vhd;
mod vhd_bad;
mod vhdx;
mod vmdk;
mod vmdk_bad;
mod xva;
