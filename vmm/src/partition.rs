//! A partition: one KVM VM with its own guest RAM, devices and a single vCPU.
//!
//! Nothing of the host process but the partition's own RAM is mapped into the VM: one memory
//! slot, covering exactly the RAM mmap'd for it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use guest_agent::boot_info::{BootInfo, MAX_ARGS};
use guest_agent::platform::{CONSOLE_PORT, CONSOLE_PORT_COUNT, EXIT_PORT, IDLE_PORT};
use keyhold_devices::bus::{Bus, BusError};
use keyhold_devices::console::{Console, LineSink};
use keyhold_devices::exit_port::ExitPort;
use keyhold_devices::idle::{IdlePort, Wake};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

use keyhold_devices::cmm::Limits;
use keyhold_devices::virtio::rng::RngLimit;
use keyhold_devices::virtio::secure_channel::ChannelDevice;
use keyhold_devices::virtio::vsock::VsockDevice;

use crate::device_thread::Backend;
use crate::layout::{BOOT_ARGS, BOOT_INFO, MAX_RAM, MIN_RAM};
use crate::loader::{Firmware, FirmwareError};
use crate::partition_devices::{AttachError, DeviceSet, DeviceView};
use crate::stop::{StopRequest, Stopped};
use crate::vcpu::Vcpu;
use crate::{cpu, host, page_tables};

/// What the operator asked for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionConfig {
    /// The partition's ID, unique within the node.
    pub id: u32,
    /// The firmware image.
    pub firmware: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The node the partition runs on (0 outside a cluster).
    pub node_id: u32,
    /// The argument string the firmware reads from its boot info.
    pub args: String,
    /// Directory to write the partition's RAM to when it stops (`partition-<id>.ram`).
    pub dump_ram: Option<PathBuf>,
    /// How much entropy its virtio-rng serves.
    pub rng_limit: RngLimit,
    /// Its CID, if it has a virtio-vsock device.
    pub vsock_cid: Option<u32>,
    /// Where programs on the node reach its vsock ports (CID 2), if anywhere.
    pub vsock_uds: Option<PathBuf>,
}

/// Why a partition could not be created.
#[derive(Debug, Error)]
pub enum PartitionError {
    /// The firmware file is unusable.
    #[error("partition {id}: firmware {}: {source}", path.display())]
    Firmware {
        /// The partition.
        id: u32,
        /// The firmware path.
        path: PathBuf,
        /// What is wrong with it.
        source: FirmwareError,
    },
    /// The memory size is out of range.
    #[error(
        "partition {id}: memory size {mib} MiB is out of range: it must be {min} to {max} MiB{why}"
    )]
    MemorySize {
        /// The partition.
        id: u32,
        /// The size asked for.
        mib: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed on this host.
        max: u64,
        /// What limits the maximum, if the host does.
        why: &'static str,
    },
    /// A KVM call failed.
    #[error("partition {id}: {what} failed: {source}")]
    Kvm {
        /// The partition.
        id: u32,
        /// The call.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The argument string is too long.
    #[error("partition {id}: its argument string is {len} bytes, over the {MAX_ARGS}-byte limit")]
    ArgsTooLong {
        /// The partition.
        id: u32,
        /// The string's length.
        len: usize,
    },
    /// A virtio device could not be attached.
    #[error("partition {id}: devices: {source}")]
    Devices {
        /// The partition.
        id: u32,
        /// What failed.
        source: AttachError,
    },
    /// A device could not be placed on its bus.
    #[error("partition {id}: device set-up: {source}")]
    Device {
        /// The partition.
        id: u32,
        /// The bus error.
        source: BusError,
    },
    /// Guest RAM could not be mapped or written.
    #[error("partition {id}: guest memory: {reason}")]
    GuestMemory {
        /// The partition.
        id: u32,
        /// What failed.
        reason: String,
    },
}

impl PartitionError {
    /// Whether the operator's input caused the error (as opposed to the host refusing).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::Firmware { .. } | Self::MemorySize { .. } | Self::ArgsTooLong { .. })
    }
}

/// A partition ready to run; dropping it tears the VM down.
pub struct Partition {
    /// Its vCPU, devices and run state (declared first so it drops before the memory).
    vcpu: Vcpu,
    /// Device backends for the device thread, taken by [`Partition::take_backends`].
    backends: Vec<Backend>,
    /// The secure-channel device, for the node's CMM; taken by [`Partition::take_channel`].
    channel: Option<ChannelDevice>,
    /// The virtio-vsock device, if it has one; taken by [`Partition::take_vsock`].
    vsock: Option<VsockDevice>,
    /// Where to dump guest RAM at the stop.
    dump_ram: Option<PathBuf>,
    /// Its devices, for the control API.
    devices: Vec<DeviceView>,
    /// Wakes its vCPU from the idle port.
    wake: Arc<Wake>,
    _vm: VmFd,
    memory: GuestMemoryMmap,
}

impl Partition {
    /// The device backends, for the device thread.
    pub fn take_backends(&mut self) -> Vec<Backend> {
        std::mem::take(&mut self.backends)
    }

    /// Its devices' state and counters, for the control API.
    pub fn devices(&self) -> Vec<DeviceView> {
        self.devices.clone()
    }

    /// The secure-channel device, for the node's CMM.
    pub fn take_channel(&mut self) -> Option<ChannelDevice> {
        self.channel.take()
    }

    /// The virtio-vsock device, for the node's CMM.
    pub fn take_vsock(&mut self) -> Option<VsockDevice> {
        self.vsock.take()
    }

    /// The partition's ID.
    pub fn id(&self) -> u32 {
        self.vcpu.partition
    }

    /// What the supervisor sets to stop the partition from outside.
    pub fn stop_request(&self) -> Arc<StopRequest> {
        self.vcpu.stop.clone()
    }

    /// What wakes its vCPU from a park on the idle port (a stop must not wait for it).
    pub fn wake(&self) -> Arc<Wake> {
        self.wake.clone()
    }

    /// Runs the guest until it stops. Takes the whole partition so that the VM and its RAM
    /// live exactly as long as the vCPU runs.
    pub fn run(self, process_start: Instant) -> Stopped {
        let Self { vcpu, backends, channel, vsock, dump_ram, devices, wake, _vm: vm, memory } =
            self;
        drop((backends, channel, vsock, devices, wake));
        let id = vcpu.partition;
        let stopped = vcpu.run(process_start);
        if let Some(dir) = dump_ram {
            if let Err(e) = dump(&memory, &dir, id) {
                log::warn!("partition {id}: dumping its RAM to {}: {e}", dir.display());
            }
        }
        // The VM goes before the RAM it maps.
        drop(vm);
        drop(memory);
        stopped
    }
}

impl PartitionConfig {
    /// Guest RAM in bytes, checked against the layout and the host.
    pub fn ram_bytes(&self) -> Result<u64, PartitionError> {
        let host_max = host::total_memory();
        let (max, why) =
            if host_max < MAX_RAM { (host_max, " (this host's memory)") } else { (MAX_RAM, "") };
        let bytes = self.memory_mib.checked_mul(1 << 20).filter(|b| (MIN_RAM..=max).contains(b));
        bytes.ok_or(PartitionError::MemorySize {
            id: self.id,
            mib: self.memory_mib,
            min: MIN_RAM >> 20,
            max: max >> 20,
            why,
        })
    }
}

impl PartitionConfig {
    /// Opens and checks the firmware (and the arguments), so that bad input is reported before
    /// any VM exists.
    pub fn open_firmware(&self) -> Result<Firmware, PartitionError> {
        if self.args.len() > MAX_ARGS {
            return Err(PartitionError::ArgsTooLong { id: self.id, len: self.args.len() });
        }
        Firmware::open(&self.firmware, self.ram_bytes()?)
            .map_err(|source| self.firmware_error(source))
    }

    fn firmware_error(&self, source: FirmwareError) -> PartitionError {
        PartitionError::Firmware { id: self.id, path: self.firmware.clone(), source }
    }
}

/// Builds a partition: creates the VM and its RAM, loads the image, attaches the devices, lays
/// out page tables, GDT, arguments and boot info, and sets the vCPU up to enter the image.
pub fn create(
    kvm: &Kvm,
    config: &PartitionConfig,
    firmware: Firmware,
    console: LineSink,
    limits: Limits,
) -> Result<Partition, PartitionError> {
    let id = config.id;
    let ram = config.ram_bytes()?;
    let kvm_error = |what| move |source| PartitionError::Kvm { id, what, source };
    let vm = kvm.create_vm().map_err(kvm_error("creating the VM"))?;
    let memory = guest_memory(&vm, id, ram)?;
    // The in-kernel irqchip carries the devices' irqfd interrupts; it must exist before the
    // vCPU. Created after the memory slot: the other order makes registering the slot take
    // milliseconds on the development machines.
    vm.create_irq_chip().map_err(kvm_error("creating the in-kernel irqchip"))?;
    let fd = vm.create_vcpu(0).map_err(kvm_error("creating the vCPU"))?;
    let layout = firmware.load(&memory).map_err(|source| config.firmware_error(source))?;

    let mut info = BootInfo::new(ram, config.node_id, id, layout.end.next_multiple_of(0x1000));
    // 0 tells firmware the frequency is unknown; it then reports no timings.
    info.tsc_khz = fd.get_tsc_khz().unwrap_or(0);
    let mut mmio = Bus::new();
    let device_error = |source| PartitionError::Devices { id, source };
    // Devices wake the vCPU when it idles on the idle port waiting for them.
    let wake = Arc::new(Wake::default());
    let mut devices = DeviceSet::new(&vm, &memory, &mut mmio, &mut info, wake.clone());
    let backends = vec![devices.attach_rng(config.rng_limit).map_err(device_error)?];
    let channel =
        devices.attach_secure_channel(config.node_id, id, limits).map_err(device_error)?;
    let vsock = config
        .vsock_cid
        .map(|cid| devices.attach_vsock(id, cid))
        .transpose()
        .map_err(device_error)?;
    let views = devices.views();
    let cr3 = write_boot_state(&memory, &mut info, &config.args)
        .map_err(|e| PartitionError::GuestMemory { id, reason: e.to_string() })?;

    let sregs = fd.get_sregs().map_err(kvm_error("reading the vCPU's special registers"))?;
    fd.set_sregs(&cpu::boot_sregs(sregs, cr3)).map_err(kvm_error("setting special registers"))?;
    fd.set_regs(&cpu::boot_regs(layout.entry)).map_err(kvm_error("setting registers"))?;
    fd.set_fpu(&cpu::boot_fpu()).map_err(kvm_error("setting FPU state"))?;

    let console = Arc::new(Mutex::new(Console::new(console)));
    let pio = port_devices(console.clone(), wake.clone())
        .map_err(|source| PartitionError::Device { id, source })?;
    let stop = Arc::new(StopRequest::default());
    let vcpu = Vcpu { partition: id, fd, pio, mmio, console, stop };
    let dump_ram = config.dump_ram.clone();
    Ok(Partition {
        vcpu,
        backends,
        channel: Some(channel),
        vsock,
        dump_ram,
        devices: views,
        wake,
        _vm: vm,
        memory,
    })
}

/// Writes all of the partition's RAM to `dir/partition-<id>.ram` (for debugging, and for the
/// tests that prove no key reaches guest memory).
fn dump(memory: &GuestMemoryMmap, dir: &std::path::Path, id: u32) -> std::io::Result<()> {
    let mut file = std::fs::File::create(dir.join(format!("partition-{id}.ram")))?;
    for region in memory.iter() {
        memory
            .write_all_volatile_to(region.start_addr(), &mut file, region.len() as usize)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Writes page tables, GDT, the argument string and the boot-info block; returns CR3.
fn write_boot_state(
    memory: &GuestMemoryMmap,
    info: &mut BootInfo,
    args: &str,
) -> Result<u64, GuestMemoryError> {
    let cr3 = page_tables::write(memory)?;
    cpu::write_gdt(memory)?;
    memory.write_slice(args.as_bytes(), GuestAddress(BOOT_ARGS))?;
    info.args_addr = BOOT_ARGS;
    info.args_len = args.len() as u32;
    memory.write_slice(info.as_bytes(), GuestAddress(BOOT_INFO))?;
    Ok(cr3)
}

/// The console, the exit port and the idle port on the port bus.
fn port_devices(console: Arc<Mutex<Console>>, wake: Arc<Wake>) -> Result<Bus, BusError> {
    let mut pio = Bus::new();
    pio.insert(u64::from(IDLE_PORT), 4, Box::new(IdlePort::new(wake)))?;
    pio.insert(u64::from(CONSOLE_PORT), u64::from(CONSOLE_PORT_COUNT), Box::new(console))?;
    pio.insert(u64::from(EXIT_PORT), 4, Box::new(ExitPort))?;
    Ok(pio)
}

/// Maps `ram` bytes of anonymous memory and gives them to the VM as slot 0 at guest-physical 0.
fn guest_memory(vm: &VmFd, id: u32, ram: u64) -> Result<GuestMemoryMmap, PartitionError> {
    let error = |reason: String| PartitionError::GuestMemory { id, reason };
    let size = usize::try_from(ram).map_err(|e| error(e.to_string()))?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| error(format!("cannot map {ram} bytes: {e}")))?;
    for (slot, region) in memory.iter().enumerate() {
        let host =
            memory.get_host_address(region.start_addr()).map_err(|e| error(e.to_string()))?;
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the returned value keeps
        // alive for as long as the VM (both end up in the same `Partition`, VM dropped first).
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| {
            PartitionError::Kvm { id, what: "registering guest memory", source }
        })?;
    }
    Ok(memory)
}
