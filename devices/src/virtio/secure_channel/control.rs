//! Control requests: LISTEN, OPEN (at once on this node, answered later from another),
//! CLOSE, LIST and STATS.

use super::*;

impl ChannelNode {
    /// One control request: read it, act on it, write the response (or keep the chain until
    /// another node answers an OPEN).
    pub(super) fn control(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Option<u32>, Malformed> {
        let partition = self.devices[index].partition;
        let mem = self.devices[index].mem.clone();
        let head_index = chain.head_index();
        let response_at = chain.clone().writable().next().map(|d| (d.addr(), d.len() as usize));
        let (mut reader, mut writer) = split(chain, &mem, "control chain outside guest RAM")?;
        let mut raw = [0u8; CONTROL_REQUEST_SIZE];
        let mut request =
            reader.read_exact(&mut raw).ok().and_then(|()| ControlRequest::from_bytes(&raw));
        raw.zeroize();
        let room = writer.available_bytes();
        let answer = match &request {
            Some(request)
                if request.op == op::OPEN && request.flags & !abi::FLAG_GUEST_KEY == 0 =>
            {
                match response_at.filter(|(_, len)| *len >= CONTROL_RESPONSE_SIZE) {
                    Some((response, _)) => {
                        self.open(index, partition, request, head_index, response)
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
        // A guest-supplied key was copied into the key table; no other copy may stay behind.
        if let Some(request) = &mut request {
            request.key.zeroize();
        }
        let Answer::Now(head, body) = answer else { return Ok(None) };
        if room < CONTROL_RESPONSE_SIZE {
            return Ok(Some(0));
        }
        writer
            .write_all(&head.to_bytes())
            .map_err(|_| Malformed("control response not writable"))?;
        writer.write_all(&body).map_err(|_| Malformed("control response not writable"))?;
        Ok(Some((CONTROL_RESPONSE_SIZE + body.len()) as u32))
    }

    /// OPEN: on this node it completes at once; to another node the offer goes over the link
    /// and the request waits for the answer.
    pub(super) fn open(
        &mut self,
        index: usize,
        partition: u32,
        req: &ControlRequest,
        head: u16,
        response: GuestAddress,
    ) -> Answer {
        let key = (req.flags & abi::FLAG_GUEST_KEY != 0).then_some(req.key);
        let (channel, offer) = match self.cmm.open(partition, req.process, req.remote, key) {
            Ok(Opening::Done(id)) => return Answer::Now(opened(Ok(id)), Vec::new()),
            Err(code) => return Answer::Now(opened(Err(code)), Vec::new()),
            Ok(Opening::Remote { channel, offer }) => (channel, offer),
        };
        let node = offer.destination.node;
        let sent = match &self.links {
            Some((links, _)) => links.send(node, &Frame::Offer { id: channel.0, offer }).is_ok(),
            None => false,
        };
        if !sent {
            return Answer::Now(opened(Err(self.cmm.offer_failed(channel))), Vec::new());
        }
        let generation = self.devices[index].shared.generation.load(Ordering::Acquire);
        self.pending_opens.push(PendingOpen { channel, device: index, generation, head, response });
        Answer::Later
    }

    /// Writes the answer to a pending OPEN and hands its chain back to the guest.
    pub(super) fn complete_open(&mut self, pending: PendingOpen, response: ControlResponse) {
        let device = &self.devices[pending.device];
        if device.shared.generation.load(Ordering::Acquire) != pending.generation {
            // The guest reset the device meanwhile: the chain is gone with its queue.
            return;
        }
        let (shared, mem) = (device.shared.clone(), device.mem.clone());
        if mem.write_slice(&response.to_bytes(), pending.response).is_err() {
            shared.fail("control response not writable");
            return;
        }
        let mut activation = lock(&shared.activation);
        let Activation::Active { queues } = &mut *activation else { return };
        let Some(queue) = queues.get_mut(0) else { return };
        if queue.add_used(&mem, pending.head, CONTROL_RESPONSE_SIZE as u32).is_err() {
            drop(activation);
            shared.fail("used ring not writable");
            return;
        }
        let interrupt = queue.needs_notification(&mem).unwrap_or(true);
        drop(activation);
        shared.used();
        if interrupt {
            shared.signal(INT_USED_BUFFER);
        }
    }

    /// Answers the pending OPEN of `channel`, if there is one.
    pub(super) fn answer_open(&mut self, channel: ChannelId, result: Result<ChannelId, u32>) {
        if let Some(at) = self.pending_opens.iter().position(|p| p.channel == channel) {
            let pending = self.pending_opens.swap_remove(at);
            self.complete_open(pending, opened(result));
        }
    }

    pub(super) fn refused(&mut self, partition: u32, code: u32) -> ControlResponse {
        ControlResponse { status: self.cmm.refuse(partition, code), ..Default::default() }
    }

    /// Carries out a decoded request; `room` is the space after the response head.
    pub(super) fn execute(&mut self, partition: u32, req: &ControlRequest, room: usize) -> Answer {
        let (head, body) = self.execute_now(partition, req, room);
        Answer::Now(head, body)
    }

    pub(super) fn execute_now(
        &mut self,
        partition: u32,
        req: &ControlRequest,
        room: usize,
    ) -> (ControlResponse, Vec<u8>) {
        match req.op {
            op::LISTEN if req.flags == 0 => {
                (opened(self.cmm.listen(partition, req.process, req.remote)), Vec::new())
            }
            op::CLOSE if req.flags == 0 => {
                let status = match self.cmm.close(partition, req.process, req.channel) {
                    Ok(Some(closing)) => {
                        if let Some((links, _)) = &self.links {
                            let frame = Frame::Close {
                                source: closing.source,
                                destination: closing.destination,
                            };
                            // An unreachable peer learns of the close when its link goes down.
                            let _ = links.send(closing.node, &frame);
                        }
                        status::OK
                    }
                    Ok(None) => status::OK,
                    Err(code) => code,
                };
                (ControlResponse { status, ..Default::default() }, Vec::new())
            }
            op::LIST => {
                let entries = self.cmm.list(partition);
                if entries.len() * CHANNEL_INFO_SIZE > room {
                    let head = ControlResponse {
                        status: status::BUFFER_TOO_SMALL,
                        channel: 0,
                        count: entries.len() as u32,
                    };
                    return (head, Vec::new());
                }
                let body = entries.iter().flat_map(|e| e.to_bytes()).collect();
                (
                    ControlResponse { status: status::OK, channel: 0, count: entries.len() as u32 },
                    body,
                )
            }
            op::STATS => {
                let body = self.cmm.stats(partition).to_bytes();
                if body.len() > room {
                    return (self.refused(partition, status::BUFFER_TOO_SMALL), Vec::new());
                }
                (ControlResponse { status: status::OK, ..Default::default() }, body.to_vec())
            }
            op::LISTEN | op::OPEN | op::CLOSE => {
                (self.refused(partition, status::BAD_REQUEST), Vec::new())
            }
            _ => (self.refused(partition, status::UNKNOWN_OP), Vec::new()),
        }
    }
}

/// The response to LISTEN or OPEN.
fn opened(result: Result<ChannelId, u32>) -> ControlResponse {
    match result {
        Ok(id) => ControlResponse { status: status::OK, channel: id.0, count: 0 },
        Err(code) => ControlResponse { status: code, ..Default::default() },
    }
}
