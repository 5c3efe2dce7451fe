//! The transmit queue: each message is checked by the CMM and then copied, once, from the
//! sender's buffer: into the receiving guest's buffer on this node, or into the link's buffer
//! (sealed there in place) for another node. The frames of a batch leave as they fill
//! records, and at the end of the batch (`ChannelNode::run_queue`).

use guest_agent::channel::abi::{status, TxHeader, TX_HEADER_SIZE};

use super::chain::Cursor;
use super::*;
use crate::cmm::{Payload, Sent};

/// A message's payload, still in the sender's guest memory.
struct GuestPayload<'c, 'm> {
    cursor: &'c mut Cursor<'m>,
}

impl Payload for GuestPayload<'_, '_> {
    fn read_into(&mut self, out: &mut [u8]) -> bool {
        self.cursor.read(out).unwrap_or(false)
    }
}

impl ChannelNode {
    /// One message; returns the bytes written to the chain (its status).
    pub(super) fn send_one(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, Malformed> {
        let partition = self.devices[index].partition;
        let (mut reader, mut writer) = Cursor::halves(chain, mem);
        let code = match self.read_header(&mut reader)? {
            // A receiver on this node with no room: nothing is sent, the sender tries again.
            Ok(header) if !self.room_for(partition, &header) => status::NO_ROOM,
            Ok(header) => {
                let sent =
                    self.cmm.send(partition, &header, &mut GuestPayload { cursor: &mut reader });
                match sent {
                    Ok(Sent::Local { partition: to, channel, header: rx }) => {
                        self.deliver_local(to, channel, &rx, &mut reader)?;
                        status::OK
                    }
                    Ok(Sent::Remote) => status::OK,
                    Err(code) => code,
                }
            }
            Err(code) => self.cmm.refuse(partition, code),
        };
        // A chain with no room for the status gets none (and a used length of 0).
        Ok(if writer.write(&code.to_le_bytes())? { 4 } else { 0 })
    }

    /// Whether the message `header` announces, from `partition`, can be taken now: a receiver
    /// on another node always (its node holds or drops); one on this node if the device holds
    /// fewer than [`CHANNEL_WINDOW`] messages for that channel and [`MAX_PENDING`] in all
    /// (each goes into a posted buffer, or is held until the guest posts one). A message that
    /// is not its sender's to send always "fits": the CMM refuses it for what it is.
    fn room_for(&self, partition: u32, header: &TxHeader) -> bool {
        let Some((to, peer)) = self.cmm.local_receiver(partition, header) else { return true };
        let Some(device) = self.device_of(to).map(|i| &self.devices[i]) else { return true };
        device.pending.len() < MAX_PENDING
            && device.pending.iter().filter(|h| h.channel == peer).count() < CHANNEL_WINDOW
    }

    /// Reads a transmit header and checks that the payload it announces is there and within
    /// the device's limit.
    fn read_header(&self, reader: &mut Cursor<'_>) -> Result<Result<TxHeader, u32>, Malformed> {
        let mut raw = [0u8; TX_HEADER_SIZE];
        if !reader.read(&mut raw)? {
            return Ok(Err(status::BAD_REQUEST));
        }
        let Some(header) = TxHeader::from_bytes(&raw) else { return Ok(Err(status::BAD_REQUEST)) };
        if header.len > self.cmm.limits().max_message {
            return Ok(Err(status::TOO_BIG));
        }
        if reader.remaining()? < header.len as usize {
            return Ok(Err(status::BAD_REQUEST));
        }
        Ok(Ok(header))
    }
}
