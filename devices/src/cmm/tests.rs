//! The CMM on one node, and two CMMs linked by real routers over loopback TCP.

use guest_agent::channel::abi::{closed, state, status, Endpoint, RxHeader, TxHeader};

use super::connection_table::ChannelId;
use super::*;
use crate::cmm::audit::Audit;
use crate::crypto::channel::{associated_data, ChannelCiphers};
use crate::link::loopback::linked;
use crate::link::router::{Router, RouterConfig};
use crate::link::wire::DataHead;
use crate::secret::SecretBox;

/// Delivered messages, as a device would see them.
#[derive(Default)]
struct Inbox(Vec<(u32, RxHeader, Vec<u8>)>);

impl Deliver for Inbox {
    fn deliver(&mut self, partition: u32, header: &RxHeader, payload: &[u8], _: bool) -> Delivered {
        self.0.push((partition, *header, payload.to_vec()));
        Delivered::Written
    }
}

/// A receiver whose guest takes nothing: every message is held.
#[derive(Default)]
struct Deaf(Vec<RxHeader>);

impl Deliver for Deaf {
    fn deliver(&mut self, _: u32, header: &RxHeader, _: &[u8], metered: bool) -> Delivered {
        assert!(metered, "a channel over a version-3 link is metered");
        self.0.push(*header);
        Delivered::Held
    }
}

/// A payload in host memory.
struct Bytes<'a>(&'a [u8]);

impl Payload for Bytes<'_> {
    fn read_into(&mut self, out: &mut [u8]) -> bool {
        out.copy_from_slice(&self.0[..out.len()]);
        true
    }
}

/// A guest's own key.
struct GuestKey([u8; 32]);

impl KeySource for GuestKey {
    fn read_key(&mut self, out: &mut [u8; 32]) -> bool {
        out.copy_from_slice(&self.0);
        true
    }
}

fn ep(node: u32, partition: u32, process: u32) -> Endpoint {
    Endpoint { node, partition, process }
}

fn tx(channel: ChannelId, source: Endpoint, len: usize) -> TxHeader {
    TxHeader { channel: channel.0, source, len: len as u32 }
}

fn config(lifetime: u32) -> CmmConfig {
    CmmConfig {
        capacity: 64,
        lifetime: KeyLifetime { messages: lifetime, secs: 600 },
        ..CmmConfig::default()
    }
}

fn one_node() -> Cmm {
    let mut cmm =
        Cmm::new(1, config(1 << 30), Audit::to_log(1).unwrap(), Router::unlinked()).unwrap();
    for partition in 1..=3 {
        cmm.add_partition(partition);
    }
    cmm
}

fn opened(result: Result<Opening, Status>) -> Result<ChannelId, Status> {
    result.map(|o| match o {
        Opening::Done(id) | Opening::Pending(id) => id,
    })
}

/// Partition 1 process 10 listens for partition 2 process 20, which opens.
fn local_pair(cmm: &mut Cmm, key: Option<[u8; 32]>) -> (ChannelId, ChannelId) {
    let listener = cmm.listen(1, 10, ep(1, 2, 20)).unwrap();
    let mut guest = key.map(GuestKey);
    let source = guest.as_mut().map(|k| k as &mut dyn KeySource);
    let opener = opened(cmm.open(2, 20, ep(1, 1, 10), source)).unwrap();
    (listener, opener)
}

#[test]
fn an_offer_on_one_node_needs_a_matching_listen() {
    let mut cmm = one_node();
    assert_eq!(opened(cmm.open(2, 20, ep(1, 1, 10), None)), Err(status::NO_LISTENER));
    cmm.listen(1, 10, ep(1, 2, 99)).unwrap();
    assert_eq!(opened(cmm.open(2, 20, ep(1, 1, 10), None)), Err(status::NO_LISTENER));
    assert_eq!(cmm.key_count(), 0);
    assert!(cmm.list(2).is_empty(), "the failed OPEN left no entry");
    assert_eq!(opened(cmm.open(2, 20, ep(7, 1, 10), None)), Err(status::UNREACHABLE), "no link");
}

#[test]
fn messages_on_one_node_go_guest_to_guest_with_verified_sources() {
    let mut cmm = one_node();
    let (listener, opener) = local_pair(&mut cmm, Some([42; 32]));
    assert_eq!(cmm.key_count(), 2, "each entry holds its key");
    let sent = cmm.send(2, &tx(opener, ep(1, 2, 20), 5), &mut Bytes(b"hello")).unwrap();
    let Sent::Local { partition, channel, header } = sent else { panic!("{sent:?}") };
    assert_eq!((partition, channel), (1, listener));
    assert_eq!((header.source, header.process, header.seq, header.len), (ep(1, 2, 20), 10, 0, 5));
    let back = cmm.send(1, &tx(listener, ep(1, 1, 10), 3), &mut Bytes(b"hi!")).unwrap();
    assert!(matches!(back, Sent::Local { partition: 2, .. }));
    for forged in [ep(1, 3, 20), ep(9, 2, 20), ep(1, 2, 21)] {
        assert_eq!(
            cmm.send(2, &tx(opener, forged, 1), &mut Bytes(b"x")),
            Err(status::FORGED_SOURCE)
        );
    }
    assert_eq!(
        cmm.send(2, &tx(listener, ep(1, 2, 20), 1), &mut Bytes(b"x")),
        Err(status::NO_CHANNEL)
    );
    assert_eq!(cmm.stats(2).forged, 3);
    assert_eq!(
        cmm.send(2, &tx(opener, ep(1, 2, 20), 65_537), &mut Bytes(&[0; 65_537])),
        Err(status::TOO_BIG)
    );
}

#[test]
fn close_and_revoke_remove_keys_on_both_sides() {
    let mut cmm = one_node();
    let (listener, opener) = local_pair(&mut cmm, None);
    assert_eq!(cmm.close(1, 11, listener.0), Err(status::NOT_OWNER));
    assert_eq!(cmm.close(2, 20, listener.0), Err(status::NO_CHANNEL));
    cmm.close(2, 20, opener.0).unwrap();
    assert_eq!(cmm.key_count(), 0);
    assert_eq!(cmm.list(1)[0].state, state::PEER_CLOSED);
    assert_eq!(cmm.list(1)[0].closed, closed::BY_PEER);
    assert_eq!(
        cmm.send(1, &tx(listener, ep(1, 1, 10), 1), &mut Bytes(b"x")),
        Err(status::NOT_OPEN)
    );
    cmm.close(1, 10, listener.0).unwrap();
    let (_, opener) = local_pair(&mut cmm, None);
    assert_eq!(cmm.revoke(3, opener.0), Err(status::NO_CHANNEL), "another partition's channel");
    cmm.revoke(2, opener.0).unwrap();
    assert_eq!(cmm.key_count(), 0);
}

#[test]
fn limits_hold() {
    let limits = Limits { max_message: 8, max_channels: 2 };
    let config = CmmConfig { limits, ..config(1 << 30) };
    let mut cmm = Cmm::new(1, config, Audit::to_log(1).unwrap(), Router::unlinked()).unwrap();
    let (_, opener) = local_pair(&mut cmm, None);
    assert_eq!(
        cmm.send(2, &tx(opener, ep(1, 2, 20), 9), &mut Bytes(&[0; 9])),
        Err(status::TOO_BIG)
    );
    cmm.listen(1, 11, ep(1, 2, 20)).unwrap();
    assert_eq!(cmm.listen(1, 12, ep(1, 2, 20)), Err(status::TABLE_FULL));
    assert_eq!(cmm.listen(2, 20, ep(1, 1, 10)), Err(status::EXISTS));
}

/// The process of node 2's entry `listener`.
fn listener_process(b: &Cmm, listener: ChannelId) -> u32 {
    b.list(1).iter().find(|e| e.channel == listener.0).map(|e| e.process).unwrap()
}

/// Two nodes' CMMs, linked.
struct Two {
    a: Cmm,
    b: Cmm,
    a_token: usize,
    b_token: usize,
    audit_b: Audit,
}

impl Two {
    fn new(lifetime: u32) -> Self {
        let (a, b) = linked(RouterConfig::default()).unwrap();
        let (a_token, b_token, audit_b) = (a.token, b.token, b.audit.clone());
        let mut a = Cmm::new(1, config(lifetime), a.audit, a.router).unwrap();
        let mut b = Cmm::new(2, config(lifetime), b.audit, b.router).unwrap();
        a.add_partition(1);
        b.add_partition(1);
        Self { a, b, a_token, b_token, audit_b }
    }

    /// Lets node 2 handle what node 1 sent (and the other way round), at least once and
    /// then until `until` holds (for at most two seconds).
    fn deliver(&mut self, inbox: &mut Inbox, until: impl Fn(&Inbox) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            self.a.flush();
            self.b.link_readable(self.b_token, inbox);
            self.b.flush();
            self.a.link_readable(self.a_token, inbox);
            if until(inbox) || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Node 2 process 10 listens for node 1 process 20, which opens with `key`.
    fn open(&mut self, key: [u8; 32]) -> (ChannelId, ChannelId) {
        self.open_between(10, 20, key)
    }

    /// Node 2 process `listener` listens for node 1 process `opener`, which opens with `key`.
    fn open_between(
        &mut self,
        listener: u32,
        opener: u32,
        key: [u8; 32],
    ) -> (ChannelId, ChannelId) {
        let listener = self.b.listen(1, listener, ep(1, 1, opener)).unwrap();
        let mut guest = GuestKey(key);
        let Ok(Opening::Pending(opener)) =
            self.a.open(1, opener, ep(2, 1, listener_process(&self.b, listener)), Some(&mut guest))
        else {
            panic!()
        };
        let mut inbox = Inbox::default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut answers = Vec::new();
        while answers.is_empty() && std::time::Instant::now() < deadline {
            self.deliver(&mut inbox, |_| true);
            answers = self.a.take_answers();
        }
        assert_eq!(answers, [(opener, Ok(opener))]);
        (listener, opener)
    }

    fn audited_b(&self, reason: &str) -> bool {
        self.audit_b.recent().iter().any(|r| r.contains(&format!("\"reason\":\"{reason}\"")))
    }
}

#[test]
fn channels_across_nodes_open_carry_messages_and_ratchet_their_keys() {
    let mut two = Two::new(3);
    let (listener, opener) = two.open([5; 32]);
    let mut inbox = Inbox::default();
    for i in 0..10u8 {
        let body = [i; 100];
        let sent = two.a.send(1, &tx(opener, ep(1, 1, 20), 100), &mut Bytes(&body)).unwrap();
        assert_eq!(sent, Sent::Remote);
    }
    two.deliver(&mut inbox, |inbox| inbox.0.len() == 10);
    assert_eq!(inbox.0.len(), 10);
    for (i, (partition, header, payload)) in inbox.0.iter().enumerate() {
        assert_eq!(
            (*partition, header.channel, header.source, header.seq),
            (1, listener.0, ep(1, 1, 20), i as u64)
        );
        assert_eq!(payload, &vec![i as u8; 100]);
    }
    // Three messages per key: epochs 0, 1, 2 and 3 were used, and both sides agree.
    let a = two.a.list_all();
    let b = two.b.list_all();
    assert_eq!((a[0].tx_epoch, b[0].rx_epoch), (3, 3));
    assert_eq!(a[0].salt, b[0].salt, "one salt for the channel");
    assert_eq!(two.b.stats(1).received, 10);
}

#[test]
fn replayed_and_retired_epoch_messages_are_refused() {
    let key = [9; 32];
    let mut two = Two::new(2);
    let (_, opener) = two.open(key);
    let mut inbox = Inbox::default();
    for _ in 0..5 {
        two.a.send(1, &tx(opener, ep(1, 1, 20), 4), &mut Bytes(b"four")).unwrap();
    }
    two.deliver(&mut inbox, |inbox| inbox.0.len() == 5);
    assert_eq!(two.b.list_all()[0].rx_epoch, 2);
    // A message sealed as the sender would have at epoch 0, seq 5: correct keys, retired epoch.
    let salt = two.a.list_all()[0].salt;
    let (src, dst) = (ep(1, 1, 20), ep(2, 1, 10));
    let ciphers =
        SecretBox::new_with(|s| ChannelCiphers::init(s, &key, &salt, &src, &dst)).unwrap();
    let forge = |two: &mut Two, epoch: u32, seq: u64| {
        let head = DataHead { source: src, destination: dst, epoch, seq, len: 3, tag: [0; 16] };
        two.a.router.stage_data(2, head, |buf| {
            buf.copy_from_slice(b"old");
            ciphers.tx.seal(&associated_data(&src, &dst, epoch, seq), seq, buf)
        })
    };
    forge(&mut two, 0, 5).unwrap();
    let audit = two.audit_b.clone();
    let seen = |reason: &'static str| {
        let audit = audit.clone();
        move |_: &Inbox| audit.recent().iter().any(|r| r.contains(reason))
    };
    two.deliver(&mut inbox, seen("retired_epoch"));
    assert!(two.audited_b("retired_epoch"), "{:#?}", two.audit_b.recent());
    // An old sequence number.
    forge(&mut two, 2, 1).unwrap();
    two.deliver(&mut inbox, seen("replayed_or_reordered"));
    assert!(two.audited_b("replayed_or_reordered"));
    // Two epochs ahead.
    forge(&mut two, 4, 5).unwrap();
    two.deliver(&mut inbox, seen("bad_epoch"));
    assert!(two.audited_b("bad_epoch"));
    assert_eq!(inbox.0.len(), 5, "nothing forged was delivered");
    assert_eq!(two.b.stats(1).rejected, 3);
    // The channel still works.
    two.a.send(1, &tx(opener, ep(1, 1, 20), 4), &mut Bytes(b"more")).unwrap();
    two.deliver(&mut inbox, |inbox| inbox.0.len() == 6);
    assert_eq!(inbox.0[5].2, b"more");
}

#[test]
fn offers_are_checked_against_the_link_and_the_table() {
    let mut two = Two::new(1 << 30);
    // Nobody listens on node 2: the offer is refused and the guest learns why.
    let Ok(Opening::Pending(id)) = two.a.open(1, 20, ep(2, 1, 10), None) else { panic!() };
    let mut inbox = Inbox::default();
    let mut answers = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while answers.is_empty() && std::time::Instant::now() < deadline {
        two.deliver(&mut inbox, |_| true);
        answers = two.a.take_answers();
    }
    assert_eq!(answers, [(id, Err(status::NO_LISTENER))]);
    assert_eq!((two.a.key_count(), two.a.channel_count()), (0, 0), "nothing left behind");
    assert!(two.audited_b("no_listener"));
    // An offer claiming another source node is refused at once.
    two.b.listen(1, 10, ep(3, 1, 20)).unwrap();
    let offer = channels::ReceivedOffer {
        source: ep(3, 1, 20),
        destination: ep(2, 1, 10),
        salt: [0; 16],
        key: &[1; 32],
    };
    let forged = two.b.core.receive_offer(1, &offer);
    assert_eq!(forged, Err(frames::Rejection::ForgedSourceNode));
    assert_eq!(two.b.key_count(), 0);
}

#[test]
fn a_lost_link_closes_its_channels_and_erases_their_keys() {
    let mut two = Two::new(1 << 30);
    let (_, opener) = two.open([3; 32]);
    assert_eq!(two.a.key_count(), 1);
    let Two { mut a, b, a_token, .. } = two;
    drop(b);
    let mut inbox = Inbox::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while a.key_count() > 0 && std::time::Instant::now() < deadline {
        a.link_readable(a_token, &mut inbox);
    }
    assert_eq!(a.key_count(), 0);
    assert_eq!(a.list(1)[0].state, state::PEER_CLOSED);
    assert_eq!(a.list(1)[0].closed, closed::LINK_DOWN);
    assert_eq!(a.send(1, &tx(opener, ep(1, 1, 20), 1), &mut Bytes(b"x")), Err(status::NOT_OPEN));
}

#[test]
fn a_stopped_partition_closes_its_channels_and_its_peers_learn_why() {
    let mut cmm = one_node();
    let (_, _) = local_pair(&mut cmm, None);
    cmm.listen(2, 21, ep(1, 3, 30)).unwrap();
    assert_eq!(cmm.partition_stopped(2), 2, "the open channel and the listener");
    assert!(cmm.list(2).is_empty());
    assert_eq!(cmm.key_count(), 0, "both ends' keys are gone");
    let peer = cmm.list(1)[0];
    assert_eq!((peer.state, peer.closed), (state::PEER_CLOSED, closed::PARTITION_STOPPED));
}

#[test]
fn a_stopped_partition_closes_its_channels_on_other_nodes() {
    let mut two = Two::new(1 << 30);
    two.open([5; 32]);
    assert_eq!(two.a.partition_stopped(1), 1);
    let mut inbox = Inbox::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while two.b.key_count() > 0 && std::time::Instant::now() < deadline {
        two.deliver(&mut inbox, |_| true);
    }
    let peer = two.b.list(1)[0];
    assert_eq!((peer.state, peer.closed), (state::PEER_CLOSED, closed::PARTITION_STOPPED));
    assert_eq!(two.b.key_count(), 0);
    assert!(two.audited_b("peer_partition_stopped"));
    // The node then goes away: the channel keeps the reason it was closed for.
    let Two { a, mut b, b_token, audit_b, .. } = two;
    drop(a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let link_down = |audit: &Audit| audit.recent().iter().any(|r| r.contains("\"link_down\""));
    while !link_down(&audit_b) && std::time::Instant::now() < deadline {
        b.link_readable(b_token, &mut inbox);
    }
    assert!(link_down(&audit_b));
    assert_eq!(b.list(1)[0].closed, closed::PARTITION_STOPPED);
}

#[test]
fn an_open_nobody_answers_times_out_and_the_peer_is_told_to_forget_it() {
    let mut two = Two::new(1 << 30);
    two.b.listen(1, 10, ep(1, 1, 20)).unwrap();
    let Ok(Opening::Pending(id)) = two.a.open(1, 20, ep(2, 1, 10), None) else { panic!() };
    let now = std::time::Instant::now();
    two.a.core.expire_offers(&mut two.a.router, now);
    assert!(two.a.take_answers().is_empty(), "not yet");
    let later = now + DEFAULT_OPEN_TIMEOUT + std::time::Duration::from_millis(1);
    two.a.core.expire_offers(&mut two.a.router, later);
    assert_eq!(two.a.take_answers(), [(id, Err(status::TIMED_OUT))]);
    assert_eq!((two.a.key_count(), two.a.channel_count()), (0, 0), "nothing left behind");
    // The offer and the CLOSE after it reach node 2: whatever it stored, it forgets.
    let mut inbox = Inbox::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while two.b.list(1)[0].state != state::PEER_CLOSED && std::time::Instant::now() < deadline {
        two.deliver(&mut inbox, |_| true);
    }
    assert_eq!(two.b.list(1)[0].state, state::PEER_CLOSED);
    assert_eq!(two.b.key_count(), 0);
    assert_eq!(two.a.stats(1).refused, 1);
}

#[test]
fn a_sender_across_nodes_stops_at_its_credit_and_goes_on_as_the_receiver_takes() {
    let mut two = Two::new(1 << 30);
    let (listener, opener) = two.open([3; 32]);
    let window = super::credit::WINDOW;
    let send = |two: &mut Two| two.a.send(1, &tx(opener, ep(1, 1, 20), 4), &mut Bytes(b"four"));
    for _ in 0..window {
        assert_eq!(send(&mut two), Ok(Sent::Remote));
    }
    assert_eq!(send(&mut two), Err(status::NO_ROOM), "a whole window is out");
    assert_eq!(two.a.stats(1).refused, 0, "running out of credit is not a refusal");
    let mut deaf = Deaf::default();
    let window_len = window as usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while deaf.0.len() < window_len && std::time::Instant::now() < deadline {
        two.a.flush();
        two.b.link_readable(two.b_token, &mut deaf);
        two.a.link_readable(two.a_token, &mut deaf);
    }
    assert_eq!(deaf.0.len(), window_len, "the node holds a window whatever the device holds");
    assert_eq!(send(&mut two), Err(status::NO_ROOM), "nothing taken, nothing granted");
    // The guest takes half a window: its sender is granted a window beyond that.
    for _ in 0..window / 2 {
        two.b.delivered(1, listener, 4);
    }
    // The device flushes once it has moved what the guest's new buffers take.
    two.b.flush();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut sent = 0;
    while sent < window / 2 && std::time::Instant::now() < deadline {
        two.a.link_readable(two.a_token, &mut deaf);
        while send(&mut two).is_ok() {
            sent += 1;
        }
    }
    assert_eq!(sent, window / 2, "the grant covers what the guest took, no more");
    assert_eq!(send(&mut two), Err(status::NO_ROOM));
}

/// Node 1 sends half a window on a new channel and node 2's guest takes it as it comes:
/// the two nodes, the channel's ends, what node 2 received, and what node 2 had sent before.
fn half_a_window_taken() -> (Two, ChannelId, ChannelId, Inbox, u64) {
    let mut two = Two::new(1 << 30);
    let (listener, opener) = two.open([3; 32]);
    for _ in 0..super::credit::WINDOW / 2 {
        assert_eq!(send_four(&mut two, opener), Ok(Sent::Remote));
    }
    let mut inbox = Inbox::default();
    let before = two.b.router.frames_sent(1);
    two.deliver(&mut inbox, |inbox| inbox.0.len() as u64 == super::credit::WINDOW / 2);
    (two, listener, opener, inbox, before)
}

fn send_four(two: &mut Two, opener: ChannelId) -> Result<Sent, Status> {
    two.a.send(1, &tx(opener, ep(1, 1, 20), 4), &mut Bytes(b"four"))
}

/// What node 1 may still send, after the `sent` it sent: a window beyond what was taken.
fn assert_a_window_beyond(two: &mut Two, opener: ChannelId, mut sent: u64) {
    while send_four(two, opener).is_ok() {
        sent += 1;
    }
    let window = super::credit::WINDOW;
    assert_eq!(sent, window / 2 + window, "a window beyond what the guest took");
}

#[test]
fn a_grant_the_sender_does_not_need_yet_rides_with_the_next_record() {
    let (mut two, listener, opener, mut inbox, before) = half_a_window_taken();
    two.b.flush();
    assert_eq!(two.b.router.frames_sent(1), before, "nothing sent for the grant alone");
    assert_eq!(send_four(&mut two, opener), Ok(Sent::Remote), "the sender goes on meanwhile");
    // The receiver's next message to that node carries it.
    two.b.send(1, &tx(listener, ep(2, 1, 10), 4), &mut Bytes(b"back")).unwrap();
    two.deliver(&mut inbox, |inbox| inbox.0.len() as u64 > super::credit::WINDOW / 2);
    assert_a_window_beyond(&mut two, opener, super::credit::WINDOW / 2 + 1);
}

#[test]
fn a_grant_waiting_for_a_record_goes_once_its_sender_sends_more() {
    let (mut two, _, opener, mut inbox, _) = half_a_window_taken();
    let before = two.b.router.frames_sent(1);
    // A one-way stream: the receiver has nothing to send back, the sender sends on.
    assert_eq!(send_four(&mut two, opener), Ok(Sent::Remote));
    two.deliver(&mut inbox, |inbox| inbox.0.len() as u64 > super::credit::WINDOW / 2);
    assert!(two.b.router.frames_sent(1) > before, "the waiting grant went");
    assert_a_window_beyond(&mut two, opener, super::credit::WINDOW / 2 + 1);
}

#[test]
fn a_message_beyond_the_granted_credit_is_refused() {
    let mut two = Two::new(1 << 30);
    let (_, opener) = two.open([4; 32]);
    let window = super::credit::WINDOW;
    for _ in 0..window {
        two.a.send(1, &tx(opener, ep(1, 1, 20), 4), &mut Bytes(b"four")).unwrap();
    }
    let mut deaf = Deaf::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while deaf.0.len() < window as usize && std::time::Instant::now() < deadline {
        two.a.flush();
        two.b.link_readable(two.b_token, &mut deaf);
    }
    // A peer that ignores its credit: the next message, in order, but not granted.
    let head = DataHead {
        source: ep(1, 1, 20),
        destination: ep(2, 1, 10),
        epoch: 0,
        seq: window,
        len: 4,
        tag: [0; 16],
    };
    two.b.core.receive(1, crate::link::wire::Frame::Data(head), &mut [0; 4], &mut deaf);
    assert!(two.audited_b("over_credit"), "refused and audited");
    assert_eq!(deaf.0.len(), window as usize, "and not delivered");
}

/// Lets the two nodes exchange what they staged, a few rounds.
fn pump(two: &mut Two, deaf: &mut Deaf) {
    for _ in 0..20 {
        two.a.flush();
        two.b.link_readable(two.b_token, deaf);
        two.b.flush();
        two.a.link_readable(two.a_token, deaf);
    }
}

/// Cycles of a new channel into node 2's partition 1, filled as far as its credit goes into
/// a guest that takes nothing, then closed by its sender, and by the guest, which listens
/// again: what was held stays held (and charged). Returns what each cycle could send.
fn fill_and_close(two: &mut Two, deaf: &mut Deaf, cycles: u32) -> Vec<u64> {
    let mut sent_per_cycle = Vec::new();
    for cycle in 0..cycles {
        let (listener, opener) = two.open_between(10 + cycle, 100 + cycle, [7; 32]);
        pump(two, deaf);
        let mut sent = 0;
        while two.a.send(1, &tx(opener, ep(1, 1, 100 + cycle), 4), &mut Bytes(b"four")).is_ok() {
            sent += 1;
        }
        pump(two, deaf);
        two.a.close(1, 100 + cycle, opener.0).unwrap();
        pump(two, deaf);
        two.b.close(1, 10 + cycle, listener.0).unwrap();
        sent_per_cycle.push(sent);
    }
    sent_per_cycle
}

#[test]
fn what_a_partitions_remote_senders_may_send_it_is_bounded_however_often_they_reopen() {
    use super::credit::{BUDGET, FLOOR, WINDOW};
    let mut two = Two::new(1 << 30);
    let mut deaf = Deaf::default();
    let channels = u64::from(two.b.limits().max_channels);
    let cycles = BUDGET / WINDOW + channels + 2;
    let sent_per_cycle = fill_and_close(&mut two, &mut deaf, cycles as u32);
    let (first, rest) = sent_per_cycle.split_at((BUDGET / WINDOW) as usize);
    assert!(first.iter().all(|&n| n == WINDOW), "whole windows from the budget: {first:?}");
    let floors = &rest[..channels as usize];
    assert!(floors.iter().all(|&n| n == FLOOR), "then each channel its floor: {rest:?}");
    let held: u64 = sent_per_cycle.iter().sum();
    assert_eq!(held, BUDGET + FLOOR * channels, "and no more, whatever the cycles");
    assert_eq!(deaf.0.len() as u64, held);
    assert_eq!(*sent_per_cycle.last().unwrap(), 0, "all spent, a new channel waits");
    // The guest takes what was held: a channel waiting for credit gets it.
    let (_, opener) = two.open_between(90, 190, [7; 32]);
    pump(&mut two, &mut deaf);
    let send = |two: &mut Two| two.a.send(1, &tx(opener, ep(1, 1, 190), 4), &mut Bytes(b"four"));
    assert_eq!(send(&mut two), Err(status::NO_ROOM));
    for header in std::mem::take(&mut deaf.0) {
        two.b.delivered(1, ChannelId(header.channel), 4);
    }
    two.b.flush();
    pump(&mut two, &mut deaf);
    assert_eq!(send(&mut two), Ok(Sent::Remote), "credit came once the guest took its messages");
}

#[test]
fn a_partition_started_again_has_its_whole_budget() {
    use super::credit::{BUDGET, WINDOW};
    let mut two = Two::new(1 << 30);
    let mut deaf = Deaf::default();
    fill_and_close(&mut two, &mut deaf, (BUDGET / WINDOW) as u32);
    // What its device held goes with the partition; the next run owes nothing.
    two.b.partition_stopped(1);
    two.b.add_partition(1);
    let sent_per_cycle = fill_and_close(&mut two, &mut deaf, 1);
    assert_eq!(sent_per_cycle, [WINDOW], "a whole window for the new run's first channel");
}
