//! Device models of a keyhold partition.
//!
//! Each device answers guest accesses through [`bus::BusDevice`]; the VMM routes port and MMIO
//! exits to them through a [`bus::Bus`] per partition. Virtio devices ([`virtio`]) split into a
//! transport on the vCPU thread and a backend on the node's device thread.

pub mod bus;
pub mod cmm;
pub mod console;
pub mod crypto;
pub mod entropy;
pub mod exit_port;
pub mod idle;
pub mod link;
pub mod memcopy;
pub mod secret;
pub mod timer;
pub mod token_bucket;
pub mod virtio;
