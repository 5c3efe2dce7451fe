#!/usr/bin/env python3
"""An independent peer for keyhold's host-link protocol, version 3, written from docs/PROTOCOL.md.

It sets up a two-node cluster in a temporary directory: one real keyhold node running the `echo`
fixture in partition 1 (listening for an endpoint of this peer's node), and this program as the
other node.  It then

  * completes the Noise IK link handshake and key confirmation, as initiator (node 1) or
    responder (node 2), as the roles of section 1 require for its node ID;
  * OFFERs a channel from (peer, 1, 1) to the echo's endpoint (keyhold, 1, 1), retrying while echo
    has not listened yet, and handles OFFER_REPLY;
  * respects version-3 CREDIT (no DATA before a grant, never at or past the limit) and grants
    credit for what it receives;
  * sends N messages sealed with AES-256-GCM under HKDF channel keys (with a short key lifetime,
    so that epochs advance both ways), receives, verifies and decrypts the echoes;
  * keeps the link alive with KEEPALIVE through an idle spell, and rekeys (it starts a rekey as
    initiator; as responder it answers keyhold's, which is configured to rekey every few seconds);
  * CLOSEs the channel, says GOODBYE, and checks keyhold's audit log for what it recorded.

Usage:
  python3 integration/peer/peer.py --keyhold target/release/keyhold --fixtures target/fixtures
  (--role initiator|responder|both, default both; --count N, default 100; -v for frame tracing;
   --finish echo-goodbye ends with echo's empty goodbye message instead of CLOSE + GOODBYE;
   --window N and --no-grant-ahead change how this peer grants credit; see --help)

Note on credit: by default this peer grants echo's direction credit for every message before it
sends that message (the CREDIT rides ahead of the DATA in the same record). With
--no-grant-ahead it grants only as keyhold does, by its window as echoes arrive; echo then meets
NO_ROOM whenever this peer pipelines past the window, and sends again, in order (the guest
agent's reap_send_retrying): the test suite runs this peer so.

Only noiseprotocol (Noise) and cryptography (X25519 keys, AES-GCM, HKDF-Expand, HMAC) do crypto.
Exits 0 on success, 1 with a message naming the failure otherwise.
"""

import argparse
import base64
import json
import os
import queue
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

try:
    from noise.connection import Keypair, NoiseConnection
    from cryptography.hazmat.primitives import hashes, hmac, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
except ImportError as e:  # pragma: no cover
    sys.exit(f"peer: missing package ({e}); pip install noiseprotocol cryptography")

NOISE_NAME = b"Noise_IK_25519_ChaChaPoly_SHA256"
VERSION = 3

KEEPALIVE, GOODBYE, CONFIRM, OFFER, OFFER_REPLY, DATA, CLOSE = 1, 2, 3, 4, 5, 6, 7
REKEY, REKEY_REPLY, REKEY_DONE, CREDIT = 8, 9, 10, 11
BODY_LEN = {KEEPALIVE: 0, GOODBYE: 0, CONFIRM: 0, OFFER: 76, OFFER_REPLY: 5, DATA: 56,
            CLOSE: 25, REKEY: 113, REKEY_REPLY: 49, REKEY_DONE: 0, CREDIT: 32}
FRAME_NAME = {1: "KEEPALIVE", 2: "GOODBYE", 3: "CONFIRM", 4: "OFFER", 5: "OFFER_REPLY",
              6: "DATA", 7: "CLOSE", 8: "REKEY", 9: "REKEY_REPLY", 10: "REKEY_DONE",
              11: "CREDIT"}
REPLY_RESULT = {0: "accepted", 1: "no_listener", 2: "forged_source_node",
                3: "destination_not_local", 4: "table_full"}
CLOSE_REASON = {0: "closed_by_process", 1: "revoked", 2: "partition_stopped"}

MAX_HEADER_PLAINTEXT = 4096
MAX_RECORD_PAYLOAD = 262144
MAX_DATA_LEN = 65536

VERBOSE = False


def log(msg):
    print(f"peer: {msg}", flush=True)


def trace(msg):
    if VERBOSE:
        print(f"peer:   {msg}", flush=True)


class PeerError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Encodings (section "Conventions", 3.1, 5)
# ---------------------------------------------------------------------------------------------

def ep(node, partition, process):
    return struct.pack("<III", node, partition, process)


def ep_str(b):
    return "%d:%d:%d" % struct.unpack("<III", b)


def ep_node(b):
    return struct.unpack_from("<I", b, 0)[0]


_last_tai = [b""]


def tai64n(now=None):
    """TAI64N as section 3.1 defines it; strictly increasing within this process."""
    if now is None:
        ns = time.time_ns()
        secs, nanos = divmod(ns, 1_000_000_000)
    else:
        secs = int(now)
        nanos = round((now - secs) * 1e9)
    stamp = struct.pack(">QI", (1 << 62) + 10 + secs, nanos)
    if now is None:
        if stamp <= _last_tai[0]:
            hi, lo = struct.unpack(">QI", _last_tai[0])
            lo += 1
            if lo >= 1_000_000_000:
                hi, lo = hi + 1, 0
            stamp = struct.pack(">QI", hi, lo)
        _last_tai[0] = stamp
    return stamp


def hello(node_id, stamp=None):
    return bytes([VERSION]) + struct.pack("<I", node_id) + (stamp or tai64n())


def frame(ftype, body=b""):
    assert len(body) == BODY_LEN[ftype], (ftype, len(body))
    return bytes([ftype]) + body


def f_offer(offer_id, src, dst, salt, key):
    return frame(OFFER, struct.pack("<I", offer_id) + src + dst + salt + key)


def f_offer_reply(offer_id, result):
    return frame(OFFER_REPLY, struct.pack("<IB", offer_id, result))


def f_data(src, dst, epoch, seq, length, tag):
    return frame(DATA, src + dst + struct.pack("<IQI", epoch, seq, length) + tag)


def f_close(src, dst, reason):
    return frame(CLOSE, src + dst + bytes([reason]))


def f_credit(src, dst, limit):
    return frame(CREDIT, src + dst + struct.pack("<Q", limit))


def parse_frames(pt):
    """Header block plaintext -> [(type, body)]; raises PeerError with the doc's reason."""
    frames, i = [], 0
    while i < len(pt):
        t = pt[i]
        if t not in BODY_LEN:
            raise PeerError(f"unknown_frame_type {t}")
        n = BODY_LEN[t]
        if i + 1 + n > len(pt):
            raise PeerError("truncated_frame")
        frames.append((t, bytes(pt[i + 1:i + 1 + n])))
        i += 1 + n
    return frames


# ---------------------------------------------------------------------------------------------
# Channel keys and messages (sections 7, 8)
# ---------------------------------------------------------------------------------------------

def hkdf_extract(salt, ikm):
    h = hmac.HMAC(salt, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def hkdf_expand(prk, info, length=32):
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk)


def chain0(key, salt, sender, receiver):
    prk = hkdf_extract(salt, key)
    return hkdf_expand(prk, b"keyhold v2 chain" + sender + receiver)


def message_key(chain):
    return hkdf_expand(chain, b"keyhold v2 message key")


def next_chain(chain):
    return hkdf_expand(chain, b"keyhold v2 next chain")


def msg_nonce(seq):
    return b"\x00" * 4 + struct.pack("<Q", seq)


def msg_aad(src, dst, epoch, seq):
    return src + dst + struct.pack("<IQ", epoch, seq)


def seal(mkey, src, dst, epoch, seq, plaintext):
    out = AESGCM(mkey).encrypt(msg_nonce(seq), plaintext, msg_aad(src, dst, epoch, seq))
    return out[:-16], out[-16:]


def open_sealed(mkey, src, dst, epoch, seq, ct, tag):
    return AESGCM(mkey).decrypt(msg_nonce(seq), ct + tag, msg_aad(src, dst, epoch, seq))


class SendDirection:
    """One direction's sender state: the epoch chain and the seq counter (section 8)."""

    def __init__(self, key, salt, src, dst, lifetime_messages, lifetime_secs):
        self.src, self.dst = src, dst
        self.chain = chain0(key, salt, src, dst)
        self.mkey = message_key(self.chain)
        self.epoch = 0
        self.sealed_in_epoch = 0
        self.epoch_started = time.monotonic()
        self.seq = 0
        self.lifetime_messages = lifetime_messages
        self.lifetime_secs = lifetime_secs

    def seal_next(self, plaintext):
        if (self.sealed_in_epoch >= self.lifetime_messages
                or time.monotonic() - self.epoch_started >= self.lifetime_secs):
            self.chain = next_chain(self.chain)  # the old chain and key are dropped
            self.mkey = message_key(self.chain)
            self.epoch += 1
            self.sealed_in_epoch = 0
            self.epoch_started = time.monotonic()
        seq = self.seq
        ct, tag = seal(self.mkey, self.src, self.dst, self.epoch, seq, plaintext)
        self.seq += 1
        self.sealed_in_epoch += 1
        return self.epoch, seq, ct, tag


class RecvDirection:
    """One direction's receiver state (section 8): current epoch, expected seq."""

    def __init__(self, key, salt, src, dst):
        self.src, self.dst = src, dst  # src = the remote sender, dst = us
        self.chain = chain0(key, salt, src, dst)
        self.mkey = message_key(self.chain)
        self.epoch = 0
        self.expected = 0

    def open(self, epoch, seq, ct, tag):
        """Returns (plaintext, None) or (None, reason); the epoch/tag part of the checks."""
        if epoch < self.epoch:
            return None, "retired_epoch"
        if epoch > self.epoch + 1:
            return None, "bad_epoch"
        if epoch == self.epoch:
            try:
                return open_sealed(self.mkey, self.src, self.dst, epoch, seq, ct, tag), None
            except Exception:
                return None, "bad_tag"
        nchain = next_chain(self.chain)
        nkey = message_key(nchain)
        try:
            pt = open_sealed(nkey, self.src, self.dst, epoch, seq, ct, tag)
        except Exception:
            return None, "bad_tag"
        self.chain, self.mkey, self.epoch = nchain, nkey, epoch
        return pt, None


class Channel:
    WINDOW = 64

    def __init__(self, local, remote, key, salt, lifetime_messages, lifetime_secs):
        self.local, self.remote = local, remote
        self.key, self.salt = key, salt
        self.state = "OFFERING"
        self.tx = SendDirection(key, salt, local, remote, lifetime_messages, lifetime_secs)
        self.rx = RecvDirection(key, salt, remote, local)
        self.send_limit = 0        # what the remote receiver granted us (starts at 0)
        self.credits_received = 0
        self.granted = 0           # what we granted the remote sender
        self.grant_due = False
        self.taken = 0             # messages received and taken by "our process"
        self.close_reason = None
        self.max_epoch_rx = 0

    def erase(self):
        self.tx = self.rx = None
        self.key = None


# ---------------------------------------------------------------------------------------------
# The link (sections 2-6)
# ---------------------------------------------------------------------------------------------

def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def new_noise(initiator, my_priv, peer_pub):
    conn = NoiseConnection.from_name(NOISE_NAME)
    if initiator:
        conn.set_as_initiator()
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, peer_pub)
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, my_priv)
    conn.set_prologue(b"")
    conn.start_handshake()
    return conn


def noise_remote_static(conn):
    return conn.noise_protocol.handshake_state.rs.public_bytes


def check_hello(payload, peer_id, last_stamp):
    """Section 3.2 steps 4-6, for a hello from the peer.  Returns (stamp, error)."""
    if len(payload) == 4:
        return None, "unsupported_version (version 1 hello)"
    if len(payload) == 0:
        return None, "bad_handshake_payload"
    if payload[0] not in (2, 3):
        return None, f"unsupported_version {payload[0]}"
    if payload[0] != VERSION:
        return None, f"hello of version {payload[0]}: this peer speaks only version 3"
    if len(payload) != 17:
        return None, "bad_handshake_payload"
    node = struct.unpack_from("<I", payload, 1)[0]
    if node != peer_id:
        return None, f"claims_other_node ({node})"
    stamp = payload[5:17]
    if last_stamp is not None and stamp <= last_stamp:
        return None, "handshake_replayed"
    return stamp, None


class Link:
    def __init__(self, sock, conn, my_id, peer_id, initiator, my_priv, peer_pub, args,
                 last_peer_stamp):
        self.sock = sock
        self.tx = conn          # cipher state we seal with
        self.rx = conn          # cipher state we open with
        self.my_id, self.peer_id = my_id, peer_id
        self.initiator = initiator
        self.my_priv, self.peer_pub = my_priv, peer_pub
        self.args = args
        self.last_peer_stamp = last_peer_stamp
        self.send_lock = threading.RLock()
        self.state_lock = threading.RLock()
        self.cond = threading.Condition(self.state_lock)
        now = time.monotonic()
        self.last_sent = now
        self.last_recv = now
        self.session_started = now
        self.channels = {}        # (local, remote) -> Channel
        self.offers = {}          # offer_id -> Channel
        self.replies = {}         # offer_id -> result
        self.inbox = queue.Queue()  # (channel, seq, epoch, plaintext)
        self.error = None
        self.closed = False
        self.goodbye_received = False
        self.rekey_conn = None    # a rekey in progress: the new NoiseConnection
        self.rekey_started = None
        self.rekeys = 0
        self.stats = {"records_in": 0, "records_out": 0, "keepalives_in": 0,
                      "keepalives_out": 0, "credit_in": 0, "credit_out": 0}

    # -- sending ---------------------------------------------------------------------------------

    def _due_credits(self):
        out = []
        with self.state_lock:
            for ch in self.channels.values():
                if ch.grant_due and ch.state == "OPEN":
                    out.append(f_credit(ch.local, ch.remote, ch.granted))
                    ch.grant_due = False
                    self.stats["credit_out"] += 1
                    trace(f"-> CREDIT {ep_str(ch.local)} lets {ep_str(ch.remote)} send "
                          f"below {ch.granted}")
        return out

    def send_record(self, frames, payloads=(), switch_tx=None, with_credits=True):
        """Seals one record: header block of `frames`, then `payloads` in DATA-frame order."""
        with self.send_lock:
            if self.closed:
                raise PeerError(f"link closed ({self.error})")
            frames = list(frames)
            if with_credits:
                # Pending grants ride in front (REKEY_REPLY/REKEY_DONE stay last).
                frames = self._due_credits() + frames
            if not frames:
                return
            pt = b"".join(frames)
            assert 1 <= len(pt) <= MAX_HEADER_PLAINTEXT, len(pt)
            total = sum(len(p) for p in payloads)
            assert total <= MAX_RECORD_PAYLOAD
            ct = self.tx.encrypt(pt)
            wire = struct.pack(">H", len(ct)) + ct + b"".join(payloads)
            trace("-> record: " + ", ".join(FRAME_NAME[f[0]] for f in frames)
                  + (f" + {total} payload bytes" if payloads else ""))
            self.sock.sendall(wire)
            self.last_sent = time.monotonic()
            self.stats["records_out"] += 1
            if switch_tx is not None:
                self.tx = switch_tx

    # -- receiving -------------------------------------------------------------------------------

    def fail(self, reason):
        with self.cond:
            if self.error is None and not self.closed:
                self.error = reason
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def reader(self):
        try:
            while True:
                length = struct.unpack(">H", recv_exact(self.sock, 2))[0]
                if not 17 <= length <= MAX_HEADER_PLAINTEXT + 16:
                    raise PeerError(f"bad_record_length {length}")
                block = recv_exact(self.sock, length)
                try:
                    pt = self.rx.decrypt(block)
                except Exception:
                    raise PeerError("bad_link_authentication")
                frames = parse_frames(pt)
                lens = []
                for t, body in frames:
                    if t == DATA:
                        n = struct.unpack_from("<I", body, 36)[0]
                        if n > MAX_DATA_LEN:
                            raise PeerError("malformed_frame: DATA len above 65,536")
                        lens.append(n)
                if sum(lens) > MAX_RECORD_PAYLOAD:
                    raise PeerError("record_too_long")
                payloads = [recv_exact(self.sock, n) if n else b"" for n in lens]
                self.last_recv = time.monotonic()
                self.stats["records_in"] += 1
                trace("<- record: " + ", ".join(FRAME_NAME[t] for t, _ in frames)
                      + (f" + {sum(lens)} payload bytes" if lens else ""))
                self.handle_block(frames, payloads)
                if self.goodbye_received:
                    break
                self.flush_credits()
        except (EOFError, OSError) as e:
            with self.cond:
                if not self.closed and self.error is None:
                    self.error = f"connection lost: {e}"
                self.cond.notify_all()
        except PeerError as e:
            self.fail(f"protocol error from keyhold: {e}")
        except Exception as e:  # a bug here, or a library error: report it
            self.fail(f"reader failed: {e!r}")

    def handle_block(self, frames, payloads):
        deferred = []
        pi = 0
        for idx, (t, body) in enumerate(frames):
            if t in (REKEY_REPLY, REKEY_DONE) and idx != len(frames) - 1:
                raise PeerError(f"frame_not_last ({FRAME_NAME[t]})")
            if t == KEEPALIVE:
                self.stats["keepalives_in"] += 1
            elif t == CONFIRM:
                raise PeerError("unexpected_confirm")
            elif t in (GOODBYE, REKEY, REKEY_REPLY, REKEY_DONE):
                deferred.append((t, body))
            elif t == OFFER:
                self.on_offer(body)
            elif t == OFFER_REPLY:
                self.on_offer_reply(body)
            elif t == DATA:
                self.on_data(body, payloads[pi])
                pi += 1
            elif t == CLOSE:
                self.on_close(body)
            elif t == CREDIT:
                self.on_credit(body)
        for t, body in deferred:
            if t == GOODBYE:
                log("<- GOODBYE from keyhold")
                with self.cond:
                    self.goodbye_received = True
                    self.cond.notify_all()
            elif t == REKEY:
                self.on_rekey(body)
            elif t == REKEY_REPLY:
                self.on_rekey_reply(body)
            elif t == REKEY_DONE:
                self.on_rekey_done()

    def on_offer(self, body):
        offer_id = struct.unpack_from("<I", body)[0]
        src, dst = body[4:16], body[16:28]
        # This peer never listens, so every offer is refused (section 7, step 2).
        if ep_node(src) != self.peer_id:
            result = 2
        elif ep_node(dst) != self.my_id:
            result = 3
        else:
            result = 1
        log(f"<- OFFER {offer_id} {ep_str(src)} -> {ep_str(dst)}: refused "
            f"{REPLY_RESULT[result]}")
        self.send_record([f_offer_reply(offer_id, result)])

    def on_offer_reply(self, body):
        offer_id, result = struct.unpack("<IB", body)
        if result not in REPLY_RESULT:
            raise PeerError(f"malformed_frame: OFFER_REPLY result {result}")
        with self.cond:
            ch = self.offers.pop(offer_id, None)
            if ch is None:
                log(f"<- OFFER_REPLY for no pending offer {offer_id} (ignored: no_such_offer)")
                return
            trace(f"<- OFFER_REPLY {offer_id}: {REPLY_RESULT[result]}")
            if result == 0:
                ch.state = "OPEN"
                self.channels[(ch.local, ch.remote)] = ch
                # A's first grant, once it reads the accepted reply.
                ch.granted = Channel.WINDOW
                ch.grant_due = True
            else:
                ch.erase()
            self.replies[offer_id] = result
            self.cond.notify_all()

    def on_data(self, body, payload):
        src, dst = body[0:12], body[12:24]
        epoch, seq, length = struct.unpack_from("<IQI", body, 24)
        tag = body[40:56]
        assert len(payload) == length
        # Section 8's checks, in order; keyhold is honest, so any refusal is a failure here.
        if ep_node(src) != self.peer_id:
            raise PeerError(f"message refused: forged_source_node ({ep_str(src)})")
        with self.cond:
            ch = self.channels.get((dst, src))
            if ch is None or ch.state != "OPEN":
                raise PeerError(f"message refused: no_channel ({ep_str(src)} -> {ep_str(dst)})")
            if seq != ch.rx.expected:
                raise PeerError(f"message refused: replayed_or_reordered (seq {seq}, expected "
                                f"{ch.rx.expected})")
            if seq >= ch.granted:
                raise PeerError(f"message refused: over_credit (seq {seq}, granted "
                                f"{ch.granted})")
            pt, why = ch.rx.open(epoch, seq, payload, tag)
            if why:
                raise PeerError(f"message refused: {why} (epoch {epoch}, seq {seq}, "
                                f"receiver at epoch {ch.rx.epoch})")
            ch.rx.expected += 1
            ch.max_epoch_rx = max(ch.max_epoch_rx, epoch)
            # "Our process" takes every message at once: grant a new window once half the
            # current one has been used.
            ch.taken += 1
            if ch.granted - ch.taken <= Channel.WINDOW // 2 or ch.granted == ch.taken:
                ch.granted = ch.taken + Channel.WINDOW
                ch.grant_due = True
        self.inbox.put((ch, seq, epoch, pt))

    def flush_credits(self):
        with self.state_lock:
            due = any(ch.grant_due and ch.state == "OPEN" for ch in self.channels.values())
        if due:
            self.send_record([])

    def on_close(self, body):
        src, dst, reason = body[0:12], body[12:24], body[24]
        if reason not in CLOSE_REASON:
            raise PeerError(f"malformed_frame: CLOSE reason {reason}")
        if ep_node(src) != self.peer_id:
            log(f"<- CLOSE with forged source {ep_str(src)} (close_rejected)")
            return
        log(f"<- CLOSE {ep_str(src)} -> {ep_str(dst)}: {CLOSE_REASON[reason]}")
        with self.cond:
            ch = self.channels.get((dst, src))
            if ch is not None:
                ch.state = "PEER_CLOSED"
                ch.close_reason = reason
                ch.erase()
            self.cond.notify_all()

    def on_credit(self, body):
        src, dst = body[0:12], body[12:24]
        limit = struct.unpack_from("<Q", body, 24)[0]
        self.stats["credit_in"] += 1
        if ep_node(src) != self.peer_id:
            log(f"<- CREDIT with forged source {ep_str(src)} (credit_rejected)")
            return
        with self.cond:
            ch = self.channels.get((dst, src))
            if ch is None or ch.state != "OPEN":
                trace(f"<- CREDIT for no open channel {ep_str(src)} -> {ep_str(dst)}")
                return
            trace(f"<- CREDIT {ep_str(src)} lets {ep_str(dst)} send below {limit}")
            if limit > ch.send_limit:
                ch.send_limit = limit
                ch.credits_received += 1
                self.cond.notify_all()

    # -- rekeying (section 6) --------------------------------------------------------------------

    def start_rekey(self):
        """Initiator only: REKEY with a fresh message 1 (hello with a new timestamp)."""
        with self.send_lock:
            if self.rekey_conn is not None or self.closed:
                return
            conn = new_noise(True, self.my_priv, self.peer_pub)
            msg1 = bytes(conn.write_message(hello(self.my_id)))
            if len(msg1) != 113:
                raise PeerError(f"rekey message 1 is {len(msg1)} bytes, not 113")
            self.rekey_conn = conn
            self.rekey_started = time.monotonic()
            log("-> REKEY")
            self.send_record([frame(REKEY, msg1)])

    def on_rekey_reply(self, body):
        if not self.initiator or self.rekey_conn is None:
            raise PeerError("unexpected_rekey (REKEY_REPLY answering nothing)")
        conn = self.rekey_conn
        try:
            payload = bytes(conn.read_message(body))
        except Exception as e:
            raise PeerError(f"rekey: REKEY_REPLY does not decrypt: {e!r}")
        if payload != bytes([VERSION]):
            raise PeerError(f"rekey: REKEY_REPLY payload {payload.hex()} is not 03")
        # Every later record from keyhold is sealed under the new session...
        self.rx = conn
        # ...and ours are, after REKEY_DONE (sealed under the old one, last in its record).
        self.send_record([frame(REKEY_DONE)], switch_tx=conn)
        self.rekey_conn = None
        self.rekeys += 1
        self.session_started = time.monotonic()
        log(f"<- REKEY_REPLY, -> REKEY_DONE: rekey {self.rekeys} done")

    def on_rekey(self, body):
        if self.initiator:
            raise PeerError("unexpected_rekey (REKEY received by the initiator)")
        if self.rekey_conn is not None:
            raise PeerError("unexpected_rekey (second REKEY before REKEY_DONE)")
        conn = new_noise(False, self.my_priv, None)
        try:
            payload = bytes(conn.read_message(body))
        except Exception as e:
            raise PeerError(f"rekey: handshake_failed ({e!r})")
        if noise_remote_static(conn) != self.peer_pub:
            raise PeerError("rekey: rekey_from_another_key / unknown_key")
        stamp, err = check_hello(payload, self.peer_id, self.last_peer_stamp)
        if err:
            raise PeerError(f"rekey: {err}")
        self.last_peer_stamp = stamp
        msg2 = bytes(conn.write_message(bytes([VERSION])))
        if len(msg2) != 49:
            raise PeerError(f"rekey: message 2 is {len(msg2)} bytes, not 49")
        self.rekey_conn = conn
        self.send_record([frame(REKEY_REPLY, msg2)], switch_tx=conn)
        log("<- REKEY, -> REKEY_REPLY")

    def on_rekey_done(self):
        if self.initiator or self.rekey_conn is None:
            raise PeerError("unexpected_rekey (REKEY_DONE answering nothing)")
        self.rx = self.rekey_conn
        self.rekey_conn = None
        self.rekeys += 1
        self.session_started = time.monotonic()
        log(f"<- REKEY_DONE: rekey {self.rekeys} done")

    # -- the timer: keepalives, liveness, rekeys, grants -----------------------------------------

    def timer(self):
        a = self.args
        while True:
            time.sleep(0.05)
            if self.closed or self.error or self.goodbye_received:
                return
            now = time.monotonic()
            try:
                if now - self.last_recv > a.dead_after:
                    self.fail(f"keepalive_timeout: nothing from keyhold for "
                              f"{now - self.last_recv:.1f} s")
                    return
                if self.rekey_conn is not None and self.rekey_started is not None \
                        and self.initiator and now - self.rekey_started > 5.0:
                    self.fail("rekey_timeout")
                    return
                if (self.initiator and a.rekey_after and self.rekey_conn is None
                        and now - self.session_started >= a.rekey_after):
                    self.start_rekey()
                if time.monotonic() - self.last_sent >= a.keepalive:
                    with self.send_lock:
                        if time.monotonic() - self.last_sent >= a.keepalive and not self.closed:
                            self.stats["keepalives_out"] += 1
                            self.send_record([frame(KEEPALIVE)])
                self.flush_credits()
            except (PeerError, OSError) as e:
                self.fail(f"timer: {e}")
                return

    def start(self):
        self.reader_thread = threading.Thread(target=self.reader, daemon=True)
        self.timer_thread = threading.Thread(target=self.timer, daemon=True)
        self.reader_thread.start()
        self.timer_thread.start()

    def check(self):
        if self.error:
            raise PeerError(self.error)
        if self.goodbye_received:
            raise PeerError("keyhold said GOODBYE unexpectedly")

    def wait_for(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                self.check()
                if pred():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"timed out waiting for {what}")
                self.cond.wait(min(left, 0.1))

    def goodbye(self):
        with self.send_lock:
            self.send_record([frame(GOODBYE)])
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # Drain until keyhold closes its end (it must send nothing more of interest).
        self.sock.settimeout(3.0)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Handshake (section 3)
# ---------------------------------------------------------------------------------------------

def handshake_initiator(addr, my_id, peer_id, my_priv, peer_pub, deadline):
    """Dial keyhold (retrying while its listener is not up), run IK, send CONFIRM."""
    backoff = 0.1
    while True:
        try:
            sock = socket.create_connection(addr, timeout=5.0)
            break
        except OSError as e:
            if time.monotonic() + backoff > deadline:
                raise PeerError(f"cannot connect to keyhold at {addr}: {e}")
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
    sock.settimeout(5.0)  # the handshake deadline
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = new_noise(True, my_priv, peer_pub)
    msg1 = bytes(conn.write_message(hello(my_id)))
    if len(msg1) != 113:
        raise PeerError(f"message 1 is {len(msg1)} bytes, not 113")
    sock.sendall(struct.pack(">H", len(msg1)) + msg1)
    n = struct.unpack(">H", recv_exact(sock, 2))[0]
    if n != 49:
        raise PeerError(f"message 2 length prefix {n}, expected 49")
    payload = bytes(conn.read_message(recv_exact(sock, n)))
    if len(payload) != 1:
        raise PeerError("bad_handshake_payload in message 2")
    if payload[0] != VERSION:
        raise PeerError(f"unsupported_version: message 2 names {payload[0]}")
    if not conn.handshake_finished:
        raise PeerError("Noise handshake not finished after message 2")
    confirm = conn.encrypt(bytes([CONFIRM]))
    assert len(confirm) == 17
    sock.sendall(b"\x00\x11" + confirm)
    sock.settimeout(None)
    log(f"link up as initiator (node {my_id} dialed node {peer_id}), CONFIRM sent")
    return sock, conn, None


def handshake_responder(listener, my_id, peer_id, my_priv, peer_pub, deadline):
    """Accept keyhold's dial, check message 1 (3.2), answer, wait for CONFIRM (3.4)."""
    last_stamp = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerError("keyhold did not dial this node in time")
        listener.settimeout(left)
        try:
            sock, peer_addr = listener.accept()
        except socket.timeout:
            raise PeerError("keyhold did not dial this node in time")
        sock.settimeout(5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            n = struct.unpack(">H", recv_exact(sock, 2))[0]
            if not 1 <= n <= 256:
                raise PeerError(f"bad_handshake_message (length {n})")
            msg1 = recv_exact(sock, n)
            conn = new_noise(False, my_priv, None)
            try:
                payload = bytes(conn.read_message(msg1))
            except Exception as e:
                raise PeerError(f"handshake_failed ({e!r})")
            if noise_remote_static(conn) != peer_pub:
                raise PeerError("unknown_key")
            if len(msg1) != 113:
                raise PeerError(f"message 1 is {len(msg1)} bytes, not the 113 documented")
            stamp, err = check_hello(payload, peer_id, last_stamp)
            if err:
                raise PeerError(err)
            last_stamp = stamp
            msg2 = bytes(conn.write_message(bytes([VERSION])))
            assert len(msg2) == 49 and conn.handshake_finished
            sock.sendall(struct.pack(">H", len(msg2)) + msg2)
            rec = recv_exact(sock, 19)
            if rec[:2] != b"\x00\x11":
                raise PeerError(f"bad_confirmation: first record length {rec[:2].hex()}")
            try:
                pt = conn.decrypt(rec[2:])
            except Exception:
                raise PeerError("bad_confirmation: does not decrypt")
            if pt != bytes([CONFIRM]):
                raise PeerError(f"bad_confirmation: {pt.hex()}")
        except (PeerError, EOFError, OSError) as e:
            log(f"refused a connection from {peer_addr}: {e}")
            sock.close()
            continue
        sock.settimeout(None)
        log(f"link up as responder (node {peer_id} dialed node {my_id} from {peer_addr[0]}:"
            f"{peer_addr[1]}), CONFIRM checked")
        return sock, conn, last_stamp


# ---------------------------------------------------------------------------------------------
# Self-check against section 11's test vectors
# ---------------------------------------------------------------------------------------------

def self_test():
    K = bytes(range(32))
    S = bytes(range(0xa0, 0xb0))
    snd, rcv = ep(1, 2, 3), ep(4, 5, 6)
    c0 = chain0(K, S, snd, rcv)
    assert c0.hex() == "e063cac12c218007763cb51034fd07b13cab6338844fd16ef817468873dee006", c0.hex()
    m0 = message_key(c0)
    assert m0.hex() == "8da8246a6833eab48c339d6e0d0253c8cc23291886daab6e5c51ed11cd2f4256"
    c1 = next_chain(c0)
    assert c1.hex() == "d497ff52e2829e32385c2044dbdb1be4183b6e6c57193452ea56ab7bd26051a3"
    m1 = message_key(c1)
    ct, tag = seal(m0, snd, rcv, 0, 7, b"keyhold")
    assert (ct.hex(), tag.hex()) == ("0964d19a6b1b0a", "86486e63831b88ffbde5552568945a48")
    ct, tag = seal(m1, snd, rcv, 1, 8, b"keyhold")
    assert (ct.hex(), tag.hex()) == ("2adfaa73eb79a8", "9775d28b1da712be3950690499a8a154")
    # Receiver side: epoch 0 then the next.
    r = RecvDirection(K, S, snd, rcv)
    assert r.open(1, 8, ct, tag) == (b"keyhold", None) and r.epoch == 1
    assert frame(KEEPALIVE).hex() == "01" and frame(CONFIRM).hex() == "03"
    assert f_offer_reply(7, 1).hex() == "050700000001"
    assert f_close(snd, rcv, 1).hex() == ("07" "010000000200000003000000"
                                           "040000000500000006000000" "01")
    assert f_credit(rcv, snd, 96).hex() == ("0b" "040000000500000006000000"
                                             "010000000200000003000000" "6000000000000000")
    assert f_data(snd, rcv, 1, 8, 7, tag).hex() == (
        "06" "010000000200000003000000" "040000000500000006000000" "01000000"
        "0800000000000000" "07000000" "9775d28b1da712be3950690499a8a154")
    assert tai64n(1_700_000_000.5).hex() == "400000006553f10a" "1dcd6500"
    assert hello(1, tai64n(1_700_000_000.5)).hex() == "03" "01000000" "400000006553f10a1dcd6500"
    log("section 11 test vectors: all match")


# ---------------------------------------------------------------------------------------------
# Orchestration: the keyhold node, the scenario, the audit check
# ---------------------------------------------------------------------------------------------

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def die_with_parent():
    """In the child, before exec: the kernel kills it if this peer dies (a test's deadline kills
    the peer with SIGKILL, and its `finally` never runs), so no keyhold node outlives it."""
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class KeyholdNode:
    def __init__(self, binary, fixtures, workdir, my_id, k_id, my_pub_b64, my_port, k_port,
                 rekey_after_secs, key_lifetime_messages):
        self.binary, self.workdir = binary, workdir
        self.k_id = k_id
        keyfile = os.path.join(workdir, f"node{k_id}.key")
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            subprocess.run([binary, "keygen"], stdout=f, check=True)
        with open(keyfile, "rb") as f:
            self.pub_b64 = subprocess.run([binary, "pubkey"], stdin=f, capture_output=True,
                                          check=True).stdout.decode().strip()
        self.pub = base64.b64decode(self.pub_b64)
        assert len(self.pub) == 32
        nodes = sorted([(k_id, k_port, self.pub_b64), (my_id, my_port, my_pub_b64)])
        with open(os.path.join(workdir, "cluster.toml"), "w") as f:
            for nid, port, pub in nodes:
                f.write(f'[[node]]\nid = {nid}\naddress = "127.0.0.1:{port}"\n'
                        f'public_key = "{pub}"\n\n')
        self.audit = os.path.join(workdir, "audit.jsonl")
        self.config = os.path.join(workdir, "node.toml")
        echo = os.path.abspath(os.path.join(fixtures, "echo.elf"))
        with open(self.config, "w") as f:
            f.write(f'[node]\nid = {k_id}\naudit_log = "audit.jsonl"\ncluster = "cluster.toml"\n'
                    f'private_key_file = "node{k_id}.key"\nlisten = "127.0.0.1:{k_port}"\n'
                    f'api_socket = "node.sock"\n\n')
            if rekey_after_secs:
                f.write(f"[links]\nrekey_after_secs = {rekey_after_secs}\n\n")
            if key_lifetime_messages:
                f.write(f"[channels]\nkey_lifetime_messages = {key_lifetime_messages}\n\n")
            f.write(f'[[partition]]\nid = 1\nfirmware = "{echo}"\nargs = "peer={my_id}:1:1"\n')
        self.proc = None

    def start(self):
        self.out = open(os.path.join(self.workdir, "keyhold.out"), "wb")
        self.proc = subprocess.Popen([self.binary, "-v", "node", "--config", self.config],
                                     stdout=self.out, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, preexec_fn=die_with_parent)
        log(f"started keyhold node {self.k_id} (pid {self.proc.pid})")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode

    def output(self):
        with open(os.path.join(self.workdir, "keyhold.out"), "rb") as f:
            return f.read().decode(errors="replace")

    def audit_records(self):
        try:
            with open(self.audit) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


def run_scenario(args, role):
    initiator = role == "initiator"
    my_id, k_id = (1, 2) if initiator else (2, 1)
    workdir = tempfile.mkdtemp(prefix=f"keyhold-peer-{role}-")
    my_key = X25519PrivateKey.generate()
    my_priv = my_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())
    my_pub = my_key.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
    my_port, k_port = free_port(), free_port()
    node = KeyholdNode(args.keyhold, args.fixtures, workdir, my_id, k_id,
                       base64.b64encode(my_pub).decode(), my_port, k_port,
                       args.keyhold_rekey_after if not initiator else None,
                       args.keyhold_key_lifetime)
    log(f"--- role {role}: this peer is node {my_id}, keyhold is node {k_id} "
        f"(workdir {workdir})")
    listener = None
    link = None
    ok = False
    try:
        if not initiator:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", my_port))
            listener.listen(8)
        node.start()
        deadline = time.monotonic() + 15
        if initiator:
            sock, conn, stamp = handshake_initiator(("127.0.0.1", k_port), my_id, k_id,
                                                    my_priv, node.pub, deadline)
        else:
            sock, conn, stamp = handshake_responder(listener, my_id, k_id, my_priv, node.pub,
                                                    deadline)
            listener.close()  # one link is all this run needs; later dials are refused
            listener = None
        link = Link(sock, conn, my_id, k_id, initiator, my_priv, node.pub, args, stamp)
        link.start()
        exchange(link, args, my_id, k_id, node)
        # Check the audit log for what keyhold saw.
        check_audit(node, my_id, args.finish)
        ok = True
    finally:
        if link is not None and not link.closed:
            try:
                link.sock.close()
            except OSError:
                pass
        if listener is not None:
            listener.close()
        rc = node.stop()
        log(f"keyhold node stopped (exit status {rc})")
        if not ok or args.verbose:
            out = node.output().splitlines()
            print("---- keyhold output (last 40 lines) ----")
            print("\n".join(out[-40:]))
            print("---- end ----")
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")


def exchange(link, args, my_id, k_id, node):
    local, remote = ep(my_id, 1, 1), ep(k_id, 1, 1)

    # 1. OFFER, repeated (fresh key and salt each time) while echo has not listened yet.
    offer_id = 0
    deadline = time.monotonic() + 20
    while True:
        offer_id += 1
        key, salt = os.urandom(32), os.urandom(16)
        ch = Channel(local, remote, key, salt, args.key_lifetime, 600)
        with link.cond:
            link.offers[offer_id] = ch
        link.send_record([f_offer(offer_id, local, remote, salt, key)])
        log(f"-> OFFER {offer_id}: {ep_str(local)} -> {ep_str(remote)}")
        link.wait_for(lambda: offer_id in link.replies, 6, f"OFFER_REPLY {offer_id}")
        result = link.replies[offer_id]
        log(f"<- OFFER_REPLY {offer_id}: {REPLY_RESULT[result]}")
        if result == 0:
            break
        if result != 1 or time.monotonic() > deadline:
            raise PeerError(f"offer refused: {REPLY_RESULT[result]}")
        if not node.alive():
            raise PeerError("keyhold exited")
        time.sleep(0.2)

    # 2. Wait for keyhold's first CREDIT: no DATA before it.
    link.wait_for(lambda: ch.send_limit > 0, 5, "keyhold's first CREDIT")
    log(f"first CREDIT from keyhold: may send below seq {ch.send_limit}")
    if ch.tx.seq != 0:
        raise PeerError("internal: sent before credit")

    # 3. The messages: sizes from empty-free 1 byte to the 64 KiB maximum.
    rng = random.Random(args.seed)
    sizes = [1, MAX_DATA_LEN, 2, 4096] + [rng.choice([rng.randint(1, 512),
                                                      rng.randint(513, 8192),
                                                      rng.randint(8193, MAX_DATA_LEN)])
                                          for _ in range(max(0, args.count - 4))]
    sizes = sizes[:args.count]
    messages = [os.urandom(n) for n in sizes]
    sent = 0
    received = 0
    max_in_flight_seen = 0
    stalls = 0
    idle_done = False
    t0 = time.monotonic()

    def drain(block_s):
        nonlocal received
        try:
            item = link.inbox.get(timeout=block_s)
        except queue.Empty:
            return False
        while True:
            c, seq, epoch, pt = item
            if c is not ch:
                raise PeerError("echo on an unexpected channel")
            if seq != received:
                raise PeerError(f"echo seq {seq}, expected {received}")
            if pt != messages[received]:
                raise PeerError(f"echo {seq} differs from message {received} "
                                f"({len(pt)} vs {len(messages[received])} bytes)")
            received += 1
            try:
                item = link.inbox.get_nowait()
            except queue.Empty:
                return True

    while received < len(messages):
        if ch.state != "OPEN":
            raise PeerError(f"channel closed by keyhold ({CLOSE_REASON.get(ch.close_reason)}) "
                            f"after {sent} sent, {received} echoed; see echo's console below")
        link.check()
        # Halfway: an idle spell longer than the keepalive interval (and near dead_after), with
        # everything echoed, so that only keepalives keep the link up.
        if not idle_done and sent == len(messages) // 2 and received == sent:
            kin, kout = link.stats["keepalives_in"], link.stats["keepalives_out"]
            log(f"idle for {args.idle:.1f} s: only keepalives on the link")
            end = time.monotonic() + args.idle
            while time.monotonic() < end:
                link.check()
                time.sleep(0.05)
            log(f"idle spell over: keepalives in {link.stats['keepalives_in'] - kin}, out "
                f"{link.stats['keepalives_out'] - kout}")
            if args.idle > args.dead_after and link.stats["keepalives_in"] == kin:
                raise PeerError("no KEEPALIVE from keyhold during the idle spell")
            idle_done = True
        # Send what credit allows, packed into records within the size bounds.
        if sent < len(messages):
            with link.send_lock:
                frames, payloads, hdr, pay = [], [], 0, 0
                with link.state_lock:
                    limit = ch.send_limit
                while (sent < len(messages) and ch.tx.seq < limit
                       and hdr + 57 <= MAX_HEADER_PLAINTEXT - 33 * 4
                       and pay + len(messages[sent]) <= MAX_RECORD_PAYLOAD
                       and not (not idle_done and sent >= len(messages) // 2)):
                    m = messages[sent]
                    epoch, seq, ct, tag = ch.tx.seal_next(m)
                    assert seq == sent and seq < limit
                    frames.append(f_data(local, remote, epoch, seq, len(ct), tag))
                    payloads.append(ct)
                    hdr += 57
                    pay += len(ct)
                    sent += 1
                if frames:
                    if args.grant_ahead:
                        # echo answers seq s with its own seq s: grant its echoes before it
                        # can need them, in this very record (the CREDIT rides ahead of the
                        # DATA), so that it never waits for credit.
                        with link.state_lock:
                            if ch.granted < sent:
                                ch.granted = max(sent, ch.taken + Channel.WINDOW)
                                ch.grant_due = True
                    link.send_record(frames, payloads)
                    max_in_flight_seen = max(max_in_flight_seen, sent - received)
                elif sent < len(messages) and ch.tx.seq >= limit:
                    stalls += 1
        if not drain(0.02 if sent < len(messages) else 0.5):
            if time.monotonic() - t0 > 60:
                raise PeerError(f"timed out: {sent} sent, {received} echoed")
    elapsed = time.monotonic() - t0
    log(f"sent {sent} messages ({sum(sizes)} bytes), all {received} echoes verified and equal; "
        f"{elapsed:.2f} s; our epochs 0..{ch.tx.epoch}, keyhold's 0..{ch.max_epoch_rx}; "
        f"credit grants in {ch.credits_received} (final limit {ch.send_limit}), out "
        f"{link.stats['credit_out']}; waited for credit {stalls} times")
    if ch.tx.epoch < 1 and args.key_lifetime < len(messages):
        raise PeerError("our direction never moved past epoch 0")
    if args.keyhold_key_lifetime and args.keyhold_key_lifetime < len(messages) \
            and ch.max_epoch_rx < 1:
        raise PeerError("keyhold's direction never moved past epoch 0 despite its key lifetime")

    # 4. A rekey must have happened (ours as initiator; keyhold's as responder).
    want_rekey = (args.rekey_after if link.initiator else args.keyhold_rekey_after)
    if want_rekey:
        link.wait_for(lambda: link.rekeys >= 1, want_rekey + 6, "a completed rekey")
        log(f"rekeys completed on this link: {link.rekeys}")

    if args.finish == "echo-goodbye":
        finish_by_echo_goodbye(link, ch, local, remote, node)
        return

    # 5. CLOSE the channel (reason 0: closed by its process), then GOODBYE.
    link.send_record([f_close(local, remote, 0)])
    with link.state_lock:
        ch.state = "CLOSED"
        ch.erase()
    log("-> CLOSE (closed by its process)")
    time.sleep(0.2)
    link.check()
    link.goodbye()
    log(f"-> GOODBYE; link stats: {link.stats}")


def finish_by_echo_goodbye(link, ch, local, remote, node):
    """Echo's goodbye is an empty message: echo exits, its node stops, and section 8 says the
    node sends CLOSE (reason 2) for the channel before its GOODBYE."""
    link.wait_for(lambda: ch.tx.seq < ch.send_limit, 5, "credit for the empty message")
    with link.send_lock:
        epoch, seq, ct, tag = ch.tx.seal_next(b"")
        assert ct == b""
        link.send_record([f_data(local, remote, epoch, seq, 0, tag)], [b""])
    log(f"-> DATA seq {seq}, empty: echo's goodbye")
    deadline = time.monotonic() + 15
    with link.cond:
        while not link.goodbye_received:
            if link.error:
                raise PeerError(link.error)
            if time.monotonic() > deadline:
                raise PeerError("no GOODBYE from keyhold after echo's goodbye")
            link.cond.wait(0.1)
        if ch.state != "PEER_CLOSED" or ch.close_reason != 2:
            raise PeerError(f"GOODBYE came, but the channel is {ch.state} "
                            f"(reason {ch.close_reason}), not closed by keyhold with reason 2 "
                            f"(partition stopped) before it")
    log("keyhold closed the channel (partition stopped) before its GOODBYE, as section 8 says")
    link.closed = True
    link.sock.close()
    try:
        rc = node.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise PeerError("keyhold did not exit once its only partition stopped")
    if rc != 0:
        raise PeerError(f"keyhold exited with status {rc}, not echo's 0")
    log("keyhold exited 0 (echo's status)")


def check_audit(node, my_id, finish="close"):
    want = {("link_up", "authenticated"), ("offer_accepted", "listener_matched")}
    if finish == "close":
        want |= {("channel_closed", "peer_closed"), ("link_down", "goodbye")}
    else:
        want |= {("channels_closed", "partition_stopped"), ("link_down", "shutdown")}
    bad_events = {"frame_rejected", "message_rejected", "credit_rejected", "close_rejected",
                  "reply_rejected", "link_rejected"}
    deadline = time.monotonic() + 5
    while True:
        recs = node.audit_records()
        seen = {(r.get("event"), r.get("reason")) for r in recs}
        bad = [r for r in recs if r.get("event") in bad_events]
        if bad:
            raise PeerError(f"keyhold audited a refusal: {bad[0]}")
        if want <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    missing = want - seen
    if missing:
        raise PeerError(f"keyhold's audit log lacks {sorted(missing)}")
    rejected = [r for r in recs if r.get("event") == "offer_rejected"]
    log(f"keyhold audit: {len(recs)} records; "
        + ", ".join(f"{e} ({r})" for e, r in sorted(want)) + " present; no refusals"
        + (f" (offers refused no_listener before echo listened: {len(rejected)})"
           if rejected else ""))


def main():
    global VERBOSE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keyhold", default="target/release/keyhold", help="the keyhold binary")
    p.add_argument("--fixtures", default="target/fixtures", help="folder holding echo.elf")
    p.add_argument("--role", choices=["initiator", "responder", "both"], default="both",
                   help="this peer's link role: initiator = node 1, responder = node 2")
    p.add_argument("--count", type=int, default=100, help="messages to send (default 100)")
    p.add_argument("--key-lifetime", type=int, default=16,
                   help="messages this peer seals per epoch (default 16, to move epochs)")
    p.add_argument("--keyhold-key-lifetime", type=int, default=16,
                   help="keyhold's [channels] key_lifetime_messages (0: its default)")
    p.add_argument("--rekey-after", type=float, default=2.0,
                   help="as initiator, rekey the link after this many seconds (0: never)")
    p.add_argument("--keyhold-rekey-after", type=float, default=2.0,
                   help="keyhold's [links] rekey_after_secs when it is the initiator")
    p.add_argument("--keepalive", type=float, default=1.0)
    p.add_argument("--dead-after", type=float, default=3.0)
    p.add_argument("--idle", type=float, default=4.0,
                   help="idle spell halfway, longer than dead_after (seconds; default 4)")
    p.add_argument("--window", type=int, default=64,
                   help="credit this peer grants beyond what it has taken (default 64)")
    p.add_argument("--finish", choices=["close", "echo-goodbye"], default="close",
                   help="close: CLOSE the channel and say GOODBYE (default); echo-goodbye: "
                        "send echo its empty goodbye message, then expect keyhold's CLOSE "
                        "(partition stopped), GOODBYE, and exit status 0")
    p.add_argument("--no-grant-ahead", dest="grant_ahead", action="store_false",
                   help="grant only as echoes arrive (window policy alone); echo then meets "
                        "NO_ROOM once this peer pipelines past the window, and sends again")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("-v", "--verbose", action="store_true", help="trace every record")
    args = p.parse_args()
    VERBOSE = args.verbose
    if args.window < 1:
        sys.exit("peer: --window must be at least 1")
    Channel.WINDOW = args.window
    if not args.keyhold_key_lifetime:
        args.keyhold_key_lifetime = None
    if not args.keyhold_rekey_after:
        args.keyhold_rekey_after = None
    args.keyhold = os.path.abspath(args.keyhold)
    args.fixtures = os.path.abspath(args.fixtures)
    if not os.access(args.keyhold, os.X_OK):
        sys.exit(f"peer: no keyhold binary at {args.keyhold}")
    if not os.path.exists(os.path.join(args.fixtures, "echo.elf")):
        sys.exit(f"peer: no echo.elf in {args.fixtures}")
    try:
        self_test()
    except AssertionError as e:
        sys.exit(f"peer: FAILED: section 11 test vector mismatch {e}")
    roles = ["initiator", "responder"] if args.role == "both" else [args.role]
    for role in roles:
        try:
            run_scenario(args, role)
        except PeerError as e:
            print(f"peer: FAILED ({role}): {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        log(f"=== role {role}: interop OK")
    log("success")


if __name__ == "__main__":
    main()
