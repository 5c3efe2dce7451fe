//! Notifications served on the vCPU thread that makes them.
//!
//! A partition's control and transmit notifications come to its transport (no ioeventfd), on
//! the thread of the vCPU that wrote them, which serves the queue there and then if the node is
//! free: on these hosts waking the device thread and waiting for it to get a core costs more
//! than the exit the notification already is. Across nodes a round trip then takes four
//! hand-offs between threads instead of six; on one node two instead of four. When the device
//! thread holds the node, the notification goes to it through the queue's eventfd as before:
//! a vCPU never waits for the node.

use std::sync::Mutex;

use super::*;
use crate::virtio::shared::InlineNotify;

impl ChannelNode {
    /// Serves each partition's control and transmit queues on the thread of the vCPU that
    /// notifies them, when the node is free: a message then goes out (or into the other guest)
    /// without waking the device thread. When the device thread holds the node, the
    /// notification goes to it as usual; a vCPU never waits for the node.
    pub fn serve_inline(node: &Arc<Mutex<ChannelNode>>) {
        let guard = lock(node);
        for (index, device) in guard.devices.iter().enumerate() {
            let fallbacks: Vec<EventFd> = [CONTROL_QUEUE, TX_QUEUE]
                .iter()
                .filter_map(|&q| device.queue_evts.get(q as usize)?.try_clone().ok())
                .collect();
            let Ok([control, tx]) = <[EventFd; 2]>::try_from(fallbacks) else { continue };
            let weak = Arc::downgrade(node);
            let handler = move |queue: u32| {
                let fallback = match queue {
                    CONTROL_QUEUE => &control,
                    TX_QUEUE => &tx,
                    _ => return false,
                };
                match weak.upgrade().as_deref().map(Mutex::try_lock) {
                    Some(Ok(mut node)) => node.notified_inline(index, queue as usize),
                    Some(Err(_)) => {
                        let _ = fallback.write(1);
                    }
                    None => return false,
                }
                true
            };
            device.shared.set_inline_notify(InlineNotify(Box::new(handler)));
        }
    }

    /// A notification of `queue` of device `index`, on the notifying vCPU's thread.
    fn notified_inline(&mut self, index: usize, queue: usize) {
        self.notified(index, queue);
        self.complete_answers();
        self.signal_touched();
        if self.cmm.has_fd_changes() {
            // A link ended: the device thread must forget its socket.
            let _ = self.poke.write(1);
        }
    }
}
