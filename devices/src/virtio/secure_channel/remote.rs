//! What arrives from outside the partitions: records on the host links, and questions from
//! the control API.

use super::*;
use crate::cmm::query::{Query, Reply};

impl ChannelNode {
    /// Link `token` has bytes: the CMM opens its messages into the receive queues.
    pub(super) fn link_readable(&mut self, token: usize) {
        let (cmm, mut receivers) = self.receivers();
        cmm.link_readable(token, &mut receivers);
        self.remote_tidy();
    }

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
                    let revoked = self.cmm.revoke(partition, channel);
                    self.cmm.flush();
                    Reply::Revoked(revoked)
                }
                Query::PartitionStopped { partition } => {
                    Reply::PartitionStopped(self.partition_stopped(partition))
                }
                Query::VsockReset { partition } => Reply::VsockReset(self.reset_vsock(partition)),
            };
            // The asker may have given up waiting; nothing to do then.
            let _ = reply.send(answer);
        }
    }
}
