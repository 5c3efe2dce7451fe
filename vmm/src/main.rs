//! The `keyhold` binary: parses the command line, runs the command, and turns its outcome into
//! one line on stderr and an exit status. Errors are reported here and nowhere else.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use std::io::Write;

use keyhold_vmm::cli::{Cli, Command, LogFormat};
use keyhold_vmm::{demo, keys, launch};
use zeroize::Zeroize;

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("keyhold: {e}");
        return ExitCode::from(2);
    }
    if matches!(
        cli.command,
        Command::Ctl(_)
            | Command::Check(_)
            | Command::Keygen
            | Command::Pubkey
            | Command::OperatorKeygen
            | Command::OperatorPubkey
            | Command::SignNode(_)
            | Command::Completions { .. }
    ) {
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
        if let Err(e) = keyhold_vmm::host::keep_malloc_from_opening_files() {
            eprintln!("keyhold: setting malloc's trim threshold: {e}");
        }
    }
    let status = match &cli.command {
        Command::Run(args) => launch::run(args, process_start),
        Command::Node(args) => launch::node(args, process_start),
        Command::Demo => demo::run().or_else(|e| {
            eprintln!("keyhold: {e}");
            Ok(e.exit_status())
        }),
        Command::Ctl(args) => Ok(keyhold_vmm::ctl::run(args)),
        Command::Check(args) => launch::check(args).map(|summary| {
            println!("{summary}");
            0
        }),
        Command::Keygen => key_command(keygen()),
        Command::Pubkey => key_command(pubkey()),
        Command::OperatorKeygen => {
            key_command(keyhold_vmm::membership::operator::generate().inspect(|_| {
                warn_if_stdout_is_readable_by_others();
            }))
        }
        Command::OperatorPubkey => key_command(operator_pubkey()),
        Command::SignNode(args) => key_command(keyhold_vmm::membership::operator::sign_node(
            &args.operator_key,
            args.id,
            args.address,
            &args.public_key,
        )),
        Command::Completions { shell } => {
            keyhold_vmm::docs_gen::completions(*shell);
            Ok(0)
        }
        Command::Man { dir } => match keyhold_vmm::docs_gen::man_pages(dir) {
            Ok(pages) => {
                println!("wrote {} man pages to {}", pages.len(), dir.display());
                Ok(0)
            }
            Err(e) => {
                eprintln!("keyhold: writing man pages to {}: {e}", dir.display());
                Ok(2)
            }
        },
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

fn keygen() -> Result<String, String> {
    warn_if_stdout_is_readable_by_others();
    Ok(keys::generate().map_err(|e| e.to_string())?.private_base64())
}

/// `keygen > file` with the usual umask makes a key file anyone on the host can read; say so,
/// as `wg genkey` does (a node refuses such a file later anyway).
fn warn_if_stdout_is_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata("/proc/self/fd/1") else { return };
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_file() && mode & 0o077 != 0 {
        eprintln!(
            "keyhold: warning: writing a private key to a file others may read (mode {mode:o}); \
             chmod 600 it, or run `umask 077` first"
        );
    }
}

fn pubkey() -> Result<String, String> {
    let mut text = String::new();
    std::io::stdin().read_line(&mut text).map_err(|e| format!("reading stdin: {e}"))?;
    let secret = keys::decode_private(&text).map_err(|e| format!("stdin: {e}"));
    text.zeroize();
    Ok(secret?.public_base64())
}

fn operator_pubkey() -> Result<String, String> {
    let mut text = String::new();
    std::io::stdin().read_line(&mut text).map_err(|e| format!("reading stdin: {e}"))?;
    let public =
        keyhold_vmm::membership::operator::public(&text).map_err(|e| format!("stdin: {e}"));
    text.zeroize();
    public
}

/// A log line in `--log-format json`, fields in this order.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    time: String,
    level: &'a str,
    target: &'a str,
    message: String,
}

fn init_logging(cli: &Cli) -> Result<(), String> {
    // virtio-queue logs every malformed ring a guest offers as an error; the device reports
    // the outcome itself (NEEDS_RESET, a status code), so those lines are only wanted at -vv.
    let level = match cli.verbose {
        0 => "warn,virtio_queue=off",
        1 => "info,virtio_queue=off",
        _ => "debug",
    };
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    builder.format_target(false);
    if cli.log_format == LogFormat::Json {
        builder.format(|out, record| {
            let line = JsonLine {
                time: out.timestamp_micros().to_string(),
                level: record.level().as_str(),
                target: record.target(),
                message: record.args().to_string(),
            };
            writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default())
        });
    }
    if let Some(path) = &cli.log_file {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    builder.init();
    Ok(())
}
