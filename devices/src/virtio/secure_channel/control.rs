//! Control requests: LISTEN, OPEN (at once on this node, answered later from another),
//! CLOSE, LIST and STATS.
//!
//! A request's first 32 bytes are its head; a guest-supplied key (OPEN with the guest-key
//! flag) is read from the request's last 32 bytes straight into the CMM's secret memory, so it
//! never sits on the device thread's stack or heap.

use guest_agent::channel::abi::{
    self, op, status, ControlRequest, ControlResponse, CHANNEL_INFO_SIZE, CONTROL_HEAD_SIZE,
    CONTROL_REQUEST_SIZE, CONTROL_RESPONSE_SIZE,
};

use super::chain::Cursor;
use super::*;
use crate::cmm::{KeySource, Opening};

/// What a control request gets.
enum Answer {
    /// A response head and body, written now.
    Now(ControlResponse, Vec<u8>),
    /// Nothing yet: the chain stays with the device until the offer is answered.
    Later,
}

/// The key part of an OPEN request, still in guest memory.
struct GuestKey<'c, 'm> {
    cursor: &'c mut Cursor<'m>,
}

impl KeySource for GuestKey<'_, '_> {
    fn read_key(&mut self, out: &mut [u8; 32]) -> bool {
        self.cursor.read(out).unwrap_or(false)
    }
}

impl ChannelNode {
    /// One control request: read it, act on it, write the response (or keep the chain until
    /// another node answers an OPEN).
    pub(super) fn control(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        epoch: u64,
    ) -> Result<Option<u32>, Malformed> {
        let partition = self.devices[index].partition;
        let head_index = chain.head_index();
        let (mut reader, mut writer) = Cursor::halves(chain, mem);
        let response_at = writer.first_buffer();
        let room = writer.remaining()?;
        let mut raw = [0u8; CONTROL_HEAD_SIZE];
        let request = (reader.remaining()? >= CONTROL_REQUEST_SIZE && reader.read(&mut raw)?)
            .then(|| ControlRequest::head_from_bytes(&raw))
            .flatten();
        let answer = match &request {
            Some(request)
                if request.op == op::OPEN && request.flags & !abi::FLAG_GUEST_KEY == 0 =>
            {
                match response_at.filter(|(_, len)| *len >= CONTROL_RESPONSE_SIZE) {
                    Some((response, _)) => {
                        let pending = PendingOpen {
                            channel: ChannelId(0),
                            device: index,
                            epoch,
                            head: head_index,
                            response,
                        };
                        self.open(partition, request, &mut reader, pending)
                    }
                    None => {
                        Answer::Now(self.refused(partition, status::BUFFER_TOO_SMALL), Vec::new())
                    }
                }
            }
            Some(request) => {
                self.execute(partition, request, room.saturating_sub(CONTROL_RESPONSE_SIZE))
            }
            None => Answer::Now(self.refused(partition, status::BAD_REQUEST), Vec::new()),
        };
        let Answer::Now(head, body) = answer else { return Ok(None) };
        if room < CONTROL_RESPONSE_SIZE {
            return Ok(Some(0));
        }
        writer.write(&head.to_bytes())?;
        writer.write(&body)?;
        Ok(Some((CONTROL_RESPONSE_SIZE + body.len()) as u32))
    }

    /// OPEN: on this node it completes at once; to another node the offer goes over the link
    /// and the request waits for the answer.
    fn open(
        &mut self,
        partition: u32,
        req: &ControlRequest,
        reader: &mut Cursor<'_>,
        pending: PendingOpen,
    ) -> Answer {
        let mut key = GuestKey { cursor: reader };
        let key: Option<&mut dyn KeySource> =
            (req.flags & abi::FLAG_GUEST_KEY != 0).then_some(&mut key as &mut dyn KeySource);
        match self.cmm.open(partition, req.process, req.remote, key) {
            Ok(Opening::Done(id)) => Answer::Now(opened(Ok(id)), Vec::new()),
            Ok(Opening::Pending(channel)) => {
                self.pending_opens.push(PendingOpen { channel, ..pending });
                Answer::Later
            }
            Err(code) => Answer::Now(opened(Err(code)), Vec::new()),
        }
    }

    /// Completes the OPENs other nodes answered (or whose links failed).
    pub(super) fn complete_answers(&mut self) {
        for (channel, result) in self.cmm.take_answers() {
            if let Some(at) = self.pending_opens.iter().position(|p| p.channel == channel) {
                let pending = self.pending_opens.swap_remove(at);
                self.complete_open(pending, opened(result));
            } else {
                self.remote_answered(channel, result.is_ok());
            }
        }
    }

    /// Writes the answer to a pending OPEN and hands its chain back to the guest.
    fn complete_open(&mut self, pending: PendingOpen, response: ControlResponse) {
        let device = &self.devices[pending.device];
        let (shared, mem) = (device.shared.clone(), device.mem.clone());
        if self.queue_epoch(pending.device, CONTROL_QUEUE as usize) != Some(pending.epoch) {
            // The guest reset the device or stopped the queue meanwhile: the chain is gone.
            return;
        }
        if vm_memory::Bytes::write_slice(&mem, &response.to_bytes(), pending.response).is_err() {
            shared.fail("control response not writable");
            return;
        }
        match return_chains(
            &shared,
            0,
            &mem,
            pending.epoch,
            &[(pending.head, CONTROL_RESPONSE_SIZE as u32)],
            false,
        ) {
            Ok(_) => {}
            Err(Malformed(why)) => shared.fail(why),
        }
    }

    fn refused(&mut self, partition: u32, code: u32) -> ControlResponse {
        ControlResponse { status: self.cmm.refuse(partition, code), ..Default::default() }
    }

    /// Carries out a request other than OPEN; `room` is the space after the response head.
    fn execute(&mut self, partition: u32, req: &ControlRequest, room: usize) -> Answer {
        let (head, body) = match req.op {
            op::LISTEN if req.flags == 0 => {
                (opened(self.cmm.listen(partition, req.process, req.remote)), Vec::new())
            }
            op::CLOSE if req.flags == 0 => {
                let status = match self.cmm.close(partition, req.process, req.channel) {
                    Ok(()) => status::OK,
                    Err(code) => code,
                };
                (ControlResponse { status, ..Default::default() }, Vec::new())
            }
            op::LIST if req.flags == 0 => {
                let entries = self.cmm.list(partition);
                let head =
                    ControlResponse { status: status::OK, channel: 0, count: entries.len() as u32 };
                if entries.len() * CHANNEL_INFO_SIZE > room {
                    // Refused like any request (counted and audited), the count still told.
                    let refused = self.refused(partition, status::BUFFER_TOO_SMALL);
                    (ControlResponse { count: head.count, ..refused }, Vec::new())
                } else {
                    (head, entries.iter().flat_map(|e| e.to_bytes()).collect())
                }
            }
            op::STATS if req.flags == 0 => {
                let body = self.cmm.stats(partition).to_bytes();
                if body.len() > room {
                    (self.refused(partition, status::BUFFER_TOO_SMALL), Vec::new())
                } else {
                    (ControlResponse { status: status::OK, ..Default::default() }, body.to_vec())
                }
            }
            // Flags where none are defined (OPEN's own are checked before it gets here).
            op::LISTEN | op::OPEN | op::CLOSE | op::LIST | op::STATS => {
                (self.refused(partition, status::BAD_REQUEST), Vec::new())
            }
            _ => (self.refused(partition, status::UNKNOWN_OP), Vec::new()),
        };
        Answer::Now(head, body)
    }
}

/// The response to LISTEN or OPEN.
fn opened(result: Result<ChannelId, u32>) -> ControlResponse {
    match result {
        Ok(id) => ControlResponse { status: status::OK, channel: id.0, count: 0 },
        Err(code) => ControlResponse { status: code, ..Default::default() },
    }
}
