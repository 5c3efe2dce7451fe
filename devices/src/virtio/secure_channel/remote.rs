//! What arrives from outside the partitions: frames from the host links, and questions from
//! the control API.

use super::*;

impl ChannelNode {
    /// Answers every question waiting.
    pub(super) fn answer_queries(&mut self) {
        let mut questions = Vec::new();
        if let Some(port) = &self.queries {
            let _ = port.wake.read();
            questions.extend(port.receiver.try_iter());
        }
        for (query, reply) in questions {
            let answer = match query {
                Query::Channels => Reply::Channels(self.cmm.list_all()),
                Query::Stats => Reply::Stats(self.cmm.all_stats()),
                Query::Revoke { partition, channel } => {
                    Reply::Revoked(self.revoke(partition, channel))
                }
            };
            // The asker may have given up waiting; nothing to do then.
            let _ = reply.send(answer);
        }
    }

    pub(super) fn revoke(&mut self, partition: u32, channel: u32) -> Result<(), u32> {
        if let Some(closing) = self.cmm.revoke(partition, channel)? {
            if let Some((links, _)) = &self.links {
                let frame =
                    Frame::Close { source: closing.source, destination: closing.destination };
                let _ = links.send(closing.node, &frame);
            }
        }
        Ok(())
    }

    /// Handles everything the host links queued; the messages among it are delivered together.
    pub(super) fn drain_inbox(&mut self) {
        let Some((_, inbox)) = &self.links else { return };
        let mut deliveries = std::mem::take(&mut self.deliveries);
        for item in inbox.take() {
            match item {
                Inbound::Frame { node, frame } => {
                    self.frame_from_link(node, frame, &mut deliveries)
                }
                Inbound::LinkDown(node) => {
                    for channel in self.cmm.link_down(node) {
                        self.answer_open(channel, Err(status::UNREACHABLE));
                    }
                }
            }
        }
        self.deliver_all(deliveries.drain(..));
        self.deliveries = deliveries;
    }

    /// A frame from `node`, authenticated by its link; a verified message joins `deliveries`.
    fn frame_from_link(&mut self, node: u32, frame: Frame, deliveries: &mut Vec<Delivery>) {
        match frame {
            Frame::Offer { id, offer } => {
                let result = match self.cmm.receive_offer(&offer, node) {
                    Ok(_) => OfferResult::Accepted,
                    Err(rejection) => OfferResult::Rejected(rejection),
                };
                if let Some((links, _)) = &self.links {
                    let _ = links.send(node, &Frame::OfferReply { id, result });
                }
            }
            Frame::OfferReply { id, result } => {
                let answer = match result {
                    OfferResult::Accepted => Ok(()),
                    OfferResult::Rejected(r) => Err(r),
                };
                let channel = ChannelId(id);
                let outcome = self.cmm.offer_answered(channel, answer, node);
                self.answer_open(channel, outcome);
            }
            Frame::Data(frame) => {
                if let Ok(delivery) = self.cmm.receive_data(frame, node) {
                    deliveries.push(delivery);
                }
            }
            Frame::Close { source, destination } => {
                self.cmm.receive_close(&source, &destination, node)
            }
            Frame::Keepalive | Frame::Goodbye => {}
        }
    }
}
