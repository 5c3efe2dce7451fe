//! `node.toml`: what `keyhold node` runs.
//!
//! ```toml
//! [node]
//! id = 1
//! audit_log = "audit.jsonl"        # optional; relative paths are relative to this file
//! cluster = "cluster.toml"         # optional: without it the node has no host links
//! private_key_file = "node1.key"   # with cluster: this node's key, mode 600
//! listen = "0.0.0.0:7000"          # optional: default, this node's address in the cluster
//! api_socket = "node1.sock"        # optional: the control API (docs/API.md)
//! metrics_listen = "127.0.0.1:9464" # optional: GET /metrics over TCP, for a scraper
//!
//! [links]                         # optional: timing and bounds of the host links
//! rekey_after_secs = 120           # (docs/OPERATOR.md lists every field and its default)
//! on_demand = true                 # link a peer only while channels need it (fleets)
//! idle_secs = 30                   # close a link on demand unused this long
//!
//! [audit]                          # optional: bounds on the audit log
//! max_file_mib = 64                # rotated to audit.jsonl.1 (and .2, ...) past this size
//! keep_files = 4                   # rotated files kept
//! records_per_second = 10          # per source (a partition, a peer node, an address)
//! burst = 50
//!
//! [channels]                       # optional
//! capacity = 65536                 # channels the node can hold
//! key_lifetime_messages = 1073741824
//! open_timeout_secs = 5            # an OPEN to another node fails TIMED_OUT after this
//!
//! [[partition]]
//! id = 1
//! firmware = "../target/fixtures/echo.elf"
//! memory_mib = 32                  # optional, default 32
//! args = "peer=1:2:1"              # optional
//! rng_bytes_per_sec = 1048576      # optional: virtio-rng's rate for this partition
//! rng_burst_bytes = 262144         # optional: what it may draw at once
//! vsock_cid = 3                    # optional: a virtio-vsock device with this CID
//! vsock_uds = "p1.vsock"           # optional: programs on the node reach it here (CID 2)
//!
//! [[vsock.allow]]                  # optional, repeated: the vsock flows allowed
//! from = "3:*"                     # CID:PORT, each a number or *, or "*"
//! to = "4:5000"
//!
//! [[vsock.peer]]                   # optional, repeated: a CID on another node
//! cid = 7
//! node = 2
//! partition = 1
//!
//! [etcd]                           # optional, instead of node.cluster: members from etcd
//! endpoints = ["http://10.0.0.10:2379"]   # (crate::membership::config lists every field)
//! operator_public_key = "..."
//! registration_signature = "..."
//! ```
//! Unknown fields are errors, so a typo is reported rather than ignored.

use std::collections::BTreeSet;

use keyhold_devices::virtio::vsock::{
    self,
    policy::{Policy, Rule},
};
use std::path::{Path, PathBuf};

use std::time::Duration;

use keyhold_devices::cmm::audit::{
    AuditConfig, AuditFile, RateLimit, DEFAULT_KEEP, DEFAULT_MAX_BYTES,
};
use keyhold_devices::cmm::{CmmConfig, KeyLifetime, Limits};
use keyhold_devices::link::LinkSettings;
use keyhold_devices::virtio::rng::RngLimit;
use serde::Deserialize;
use thiserror::Error;

use crate::cluster_config;
use crate::launch::Launch;
use crate::partition::{PartitionConfig, PartitionError};

/// Default guest RAM of a partition, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 32;

/// Why a node config was refused: always names the file, and the field where it can.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}: cannot read it: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape. The parser's message keeps its lines:
    /// the first names line and column, the next show the line with a caret under the fault.
    #[error("{}: {}", path.display(), message.trim_end())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{}: {field}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, as `partition[2].id`.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: NodeSection,
    #[serde(default)]
    links: LinksSection,
    #[serde(default)]
    channels: ChannelsSection,
    #[serde(default)]
    audit: AuditSection,
    #[serde(default)]
    vsock: VsockSection,
    etcd: Option<crate::membership::config::EtcdSection>,
    #[serde(default)]
    partition: Vec<PartitionSection>,
}

/// `[audit]`: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditSection {
    max_file_mib: Option<u64>,
    keep_files: Option<u32>,
    records_per_second: Option<f64>,
    burst: Option<f64>,
}

/// `[vsock]`: the flows the operator allows between vsock CIDs and ports.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockSection {
    #[serde(default)]
    allow: Vec<AllowSection>,
    #[serde(default)]
    peer: Vec<PeerSection>,
}

/// One `[[vsock.peer]]`: a CID of a partition on another node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSection {
    cid: u32,
    node: u32,
    partition: u32,
}

/// One `[[vsock.allow]]` rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowSection {
    from: String,
    to: String,
}

/// `[links]`: every field optional; the defaults are WireGuard's where it has one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinksSection {
    handshake_timeout_secs: Option<f64>,
    keepalive_secs: Option<f64>,
    dead_after_secs: Option<f64>,
    rekey_after_secs: Option<f64>,
    rekey_after_messages: Option<u64>,
    send_backlog_mib: Option<u64>,
    max_unauthenticated: Option<usize>,
    max_unauthenticated_per_address: Option<usize>,
    handshakes_per_second: Option<f64>,
    handshakes_per_second_per_address: Option<f64>,
    #[serde(default)]
    on_demand: bool,
    idle_secs: Option<f64>,
}

/// `[channels]`: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsSection {
    capacity: Option<usize>,
    per_partition: Option<u32>,
    key_lifetime_messages: Option<u32>,
    key_lifetime_secs: Option<u32>,
    open_timeout_secs: Option<f64>,
}

/// Most channels a node can hold (the connection table's ID space).
pub const MAX_CAPACITY: usize = 1 << 24;
/// Longest duration any `[links]` field takes, in seconds (a day).
const MAX_SECS: f64 = 86_400.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    id: u32,
    audit_log: Option<PathBuf>,
    cluster: Option<PathBuf>,
    private_key_file: Option<PathBuf>,
    listen: Option<String>,
    api_socket: Option<PathBuf>,
    metrics_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionSection {
    id: u32,
    firmware: PathBuf,
    memory_mib: Option<u64>,
    #[serde(default)]
    args: String,
    rng_bytes_per_sec: Option<u64>,
    rng_burst_bytes: Option<u64>,
    vsock_cid: Option<u32>,
    vsock_uds: Option<PathBuf>,
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<Launch, ConfigError> {
    let launch = parse(path, &read(path)?)?;
    check_files(path, &launch)?;
    Ok(launch)
}

/// What a start would refuse in the files a config names, checked here so that the error
/// names the file and the field: firmware that is not a readable file (its contents are
/// checked when the partition is built), and sockets and logs in directories that do not
/// exist.
fn check_files(path: &Path, launch: &Launch) -> Result<(), ConfigError> {
    let invalid = |field: String, problem: String| ConfigError::Invalid {
        path: path.to_owned(),
        field,
        problem,
    };
    for (i, p) in launch.partitions.iter().enumerate() {
        let problem = match std::fs::metadata(&p.firmware) {
            Ok(m) if m.is_file() => continue,
            Ok(_) => format!("{} is not a file", p.firmware.display()),
            Err(e) => format!("{}: {e}", p.firmware.display()),
        };
        return Err(invalid(format!("partition[{i}].firmware"), problem));
    }
    let audit_log = launch.audit.file.as_ref().map(|f| f.path.as_path());
    let mut files = vec![
        ("node.api_socket".to_owned(), launch.api_socket.as_deref()),
        ("node.audit_log".into(), audit_log),
    ];
    for (i, p) in launch.partitions.iter().enumerate() {
        files.push((format!("partition[{i}].vsock_uds"), p.vsock_uds.as_deref()));
    }
    for (field, file) in files {
        let Some(dir) = file.and_then(Path::parent).filter(|d| !d.as_os_str().is_empty()) else {
            continue;
        };
        if !dir.is_dir() {
            return Err(invalid(field, format!("directory {} does not exist", dir.display())));
        }
    }
    Ok(())
}

/// The text of config file `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })
}

/// `text` (read from `path`) as a `T`, with TOML errors naming the file.
pub fn from_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
}

/// Checks the text of a node config read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Launch, ConfigError> {
    let file: File = from_toml(path, text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let invalid = |field: String, problem: &str| ConfigError::Invalid {
        path: path.to_owned(),
        field,
        problem: problem.to_owned(),
    };
    if file.partition.is_empty() {
        return Err(invalid("partition".into(), "a node needs at least one [[partition]]"));
    }
    let mut seen = BTreeSet::new();
    let mut cids = BTreeSet::new();
    let mut partitions = Vec::with_capacity(file.partition.len());
    for (i, p) in file.partition.into_iter().enumerate() {
        if !seen.insert(p.id) {
            return Err(invalid(
                format!("partition[{i}].id"),
                &format!("ID {} is used twice", p.id),
            ));
        }
        let field = |name: &str| format!("partition[{i}].{name}");
        let d = RngLimit::default();
        let rng_limit = RngLimit {
            bytes_per_sec: count(
                path,
                &field("rng_bytes_per_sec"),
                p.rng_bytes_per_sec,
                64,
                1 << 30,
                d.bytes_per_sec,
            )?,
            burst: count(path, &field("rng_burst_bytes"), p.rng_burst_bytes, 64, 1 << 30, d.burst)?,
        };
        if let Some(cid) = p.vsock_cid {
            if !(vsock::MIN_GUEST_CID..u32::MAX).contains(&cid) {
                let problem =
                    format!("{cid} is reserved: a partition's CID is 3 to {}", u32::MAX - 1);
                return Err(invalid(field("vsock_cid"), &problem));
            }
            if !cids.insert(cid) {
                return Err(invalid(field("vsock_cid"), &format!("CID {cid} is used twice")));
            }
        }
        let partition = PartitionConfig {
            id: p.id,
            firmware: base.join(p.firmware),
            memory_mib: p.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            node_id: file.node.id,
            args: p.args,
            dump_ram: None,
            rng_limit,
            vsock_cid: p.vsock_cid,
            vsock_uds: p.vsock_uds.map(|path| base.join(path)),
        };
        if partition.vsock_uds.is_some() && partition.vsock_cid.is_none() {
            return Err(invalid(
                field("vsock_uds"),
                "needs vsock_cid: the partition has no vsock device",
            ));
        }
        if let Err(PartitionError::MemorySize { mib, min, max, why, .. }) = partition.ram_bytes() {
            let problem = format!("{mib} MiB is out of range: {min} to {max} MiB{why}");
            return Err(invalid(field("memory_mib"), &problem));
        }
        partitions.push(partition);
    }
    let settings = link_settings(path, &file.links)?;
    let cmm = cmm_config(path, &file.channels)?;
    let links = match (&file.node.cluster, &file.node.private_key_file) {
        (Some(_), _) if file.etcd.is_some() => {
            return Err(invalid(
                "etcd".into(),
                "a node has a cluster file or etcd, not both (remove node.cluster)",
            ))
        }
        (None, Some(key)) if file.etcd.is_some() => {
            let section = file.etcd.as_ref().ok_or_else(|| invalid("etcd".into(), "missing"))?;
            Some(crate::membership::config::etcd_links(
                path,
                file.node.id,
                section,
                &base.join(key),
                file.node.listen.as_deref(),
                settings,
            )?)
        }
        (None, None) if file.etcd.is_some() => {
            return Err(invalid("node.private_key_file".into(), "a node on etcd needs its key"))
        }
        (Some(cluster), Some(key)) => Some(cluster_config::cluster_links(
            path,
            file.node.id,
            &base.join(cluster),
            &base.join(key),
            file.node.listen.as_deref(),
            settings,
        )?),
        (None, None) if file.node.listen.is_none() => None,
        (None, _) => {
            return Err(invalid(
                "node.cluster".into(),
                "private_key_file and listen need a cluster",
            ))
        }
        (Some(_), None) => {
            return Err(invalid(
                "node.private_key_file".into(),
                "a node in a cluster needs its key",
            ))
        }
    };
    Ok(Launch {
        node: file.node.id,
        partitions,
        timeout: None,
        console: None,
        audit: audit_config(path, file.node.audit_log.map(|p| base.join(p)), &file.audit)?,
        links,
        cmm,
        vsock_policy: vsock_policy(path, &file.vsock)?,
        vsock_peers: vsock_peers(path, file.node.id, &file.vsock, &cids)?,
        api_socket: file.node.api_socket.map(|p| base.join(p)),
        metrics_listen: file
            .node
            .metrics_listen
            .map(|text| {
                text.parse().map_err(|_| {
                    invalid("node.metrics_listen".into(), &format!("{text:?} is not IP:PORT"))
                })
            })
            .transpose()?,
    })
}

/// `[[vsock.allow]]`: each rule's patterns, checked.
fn vsock_policy(path: &Path, section: &VsockSection) -> Result<Policy, ConfigError> {
    let mut rules = Vec::with_capacity(section.allow.len());
    for (i, rule) in section.allow.iter().enumerate() {
        let pattern = |name: &str, text: &str| {
            text.parse().map_err(|e: vsock::policy::BadPattern| ConfigError::Invalid {
                path: path.to_owned(),
                field: format!("vsock.allow[{i}].{name}"),
                problem: e.to_string(),
            })
        };
        rules.push(Rule { from: pattern("from", &rule.from)?, to: pattern("to", &rule.to)? });
    }
    Ok(Policy { rules })
}

/// `[[vsock.peer]]`: other nodes' CIDs, none reserved, none twice, none of this node's
/// (`local`).
fn vsock_peers(
    path: &Path,
    node: u32,
    section: &VsockSection,
    local: &BTreeSet<u32>,
) -> Result<Vec<(u32, u32, u32)>, ConfigError> {
    let mut seen = local.clone();
    let mut peers = Vec::with_capacity(section.peer.len());
    for (i, peer) in section.peer.iter().enumerate() {
        let invalid = |field: &str, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: format!("vsock.peer[{i}].{field}"),
            problem,
        };
        if !(vsock::MIN_GUEST_CID..u32::MAX).contains(&peer.cid) {
            return Err(invalid(
                "cid",
                format!("{} is reserved: CIDs are 3 to {}", peer.cid, u32::MAX - 1),
            ));
        }
        if !seen.insert(peer.cid) {
            return Err(invalid(
                "cid",
                format!("CID {} is used twice (here or by a partition)", peer.cid),
            ));
        }
        if peer.node == node {
            return Err(invalid(
                "node",
                format!("{node} is this node: give the partition vsock_cid"),
            ));
        }
        peers.push((peer.cid, peer.node, peer.partition));
    }
    Ok(peers)
}

/// A duration field in seconds: positive, finite, at most a day.
fn secs(
    path: &Path,
    field: &str,
    value: Option<f64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(value) = value else { return Ok(default) };
    if !value.is_finite() || value <= 0.0 || value > MAX_SECS {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            problem: format!("{value} is not a number of seconds above 0 and at most {MAX_SECS}"),
        });
    }
    Ok(Duration::from_secs_f64(value))
}

/// A count field: at least `min`.
fn count<T: PartialOrd + Copy + std::fmt::Display>(
    path: &Path,
    field: &str,
    value: Option<T>,
    min: T,
    max: T,
    default: T,
) -> Result<T, ConfigError> {
    let Some(value) = value else { return Ok(default) };
    if value < min || value > max {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            problem: format!("{value} is not between {min} and {max}"),
        });
    }
    Ok(value)
}

fn link_settings(path: &Path, l: &LinksSection) -> Result<LinkSettings, ConfigError> {
    let mut s = LinkSettings::default();
    s.setup.handshake =
        secs(path, "links.handshake_timeout_secs", l.handshake_timeout_secs, s.setup.handshake)?;
    s.router.keepalive = secs(path, "links.keepalive_secs", l.keepalive_secs, s.router.keepalive)?;
    s.router.dead_after =
        secs(path, "links.dead_after_secs", l.dead_after_secs, s.router.dead_after)?;
    if s.router.dead_after <= s.router.keepalive {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            field: "links.dead_after_secs".into(),
            problem: format!("must be longer than keepalive_secs ({:?})", s.router.keepalive),
        });
    }
    s.router.rekey_after =
        secs(path, "links.rekey_after_secs", l.rekey_after_secs, s.router.rekey_after)?;
    s.router.rekey_timeout = s.setup.handshake;
    s.router.rekey_after_records = count(
        path,
        "links.rekey_after_messages",
        l.rekey_after_messages,
        16,
        u64::MAX / 2,
        s.router.rekey_after_records,
    )?;
    let mib = count(
        path,
        "links.send_backlog_mib",
        l.send_backlog_mib,
        1,
        4096,
        (s.router.backlog >> 20) as u64,
    )?;
    s.router.backlog = (mib as usize) << 20;
    s.admission.pending = count(
        path,
        "links.max_unauthenticated",
        l.max_unauthenticated,
        1,
        65_536,
        s.admission.pending,
    )?;
    s.admission.pending_per_address = count(
        path,
        "links.max_unauthenticated_per_address",
        l.max_unauthenticated_per_address,
        1,
        65_536,
        s.admission.pending_per_address,
    )?;
    s.admission.handshakes = count(
        path,
        "links.handshakes_per_second",
        l.handshakes_per_second,
        1.0,
        1e6,
        s.admission.handshakes,
    )?;
    s.admission.handshakes_per_address = count(
        path,
        "links.handshakes_per_second_per_address",
        l.handshakes_per_second_per_address,
        1.0,
        1e6,
        s.admission.handshakes_per_address,
    )?;
    s.router.idle_after = match (l.on_demand, l.idle_secs) {
        (true, idle) => Some(secs(path, "links.idle_secs", idle, DEFAULT_IDLE)?),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                field: "links.idle_secs".into(),
                problem: "applies to links on demand only: set on_demand = true too".into(),
            })
        }
    };
    Ok(s)
}

/// How long a link on demand stays up with no channel over it, by default.
const DEFAULT_IDLE: Duration = Duration::from_secs(30);

fn audit_config(
    path: &Path,
    log: Option<PathBuf>,
    a: &AuditSection,
) -> Result<AuditConfig, ConfigError> {
    let mib =
        count(path, "audit.max_file_mib", a.max_file_mib, 1, 1 << 20, DEFAULT_MAX_BYTES >> 20)?;
    let keep = count(path, "audit.keep_files", a.keep_files, 0, 1000, DEFAULT_KEEP)?;
    let d = RateLimit::default();
    let per_second =
        count(path, "audit.records_per_second", a.records_per_second, 0.01, 1e6, d.per_second)?;
    let burst = count(path, "audit.burst", a.burst, 1.0, 1e6, d.burst)?;
    Ok(AuditConfig {
        file: log.map(|path| AuditFile { path, max_bytes: mib << 20, keep }),
        limit: RateLimit { per_second, burst },
    })
}

fn cmm_config(path: &Path, c: &ChannelsSection) -> Result<CmmConfig, ConfigError> {
    let d = CmmConfig::default();
    let capacity = count(path, "channels.capacity", c.capacity, 1, MAX_CAPACITY, d.capacity)?;
    let per_partition =
        count(path, "channels.per_partition", c.per_partition, 1, u32::MAX, d.limits.max_channels)?;
    let lifetime = KeyLifetime {
        messages: count(
            path,
            "channels.key_lifetime_messages",
            c.key_lifetime_messages,
            1,
            u32::MAX,
            d.lifetime.messages,
        )?,
        secs: count(
            path,
            "channels.key_lifetime_secs",
            c.key_lifetime_secs,
            1,
            u32::MAX,
            d.lifetime.secs,
        )?,
    };
    let open_timeout =
        secs(path, "channels.open_timeout_secs", c.open_timeout_secs, d.open_timeout)?;
    Ok(CmmConfig {
        capacity,
        limits: Limits { max_channels: per_partition, ..d.limits },
        lifetime,
        open_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Launch, ConfigError> {
        parse(Path::new("/etc/keyhold/node.toml"), text)
    }

    #[test]
    fn a_good_config_resolves_paths_against_its_directory() {
        let launch = parse_str(
            "[node]\nid = 3\naudit_log = \"audit.jsonl\"\n\n[[partition]]\nid = 1\nfirmware = \"echo.elf\"\nargs = \"peer=3:2:1\"\n\n[[partition]]\nid = 2\nfirmware = \"/abs/ping.elf\"\nmemory_mib = 64\n",
        )
        .unwrap();
        assert_eq!(launch.node, 3);
        let audit = launch.audit.file.unwrap();
        assert_eq!(audit.path, PathBuf::from("/etc/keyhold/audit.jsonl"));
        assert_eq!((audit.max_bytes, audit.keep), (DEFAULT_MAX_BYTES, DEFAULT_KEEP));
        assert_eq!(launch.partitions[0].firmware, PathBuf::from("/etc/keyhold/echo.elf"));
        assert_eq!(launch.partitions[0].memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(launch.partitions[0].node_id, 3);
        assert_eq!(launch.partitions[1].firmware, PathBuf::from("/abs/ping.elf"));
        assert_eq!(launch.partitions[1].memory_mib, 64);
    }

    #[test]
    fn links_on_demand_are_chosen_with_an_idle_time() {
        let idle = |text: &str| {
            let section: LinksSection = toml::from_str(text).unwrap();
            link_settings(Path::new("node.toml"), &section).unwrap().router.idle_after
        };
        assert_eq!(idle(""), None, "a full mesh by default");
        assert_eq!(idle("on_demand = true"), Some(DEFAULT_IDLE));
        assert_eq!(idle("on_demand = true\nidle_secs = 2.5"), Some(Duration::from_millis(2500)));
    }

    #[test]
    fn bad_configs_name_the_file_and_field() {
        let cases = [
            ("[node]\nid = 1\n", "partition: a node needs at least one"),
            ("[node]\nid = 1\n[[partition]]\nid = 1\nfirmware = \"a\"\n[[partition]]\nid = 1\nfirmware = \"b\"\n", "partition[1].id: ID 1 is used twice"),
            ("[node]\nid = -1\n", "node.toml"),
            ("[node]\nid = 1\ncolour = \"red\"\n", "unknown field `colour`"),
            ("[[partition]]\nid = 1\nfirmware = \"a\"\n", "missing field `node`"),
            ("not toml at all", "node.toml"),
            ("[node]\nid = 1\n[audit]\nburst = 0\n[[partition]]\nid = 1\nfirmware = \"a\"\n", "audit.burst: 0 is not between 1 and 1000000"),
            ("[node]\nid = 1\n[channels]\nopen_timeout_secs = -2\n[[partition]]\nid = 1\nfirmware = \"a\"\n", "channels.open_timeout_secs"),
            ("[node]\nid = 1\n[[partition]]\nid = 1\nfirmware = \"a\"\nrng_bytes_per_sec = 1\n", "partition[0].rng_bytes_per_sec: 1 is not between 64"),
            ("[node]\nid = 1\n[links]\nidle_secs = 5\n[[partition]]\nid = 1\nfirmware = \"a\"\n", "links.idle_secs: applies to links on demand only"),
            ("[node]\nid = 1\n[links]\non_demand = true\nidle_secs = 0\n[[partition]]\nid = 1\nfirmware = \"a\"\n", "links.idle_secs: 0 is not a number of seconds"),
        ];
        for (text, want) in cases {
            let err = parse_str(text).unwrap_err().to_string();
            assert!(err.starts_with("/etc/keyhold/node.toml: "), "{err}");
            assert!(err.contains(want), "{want:?} not in {err:?}");
            if err.contains("TOML parse error at line") {
                // The parser's rendering: the faulty line, a caret under the fault.
                assert!(err.contains("\n  |") && err.contains('^'), "{err:?}");
            } else {
                assert!(!err.contains('\n'), "one line: {err:?}");
            }
        }
    }
}
