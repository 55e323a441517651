//! The subcommands, one file each, on validated configuration from [`crate::cli`].

mod check;
mod daemon;
mod export;
mod info;
mod map;
mod mount;
mod progress;

use crate::cli::{Cli, Command};
use vdiskfs::Result;

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mount(a) => mount::run(a.config()?),
        Command::Info(a) => info::run(&a),
        Command::Map(a) => map::run(&a),
        Command::Export(a) => export::run(&a),
        Command::Check(a) => check::run(&a),
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
