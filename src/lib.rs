//! vdiskfs: VHD, VHDX, VMDK and XVA snapshot chains as flat raw files, through FUSE.
//!
//! ```text
//!  Source      positional reads of one file (local file, block device; later ssh, http)
//!    │
//!  Layer       one image: map(voff) → Data{source, off} | Zero | Parent     (formats/)
//!    │
//!  Chain       top → base, parent identity checked; a cached merged block map
//!    │
//!  Disk        Chain (+ later an overlay for writes)
//!    │
//!  fs          inode table of Disks: read / lseek / statfs as plain Rust returning Result
//!    │
//!  fuse        thin fuser::Filesystem adapter: Result → reply, Error → errno
//! ```

pub mod app;
pub mod chain;
pub mod check;
pub mod cli;
pub mod disk;
pub mod error;
pub mod export;
pub mod formats;
pub mod fs;
pub mod layer;
pub mod overlay;
pub mod source;

pub use error::{Error, Kind, Result};
