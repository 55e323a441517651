//! Integration tests: real files, real FUSE mounts, real consumers, independent readers.

mod cli;
mod common;
mod corpus;
mod vhd;
mod vhd_bad;
