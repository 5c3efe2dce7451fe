//! The guest side of keyhold.
//!
//! Firmware running in a keyhold partition links this crate to reach the platform: the boot-info
//! block the VMM hands over in `RDI`, the console, the exit port, and (with the `rt` feature) the
//! bare-metal runtime. The VMM links it too, for the ABI types alone, so that guest and host share
//! one definition of every structure they exchange.
#![no_std]

pub mod boot_info;
pub mod channel;
pub mod console;
pub mod exit;
pub mod idle;
pub mod mmio;
pub mod pages;
pub mod platform;
mod port_io;
pub mod time;
pub mod virtio;

#[cfg(feature = "rt")]
pub mod rt;

pub use boot_info::BootInfo;
