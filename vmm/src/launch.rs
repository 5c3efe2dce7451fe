//! `keyhold run`: boot the partitions named on the command line and wait for all of them.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Instant;

use keyhold_devices::console::{shared_output, SharedOutput};
use thiserror::Error;

use keyhold_devices::bus::lock;
use keyhold_devices::cmm::query::{self, QueryPort};
use keyhold_devices::link::{LinkManager, Router};

use crate::api::{ApiServer, ApiState, PartitionState};
use crate::claimed_socket::ClaimedSocket;

use crate::cli::{CheckArgs, NodeArgs, RunArgs, SeccompArgs};
use crate::cluster_config::{ClusterLinks, DirectorySource};
use crate::membership::Membership;
use crate::node_config::{self, ConfigError};
use std::sync::{Arc, Mutex};

use keyhold_devices::cmm::audit::{Audit, AuditConfig};
use keyhold_devices::cmm::{Cmm, CmmConfig};
use keyhold_devices::virtio::secure_channel::ChannelNode;
use keyhold_devices::virtio::vsock::policy::Policy;

use crate::device_thread::DeviceThread;
use crate::host::{self, HostError};
use crate::partition::{self, Partition, PartitionConfig, PartitionError};
use crate::requests::{ReloadFn, Requests};
use crate::seccomp::{Containment, Needs, SeccompError};
use crate::starter::{Consoles, StartKit, Starter};
use crate::stop::Stopped;
use crate::supervisor::{self, Control, SupervisorError};

/// How long the node waits at exit for the audit writer to catch up.
const AUDIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// Exit status for bad input.
pub const STATUS_BAD_INPUT: u8 = 2;
/// Exit status for a host that refused a resource.
pub const STATUS_HOST_FAILURE: u8 = 1;

/// Why `keyhold run` could not boot its partitions.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// Neither --firmware nor --partition.
    #[error("no partition to run: give --firmware PATH or --partition ID=PATH")]
    NoPartitions,
    /// --arg for a partition that is not there.
    #[error("--arg names partition {0}, which is not being run")]
    ArgsForNobody(u32),
    /// Two partitions with one ID.
    #[error("partition ID {0} is used more than once")]
    DuplicateId(u32),
    /// --partition-id plus the number of --firmware images overflows.
    #[error("--partition-id {0} leaves no room for {1} partitions below 2^32")]
    IdOverflow(u32, usize),
    /// The node config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The control API socket (or a `vsock_uds`) cannot be made.
    #[error("cannot listen on socket {}: {source}", path.display())]
    ApiSocket {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The metrics address cannot be bound.
    #[error("cannot listen for metrics scrapes on {addr}: {source}")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The link listener cannot bind.
    #[error("cannot listen for host links on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The audit log cannot be opened.
    #[error("cannot open audit log {}: {source}", path.display())]
    AuditLog {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The console file cannot be written.
    #[error("cannot open console file {}: {source}", path.display())]
    ConsoleFile {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The CMM's key table could not be allocated.
    #[error("allocating the key table: {0}")]
    Cmm(io::Error),
    /// The device thread could not start.
    #[error("starting the device thread: {0}")]
    DeviceThread(io::Error),
    /// The membership thread (etcd) could not start.
    #[error("starting the membership thread: {0}")]
    Membership(io::Error),
    /// The host cannot run partitions.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A partition could not be built.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// The partitions could not be supervised.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// The threads' seccomp filters could not be prepared.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

impl LaunchError {
    /// The process exit status for this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::Partition(e) if !e.is_bad_input() => STATUS_HOST_FAILURE,
            Self::Host(HostError::KvmOpen(_))
            | Self::Supervisor(_)
            | Self::DeviceThread(_)
            | Self::Membership(_)
            | Self::Seccomp(_)
            | Self::Cmm(_) => STATUS_HOST_FAILURE,
            _ => STATUS_BAD_INPUT,
        }
    }
}

/// The partitions the arguments ask for, with their IDs checked.
pub fn partition_configs(args: &RunArgs) -> Result<Vec<PartitionConfig>, LaunchError> {
    let mut configs = Vec::with_capacity(args.firmware.len() + args.partition.len());
    for (i, firmware) in args.firmware.iter().enumerate() {
        let id = u32::try_from(i)
            .ok()
            .and_then(|i| args.partition_id.checked_add(i))
            .ok_or(LaunchError::IdOverflow(args.partition_id, args.firmware.len()))?;
        configs.push(config(id, firmware.clone(), args.memory));
    }
    for (id, firmware) in &args.partition {
        configs.push(config(*id, firmware.clone(), args.memory));
    }
    if configs.is_empty() {
        return Err(LaunchError::NoPartitions);
    }
    let mut seen = BTreeSet::new();
    if let Some(dup) = configs.iter().find(|c| !seen.insert(c.id)) {
        return Err(LaunchError::DuplicateId(dup.id));
    }
    for config in &mut configs {
        config.dump_ram.clone_from(&args.dump_ram);
    }
    for (id, args) in &args.arg {
        let config =
            configs.iter_mut().find(|c| c.id == *id).ok_or(LaunchError::ArgsForNobody(*id))?;
        config.args.clone_from(args);
    }
    Ok(configs)
}

fn config(id: u32, firmware: PathBuf, memory_mib: u64) -> PartitionConfig {
    PartitionConfig {
        id,
        firmware,
        memory_mib,
        node_id: 0,
        args: String::new(),
        dump_ram: None,
        rng_limit: Default::default(),
        vsock_cid: None,
        vsock_uds: None,
    }
}

/// What one keyhold process runs: a node with its partitions.
#[derive(Debug, Default)]
pub struct Launch {
    /// The node ID (0 for `keyhold run`).
    pub node: u32,
    /// The partitions.
    pub partitions: Vec<PartitionConfig>,
    /// Stop partitions still running after this long.
    pub timeout: Option<std::time::Duration>,
    /// Where the consoles go (stdout if `None`).
    pub console: Option<PathBuf>,
    /// Where audit records go and how they are bounded.
    pub audit: AuditConfig,
    /// The host links, if the node is part of a cluster.
    pub links: Option<ClusterLinks>,
    /// The CMM's size, per-partition limits and key lifetimes.
    pub cmm: CmmConfig,
    /// The vsock flows allowed between the partitions' CIDs.
    pub vsock_policy: Policy,
    /// Other nodes' CIDs: `(CID, node, partition)`.
    pub vsock_peers: Vec<(u32, u32, u32)>,
    /// Where the control API listens, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Where `GET /metrics` is also served over TCP, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `keyhold run`: boots the partitions named on the command line.
pub fn run(args: &RunArgs, process_start: Instant) -> Result<u8, LaunchError> {
    let launch = Launch {
        node: 0,
        partitions: partition_configs(args)?,
        timeout: args.timeout,
        console: args.console.clone(),
        audit: AuditConfig::default(),
        links: None,
        cmm: CmmConfig::default(),
        vsock_policy: Policy::default(),
        vsock_peers: Vec::new(),
        api_socket: None,
        metrics_listen: None,
    };
    boot(&launch, &args.seccomp, process_start)
}

/// `keyhold node`: boots the partitions of a node config.
pub fn node(args: &NodeArgs, process_start: Instant) -> Result<u8, LaunchError> {
    let mut launch = node_config::load(&args.config)?;
    launch.timeout = args.timeout;
    boot(&launch, &args.seccomp, process_start)
}

/// `keyhold check`: everything a start of the node would refuse, found without starting it;
/// the summary of what would run.
pub fn check(args: &CheckArgs) -> Result<String, LaunchError> {
    let launch = node_config::load(&args.config)?;
    for partition in &launch.partitions {
        partition.open_firmware()?;
    }
    host::open_kvm()?;
    let mut summary = format!(
        "{}: node {} with {} partitions",
        args.config.display(),
        launch.node,
        launch.partitions.len()
    );
    if let Some(links) = &launch.links {
        match &links.source {
            DirectorySource::File(_) => {
                let peers = links.directory.peers().len().saturating_sub(1);
                summary += &format!(", listening on {} for {peers} peers", links.listen);
            }
            DirectorySource::Etcd(etcd) => {
                let endpoints = etcd.endpoints.join(", ");
                summary +=
                    &format!(", listening on {}, members from etcd at {endpoints}", links.listen);
            }
        }
    }
    if let Some(socket) = &launch.api_socket {
        summary += &format!(", API on {}", socket.display());
    }
    if let Some(addr) = &launch.metrics_listen {
        summary += &format!(", metrics on {addr}");
    }
    Ok(summary + ": ok")
}

/// Boots a node's partitions and returns the process exit status: the first non-zero status
/// of a partition, in the order they stopped, or 0. Every thread it starts, and the calling
/// thread once they have started, runs under its seccomp filter (unless `seccomp` says off).
pub fn boot(
    launch: &Launch,
    seccomp: &SeccompArgs,
    process_start: Instant,
) -> Result<u8, LaunchError> {
    let needs = Needs {
        dump_ram: launch.partitions.iter().any(|p| p.dump_ram.is_some()),
        host_vsock: launch.partitions.iter().any(|p| p.vsock_uds.is_some()),
    };
    let containment = Containment::prepare(seccomp.switch, needs, seccomp.selftest)?;
    // First, so that a node refused its socket (another node serves there) touches nothing.
    let api_socket = match &launch.api_socket {
        Some(path) => Some(
            ClaimedSocket::claim(path)
                .map_err(|source| LaunchError::ApiSocket { path: path.clone(), source })?,
        ),
        None => None,
    };
    let vsock_sockets = claim_vsock_sockets(launch)?;
    let metrics_listener = match launch.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|source| LaunchError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let firmware = launch
        .partitions
        .iter()
        .map(PartitionConfig::open_firmware)
        .collect::<Result<Vec<_>, _>>()?;
    let audit = open_audit(launch, &containment)?;
    let flusher = audit.clone();
    let kvm = host::open_kvm()?;
    let consoles = consoles(launch)?;
    let mut partitions = create_partitions(&kvm, launch, firmware, &consoles)?;
    let (links, router) = start_links(launch, &audit, &containment)?;
    let membership = start_membership(launch, links.as_ref(), &audit, &containment)?;
    let (queries, query_port) = query::channel().map_err(LaunchError::DeviceThread)?;
    let requests = Requests::new().map_err(LaunchError::DeviceThread)?;
    let api_state = Arc::new(ApiState {
        node: launch.node,
        partitions: Mutex::new(
            partitions.iter().zip(&launch.partitions).map(api_partition).collect(),
        ),
        queries,
        links: links.as_ref().map(LinkManager::book),
        membership: membership.as_ref().map(Membership::status),
        audit: audit.clone(),
        requests: Some(requests.clone()),
    });
    let host_places = vsock_sockets
        .iter()
        .map(|(id, s)| Ok((*id, s.listener().try_clone()?, s.path().to_owned())))
        .collect::<io::Result<Vec<_>>>()
        .map_err(LaunchError::DeviceThread)?;
    let devices = Devices { router, queries: query_port, host_places };
    let (device_thread, node) =
        start_devices(&mut partitions, launch, audit, devices, &containment)?;
    let api = ApiServer::start(api_socket, metrics_listener, api_state.clone(), &containment)
        .map_err(|source| LaunchError::ApiSocket {
            path: launch.api_socket.clone().unwrap_or_default(),
            source,
        })?;
    // Only an operator starts a partition again, and only through the API.
    let kit = StartKit {
        kvm,
        configs: launch.partitions.clone(),
        consoles,
        limits: launch.cmm.limits,
        devices: device_thread.handle(),
        node,
        api: api_state.clone(),
        process_start,
        containment: containment.clone(),
    };
    let starter = launch.api_socket.is_some().then(|| Starter::spawn(kit)).transpose();
    let starter = starter.map_err(LaunchError::DeviceThread)?;
    let on_stop = move |stopped: &Stopped| report_stop(&api_state, stopped);
    let started = || tell_service_manager(launch);
    let control = Control { requests, reload: reload_fn(launch, links.as_ref()), starter };
    let stops = supervisor::run(
        partitions,
        launch.timeout,
        process_start,
        &containment,
        control,
        started,
        on_stop,
    )?;
    drop(api);
    // Devices stop before the links, so nothing is sent over a link being torn down.
    drop(device_thread);
    // Deregistered before the links say goodbye, so peers unlink at once.
    drop(membership);
    drop(links);
    // The last records (links going down, channels closing) reach the file before exit.
    flusher.flush(AUDIT_FLUSH);
    Ok(stops.iter().map(|s| s.exit_status()).find(|&s| s != 0).unwrap_or(0))
}

/// Where the consoles go: each line prefixed with its partition's ID when there are several.
fn consoles(launch: &Launch) -> Result<Consoles, LaunchError> {
    let output = console_output(launch.console.as_deref())?;
    Ok(Consoles { output, prefixed: launch.partitions.len() > 1 })
}

/// Builds every partition.
fn create_partitions(
    kvm: &kvm_ioctls::Kvm,
    launch: &Launch,
    firmware: Vec<crate::loader::Firmware>,
    consoles: &Consoles,
) -> Result<Vec<Partition>, LaunchError> {
    let mut partitions = Vec::with_capacity(launch.partitions.len());
    for (config, firmware) in launch.partitions.iter().zip(firmware) {
        let console = consoles.sink(config.id);
        partitions.push(partition::create(kvm, config, firmware, console, launch.cmm.limits)?);
    }
    Ok(partitions)
}

/// Starts the host links if the node is in a cluster; returns their manager and the router
/// the device thread runs (one with no links otherwise).
fn start_links(
    launch: &Launch,
    audit: &Audit,
    containment: &Containment,
) -> Result<(Option<LinkManager>, Router), LaunchError> {
    let Some(l) = &launch.links else { return Ok((None, Router::unlinked())) };
    let (manager, router) = LinkManager::start(
        launch.node,
        l.key.clone(),
        l.directory.clone(),
        l.listen,
        audit.clone(),
        l.settings,
        containment.for_thread(crate::seccomp::ThreadKind::LinkSetup),
    )
    .map_err(|source| LaunchError::Listen { addr: l.listen, source })?;
    Ok((Some(manager), router))
}

/// Registers the node in etcd and has its links follow the members there, if its members
/// come from etcd.
fn start_membership(
    launch: &Launch,
    links: Option<&LinkManager>,
    audit: &Audit,
    containment: &Containment,
) -> Result<Option<Membership>, LaunchError> {
    let (Some(l), Some(manager)) = (&launch.links, links) else { return Ok(None) };
    let DirectorySource::Etcd(config) = &l.source else { return Ok(None) };
    let own = l.directory.by_id(launch.node).cloned().ok_or_else(|| {
        LaunchError::Membership(io::Error::other("the node is not in its own directory"))
    })?;
    let membership = Membership::start(
        (**config).clone(),
        own,
        manager.reloader(),
        audit.clone(),
        containment.clone(),
    )
    .map_err(LaunchError::Membership)?;
    Ok(Some(membership))
}

/// How SIGHUP and `ctl reload` re-read the cluster file and apply it to the links (a node on
/// etcd has none: its members follow etcd).
fn reload_fn(launch: &Launch, links: Option<&LinkManager>) -> Option<ReloadFn> {
    let DirectorySource::File(file) = &launch.links.as_ref()?.source else { return None };
    let file = file.clone();
    let reloader = links?.reloader();
    Some(Box::new(move || {
        let directory = crate::cluster_config::load_cluster(&file).map_err(|e| e.to_string())?;
        let changes = reloader.reload(directory).map_err(|e| format!("{}: {e}", file.display()))?;
        let ids = |ids: &[u32]| format!("{ids:?}");
        Ok(format!(
            "added {}, removed {}, new keys {}, moved {}",
            ids(&changes.added),
            ids(&changes.removed),
            ids(&changes.rekeyed),
            ids(&changes.moved)
        ))
    }))
}

/// Under systemd (`Type=notify`, `$NOTIFY_SOCKET` set) the node is ready once its partitions
/// run, its link listener is bound and its API serves; elsewhere this does nothing.
fn tell_service_manager(launch: &Launch) {
    let status = format!("node {}: {} partitions running", launch.node, launch.partitions.len());
    // `false`: leave the environment alone; other threads may be reading it.
    let states = [sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)];
    if let Err(e) = sd_notify::notify(false, &states) {
        log::warn!("telling the service manager the node is ready: {e}");
    }
}

/// Reports a stopped partition on stderr (unless it exited cleanly) and to the API, and has
/// its channels closed (their peers learn that the partition stopped).
fn report_stop(state: &ApiState, stopped: &Stopped) {
    let partition = stopped.partition;
    match state.queries.ask(query::Query::PartitionStopped { partition }) {
        Some(query::Reply::PartitionStopped(0)) => {}
        Some(query::Reply::PartitionStopped(n)) => {
            log::info!("partition {partition} stopped: its {n} channels are closed")
        }
        _ => log::warn!("partition {partition} stopped, but the device thread did not answer"),
    }
    let report = stopped.report();
    if let Some(report) = &report {
        eprintln!("keyhold: {report}");
    }
    if let Some(p) = lock(&state.partitions).iter_mut().find(|p| p.id == stopped.partition) {
        let report = report.unwrap_or_else(|| "exited with status 0".into());
        p.stopped = Some((stopped.exit_status(), report));
    }
}

/// What the device thread serves beside the partitions' devices.
struct Devices {
    /// The links to the other nodes.
    router: Router,
    /// The control API's questions.
    queries: QueryPort,
    /// Each partition's `vsock_uds` listening socket, and its path.
    host_places: Vec<(u32, std::os::unix::net::UnixListener, PathBuf)>,
}

/// Binds each partition's `vsock_uds` (as the API socket: never one a live node serves).
fn claim_vsock_sockets(launch: &Launch) -> Result<Vec<(u32, ClaimedSocket)>, LaunchError> {
    let mut claimed = Vec::new();
    for partition in &launch.partitions {
        if let Some(path) = &partition.vsock_uds {
            let socket = ClaimedSocket::claim(path)
                .map_err(|source| LaunchError::ApiSocket { path: path.clone(), source })?;
            socket.listener().set_nonblocking(true).map_err(LaunchError::DeviceThread)?;
            claimed.push((partition.id, socket));
        }
    }
    Ok(claimed)
}

/// Starts the device thread with every partition's backends and one CMM for the node in
/// front of all their secure-channel devices, with the router to the other nodes; returns
/// the thread and the node (the CMM and the devices).
fn start_devices(
    partitions: &mut [Partition],
    launch: &Launch,
    audit: Audit,
    devices: Devices,
    containment: &Containment,
) -> Result<(DeviceThread, Arc<Mutex<ChannelNode>>), LaunchError> {
    let Devices { router, queries, host_places } = devices;
    let backends = partitions.iter_mut().map(|p| (p.id(), p.take_backends())).collect();
    let channels = partitions.iter_mut().filter_map(Partition::take_channel).collect();
    let vsock = partitions.iter_mut().filter_map(Partition::take_vsock).collect();
    let cmm = Cmm::new(launch.node, launch.cmm, audit, router).map_err(LaunchError::Cmm)?;
    let node = ChannelNode::new(cmm, channels).map_err(LaunchError::DeviceThread)?;
    let policy = launch.vsock_policy.clone();
    let node = node.with_vsock(vsock, policy, host_places, &launch.vsock_peers);
    let node = node.with_queries(queries);
    let node = Arc::new(Mutex::new(node));
    ChannelNode::serve_inline(&node);
    let thread = DeviceThread::start(backends, node.clone(), containment)
        .map_err(LaunchError::DeviceThread)?;
    Ok((thread, node))
}

fn api_partition((partition, config): (&Partition, &PartitionConfig)) -> PartitionState {
    PartitionState {
        id: config.id,
        firmware: config.firmware.clone(),
        memory_mib: config.memory_mib,
        stopped: None,
        devices: partition.devices(),
    }
}

fn open_audit(launch: &Launch, containment: &Containment) -> Result<Audit, LaunchError> {
    let contain = containment.for_thread(crate::seccomp::ThreadKind::Audit);
    Audit::start(launch.node, launch.audit.clone(), contain).map_err(|source| {
        LaunchError::AuditLog {
            path: launch.audit.file.as_ref().map(|f| f.path.clone()).unwrap_or_default(),
            source,
        }
    })
}

fn console_output(path: Option<&std::path::Path>) -> Result<SharedOutput, LaunchError> {
    let out: Box<dyn Write + Send> = match path {
        Some(path) => Box::new(
            File::create(path)
                .map_err(|source| LaunchError::ConsoleFile { path: path.to_owned(), source })?,
        ),
        None => Box::new(io::stdout()),
    };
    Ok(shared_output(out))
}
