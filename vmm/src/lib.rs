//! keyhold: a minimal KVM virtual machine monitor that hosts guest partitions.
//!
//! The binary's subcommands live in [`cli`]; [`launch`] boots partitions for `keyhold run`.
//! A partition is built by [`partition`] from a firmware image ([`loader`]), identity page
//! tables ([`page_tables`]) and a 64-bit CPL-3 entry state ([`cpu`]), laid out as [`layout`]
//! says, then run by its vCPU thread ([`vcpu`]) under the [`supervisor`].

/// The version and the git revision this build was made from.
pub const VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("KEYHOLD_GIT_REVISION"), ")");

pub mod api;
pub mod claimed_socket;
pub mod cli;
pub mod cluster_config;
pub mod cpu;
pub mod ctl;
pub mod demo;
pub mod device_thread;
pub mod docs_gen;
pub mod exit_stats;
pub mod host;
pub mod keys;
pub mod kick;
pub mod launch;
pub mod layout;
pub mod loader;
pub mod membership;
pub mod node_config;
pub mod page_tables;
pub mod partition;
pub mod partition_devices;
pub mod requests;
pub mod seccomp;
pub mod starter;
pub mod stop;
pub mod supervisor;
pub mod vcpu;
