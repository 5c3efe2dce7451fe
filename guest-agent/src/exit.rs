//! Ending the partition.

use crate::platform::EXIT_PORT;
use crate::port_io::outl;

/// Stops the partition with `status`: the VMM reports it as the partition's exit status.
pub fn exit(status: u32) -> ! {
    outl(EXIT_PORT, status);
    // The VMM stops the vCPU on the write above; should it ever resume us, stay put rather than
    // run off the end of the program. (`hlt` is privileged at CPL 3, so spin.)
    loop {
        core::hint::spin_loop();
    }
}
