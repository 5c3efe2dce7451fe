//! Secret memory: where every key of the node lives, and nowhere else.
//!
//! Keys are built in place in pages that the kernel removes from its own direct map
//! (`memfd_secret(2)`): no other process, not even root through `/proc/PID/mem` or
//! `process_vm_readv`, can read them, they never reach swap or a core dump, and they are never
//! mapped into a guest. Where the kernel lacks `memfd_secret`, locked anonymous memory excluded
//! from dumps takes its place (said once in the log).
//!
//! - [`Slab`]: many objects of one type (the key table's channel ciphers), O(1) to allocate
//!   and free, grown in chunks as they are needed.
//! - [`SecretBox`]: one object of any type (a node key, a Noise cipher, a handshake state).
//! - [`scrub_stack`]: wipes what a library left on the stack while it built a key in place.
//!
//! Everything here is zeroed when it is freed.

mod boxed;
mod region;
mod scrub;
mod slab;

pub use boxed::SecretBox;
pub use region::{backing, Backing, SecretRegion};
pub use scrub::{scrub_stack, scrubbed, scrubbed_light};
pub use slab::{Slab, SlabError};
