//! What the links hand the CMM: authenticated frames and link losses, queued for the device
//! thread, with what each peer has queued counted so that no peer can grow it without bound.
//!
//! The links never wait for the device thread (a link that stopped reading while the device
//! thread was blocked sending to that same peer would deadlock the pair). A peer whose frames
//! pile up past [`PEER_BACKLOG`] unhandled bytes is sending faster than this node can handle,
//! or on purpose to exhaust its memory: its link is dropped, like any other peer misbehaviour.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::wire::Frame;

/// Bytes of one peer's frames that may wait for the device thread.
pub const PEER_BACKLOG: usize = 64 << 20;

/// What the links tell the CMM.
pub enum Inbound {
    /// A frame for the CMM from an authenticated peer.
    Frame {
        /// The node authenticated on the link it came over.
        node: u32,
        /// The frame.
        frame: Frame,
    },
    /// The link to `node` went down: its channels are gone.
    LinkDown(u32),
}

/// The device thread's end: drained whenever `wake` fires.
pub struct Inbox {
    receiver: Receiver<Inbound>,
    backlog: Arc<Backlog>,
    /// Written whenever something is queued.
    pub wake: EventFd,
}

/// The links' end.
pub(super) struct Outbox {
    sender: Sender<Inbound>,
    backlog: Arc<Backlog>,
    wake: EventFd,
}

/// The peer's backlog would pass [`PEER_BACKLOG`]; the frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Overrun;

/// Bytes queued per peer node.
struct Backlog {
    limit: usize,
    bytes: BTreeMap<u32, AtomicUsize>,
}

impl Backlog {
    fn counter(&self, node: u32) -> Option<&AtomicUsize> {
        self.bytes.get(&node)
    }
}

/// A new inbox for frames from `peers`, each allowed `limit` bytes of backlog.
pub(super) fn inbox(
    peers: impl IntoIterator<Item = u32>,
    limit: usize,
) -> std::io::Result<(Outbox, Inbox)> {
    let (sender, receiver) = mpsc::channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let bytes = peers.into_iter().map(|p| (p, AtomicUsize::new(0))).collect();
    let backlog = Arc::new(Backlog { limit, bytes });
    let outbox = Outbox { sender, backlog: backlog.clone(), wake: wake.try_clone()? };
    Ok((outbox, Inbox { receiver, backlog, wake }))
}

/// What a queued frame costs: its payload and the frame itself.
fn cost(frame: &Frame) -> usize {
    let payload = match frame {
        Frame::Data(data) => data.payload.len(),
        _ => 0,
    };
    std::mem::size_of::<Inbound>() + payload
}

impl Outbox {
    /// Queues `frame` from `node`, unless that would take the node past its backlog.
    pub(super) fn frame(&self, node: u32, frame: Frame) -> Result<(), Overrun> {
        let cost = cost(&frame);
        let counter = self.backlog.counter(node).ok_or(Overrun)?;
        let before = counter.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.backlog.limit {
            counter.fetch_sub(cost, Ordering::AcqRel);
            return Err(Overrun);
        }
        self.send(Inbound::Frame { node, frame });
        Ok(())
    }

    /// Bytes of `node`'s frames queued and not yet taken.
    pub(super) fn queued(&self, node: u32) -> usize {
        self.backlog.counter(node).map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Says that the link to `node` went down.
    pub(super) fn link_down(&self, node: u32) {
        self.send(Inbound::LinkDown(node));
    }

    fn send(&self, item: Inbound) {
        // The receiver is gone only when the device thread has ended; nothing is waiting then.
        if self.sender.send(item).is_ok() {
            if let Err(e) = self.wake.write(1) {
                log::error!("waking the device thread: {e}");
            }
        }
    }
}

impl Inbox {
    /// Everything queued so far, in arrival order.
    pub fn take(&self) -> Vec<Inbound> {
        let _ = self.wake.read();
        let items: Vec<Inbound> = self.receiver.try_iter().collect();
        for item in &items {
            if let Inbound::Frame { node, frame } = item {
                if let Some(counter) = self.backlog.counter(*node) {
                    counter.fetch_sub(cost(frame), Ordering::AcqRel);
                }
            }
        }
        items
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cmm::frames::DataFrame;
    use guest_agent::channel::abi::Endpoint;

    /// A DATA frame from node 2 to node 1 with `len` bytes of payload.
    pub(crate) fn data(len: usize) -> Frame {
        let source = Endpoint { node: 2, partition: 1, process: 1 };
        let destination = Endpoint { node: 1, partition: 1, process: 1 };
        Frame::Data(DataFrame { source, destination, seq: 0, payload: vec![7; len], tag: [0; 16] })
    }

    #[test]
    fn each_peer_gets_its_own_backlog_and_taking_frees_it() {
        let one = cost(&data(1000));
        let (outbox, inbox) = inbox([2, 3], 2 * one).unwrap();
        assert_eq!(outbox.frame(2, data(1000)), Ok(()));
        assert_eq!(outbox.frame(2, data(1000)), Ok(()));
        assert_eq!(outbox.frame(2, data(1000)), Err(Overrun));
        // Another peer is not held back by the first one's backlog.
        assert_eq!(outbox.frame(3, data(1000)), Ok(()));
        // Nor is a node that is not a peer let in.
        assert_eq!(outbox.frame(9, data(1)), Err(Overrun));
        outbox.link_down(3);
        let items = inbox.take();
        assert_eq!(items.len(), 4);
        assert!(matches!(items[3], Inbound::LinkDown(3)));
        assert_eq!(outbox.frame(2, data(1000)), Ok(()));
        assert_eq!(outbox.frame(2, data(1000)), Ok(()));
    }
}
