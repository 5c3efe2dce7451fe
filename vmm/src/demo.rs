//! `keyhold demo`: the whole product on one machine, with nothing to prepare.
//!
//! Two nodes, each a child `keyhold node` process with two partitions, linked over loopback with
//! fresh keys. Node 1 runs an echo; a ping on node 1 talks to it within the node, a ping on node 2
//! talks to it across nodes, and a hostile partition on node 2 tries every forgery. The demo
//! prints what happened and exits 0 only if every message was echoed and every forgery refused.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::keys;

/// Messages each ping sends.
const COUNT: u32 = 500;
/// Their size.
const SIZE: u32 = 256;

/// Why the demo could not run (as opposed to ran and found something wrong).
#[derive(Debug, Error)]
pub enum DemoError {
    /// Setting up its files failed.
    #[error("preparing the demo in {}: {source}", dir.display())]
    Setup {
        /// The scratch directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A node process could not be started.
    #[error("starting a node: {0}")]
    Spawn(std::io::Error),
    /// Key generation failed.
    #[error("generating node keys: {0}")]
    Keys(#[from] keys::KeyError),
    /// This host cannot run partitions: checked first, so nothing is started in vain.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
}

impl DemoError {
    /// The exit status: 2 when the host cannot run KVM guests (as for `run` and `node`), 1
    /// when the demo could not be set up.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::Host(_) => 2,
            _ => 1,
        }
    }
}

/// What one node process left.
struct NodeRun {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    audit: String,
}

/// Runs the demo; returns the exit status (0: everything as expected).
pub fn run() -> Result<u8, DemoError> {
    crate::host::open_kvm()?;
    let dir = std::env::temp_dir().join(format!("keyhold-demo-{}", std::process::id()));
    let setup = |source| DemoError::Setup { dir: dir.clone(), source };
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(setup)?;
    let result = prepare(&dir).and_then(|(configs, ports)| {
        println!("keyhold demo: two nodes on loopback (127.0.0.1:{} and 127.0.0.1:{}), two partitions each", ports[0], ports[1]);
        let children = configs
            .iter()
            .map(|config| {
                Command::new(std::env::current_exe().map_err(DemoError::Spawn)?)
                    .args(["node", "--config"])
                    .arg(config)
                    .args(["--timeout", "120"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(DemoError::Spawn)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let runs: Vec<NodeRun> = children
            .into_iter()
            .enumerate()
            .map(|(i, child)| {
                let out = child.wait_with_output();
                let audit = std::fs::read_to_string(dir.join(format!("audit{}.jsonl", i + 1))).unwrap_or_default();
                match out {
                    Ok(out) => NodeRun {
                        status: out.status.code(),
                        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                        audit,
                    },
                    Err(e) => NodeRun { status: None, stdout: String::new(), stderr: e.to_string(), audit },
                }
            })
            .collect();
        Ok(report(&runs))
    });
    // The scratch directory holds the node keys: it goes, whatever happened.
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Writes firmware, keys and configs; returns the two node configs and their ports.
fn prepare(dir: &Path) -> Result<([PathBuf; 2], [u16; 2]), DemoError> {
    let setup = |source| DemoError::Setup { dir: dir.to_owned(), source };
    for name in ["echo", "ping", "forge"] {
        let image = firmware_fixtures::image(name).ok_or_else(|| {
            setup(std::io::Error::other(format!("fixture {name} is not built in")))
        })?;
        std::fs::write(dir.join(format!("{name}.elf")), image).map_err(setup)?;
    }
    let ports = [free_port().map_err(setup)?, free_port().map_err(setup)?];
    let mut cluster = String::new();
    for (i, port) in ports.iter().enumerate() {
        let secret = keys::generate()?;
        let key_file = dir.join(format!("node{}.key", i + 1));
        write_private(&key_file, &secret.private_base64()).map_err(setup)?;
        let _ = writeln!(
            cluster,
            "[[node]]\nid = {}\naddress = \"127.0.0.1:{port}\"\npublic_key = \"{}\"\n",
            i + 1,
            secret.public_base64()
        );
    }
    std::fs::write(dir.join("cluster.toml"), cluster).map_err(setup)?;
    let ping = format!("count={COUNT} size={SIZE} batch=16");
    let nodes = [
        (
            1,
            [("echo", "peer=1:2:1,2:1:1,2:2:1".to_owned()), ("ping", format!("peer=1:1:1 {ping}"))],
        ),
        (2, [("ping", format!("peer=1:1:1 {ping}")), ("forge", "peer=1:1:1".to_owned())]),
    ];
    let mut configs = [PathBuf::new(), PathBuf::new()];
    for (id, partitions) in nodes {
        let mut text = format!(
            "[node]\nid = {id}\naudit_log = \"audit{id}.jsonl\"\ncluster = \"cluster.toml\"\nprivate_key_file = \"node{id}.key\"\n"
        );
        for (p, (firmware, args)) in partitions.iter().enumerate() {
            let _ = write!(
                text,
                "\n[[partition]]\nid = {}\nfirmware = \"{firmware}.elf\"\nargs = \"{args}\"\n",
                p + 1
            );
        }
        let path = dir.join(format!("node{id}.toml"));
        std::fs::write(&path, text).map_err(setup)?;
        configs[id as usize - 1] = path;
    }
    Ok((configs, ports))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    writeln!(file, "{text}")
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first line of `stdout` that starts with `prefix`, without it.
fn line<'a>(stdout: &'a str, prefix: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| l.strip_prefix(prefix))
}

/// A ping's result line from partition `partition`'s console.
fn ping_result(stdout: &str, partition: u32) -> Option<&str> {
    let prefix = format!("[p{partition}] ping: {COUNT} messages");
    stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .map(|l| &l[prefix.len() - format!("{COUNT} messages").len()..])
}

/// Prints the table and returns the exit status.
fn report(runs: &[NodeRun]) -> u8 {
    let (n1, n2) = (&runs[0], &runs[1]);
    // "500 messages of 256 bytes, batch 16: 733 msg/s, ..." -> the figures after the colon.
    let rtt =
        |l: Option<&str>| l.and_then(|l| l.split(": ").nth(1)).unwrap_or("no result").to_owned();
    let local = ping_result(&n1.stdout, 2);
    let remote = ping_result(&n2.stdout, 1);
    let forged = n2.stdout.matches("refused as expected").count();
    let genuine = n2.stdout.contains("forge: genuine message echoed: true");
    let forge_clean = n2.stdout.contains("forge: 0 checks failed");
    let echoed = line(&n1.stdout, "[p1] echo: echoed ").unwrap_or("nothing");
    println!();
    println!("  {:<13} {:<13} {:<13} {:>8}  result", "from", "to", "path", "messages");
    println!(
        "  {:<13} {:<13} {:<13} {:>8}  {}",
        "1:2:1 ping",
        "1:1:1 echo",
        "same node",
        COUNT,
        verdict(local.is_some(), &rtt(local))
    );
    println!(
        "  {:<13} {:<13} {:<13} {:>8}  {}",
        "2:1:1 ping",
        "1:1:1 echo",
        "across nodes",
        COUNT,
        verdict(remote.is_some(), &rtt(remote))
    );
    let forge_result = format!("{forged} forgeries refused; genuine message echoed: {genuine}");
    println!(
        "  {:<13} {:<13} {:<13} {:>8}  {}",
        "2:2:1 forge",
        "1:1:1 echo",
        "across nodes",
        1,
        verdict(forge_clean && genuine, &forge_result)
    );
    println!();
    println!("  echo on node 1 echoed {echoed}");
    for (i, run) in runs.iter().enumerate() {
        let count = |event: &str| run.audit.matches(&format!("\"event\":\"{event}\"")).count();
        println!(
            "  audit, node {}: {} links up, {} offers accepted, {} rejected, {} forged sends refused",
            i + 1,
            count("link_up"),
            count("offer_accepted"),
            count("offer_rejected"),
            count("send_refused")
        );
    }
    let ok = local.is_some()
        && remote.is_some()
        && forge_clean
        && genuine
        && runs.iter().all(|r| r.status == Some(0));
    if ok {
        println!("\nkeyhold demo: every message echoed, every forgery refused");
        return 0;
    }
    println!("\nkeyhold demo: something went wrong; the nodes said:");
    for (i, run) in runs.iter().enumerate() {
        println!("--- node {} (exit {:?})\n{}{}", i + 1, run.status, run.stdout, run.stderr);
    }
    1
}

fn verdict(ok: bool, detail: &str) -> String {
    if ok {
        format!("ok: {detail}")
    } else {
        format!("FAILED: {detail}")
    }
}
