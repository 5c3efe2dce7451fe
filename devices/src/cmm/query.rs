//! Questions the control API asks the CMM, which lives on the device thread: each goes through a
//! channel with an eventfd to wake that thread, and is answered on a channel of its own.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use guest_agent::channel::abi::Stats;

use super::ChannelView;
use vmm_sys_util::eventfd::EventFd;

/// A question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// Every connection-table entry (never keys).
    Channels,
    /// Every partition's counters.
    Stats,
    /// End a channel on the operator's word; its peer learns of it.
    Revoke {
        /// The partition holding the channel.
        partition: u32,
        /// The channel.
        channel: u32,
    },
    /// A partition stopped: its channels close and its device goes quiet.
    PartitionStopped {
        /// The partition.
        partition: u32,
    },
    /// Reset the transport of a partition's vsock device on the operator's word: every
    /// connection ends, and the driver is told (TRANSPORT_RESET).
    VsockReset {
        /// The partition.
        partition: u32,
    },
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Every entry, with its partition and public keying details.
    Channels(Vec<ChannelView>),
    /// `(partition, counters)` pairs.
    Stats(Vec<(u32, Stats)>),
    /// The revocation's outcome: a status code on failure.
    Revoked(Result<(), u32>),
    /// How many channels the stopped partition held.
    PartitionStopped(usize),
    /// How many connections the reset ended; `None` if the partition has no running vsock
    /// device.
    VsockReset(Option<usize>),
}

type Envelope = (Query, Sender<Reply>);

/// The device thread's end.
pub struct QueryPort {
    /// Questions, in order.
    pub receiver: Receiver<Envelope>,
    /// Written with each question.
    pub wake: EventFd,
}

/// The asking end.
pub struct QueryHandle {
    sender: Sender<Envelope>,
    wake: EventFd,
}

/// A connected pair.
pub fn channel() -> io::Result<(QueryHandle, QueryPort)> {
    let (sender, receiver) = mpsc::channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    Ok((QueryHandle { sender, wake: wake.try_clone()? }, QueryPort { receiver, wake }))
}

impl QueryHandle {
    /// Asks `query` and waits up to two seconds for the answer; `None` if the device thread is
    /// gone or too busy.
    pub fn ask(&self, query: Query) -> Option<Reply> {
        let (reply, answer) = mpsc::channel();
        self.sender.send((query, reply)).ok()?;
        self.wake.write(1).ok()?;
        answer.recv_timeout(Duration::from_secs(2)).ok()
    }
}
