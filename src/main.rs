//! The `vdiskfs` command: parse, set up logging, run, map the error to an exit code.

mod cli;
mod cmd;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_target(false).init();
    if cli.command.prints_to_stdout() {
        // `vdiskfs info IMAGE | head -1`: a closed pipe ends the command quietly, as it ends `ls`.
        // SAFETY: restoring the default action of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Err(e) = cmd::run(cli) {
        eprintln!("vdiskfs: {e}");
        std::process::exit(e.exit_code());
    }
}
