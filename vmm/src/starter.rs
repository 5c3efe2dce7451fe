//! Starting a stopped partition again while the node runs (`keyhold ctl start`).
//!
//! Creating a VM takes system calls no running thread's seccomp filter allows (the main
//! thread's least of all), so a thread of its own does it: the starter, made with the others
//! at boot, whose filter allows creating a VM and its vCPU on top of everything a vCPU thread
//! may do. It builds the partition from its configuration exactly as the boot did, has the
//! device thread replace the backends of the partition's last run (the guest RAM they held
//! goes with them), and starts the vCPU thread, which inherits the starter's filter and
//! narrows it to a vCPU's before it enters the guest.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use keyhold_devices::bus::lock;
use keyhold_devices::cmm::Limits;
use keyhold_devices::console::{LineSink, SharedOutput};
use keyhold_devices::virtio::secure_channel::ChannelNode;
use kvm_ioctls::Kvm;

use crate::api::ApiState;
use crate::device_thread::DeviceHandle;
use crate::partition::{self, PartitionConfig};
use crate::seccomp::{Containment, ThreadKind};
use crate::supervisor::{self, Running};

/// Where the partitions' consoles go: one output, each line prefixed with the partition's ID
/// when the node runs several.
#[derive(Clone)]
pub struct Consoles {
    /// The shared output.
    pub output: SharedOutput,
    /// Whether lines carry a `[pID] ` prefix.
    pub prefixed: bool,
}

impl Consoles {
    /// The console of partition `id`.
    pub fn sink(&self, id: u32) -> LineSink {
        let prefix = if self.prefixed { format!("[p{id}] ") } else { String::new() };
        LineSink::new(prefix, self.output.clone())
    }
}

/// Everything a start needs, moved into the starter thread.
pub struct StartKit {
    /// `/dev/kvm`, opened at boot.
    pub kvm: Kvm,
    /// Every partition the node was configured with.
    pub configs: Vec<PartitionConfig>,
    /// Where consoles go.
    pub consoles: Consoles,
    /// The CMM's per-partition limits (each device tells its guest).
    pub limits: Limits,
    /// The device thread, which gets the new backends.
    pub devices: DeviceHandle,
    /// The CMM and the secure-channel devices.
    pub node: Arc<Mutex<ChannelNode>>,
    /// What the control API shows.
    pub api: Arc<ApiState>,
    /// When the process started (boot times are reported from it).
    pub process_start: Instant,
    /// The filters; the vCPU threads started here install theirs.
    pub containment: Containment,
}

/// One start asked for, and where its answer goes.
type Ask = (u32, mpsc::SyncSender<Result<Running, String>>);

/// The starter thread.
pub struct Starter {
    asks: Option<mpsc::Sender<Ask>>,
    thread: Option<JoinHandle<()>>,
}

impl Starter {
    /// Starts the thread; it installs its seccomp filter before it does anything else.
    pub fn spawn(kit: StartKit) -> std::io::Result<Self> {
        let (asks, arrivals) = mpsc::channel::<Ask>();
        let thread = std::thread::Builder::new().name("starter".into()).spawn(move || {
            kit.containment.install(ThreadKind::Starter);
            for (id, answer) in arrivals {
                let _ = answer.send(kit.start(id));
            }
        })?;
        Ok(Self { asks: Some(asks), thread: Some(thread) })
    }

    /// Builds partition `id` again and starts its vCPU thread; waits until it runs.
    pub fn start(&self, id: u32) -> Result<Running, String> {
        let (answer, wait) = mpsc::sync_channel(1);
        let gone = || "the starter thread is gone".to_owned();
        self.asks.as_ref().ok_or_else(gone)?.send((id, answer)).map_err(|_| gone())?;
        wait.recv().map_err(|_| gone())?
    }
}

impl Drop for Starter {
    fn drop(&mut self) {
        // Its queue closing ends the thread.
        drop(self.asks.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl StartKit {
    fn start(&self, id: u32) -> Result<Running, String> {
        let config = self
            .configs
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| format!("no partition {id} in the node's configuration"))?;
        let firmware = config.open_firmware().map_err(|e| e.to_string())?;
        let mut partition =
            partition::create(&self.kvm, config, firmware, self.consoles.sink(id), self.limits)
                .map_err(|e| e.to_string())?;
        let device_error = |e: std::io::Error| format!("partition {id}: devices: {e}");
        self.devices.replace(id, partition.take_backends()).map_err(device_error)?;
        let channel = partition.take_channel().map(|c| ChannelNode::attach(&self.node, c));
        let vsock = partition.take_vsock().map(|v| ChannelNode::attach_vsock(&self.node, v));
        for attachment in channel.into_iter().chain(vsock) {
            let node = self.node.clone();
            self.devices
                .change_node(move |ops| lock(&node).watch(attachment, ops))
                .map_err(device_error)?;
        }
        let views = partition.devices();
        let running = supervisor::spawn(partition, self.process_start, &self.containment)
            .map_err(|e| e.to_string())?;
        if let Some(shown) = lock(&self.api.partitions).iter_mut().find(|p| p.id == id) {
            shown.stopped = None;
            shown.devices = views;
        }
        Ok(running)
    }
}
