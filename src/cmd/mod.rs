//! The subcommands, one file each, on validated configuration from [`crate::cli`].

mod check;
mod daemon;
mod export;
mod info;
mod map;
mod mount;
mod progress;
mod sync;

use std::path::Path;

use crate::cli::{Cli, Command};
use vdiskfs::disk::Disk;
use vdiskfs::{Error, Result};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mount(a) => mount::run(a.config()?),
        Command::Info(a) => info::run(&a),
        Command::Map(a) => map::run(&a),
        Command::Export(a) => export::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Sync(a) => sync::run(&a),
    }
}

/// Sizes as people read them: `1.5 GiB`.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", U[i]) }
}

/// The disk named `want` (by `<name>.raw` or `<name>`), or the only one.
pub fn one_disk(mut disks: Vec<Disk>, want: Option<&str>, image: &Path) -> Result<Disk> {
    let names = |d: &[Disk]| d.iter().map(|d| d.name().to_string()).collect::<Vec<_>>().join(", ");
    match want {
        Some(n) => {
            let i = disks.iter().position(|d| d.name() == n || d.name().trim_end_matches(".raw") == n).ok_or_else(
                || Error::usage(format!("no disk {n} in {} (it has {})", image.display(), names(&disks))),
            )?;
            Ok(disks.swap_remove(i))
        }
        None if disks.len() == 1 => Ok(disks.remove(0)),
        None => Err(Error::usage(format!(
            "{} holds {} disks ({}); choose one with --disk NAME",
            image.display(),
            disks.len(),
            names(&disks)
        ))),
    }
}
