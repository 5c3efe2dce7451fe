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
use crate::virtio::vsock::{self, VsockDevice};

/// A device [`ChannelNode::attach`] put in place, for the device thread to watch.
pub struct Attachment {
    index: usize,
    /// The queue eventfds of the device it replaced.
    retired: Vec<EventFd>,
    /// A vsock device (else a secure-channel device).
    vsock: bool,
}

impl ChannelNode {
    /// Serves each partition's control and transmit queues on the thread of the vCPU that
    /// notifies them, when the node is free: a message then goes out (or into the other guest)
    /// without waking the device thread. When the device thread holds the node, the
    /// notification goes to it as usual; a vCPU never waits for the node.
    pub fn serve_inline(node: &Arc<Mutex<ChannelNode>>) {
        let guard = lock(node);
        for index in 0..guard.devices.len() {
            guard.serve_inline_at(node, index);
        }
        for index in 0..guard.vsock.devices.len() {
            guard.serve_vsock_inline_at(node, index);
        }
    }

    /// Serves vsock device `index`'s transmit and receive notifications inline: the driver
    /// waits for each transmitted packet's buffer to come back, so a pass of the device
    /// thread per packet would cost a wake-up each.
    fn serve_vsock_inline_at(&self, node: &Arc<Mutex<ChannelNode>>, index: usize) {
        let Some(device) = self.vsock.devices.get(index) else { return };
        let fallbacks: Vec<EventFd> = [vsock::RX_QUEUE, vsock::TX_QUEUE]
            .iter()
            .filter_map(|&q| device.queue_evts.get(q)?.try_clone().ok())
            .collect();
        let Ok([rx, tx]) = <[EventFd; 2]>::try_from(fallbacks) else { return };
        let weak = Arc::downgrade(node);
        let handler = move |queue: u32| {
            let fallback = match queue as usize {
                vsock::RX_QUEUE => &rx,
                vsock::TX_QUEUE => &tx,
                _ => return false,
            };
            match weak.upgrade().as_deref().map(Mutex::try_lock) {
                Some(Ok(mut node)) => {
                    node.vsock_notified(index, queue as usize);
                    node.after_inline();
                }
                Some(Err(_)) => {
                    let _ = fallback.write(1);
                }
                None => return false,
            }
            true
        };
        device.shared.set_inline_notify(InlineNotify(Box::new(handler)));
    }

    /// Serves device `index`'s control and transmit notifications inline (as
    /// [`ChannelNode::serve_inline`]); `node` is the node this is.
    fn serve_inline_at(&self, node: &Arc<Mutex<ChannelNode>>, index: usize) {
        let Some(device) = self.devices.get(index) else { return };
        let fallbacks: Vec<EventFd> = [CONTROL_QUEUE, TX_QUEUE]
            .iter()
            .filter_map(|&q| device.queue_evts.get(q as usize)?.try_clone().ok())
            .collect();
        let Ok([control, tx]) = <[EventFd; 2]>::try_from(fallbacks) else { return };
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

    /// Puts the device of a partition started again in place of its last run's (whose
    /// channels closed when it stopped) and serves its notifications inline. The device
    /// thread must then [`ChannelNode::watch`] what this returns.
    pub fn attach(node: &Arc<Mutex<ChannelNode>>, device: ChannelDevice) -> Attachment {
        let mut guard = lock(node);
        let partition = device.partition;
        let (index, retired) = match guard.device_of(partition) {
            Some(index) => {
                let old = std::mem::replace(&mut guard.devices[index], device);
                (index, old.queue_evts)
            }
            None => {
                guard.devices.push(device);
                (guard.devices.len() - 1, Vec::new())
            }
        };
        guard.cmm.add_partition(partition);
        guard.serve_inline_at(node, index);
        Attachment { index, retired, vsock: false }
    }

    /// As [`ChannelNode::attach`], for the vsock device of a partition started again (whose
    /// connections were reset when it stopped).
    pub fn attach_vsock(node: &Arc<Mutex<ChannelNode>>, device: VsockDevice) -> Attachment {
        let mut guard = lock(node);
        let partition = device.partition;
        let devices = &mut guard.vsock.devices;
        let (index, retired) = match devices.iter().position(|d| d.partition == partition) {
            Some(index) => (index, std::mem::replace(&mut devices[index], device).queue_evts),
            None => {
                devices.push(device);
                (devices.len() - 1, Vec::new())
            }
        };
        guard.cmm.add_partition(partition);
        guard.serve_vsock_inline_at(node, index);
        Attachment { index, retired, vsock: true }
    }

    /// On the device thread: watches the queues of a device just attached, and forgets those
    /// of the device it replaced.
    pub fn watch(&mut self, attachment: Attachment, ops: &mut EventOps) {
        for evt in &attachment.retired {
            // Not watched if it never was: nothing to undo.
            let _ = ops.remove(Events::new(evt, EventSet::IN));
        }
        if attachment.vsock {
            self.watch_vsock_queues(attachment.index, ops);
        } else {
            self.watch_queues(attachment.index, ops);
        }
    }

    /// A notification of `queue` of device `index`, on the notifying vCPU's thread.
    fn notified_inline(&mut self, index: usize, queue: usize) {
        self.notified(index, queue);
        self.after_inline();
    }

    /// What a pass on a vCPU's thread ends with, as the device thread's passes do.
    fn after_inline(&mut self) {
        self.complete_answers();
        self.signal_touched();
        if self.cmm.has_fd_changes() || self.cmm.needs_timer() != self.timer_running {
            // A link ended (the device thread must forget its socket), or an OPEN now waits
            // for a link or an answer (the device thread must run the timer that ends it).
            let _ = self.poke.write(1);
        }
    }
}
