//! vdiskfs: VHD, VHDX, VMDK and XVA snapshot chains as flat raw files, through FUSE.
//!
//! ```text
//!  open        IMAGE → Disks: the top through the gate, the format, the chain (open.rs)
//!    │
//!  Source      positional reads of one file (local file, block device; later ssh, http)
//!    │         every file an image names comes through the gate (gate.rs)
//!  Layer       one image: map(voff) → Data{source, off} | Zero | Parent     (formats/)
//!    │
//!  Chain       top → base, parent identity checked; a cached merged block map
//!    │
//!  Disk        Chain + optional copy-on-write overlay for writes; a composed disk's chain is
//!    │         one layer over parts: a generated partition table, then each part's chain
//!    │
//!  fs          inode table of Disks: read / write / lseek / statfs as plain Rust returning Result
//!    │
//!  fuse        thin fuser::Filesystem adapter: Result → reply, Error → errno
//! ```
//!
//! Beside the read path: `export` writes a disk to a file or block device, and `sync` keeps a
//! record of the chain a target holds and writes only the layers above it (warm migration).
//!
//! The library is the engine; the command line (`cli`, `cmd/`) belongs to the binary. See
//! ARCHITECTURE.md for the rule each layer keeps and where new formats and sources plug in.

pub mod cache;
pub mod chain;
pub mod compose;
pub mod disk;
pub mod error;
pub mod export;
pub mod formats;
pub mod fs;
pub mod gate;
pub mod holders;
pub mod layer;
pub mod open;
pub mod overlay;
pub mod progress;
pub mod source;
pub mod sync;

pub use error::{Error, ErrorKind, Kind, Result};
