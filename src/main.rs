use clap::Parser;

fn main() {
    let cli = vdiskfs::cli::Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_target(false).init();
    if let Err(e) = vdiskfs::app::run(cli) {
        eprintln!("vdiskfs: {e}");
        std::process::exit(e.exit_code());
    }
}
