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
    if matches!(cli.command, Command::Ctl(_) | Command::Keygen | Command::Pubkey) {
        restore_sigpipe();
    }
    if matches!(cli.command, Command::Run(_) | Command::Node(_)) {
        // Before any thread exists, so every thread inherits the mask: SIGTERM and SIGINT
        // then stop the partitions in order instead of killing the process.
        if let Err(e) = keyhold_vmm::host::block_shutdown_signals() {
            eprintln!("keyhold: blocking SIGTERM and SIGINT: {e}");
        }
        if let Err(e) = keyhold_vmm::host::forbid_core_dumps() {
            eprintln!("keyhold: making the process non-dumpable: {e}");
        }
    }
    let status = match &cli.command {
        Command::Run(args) => launch::run(args, process_start),
        Command::Node(args) => launch::node(args, process_start),
        Command::Demo => demo::run().or_else(|e| {
            eprintln!("keyhold: {e}");
            Ok(1)
        }),
        Command::Ctl(args) => Ok(ctl(args)),
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

/// Lets the short-lived output commands end quietly when their reader goes away (`| head`), as
/// Unix tools do, instead of failing a write; the VMM commands keep ignoring SIGPIPE and handle
/// write errors themselves.
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to the default has no preconditions; no handler
    // of ours is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// `keyhold ctl`: one request to a node's API, its JSON answer printed.
fn ctl(args: &keyhold_vmm::cli::CtlArgs) -> u8 {
    let (method, path) = args.request.route();
    match keyhold_vmm::api::request(&args.socket, method, &path) {
        Ok((200, body)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&body)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(body);
            println!("{pretty}");
            0
        }
        Ok((code, body)) => {
            eprintln!("keyhold: the node answered {code}: {}", body.trim());
            1
        }
        Err(e) => {
            eprintln!("keyhold: no node answers on {}: {e}", args.socket.display());
            2
        }
    }
}

fn keygen() -> Result<String, String> {
    Ok(keys::generate().map_err(|e| e.to_string())?.private_base64())
}

fn pubkey() -> Result<String, String> {
    let mut text = String::new();
    std::io::stdin().read_line(&mut text).map_err(|e| format!("reading stdin: {e}"))?;
    let secret = keys::decode_private(&text).map_err(|e| format!("stdin: {e}"));
    text.zeroize();
    Ok(secret?.public_base64())
}

fn init_logging(verbose: u8) {
    // virtio-queue logs every malformed ring a guest offers as an error; the device reports
    // the outcome itself (NEEDS_RESET, a status code), so those lines are only wanted at -vv.
    let level = match verbose {
        0 => "warn,virtio_queue=off",
        1 => "info,virtio_queue=off",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .init();
}
