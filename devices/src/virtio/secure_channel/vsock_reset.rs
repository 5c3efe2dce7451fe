//! Resets of a vsock device's transport: the driver's own (it wrote 0 to the status register
//! and set the device up again), and the operator's (`keyhold ctl reset-vsock`), which is what
//! virtio 1.2 section 5.10.6.7 has the event queue's TRANSPORT_RESET for: the device's
//! connections are gone, and the driver must reset every socket it has and read its CID again.

use super::chain::Cursor;
use super::receive::next_buffer;
use super::vsock::{mirror, rst_from, StreamKey};
use super::*;
use crate::virtio::vsock::EVENT_QUEUE;

/// The event queue's only event (`le32 id`).
const EVENT_TRANSPORT_RESET: u32 = 0;

impl ChannelNode {
    /// If the driver of device `index` reset it since the node last looked, its connections
    /// end as they would with its partition (the other ends get an RST, the entries close,
    /// what waited for it goes): the driver that set the device up again knows none of them.
    pub(super) fn vsock_check_reset(&mut self, index: usize) {
        let resets = self.vsock.devices[index].shared.resets();
        if resets == self.vsock.devices[index].resets_seen {
            return;
        }
        self.vsock.devices[index].resets_seen = resets;
        self.vsock_end_all(index);
    }

    /// The operator resets the transport of `partition`'s vsock device: every connection ends
    /// (the other ends get an RST, the entries close), the driver gets an RST for each of them
    /// and TRANSPORT_RESET on the event queue if it posted a buffer there. Returns how many
    /// connections ended; `None` if the partition has no running vsock device.
    pub(super) fn vsock_transport_reset(&mut self, partition: u32) -> Option<usize> {
        let index =
            self.vsock.devices.iter().position(|d| d.partition == partition && !d.stopped)?;
        let ended = self.vsock_connections_of(index);
        self.vsock_end_all(index);
        // A driver that posts no event buffers (some do not) still learns of each connection.
        for key in &ended {
            self.vsock.post(index, rst_from(mirror(*key)), Vec::new(), None);
        }
        if let Err(why) = self.vsock_event(index, EVENT_TRANSPORT_RESET) {
            self.vsock.devices[index].shared.fail(why);
        }
        self.vsock_flush();
        self.cmm.audit_vsock_reset(partition, ended.len());
        Some(ended.len())
    }

    /// Every connection of device `index`, as its guest sees them.
    fn vsock_connections_of(&self, index: usize) -> Vec<StreamKey> {
        let mut keys = self.vsock.local_keys_of(index);
        keys.extend(self.remote_keys_of(index));
        keys.extend(self.host_keys_of(index));
        keys
    }

    /// Ends every connection of device `index`, on this node, across nodes and with programs
    /// on the node, and lets go of what waited for its driver.
    fn vsock_end_all(&mut self, index: usize) {
        for key in self.vsock.local_keys_of(index) {
            let peer = self.vsock.device_of_cid(key.2);
            self.vsock_reset(key, peer);
        }
        self.remote_device_reset(index);
        self.host_partition_stopped(index);
        self.vsock_drop_outbox(index);
    }

    /// Writes event `id` into the next buffer the driver posted on device `index`'s event
    /// queue; false if it posted none.
    fn vsock_event(&mut self, index: usize, id: u32) -> Result<bool, &'static str> {
        let device = &self.vsock.devices[index];
        let mem = device.mem.clone();
        let mut activation = lock(&device.shared.activation);
        let Some(queue) = ready_queue(&mut activation, EVENT_QUEUE) else { return Ok(false) };
        let Some(chain) = next_buffer(queue, &mem)? else { return Ok(false) };
        let head = chain.head_index();
        let mut writer = Cursor::writable(chain, &mem);
        let written =
            writer.write(&id.to_le_bytes()).map_err(|_| "event buffer outside guest RAM")?;
        let len = if written { 4 } else { 0 };
        queue.add_used(&mem, head, len).map_err(|_| "used ring not writable")?;
        let interrupt = queue.needs_notification(&mem).unwrap_or(true);
        drop(activation);
        device.shared.used();
        if interrupt {
            device.shared.signal(INT_USED_BUFFER);
        }
        Ok(written)
    }
}
