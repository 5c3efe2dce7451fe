//! The `keyhold` binary: parses the command line, runs the command, and turns its outcome into
//! one line on stderr and an exit status. Errors are reported here and nowhere else.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use keyhold_vmm::cli::{Cli, Command};
use keyhold_vmm::{demo, keys, launch};
use zeroize::Zeroize;

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let status = match &cli.command {
        Command::Run(args) => launch::run(args, process_start),
        Command::Node(args) => launch::node(args, process_start),
        Command::Demo => demo::run().or_else(|e| {
            eprintln!("keyhold: {e}");
            Ok(1)
        }),
        Command::Keygen => key_command(keygen()),
        Command::Pubkey => key_command(pubkey()),
    };
    let status = status.unwrap_or_else(|e| {
        eprintln!("keyhold: {e}");
        e.exit_status()
    });
    ExitCode::from(status)
}

/// Prints what a key command made, or reports its error (exit status 2: bad input).
fn key_command(result: Result<String, String>) -> Result<u8, launch::LaunchError> {
    match result {
        Ok(line) => {
            println!("{line}");
            Ok(0)
        }
        Err(e) => {
            eprintln!("keyhold: {e}");
            Ok(2)
        }
    }
}

fn keygen() -> Result<String, String> {
    let secret = keys::generate().map_err(|e| e.to_string())?;
    Ok(keys::encode(&secret.to_bytes()))
}

fn pubkey() -> Result<String, String> {
    let mut text = String::new();
    std::io::stdin().read_line(&mut text).map_err(|e| format!("reading stdin: {e}"))?;
    let secret = keys::decode_private(&text).map_err(|e| format!("stdin: {e}"))?;
    text.zeroize();
    Ok(keys::public_of(&secret))
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
