//! The `keyhold` binary: parses the command line, runs the command, and turns its outcome into
//! one line on stderr and an exit status. Errors are reported here and nowhere else.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use keyhold_vmm::cli::{Cli, Command};
use keyhold_vmm::launch;

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let status = match &cli.command {
        Command::Run(args) => launch::run(args, process_start),
        Command::Node(args) => launch::node(args, process_start),
    };
    let status = status.unwrap_or_else(|e| {
        eprintln!("keyhold: {e}");
        e.exit_status()
    });
    ExitCode::from(status)
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .init();
}
