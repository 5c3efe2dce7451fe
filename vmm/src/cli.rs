//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::seccomp::{Switch, ThreadKind};

/// keyhold: a minimal KVM VMM whose partitions talk over secure channels.
#[derive(Debug, Parser)]
#[command(name = "keyhold", version = crate::VERSION, about, max_term_width = 100)]
pub struct Cli {
    /// More log output (-v: info, -vv: debug). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// How log lines look: `text` for people, `json` (one object per line: time, level,
    /// target, message) for log collectors.
    #[arg(long, value_name = "FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
    /// Append log lines to FILE (made with mode 600 if new) instead of writing them to stderr.
    /// Consoles and one-line errors stay on stdout and stderr.
    #[arg(long, value_name = "FILE", global = true)]
    pub log_file: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The formats of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `[time LEVEL] message`.
    #[default]
    Text,
    /// `{"time": ..., "level": ..., "target": ..., "message": ...}`.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one or more bare-metal partitions and wait until all have stopped.
    Run(RunArgs),
    /// Run a node: the partitions of a node.toml, each with virtio-rng and a secure-channel
    /// device, sharing one connection management mechanism.
    Node(NodeArgs),
    /// Ask a running node, through its control API socket.
    Ctl(CtlArgs),
    /// Check a node.toml as a start would (the file, the cluster file, the key and its
    /// permissions, every firmware image, /dev/kvm) without starting anything: exit status 0
    /// with a summary, or 2 with the first problem.
    Check(CheckArgs),
    /// Run two linked nodes on this machine and show channels within and across nodes, and a
    /// hostile partition whose forgeries are all refused. Needs nothing prepared.
    Demo,
    /// Print a new private key (base64 X25519), as `wg genkey` does.
    Keygen,
    /// Read a private key on stdin and print its public key, as `wg pubkey` does.
    Pubkey,
    /// Print a new cluster operator key (base64 Ed25519 seed): it signs each node's
    /// registration for membership from etcd. Keep it off the nodes.
    OperatorKeygen,
    /// Read an operator key on stdin and print its public key, for node.toml's
    /// `[etcd] operator_public_key`.
    OperatorPubkey,
    /// Sign a node's registration with the operator key: prints the signature for the node's
    /// `[etcd] registration_signature`. It covers the node's ID, address and static public key,
    /// so etcd write access alone can neither add a node nor swap its key.
    SignNode(SignNodeArgs),
    /// Print the completion script for SHELL (for example
    /// `keyhold completions bash > /etc/bash_completion.d/keyhold`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (keyhold.1 and one per subcommand) into DIR.
    Man {
        /// The directory (made if missing), for example /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

const RUN_AFTER_HELP: &str = "\
Each partition is a KVM VM with its own RAM and one vCPU, entered in 64-bit mode at CPL 3 with
RDI pointing at the boot-info block (docs/GUEST.md). Its console is a 16550 UART at port 0x3f8;
firmware ends by writing a 32-bit status to port 0xf4. With several partitions, each console
line is prefixed with [p<ID>].

Exit status:
  0-119  the firmware status (with several partitions: the first non-zero one)
  120    the firmware wrote a status above 119 (the report gives it)
  121    triple fault: the guest took an exception it has no handler for
  122    KVM could not emulate a guest instruction (internal-error exit)
  123    the guest touched an I/O port or MMIO address where no device is
  124    the partition ran past --timeout
  125    the VMM failed while running the partition, or KVM exited unexpectedly
  130    SIGINT asked the node to stop (every partition is stopped first)
  143    SIGTERM asked the node to stop (likewise)
  159    a thread made a system call its seccomp filter does not allow (the report names it)
  2      bad input: arguments, firmware file, memory size, /dev/kvm missing or not permitted
  1      the host refused a resource (memory, threads) before boot

Needs read-write access to /dev/kvm (root, or membership of its group).";

/// Arguments of `keyhold run`.
#[derive(Debug, Args)]
#[command(after_help = RUN_AFTER_HELP)]
pub struct RunArgs {
    /// Firmware image (static ELF64) of a partition; repeat for more partitions, numbered
    /// from --partition-id upwards in the order given.
    #[arg(long, value_name = "PATH")]
    pub firmware: Vec<PathBuf>,
    /// A partition with an explicit ID; may be repeated and mixed with --firmware.
    #[arg(long, value_name = "ID=PATH", value_parser = parse_partition)]
    pub partition: Vec<(u32, PathBuf)>,
    /// The argument string of partition ID (firmware reads it from its boot info, as
    /// space-separated key=value words); may be repeated for other partitions.
    #[arg(long, value_name = "ID=TEXT", value_parser = parse_partition_arg)]
    pub arg: Vec<(u32, String)>,
    /// ID of the first --firmware partition.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub partition_id: u32,
    /// Guest RAM per partition, in MiB (2 to 3072, and no more than the host has).
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    pub memory: u64,
    /// Write the consoles to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// When a partition stops, write its RAM to DIR/partition-<ID>.ram (for debugging).
    #[arg(long, value_name = "DIR")]
    pub dump_ram: Option<PathBuf>,
    /// Stop any partition still running after SECS seconds (fractions allowed).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// System-call filters.
    #[command(flatten)]
    pub seccomp: SeccompArgs,
}

/// The containment switches of `keyhold run` and `keyhold node` (docs/SECURITY.md).
#[derive(Debug, Args)]
pub struct SeccompArgs {
    /// Each thread runs under a seccomp filter of the system calls its kind needs; `off` runs
    /// without them, for debugging only (with a warning).
    #[arg(long = "seccomp", value_name = "on|off", default_value = "on")]
    pub switch: Switch,
    /// Self-test of the containment: THREAD (vcpu, devices, link-setup, api, main) makes a
    /// system call its filter does not allow, right after installing it; with the filters on
    /// the process stops with status 159 and the report.
    #[arg(long = "seccomp-selftest", value_name = "THREAD", hide = true)]
    pub selftest: Option<ThreadKind>,
}

/// Arguments of `keyhold ctl`.
#[derive(Debug, Args)]
#[command(after_help = "\
Which node: --socket, else $KEYHOLD_SOCKET, else the one socket in /run/keyhold/ (where the
systemd unit puts it). Options may come before or after the request.

Every request but `show` and `metrics` prints the node's JSON answer; `show` prints a summary
(JSON with --json), `metrics` the Prometheus text. Exit status: 0 answered, 1 the node refused
the request, 2 no node answers on the socket. The same routes answer
curl --unix-socket SOCKET http://keyhold/v1/...; docs/API.md lists them.")]
pub struct CtlArgs {
    /// The node's API socket (api_socket in its node.toml).
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// JSON output, for every request (the default for all but `show` and `metrics`).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to ask.
    #[command(subcommand)]
    pub request: CtlRequest,
}

/// Requests of `keyhold ctl`.
#[derive(Debug, Subcommand)]
pub enum CtlRequest {
    /// One screen: the node, its links, partitions, channels and refusals.
    Show,
    /// The node's ID and build.
    Node,
    /// The node's partitions and whether they still run.
    Partitions,
    /// Every connection-table entry: endpoints, state, counters (never keys).
    Channels,
    /// Each partition's device counters.
    Stats,
    /// The host links: state, address, last handshake and failure, bytes and frames.
    Links,
    /// Where the members come from; from etcd, whether the node follows it now, since when,
    /// the members and the revision.
    Membership,
    /// The most recent audit records.
    Audit,
    /// Every counter in the Prometheus text format (GET /metrics).
    Metrics,
    /// Stop one partition now: its channels close (their peers see why), the others run on,
    /// and the node waits for it to be started again.
    Stop {
        /// The partition.
        partition: u32,
    },
    /// Start a stopped partition again: a fresh VM from its configuration (firmware read
    /// anew, empty RAM, new devices), whatever stopped it.
    Start {
        /// The partition.
        partition: u32,
    },
    /// Reset a partition's vsock transport: every vsock connection it has ends (the other ends
    /// get an RST), and its driver is told to reset its sockets (TRANSPORT_RESET).
    ResetVsock {
        /// The partition.
        partition: u32,
    },
    /// Read the node's cluster file again and apply it, as SIGHUP does: new nodes are linked,
    /// removed ones unlinked (their channels close), changed keys re-handshake.
    Reload,
    /// End a channel now; its peer learns it is closed.
    Revoke {
        /// The partition holding the channel.
        partition: u32,
        /// The channel ID (decimal or 0x hexadecimal, as `channels` prints it).
        channel: String,
    },
}

impl CtlRequest {
    /// The HTTP method and path of the request (`show` asks several: see `ctl`).
    pub fn route(&self) -> (&'static str, String) {
        match self {
            Self::Show | Self::Node => ("GET", "/v1/node".into()),
            Self::Partitions => ("GET", "/v1/partitions".into()),
            Self::Channels => ("GET", "/v1/channels".into()),
            Self::Stats => ("GET", "/v1/stats".into()),
            Self::Links => ("GET", "/v1/links".into()),
            Self::Membership => ("GET", "/v1/membership".into()),
            Self::Audit => ("GET", "/v1/audit".into()),
            Self::Metrics => ("GET", "/metrics".into()),
            Self::Revoke { partition, channel } => {
                ("POST", format!("/v1/channels/{partition}/{channel}/revoke"))
            }
            Self::Stop { partition } => ("POST", format!("/v1/partitions/{partition}/stop")),
            Self::Start { partition } => ("POST", format!("/v1/partitions/{partition}/start")),
            Self::ResetVsock { partition } => {
                ("POST", format!("/v1/partitions/{partition}/vsock/reset"))
            }
            Self::Reload => ("POST", "/v1/reload".into()),
        }
    }
}

/// Arguments of `keyhold sign-node`.
#[derive(Debug, Args)]
pub struct SignNodeArgs {
    /// The operator key (from `keyhold operator-keygen`).
    #[arg(long, value_name = "FILE")]
    pub operator_key: PathBuf,
    /// The node's ID.
    #[arg(long)]
    pub id: u32,
    /// Where the node's peers dial it (its `[etcd] advertise`, or its `listen`).
    #[arg(long, value_name = "IP:PORT")]
    pub address: std::net::SocketAddr,
    /// The node's static public key (`keyhold pubkey < node.key`).
    #[arg(long, value_name = "BASE64")]
    pub public_key: String,
}

/// Arguments of `keyhold check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The node's configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of `keyhold node`.
#[derive(Debug, Args)]
#[command(
    after_help = "The node runs until all its partitions have stopped, except that a partition \
stopped with keyhold ctl stop keeps it up, waiting for keyhold ctl start; SIGTERM or SIGINT ends \
it whatever runs. Its exit status is that of keyhold run. See docs/OPERATOR.md for node.toml and \
examples/ for working configs."
)]
pub struct NodeArgs {
    /// The node's configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Stop partitions still running after SECS seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// System-call filters.
    #[command(flatten)]
    pub seccomp: SeccompArgs,
}

fn parse_partition_arg(arg: &str) -> Result<(u32, String), String> {
    let (id, text) = arg.split_once('=').ok_or("expected ID=TEXT, for example 2=\"peer=0:1:7\"")?;
    let id = parse_id(id)?;
    Ok((id, text.to_owned()))
}

fn parse_id(id: &str) -> Result<u32, String> {
    id.trim()
        .parse::<u32>()
        .map_err(|_| format!("partition ID {id:?} is not a number from 0 to {}", u32::MAX))
}

fn parse_partition(arg: &str) -> Result<(u32, PathBuf), String> {
    let (id, path) =
        arg.split_once('=').ok_or("expected ID=PATH, for example 3=target/fixtures/hello.elf")?;
    let id = parse_id(id)?;
    if path.is_empty() {
        return Err("the firmware path after '=' is empty".into());
    }
    Ok((id, PathBuf::from(path)))
}

fn parse_timeout(arg: &str) -> Result<Duration, String> {
    let secs: f64 =
        arg.trim().parse().map_err(|_| format!("{arg:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 1e9) {
        return Err(format!("{arg} must be more than 0 and at most 1e9 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn partitions_and_timeouts_parse_strictly() {
        assert_eq!(parse_partition("3=a.elf"), Ok((3, PathBuf::from("a.elf"))));
        assert!(parse_partition("a.elf").is_err());
        assert!(parse_partition("x=a.elf").is_err());
        assert!(parse_partition("-1=a.elf").is_err());
        assert!(parse_partition("3=").is_err());
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "nan", "inf", "1e10", "soon"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
