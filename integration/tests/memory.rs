//! No channel key, in any form, exists outside secret memory: checked from outside, by reading
//! every mapping of every running keyhold process through `/proc/PID/mem` (as root).
//!
//! Two linked nodes. Node 1 runs the `keys` fixture as partition 1 and an echo as partition 2;
//! node 2 runs an echo. `keys` opens seven channels with keys it supplies itself (derived from a
//! seed this test chose, so the test knows them): three to the echo beside it, four to the echo
//! on node 2, and moves 300 messages each way on each with `key_lifetime_messages = 50`, so that
//! every cross-node channel goes through several epochs. Then, phase by phase:
//!
//! 1. live: every channel open;
//! 2. closed: `keys` closed two of them (one on each node);
//! 3. revoked: the operator revoked three (`keyhold ctl revoke`, two on node 1, one on node 2);
//! 4. link down: node 2 was SIGKILLed, taking its last channel with it (node 1 only).
//!
//! In each phase the test reads every mapping of every keyhold process still running and
//! searches it for every form of every key, for every epoch up to the current one and the next
//! (which must not exist anywhere yet):
//! - the channel key K;
//! - for cross-node channels, in both directions, each chain key C_e and message key M_e
//!   (docs/PROTOCOL.md; devices/src/crypto/channel.rs has the vector checked below);
//! - the 15 AES-256 round keys of each M_e (FIPS-197 key expansion) and its GHASH key
//!   H = AES-256_{M_e}(0^128), as computed and in the "twisted" form ring's GHASH keeps.
//!
//! Every pattern is 16 bytes (a 32-byte key is searched as its two halves, so a partial copy is
//! caught too), found at any alignment. Same-node channels do no cipher at all: there only K
//! exists. A finding anywhere is a failure, reported with its mapping line (and the threads whose
//! stack it is), offset and what was found, except K in the RAM of the partition that supplied
//! it. Findings of every phase are gathered and reported together at the end.
//!
//! The controls, without which a clean result would prove nothing:
//! - `keys` keeps its own copy of every key in its RAM, which is a mapping of node 1's process;
//!   the scan must find every K there, whole, in every phase. A guest RAM is found by the
//!   boot-info block the VMM writes at guest-physical 0x1000 ("KHBI", node, partition, RAM
//!   size), not by its mapping alone: the kernel merges the two RAMs of node 1 into one mapping
//!   (and this kernel cannot name them: no CONFIG_ANON_VMA_NAME).
//! - `the_searched_forms_are_the_ones_keyhold_keeps` builds keyhold's own `ChannelCiphers` in
//!   plain heap memory and finds the chain key, every round key and the twisted H in it, as
//!   computed here: the derived forms searched for are the ones the product really holds.
//! - The other tests below check the key derivation against the documented vector, the AES key
//!   expansion against FIPS-197 and the `aes` crate, and the scanner at every alignment and
//!   across the chunks it reads in.
//!
//! Mappings that cannot be read are counted: `memfd_secret` mappings (`/secretmem (deleted)`)
//! must exist and must be unreadable, special ones like `[vvar]` may be, and any other is a
//! failure. PROT_NONE mappings are read too (`/proc/PID/mem` can).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes::cipher::{BlockEncrypt, KeyInit};
use firmware_fixtures::snoop_key::key_byte;
use hkdf::Hkdf;
use keyhold_integration::nodes::{ctl, pair, wait_until, NodeSpec};
use keyhold_integration::{fixture, is_root, require_kvm, spawn_keyhold};
use serde_json::Value;
use sha2::Sha256;

// ---------------------------------------------------------------------------------------------
// The channels (the same table as firmware-fixtures/guest/src/bin/keys.rs).

/// What happens to a channel after the live phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// The guest closes it.
    Close,
    /// The operator revokes it, on node 1 (`here`) or on node 2.
    Revoke { here: bool },
    /// Nothing.
    Keep,
    /// It dies with the link to node 2.
    LinkDown,
}

struct Plan {
    process: u32,
    remote: bool,
    fate: Fate,
}

const PLAN: [Plan; 7] = [
    Plan { process: 11, remote: false, fate: Fate::Close },
    Plan { process: 12, remote: false, fate: Fate::Revoke { here: true } },
    Plan { process: 13, remote: false, fate: Fate::Keep },
    Plan { process: 21, remote: true, fate: Fate::Close },
    Plan { process: 22, remote: true, fate: Fate::Revoke { here: true } },
    Plan { process: 23, remote: true, fate: Fate::Revoke { here: false } },
    Plan { process: 24, remote: true, fate: Fate::LinkDown },
];

/// The echo on node 1 (partition 2) and the one on node 2 (partition 1), both process 1.
const LOCAL_ECHO: Endpoint = Endpoint { node: 1, partition: 2, process: 1 };
const REMOTE_ECHO: Endpoint = Endpoint { node: 2, partition: 1, process: 1 };

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Endpoint {
    node: u32,
    partition: u32,
    process: u32,
}

impl Endpoint {
    fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..4].copy_from_slice(&self.node.to_le_bytes());
        out[4..8].copy_from_slice(&self.partition.to_le_bytes());
        out[8..].copy_from_slice(&self.process.to_le_bytes());
        out
    }

    fn of(value: &Value) -> Self {
        let n = |k: &str| value[k].as_u64().unwrap_or(u64::MAX) as u32;
        Endpoint { node: n("node"), partition: n("partition"), process: n("process") }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.node, self.partition, self.process)
    }
}

impl Plan {
    fn local(&self) -> Endpoint {
        Endpoint { node: 1, partition: 1, process: self.process }
    }

    fn peer(&self) -> Endpoint {
        if self.remote {
            REMOTE_ECHO
        } else {
            LOCAL_ECHO
        }
    }
}

/// Channel `i`'s key, as `keys` derives it from `seed`.
fn channel_key(seed: u64, i: usize) -> [u8; 32] {
    let channel_seed = seed ^ ((i as u64 + 1) << 32);
    std::array::from_fn(|j| key_byte(channel_seed, j))
}

// ---------------------------------------------------------------------------------------------
// Every form of a key (a search pattern, not product crypto).

const CHAIN_LABEL: &[u8] = b"keyhold v2 chain";
const MESSAGE_KEY_LABEL: &[u8] = b"keyhold v2 message key";
const NEXT_CHAIN_LABEL: &[u8] = b"keyhold v2 next chain";

fn expand(prk: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let hkdf = Hkdf::<Sha256>::from_prk(prk).expect("a 32-byte PRK");
    let mut out = [0u8; 32];
    hkdf.expand(info, &mut out).expect("32 bytes");
    out
}

/// C_0 of the direction `sender` -> `receiver` of a channel with key `key` and salt `salt`.
fn first_chain(key: &[u8; 32], salt: &[u8; 16], sender: Endpoint, receiver: Endpoint) -> [u8; 32] {
    let (prk, _) = Hkdf::<Sha256>::extract(Some(salt), key);
    let mut info = CHAIN_LABEL.to_vec();
    info.extend_from_slice(&sender.encode());
    info.extend_from_slice(&receiver.encode());
    expand(&prk.into(), &info)
}

/// (C_e, M_e) for e = 0..epochs.
fn chain(c0: [u8; 32], epochs: u32) -> Vec<([u8; 32], [u8; 32])> {
    let mut c = c0;
    let mut out = Vec::new();
    for _ in 0..epochs {
        out.push((c, expand(&c, MESSAGE_KEY_LABEL)));
        c = expand(&c, NEXT_CHAIN_LABEL);
    }
    out
}

/// The AES S-box, computed (multiplicative inverse in GF(2^8), then the affine map) rather
/// than typed in.
fn sbox() -> [u8; 256] {
    let mul = |mut a: u8, mut b: u8| {
        let mut p = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                p ^= a;
            }
            let carry = a & 0x80 != 0;
            a <<= 1;
            if carry {
                a ^= 0x1b;
            }
            b >>= 1;
        }
        p
    };
    std::array::from_fn(|x| {
        let x = x as u8;
        let inv = if x == 0 { 0 } else { (1..=255u8).find(|&y| mul(x, y) == 1).unwrap() };
        inv ^ inv.rotate_left(1)
            ^ inv.rotate_left(2)
            ^ inv.rotate_left(3)
            ^ inv.rotate_left(4)
            ^ 0x63
    })
}

/// The 15 round keys of the AES-256 key expansion (FIPS-197, section 5.2).
fn aes256_round_keys(key: &[u8; 32], sbox: &[u8; 256]) -> [[u8; 16]; 15] {
    const RCON: [u8; 7] = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40];
    let mut w = [[0u8; 4]; 60];
    for (i, word) in w.iter_mut().enumerate().take(8) {
        word.copy_from_slice(&key[4 * i..4 * i + 4]);
    }
    for i in 8..60 {
        let mut t = w[i - 1];
        if i % 8 == 0 {
            t = [
                sbox[t[1] as usize],
                sbox[t[2] as usize],
                sbox[t[3] as usize],
                sbox[t[0] as usize],
            ];
            t[0] ^= RCON[i / 8 - 1];
        } else if i % 8 == 4 {
            t = t.map(|b| sbox[b as usize]);
        }
        w[i] = std::array::from_fn(|j| w[i - 8][j] ^ t[j]);
    }
    std::array::from_fn(|r| {
        let mut k = [0u8; 16];
        for j in 0..4 {
            k[4 * j..4 * j + 4].copy_from_slice(&w[4 * r + j]);
        }
        k
    })
}

/// GHASH's key for an AES-256-GCM key: the zero block, encrypted.
fn ghash_key(key: &[u8; 32]) -> [u8; 16] {
    let cipher = aes::Aes256::new(key.into());
    let mut block = aes::Block::default();
    cipher.encrypt_block(&mut block);
    block.into()
}

/// H as carry-less-multiplication GHASH code keeps it (ring's `gcm_init_clmul` and its AVX
/// variants): H read as a big-endian number, times x modulo the GHASH polynomial in its
/// bit-reflected form (shift left by one, xor 0xc2 << 120 | 1 on carry), stored little-endian.
/// `the_searched_forms_are_the_ones_keyhold_keeps` shows this is the form in keyhold's ciphers.
fn twisted(h: [u8; 16]) -> [u8; 16] {
    let v = u128::from_be_bytes(h);
    let reduce = if v >> 127 == 1 { 0xc2 << 120 | 1 } else { 0 };
    ((v << 1) ^ reduce).to_le_bytes()
}

// ---------------------------------------------------------------------------------------------
// The patterns and how they are found.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Half `half` of channel `channel`'s key K.
    GuestKey { channel: usize, half: usize },
    /// Anything derived from a key.
    Derived,
}

/// 16-byte patterns, indexed by their 8-byte pieces at offsets 0..8: an occurrence of a 16-byte
/// pattern at any address contains exactly one 8-aligned word, the pattern's bytes k..k+8 for
/// some k in 0..8, so reading memory one aligned word at a time finds it at every alignment.
struct Needles {
    bytes: Vec<[u8; 16]>,
    what: Vec<String>,
    kind: Vec<Kind>,
    /// word -> (pattern, offset of the word in it)
    index: HashMap<u64, Vec<(u32, u8)>>,
    /// A Bloom-like filter of the index's words, so that most words cost no hash lookup.
    filter: Vec<u64>,
}

const FILTER_BITS: u32 = 20;

fn bucket(word: u64) -> usize {
    (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FILTER_BITS)) as usize
}

impl Needles {
    fn new() -> Self {
        Needles {
            bytes: Vec::new(),
            what: Vec::new(),
            kind: Vec::new(),
            index: HashMap::new(),
            filter: vec![0; (1 << FILTER_BITS) / 64],
        }
    }

    /// Adds `pattern`; a pattern already there gets `what` added to its description.
    fn add(&mut self, pattern: [u8; 16], what: String, kind: Kind) {
        if let Some(n) = self.bytes.iter().position(|b| *b == pattern) {
            self.what[n] = format!("{} = {what}", self.what[n]);
            assert_eq!(self.kind[n], kind, "{} is both a guest key and derived", self.what[n]);
            return;
        }
        let n = self.bytes.len() as u32;
        for k in 0..8u8 {
            let word = u64::from_ne_bytes(pattern[k as usize..k as usize + 8].try_into().unwrap());
            assert_ne!(word, 0, "a pattern with 8 zero bytes in a row cannot be searched: {what}");
            self.index.entry(word).or_default().push((n, k));
            let b = bucket(word);
            self.filter[b / 64] |= 1 << (b % 64);
        }
        self.bytes.push(pattern);
        self.what.push(what);
        self.kind.push(kind);
    }

    /// Adds both halves of a 32-byte key.
    fn add_key(&mut self, key: &[u8; 32], what: &str, kind: impl Fn(usize) -> Kind) {
        for half in 0..2 {
            let mut pattern = [0u8; 16];
            pattern.copy_from_slice(&key[16 * half..16 * half + 16]);
            let range = if half == 0 { "0..16" } else { "16..32" };
            self.add(pattern, format!("{what} bytes {range}"), kind(half));
        }
    }

    fn maybe(&self, word: u64) -> bool {
        let b = bucket(word);
        self.filter[b / 64] >> (b % 64) & 1 != 0
    }
}

/// What the test knows of one channel once it is open.
struct Known {
    key: [u8; 32],
    salt: [u8; 16],
    /// The highest epoch each direction reached: [local -> peer, peer -> local].
    epochs: [u32; 2],
}

/// Every form of every channel's key.
fn needles(known: &[Known]) -> Needles {
    let mut needles = Needles::new();
    for (i, (plan, k)) in PLAN.iter().zip(known).enumerate() {
        let name = channel_name(i);
        needles
            .add_key(&k.key, &format!("K of {name}"), |half| Kind::GuestKey { channel: i, half });
        if plan.remote {
            // (No cipher on one node: there K is all there is.)
            add_derived(&mut needles, i, k);
        }
    }
    needles
}

fn channel_name(i: usize) -> String {
    format!("channel {i} ({} <-> {})", PLAN[i].local(), PLAN[i].peer())
}

/// The forms derived from channel `i`'s key, in both directions, for epochs 0..=current and
/// the next one (which must not exist anywhere yet).
fn add_derived(needles: &mut Needles, i: usize, k: &Known) {
    let sbox = sbox();
    let (plan, name) = (&PLAN[i], channel_name(i));
    let directions = [(plan.local(), plan.peer()), (plan.peer(), plan.local())];
    for (d, (sender, receiver)) in directions.into_iter().enumerate() {
        let c0 = first_chain(&k.key, &k.salt, sender, receiver);
        let current = k.epochs[d];
        for (e, (c, m)) in chain(c0, current + 2).into_iter().enumerate() {
            let next = if e as u32 > current { " (the next epoch, not yet used)" } else { "" };
            let dir = format!("{sender} -> {receiver} of {name}{next}");
            needles.add_key(&c, &format!("C_{e} {dir}"), |_| Kind::Derived);
            needles.add_key(&m, &format!("M_{e} {dir}"), |_| Kind::Derived);
            for (r, round_key) in aes256_round_keys(&m, &sbox).into_iter().enumerate() {
                needles.add(round_key, format!("round key {r} of M_{e} {dir}"), Kind::Derived);
            }
            let h = ghash_key(&m);
            needles.add(h, format!("GHASH key H of M_{e} {dir}"), Kind::Derived);
            needles.add(twisted(h), format!("twisted H of M_{e} {dir}"), Kind::Derived);
        }
    }
}

/// The derived forms of one channel like `PLAN[4]`'s, for a test of the test.
fn needles_of(key: &[u8; 32], salt: &[u8; 16], epochs: [u32; 2]) -> Needles {
    let mut needles = Needles::new();
    add_derived(&mut needles, 4, &Known { key: *key, salt: *salt, epochs });
    needles
}

// ---------------------------------------------------------------------------------------------
// Reading a process.

const PAGE: u64 = 4096;
const CHUNK: usize = 4 << 20;

#[derive(Debug, Clone)]
struct Mapping {
    start: u64,
    end: u64,
    line: String,
    name: String,
}

impl Mapping {
    fn len(&self) -> u64 {
        self.end - self.start
    }

    fn is_secretmem(&self) -> bool {
        self.name.starts_with("/secretmem")
    }

    /// Kernel-provided mappings that /proc/PID/mem may refuse to read.
    fn is_special(&self) -> bool {
        ["[vvar]", "[vvar_vclock]", "[vsyscall]", "[vectors]", "[uprobes]"].contains(&&*self.name)
    }
}

fn read_maps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (start, end) = fields[0].split_once('-').unwrap();
            Mapping {
                start: u64::from_str_radix(start, 16).unwrap(),
                end: u64::from_str_radix(end, 16).unwrap(),
                line: line.to_owned(),
                name: fields.get(5..).map(|f| f.join(" ")).unwrap_or_default(),
            }
        })
        .collect()
}

/// A pattern found: where, which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Hit {
    addr: u64,
    needle: u32,
    mapping: usize,
}

/// A guest RAM: where the VMM's boot-info block says it is.
#[derive(Debug, Clone, Copy)]
struct Ram {
    start: u64,
    size: u64,
    node: u32,
    partition: u32,
    mapping: usize,
}

impl Ram {
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.start && addr + len <= self.start + self.size
    }
}

/// One reading of one process.
#[derive(Default)]
struct ProcessScan {
    maps: Vec<Mapping>,
    /// Mappings read (at least in part).
    read: usize,
    bytes: u64,
    /// `memfd_secret` mappings, every page of which was refused.
    secret_unreadable: usize,
    secret_bytes: u64,
    /// Special mappings that were refused.
    special_unreadable: usize,
    /// Other mappings with pages that could not be read: the test cannot vouch for them.
    unreadable: Vec<String>,
    /// `memfd_secret` mappings that could be read: not secret at all.
    secret_readable: Vec<String>,
    hits: Vec<Hit>,
    rams: Vec<Ram>,
    /// Mapping -> the threads whose stack pointer is in it.
    stacks: HashMap<usize, Vec<String>>,
}

/// Reads `buf.len()` bytes at `addr` as far as it can: the bytes read before the first page
/// that cannot be read, or the error if that is the first.
fn read_some(mem: &File, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match mem.read_at(&mut buf[done..], addr + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: any byte pattern is a valid u64 and any u64 is valid bytes; the view covers
    // exactly the words' memory and borrows them mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: as in `as_bytes_mut`, for a shared view.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

/// "KHBI", then layout version 2: the first 6 bytes of the boot-info block, little-endian.
const BOOT_INFO_HEAD: u64 = 0x0002_4942_484b;
const BOOT_INFO_GPA: u64 = 0x1000;
/// Each partition's RAM: the default 32 MiB, which the nodes' configs leave as it is.
const RAM_BYTES: u64 = 32 << 20;

/// Searches `words` (read from `base`; bytes before `valid_from` are not memory) for every
/// pattern, and for boot-info blocks at page starts.
fn search(
    words: &[u64],
    valid_from: usize,
    base: u64,
    needles: &Needles,
    mapping: usize,
    out: &mut ProcessScan,
) {
    let bytes = as_bytes(words);
    for (i, &word) in words.iter().enumerate() {
        if word == 0 || !needles.maybe(word) {
            continue;
        }
        let Some(candidates) = needles.index.get(&word) else { continue };
        for &(n, k) in candidates {
            let Some(at) = (i * 8).checked_sub(k as usize).filter(|&at| at >= valid_from) else {
                continue;
            };
            if bytes.get(at..at + 16) == Some(&needles.bytes[n as usize][..]) {
                out.hits.push(Hit { addr: base + at as u64, needle: n, mapping });
            }
        }
    }
    // Pages start at multiples of 4096 from `base + 16` (see `scan_mapping`).
    let mut page = 2;
    while page + 3 <= words.len() {
        if words[page] & 0xffff_ffff_ffff == BOOT_INFO_HEAD && page * 8 >= valid_from {
            let at = base + page as u64 * 8;
            out.rams.push(Ram {
                start: at.wrapping_sub(BOOT_INFO_GPA),
                size: words[page + 1],
                node: words[page + 2] as u32,
                partition: (words[page + 2] >> 32) as u32,
                mapping,
            });
        }
        page += PAGE as usize / 8;
    }
}

/// Reads mapping `index` of `maps` in chunks of `chunk` bytes (a multiple of the page size),
/// carrying the last 16 bytes of each chunk into the next so that nothing straddling a
/// boundary is missed. Returns the pages that could not be read.
fn scan_mapping(
    mem: &File,
    maps: &[Mapping],
    index: usize,
    chunk: usize,
    needles: &Needles,
    out: &mut ProcessScan,
) -> u64 {
    let m = &maps[index];
    let mut buf = vec![0u64; 2 + chunk / 8];
    let (mut addr, mut carried, mut refused) = (m.start, false, 0);
    while addr < m.end {
        let want = (m.end - addr).min(chunk as u64) as usize;
        match read_some(mem, addr, &mut as_bytes_mut(&mut buf[2..])[..want]) {
            Ok(n) if n >= 8 => {
                let words = 2 + n / 8;
                if !carried {
                    buf[..2].fill(0);
                }
                let valid_from = if carried { 0 } else { 16 };
                search(&buf[..words], valid_from, addr - 16, needles, index, out);
                out.bytes += n as u64;
                buf.copy_within(words - 2..words, 0);
                carried = n % 8 == 0 && n >= 16;
                addr += n as u64;
            }
            _ => {
                refused += 1;
                carried = false;
                addr = (addr / PAGE + 1) * PAGE;
            }
        }
    }
    refused
}

/// Which mapping each thread's stack pointer is in (threads blocked in a system call show it
/// in /proc/PID/task/TID/syscall).
fn thread_stacks(pid: u32, maps: &[Mapping]) -> HashMap<usize, Vec<String>> {
    let mut stacks: HashMap<usize, Vec<String>> = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return stacks };
    for task in tasks.flatten() {
        let dir = task.path();
        let tid = task.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let syscall = std::fs::read_to_string(dir.join("syscall")).unwrap_or_default();
        let fields: Vec<&str> = syscall.split_whitespace().collect();
        if fields.len() < 3 || fields[0] == "running" {
            continue;
        }
        let Ok(sp) = u64::from_str_radix(fields[fields.len() - 2].trim_start_matches("0x"), 16)
        else {
            continue;
        };
        if let Some(i) = maps.iter().position(|m| m.start <= sp && sp < m.end) {
            stacks.entry(i).or_default().push(format!("thread {tid} \"{}\"", comm.trim()));
        }
    }
    stacks
}

/// Reads every mapping of process `pid` and searches it.
fn scan_process(pid: u32, needles: &Needles) -> ProcessScan {
    let maps = read_maps(pid);
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (root?)");
    let mut out = ProcessScan { stacks: thread_stacks(pid, &maps), ..Default::default() };
    for (i, m) in maps.iter().enumerate() {
        let before = out.bytes;
        // PROT_NONE mappings too: /proc/PID/mem reads them (FOLL_FORCE), and so could anyone
        // else with this access.
        let refused = scan_mapping(&mem, &maps, i, CHUNK, needles, &mut out);
        let read = out.bytes - before;
        if read > 0 {
            out.read += 1;
        }
        if m.is_secretmem() {
            if read == 0 {
                out.secret_unreadable += 1;
                out.secret_bytes += m.len();
            } else {
                out.secret_readable.push(format!("{} ({read} bytes read)", m.line));
            }
        } else if refused > 0 {
            if m.is_special() {
                out.special_unreadable += 1;
            } else {
                out.unreadable.push(format!("{} ({refused} pages refused)", m.line));
            }
        }
    }
    out.maps = maps;
    out.hits.sort();
    out.hits.dedup();
    out
}

// ---------------------------------------------------------------------------------------------
// Nodes.

/// A running `keyhold node`, its console collected, killed when dropped.
struct Node {
    name: &'static str,
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let into = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            let mut text = into.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    text
}

impl Node {
    fn start(name: &'static str, config: &Path) -> Node {
        // The timeout only ends nodes a killed test run left behind.
        let config = config.display().to_string();
        let mut child = spawn_keyhold(["node", "--config", &config, "--timeout", "300"]);
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Node { name, child: Some(child), stdout, stderr }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn output(&self) -> String {
        format!(
            "node {} stdout:\n{}\nnode {} stderr:\n{}",
            self.name,
            self.stdout.lock().unwrap(),
            self.name,
            self.stderr.lock().unwrap()
        )
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for a console line containing `text`; returns what follows it on the line.
    fn wait_line(&mut self, text: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            if let Some(line) = self.stdout.lock().unwrap().lines().find(|l| l.contains(text)) {
                return line[line.find(text).unwrap() + text.len()..].to_owned();
            }
            let failed = self.stdout.lock().unwrap().contains("keys: FAILED");
            assert!(!failed, "the guest failed before {text:?}:\n{}", self.output());
            assert!(
                self.running(),
                "node {} stopped before {text:?}:\n{}",
                self.name,
                self.output()
            );
            assert!(Instant::now() < until, "no {text:?} within {limit:?}:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap; returns the console.
    fn kill(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The readers end with the pipes; give them a moment to take the last lines.
        wait_until(Duration::from_secs(5), || Arc::strong_count(&self.stdout) == 1);
        self.output()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `ctl <what>` of node `name` as JSON (null if the node does not answer).
fn api(dir: &Path, name: &str, what: &str) -> Value {
    let out = ctl(dir, name, &[what]);
    if out.code() != 0 {
        return Value::Null;
    }
    serde_json::from_str(&out.stdout).unwrap_or(Value::Null)
}

/// The entry of `partition` on node `name` whose local process or remote endpoint fits.
fn entry(dir: &Path, name: &str, partition: u64, fits: impl Fn(&Value) -> bool) -> Option<Value> {
    api(dir, name, "channels")
        .as_array()?
        .iter()
        .find(|e| e["partition"].as_u64() == Some(partition) && fits(e))
        .cloned()
}

/// Node 1's entry of `keys`'s channel `plan`.
fn keys_entry(dir: &Path, plan: &Plan) -> Option<Value> {
    entry(dir, "1", 1, |e| e["process"].as_u64() == Some(u64::from(plan.process)))
}

/// The peer's entry of channel `plan` (node 1 partition 2, or node 2 partition 1).
fn peer_entry(dir: &Path, plan: &Plan) -> Option<Value> {
    let (name, partition) = if plan.remote { ("2", 1) } else { ("1", 2) };
    entry(dir, name, partition, |e| Endpoint::of(&e["remote"]) == plan.local())
}

fn is_open(entry: &Option<Value>) -> bool {
    entry.as_ref().is_some_and(|e| e["state"] == "open")
}

fn revoke(dir: &Path, name: &str, partition: u32, channel: &str) {
    let out = ctl(dir, name, &["revoke", &partition.to_string(), channel]);
    assert_eq!(out.code(), 0, "revoke {partition} {channel} on node {name}: {out:#?}");
}

fn salt_of(entry: &Value) -> [u8; 16] {
    let hex = entry["salt"].as_str().unwrap_or_else(|| panic!("no salt in {entry}"));
    assert_eq!(hex.len(), 32, "{entry}");
    std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
}

fn epoch(entry: &Value, field: &str) -> u32 {
    entry[field].as_u64().unwrap_or_else(|| panic!("no {field} in {entry}")) as u32
}

// ---------------------------------------------------------------------------------------------
// A phase: scan, judge, report.

/// Scans node `name` (process `pid`, node ID `id`) and any process it started; returns what
/// failed and a summary line.
fn check_node(
    phase: &str,
    name: &str,
    id: u32,
    pid: u32,
    needles: &Needles,
    failures: &mut Vec<String>,
) -> String {
    let mut pids = vec![pid];
    pids.extend(descendants(pid));
    let mut summary = String::new();
    for (i, pid) in pids.into_iter().enumerate() {
        // The node itself holds the guest RAMs and the key table; anything it started (it
        // starts nothing today) is searched just the same.
        let node = i == 0;
        let start = Instant::now();
        let scan = scan_process(pid, needles);
        let took = start.elapsed();
        let at = format!("phase \"{phase}\", node {name} (pid {pid})");
        let mut fail = |what: String| failures.push(format!("{at}: {what}"));
        // Guest RAMs, by their boot-info blocks: a block of this node, naming the configured
        // size, at 0x1000 into a stretch of one mapping that holds the whole RAM (normally
        // exactly the mapping; the kernel may merge neighbouring anonymous mappings).
        let mut rams: BTreeMap<u32, Ram> = BTreeMap::new();
        for ram in scan.rams.iter().filter(|r| r.node == id && r.size == RAM_BYTES) {
            let m = &scan.maps[ram.mapping];
            if ram.start < m.start || ram.start + ram.size > m.end {
                continue; // not a RAM: a copy of a block somewhere else
            }
            if rams.insert(ram.partition, *ram).is_some() {
                fail(format!("two RAMs claim to be partition {}'s", ram.partition));
            }
        }
        let partitions: &[u32] = match (node, id) {
            (false, _) => &[],
            (true, 1) => &[1, 2],
            (true, _) => &[1],
        };
        for p in partitions {
            if !rams.contains_key(p) {
                fail(format!("partition {p}'s RAM not found: the scanner is blind"));
            }
        }
        // Every pattern found.
        let mut control: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        let mut copies = 0;
        for hit in &scan.hits {
            let n = hit.needle as usize;
            let m = &scan.maps[hit.mapping];
            let ram = rams.values().find(|r| r.contains(hit.addr, 16));
            if let (Kind::GuestKey { channel, half }, Some(ram)) = (needles.kind[n], ram) {
                if id == 1 && ram.partition == 1 {
                    // The control: the guest's own copy, in its own RAM.
                    if half == 0 {
                        control.entry(channel).or_default().insert(hit.addr);
                    }
                    copies += 1;
                    continue;
                }
            }
            let mut place = m.name.clone();
            if place.is_empty() {
                place = "anonymous".into();
            }
            if let Some(ram) = ram {
                place = format!("RAM of partition {} of node {}", ram.partition, ram.node);
            }
            if let Some(threads) = scan.stacks.get(&hit.mapping) {
                place = format!("{place}, the stack of {}", threads.join(", "));
            }
            fail(format!(
                "{} at {:#x}, offset {:#x} in `{}` ({place})",
                needles.what[n],
                hit.addr,
                hit.addr - m.start,
                m.line
            ));
        }
        // The control must have found every key, whole, in partition 1's RAM.
        if node && id == 1 {
            for (channel, plan) in PLAN.iter().enumerate() {
                let whole = control.get(&channel).is_some_and(|addrs| {
                    addrs.iter().any(|&a| {
                        scan.hits.iter().any(|h| {
                            h.addr == a + 16
                                && needles.kind[h.needle as usize]
                                    == Kind::GuestKey { channel, half: 1 }
                        })
                    })
                });
                if !whole {
                    fail(format!(
                        "control failed: K of channel {channel} (process {}) is not in partition 1's RAM, where the guest keeps it",
                        plan.process
                    ));
                }
            }
        }
        if node && scan.secret_unreadable == 0 {
            fail("no unreadable /secretmem mapping: where are the keys?".into());
        }
        for m in &scan.secret_readable {
            fail(format!("a memfd_secret mapping could be read: {m}"));
        }
        for m in &scan.unreadable {
            fail(format!("a mapping could not be read, so it was not searched: {m}"));
        }
        let ram_text: Vec<String> = rams
            .values()
            .map(|r| {
                let m = &scan.maps[r.mapping];
                let exact = if (m.start, m.end) == (r.start, r.start + r.size) {
                    ""
                } else {
                    " (inside a larger mapping)"
                };
                format!("p{} {} MiB at {:#x}{exact}", r.partition, r.size >> 20, r.start)
            })
            .collect();
        summary += &format!(
            "phase {phase:>9}, node {name} (pid {pid}): {} mappings, {} read ({:.1} MiB), {} secretmem unreadable ({} KiB), {} special skipped; guest RAM {}; {} patterns found, {} of them the guest's own key copies in p1's RAM; {:.2} s\n",
            scan.maps.len(),
            scan.read,
            scan.bytes as f64 / (1 << 20) as f64,
            scan.secret_unreadable,
            scan.secret_bytes >> 10,
            scan.special_unreadable,
            ram_text.join(", "),
            scan.hits.len(),
            copies,
            took.as_secs_f64(),
        );
    }
    summary
}

/// The processes `pid` started, and theirs.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The fields after the command name (which may hold spaces) are: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parents.entry(ppid).or_default().push(child);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in parents.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The test.

#[test]
fn no_channel_key_in_any_form_is_readable_outside_secret_memory() {
    require_kvm!();
    assert!(is_root(), "reading other processes' memory through /proc/PID/mem needs root");
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    // A fresh seed each run (below 2^63: the fixture takes u64::MAX for "missing").
    let seed =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            ^ u64::from(std::process::id()) << 40)
            >> 1;
    let peers = |remote: bool| {
        let list: Vec<String> = PLAN
            .iter()
            .filter(|plan| plan.remote == remote)
            .map(|plan| plan.local().to_string())
            .collect();
        format!("peer={}", list.join(","))
    };
    let channels = "[channels]\nkey_lifetime_messages = 50\n";
    let sections1 = format!(
        "{channels}\n[[partition]]\nid = 2\nfirmware = \"{}\"\nargs = \"{}\"\n",
        fixture("echo").display(),
        peers(false)
    );
    let args1 = format!("seed={seed} local={LOCAL_ECHO} remote={REMOTE_ECHO}");
    let spec = |name, id, key, firmware, args, sections| NodeSpec {
        name,
        id,
        cluster: &p.cluster,
        key,
        firmware,
        args,
        node_extra: "",
        sections,
    };
    let config1 = spec("1", 1, &p.k1, "keys", &args1, &sections1).write(d);
    let config2 = spec("2", 2, &p.k2, "echo", &peers(true), channels).write(d);
    let mut n1 = Node::start("1", &config1);
    let mut n2 = Node::start("2", &config2);
    let mut failures = Vec::new();
    let mut report = String::new();

    // 1. Live: every channel open, every cross-node one several epochs on.
    let signal = n1.wait_line("[p1] keys: live signal=", Duration::from_secs(90));
    let opened = began.elapsed();
    let mut known = Vec::new();
    for (i, plan) in PLAN.iter().enumerate() {
        let mine = keys_entry(d, plan).unwrap_or_else(|| panic!("channel {i}: {}", n1.output()));
        let theirs = peer_entry(d, plan).unwrap_or_else(|| panic!("channel {i}'s peer entry"));
        assert_eq!((&mine["state"], &theirs["state"]), (&"open".into(), &"open".into()));
        let salt = salt_of(&mine);
        let mut epochs = [0, 0];
        if plan.remote {
            assert_eq!(salt, salt_of(&theirs), "both ends of channel {i} show one salt");
            assert_ne!(salt, [0; 16], "channel {i}: {mine}");
            epochs = [
                epoch(&mine, "tx_epoch").max(epoch(&theirs, "rx_epoch")),
                epoch(&mine, "rx_epoch").max(epoch(&theirs, "tx_epoch")),
            ];
            assert!(epochs[0] >= 2 && epochs[1] >= 2, "channel {i} rekeyed: {mine} {theirs}");
        }
        known.push(Known { key: channel_key(seed, i), salt, epochs });
    }
    // Guest RAMs are recognised by their size too.
    for node in ["1", "2"] {
        let partitions = api(d, node, "partitions");
        for p in partitions.as_array().unwrap_or_else(|| panic!("node {node}: {partitions}")) {
            assert_eq!(p["memory_mib"].as_u64(), Some(RAM_BYTES >> 20), "{p}");
        }
    }
    let needles = needles(&known);
    let epochs: Vec<String> = known.iter().map(|k| format!("{:?}", k.epochs)).collect();
    eprintln!(
        "memory: seed {seed}; channels open and {} patterns computed after {:.1} s; epochs per channel [tx, rx]: {}",
        needles.bytes.len(),
        opened.as_secs_f64(),
        epochs.join(" ")
    );
    let nodes_up = |n1: &Node, n2: Option<&Node>| {
        let mut v = vec![("1", 1, n1.pid())];
        if let Some(n2) = n2 {
            v.push(("2", 2, n2.pid()));
        }
        v
    };
    let mut phase = |name: &str, nodes: Vec<(&str, u32, u32)>, failures: &mut Vec<String>| {
        for (node, id, pid) in nodes {
            let summary = check_node(name, node, id, pid, &needles, failures);
            eprint!("memory: {summary}");
            report += &summary;
        }
    };
    phase("live", nodes_up(&n1, Some(&n2)), &mut failures);

    // 2. The guest closes two channels, one to each echo.
    revoke(d, "1", 1, &signal);
    let signal = n1.wait_line("[p1] keys: closed signal=", Duration::from_secs(30));
    for plan in PLAN.iter().filter(|plan| plan.fate == Fate::Close) {
        let gone = wait_until(Duration::from_secs(20), || {
            keys_entry(d, plan).is_none() && !is_open(&peer_entry(d, plan))
        });
        assert!(gone, "process {}'s channel is closed on both ends", plan.process);
    }
    phase("closed", nodes_up(&n1, Some(&n2)), &mut failures);

    // 3. The operator revokes three: two on node 1 (one to each echo), one on node 2.
    for plan in PLAN.iter() {
        let Fate::Revoke { here } = plan.fate else { continue };
        if here {
            let channel = keys_entry(d, plan).expect("entry")["channel"].clone();
            revoke(d, "1", 1, channel.as_str().unwrap());
        } else {
            let channel = peer_entry(d, plan).expect("entry")["channel"].clone();
            revoke(d, "2", 1, channel.as_str().unwrap());
        }
    }
    for plan in PLAN.iter().filter(|plan| matches!(plan.fate, Fate::Revoke { .. })) {
        let gone = wait_until(Duration::from_secs(20), || {
            !is_open(&keys_entry(d, plan)) && !is_open(&peer_entry(d, plan))
        });
        assert!(gone, "process {}'s channel is revoked on both ends", plan.process);
    }
    phase("revoked", nodes_up(&n1, Some(&n2)), &mut failures);

    // 4. Node 2 dies; its last channel with it.
    let out2 = n2.kill();
    let down = wait_until(Duration::from_secs(30), || {
        let links = api(d, "1", "links");
        let up = links
            .as_array()
            .and_then(|l| l.iter().find(|l| l["peer"] == 2))
            .map(|l| l["up"] == true);
        up == Some(false)
            && PLAN.iter().filter(|p| p.fate == Fate::LinkDown).all(|p| !is_open(&keys_entry(d, p)))
    });
    assert!(down, "node 1 saw node 2 go: {}", api(d, "1", "links"));
    phase("link down", nodes_up(&n1, None), &mut failures);

    // The guest's kept channel still works, and it finishes.
    revoke(d, "1", 1, &signal);
    n1.wait_line("[p1] keys: done", Duration::from_secs(30));
    let finished = wait_until(Duration::from_secs(20), || {
        api(d, "1", "partitions")
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == 1))
            .is_some_and(|p| p["exit_status"] == 0)
    });
    let out1 = n1.kill();
    assert!(finished, "keys exited 0: {out1}");
    assert!(out1.contains("[p1] keys: channel 2 still works"), "{out1}");
    for out in [&out1, &out2] {
        assert!(!out.contains("' panicked at"), "{out}");
    }
    eprintln!("memory: {:.1} s in all", began.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "{} findings outside secret memory (seed {seed}):\n{}\n\n{report}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The test's own tools, checked.

/// The vector of devices/src/crypto/channel.rs (and docs/PROTOCOL.md): C_0, M_0, C_1.
#[test]
fn key_derivation_matches_the_documented_vector() {
    let src = Endpoint { node: 1, partition: 2, process: 3 };
    let dst = Endpoint { node: 4, partition: 5, process: 6 };
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let salt: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
    let epochs = chain(first_chain(&key, &salt, src, dst), 2);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(
        [hex(&epochs[0].0), hex(&epochs[0].1), hex(&epochs[1].0)],
        [
            "e063cac12c218007763cb51034fd07b13cab6338844fd16ef817468873dee006",
            "8da8246a6833eab48c339d6e0d0253c8cc23291886daab6e5c51ed11cd2f4256",
            "d497ff52e2829e32385c2044dbdb1be4183b6e6c57193452ea56ab7bd26051a3",
        ]
    );
}

/// AES-256 with the given round keys (FIPS-197, section 5.1): to check the expansion against
/// the `aes` crate and FIPS-197's example.
fn encrypt_with(round_keys: &[[u8; 16]; 15], sbox: &[u8; 256], block: [u8; 16]) -> [u8; 16] {
    let xtime = |b: u8| (b << 1) ^ if b & 0x80 != 0 { 0x1b } else { 0 };
    let mut s = block;
    let add = |s: &mut [u8; 16], k: &[u8; 16]| s.iter_mut().zip(k).for_each(|(a, b)| *a ^= b);
    add(&mut s, &round_keys[0]);
    for (round, key) in round_keys.iter().enumerate().skip(1) {
        s = s.map(|b| sbox[b as usize]);
        // ShiftRows: byte (row r, column c) is s[4c + r]; row r moves left by r.
        s = std::array::from_fn(|i| s[(4 * (i / 4 + i % 4) + i % 4) % 16]);
        if round != 14 {
            for c in 0..4 {
                let col = [s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]];
                let all = col[0] ^ col[1] ^ col[2] ^ col[3];
                for r in 0..4 {
                    s[4 * c + r] = col[r] ^ all ^ xtime(col[r] ^ col[(r + 1) % 4]);
                }
            }
        }
        add(&mut s, key);
    }
    s
}

#[test]
fn aes_key_expansion_matches_fips_197_and_the_aes_crate() {
    let sbox = sbox();
    assert_eq!((sbox[0x00], sbox[0x53], sbox[0xff]), (0x63, 0xed, 0x16));
    // FIPS-197, appendix C.3.
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let plain: [u8; 16] = std::array::from_fn(|i| (i as u8) * 0x11);
    let rk = aes256_round_keys(&key, &sbox);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(hex(&rk[14]), "24fc79ccbf0979e9371ac23c6d68de36");
    assert_eq!(hex(&encrypt_with(&rk, &sbox, plain)), "8ea2b7ca516745bfeafc49904b496089");
    // And against RustCrypto for keys of every kind of byte.
    for seed in 1..50u64 {
        let key: [u8; 32] = std::array::from_fn(|j| key_byte(seed, j));
        let block: [u8; 16] = std::array::from_fn(|j| key_byte(seed * 7, j));
        let mut theirs = aes::Block::from(block);
        aes::Aes256::new(&key.into()).encrypt_block(&mut theirs);
        let ours = encrypt_with(&aes256_round_keys(&key, &sbox), &sbox, block);
        assert_eq!(ours, <[u8; 16]>::from(theirs), "seed {seed}");
        assert_eq!(ghash_key(&key), encrypt_with(&aes256_round_keys(&key, &sbox), &sbox, [0; 16]));
    }
}

/// The scanner finds a pattern at every alignment and across chunk boundaries, reading this
/// very process through /proc/self/mem.
#[test]
fn the_scanner_finds_patterns_at_every_offset_and_across_chunks() {
    let mut needles = Needles::new();
    let patterns: Vec<[u8; 16]> =
        (0..23u64).map(|s| std::array::from_fn(|j| key_byte(1000 + 2 * s, j))).collect();
    for (i, p) in patterns.iter().enumerate() {
        needles.add(*p, format!("pattern {i}"), Kind::Derived);
    }
    let mut memory = vec![0u8; 8 * PAGE as usize];
    let base = memory.as_ptr() as u64;
    let first = (base / PAGE + 1) * PAGE; // 6 whole pages from here
    let page_at = |n: usize| (first - base) as usize + n * PAGE as usize;
    let mut placed = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        let at = match i {
            // Every alignment, inside one page.
            0..16 => page_at(0) + 100 + 41 * i,
            // Straddling the start of pages 1..=5 by 15, 12, 9, 6 and 3 bytes.
            16..21 => page_at(i - 15) - (15 - 3 * (i - 16)),
            // The first and the last 16 bytes of the region.
            21 => page_at(0),
            _ => page_at(6) - 16,
        };
        memory[at..at + 16].copy_from_slice(p);
        placed.push((base + at as u64, i as u32));
    }
    std::hint::black_box(&memory);
    let maps = vec![Mapping {
        start: first,
        end: first + 6 * PAGE,
        line: "test".into(),
        name: String::new(),
    }];
    let mem = File::open("/proc/self/mem").unwrap();
    for chunk in [PAGE as usize, 2 * PAGE as usize, CHUNK] {
        let mut scan = ProcessScan::default();
        assert_eq!(scan_mapping(&mem, &maps, 0, chunk, &needles, &mut scan), 0);
        scan.hits.sort();
        scan.hits.dedup();
        let found: Vec<(u64, u32)> = scan.hits.iter().map(|h| (h.addr, h.needle)).collect();
        let mut want = placed.clone();
        want.sort();
        assert_eq!(found, want, "chunk {chunk}");
        assert_eq!(scan.bytes, 6 * PAGE);
    }
}

/// The forms searched for are the forms keyhold keeps: its own `ChannelCiphers`, built here in
/// ordinary heap memory instead of a key-table slot, hold the chain key and the AES-256 round
/// keys of the message key exactly as the test computes them; and a direction moved on to a
/// later epoch holds nothing of the earlier ones.
#[test]
fn the_searched_forms_are_the_ones_keyhold_keeps() {
    use guest_agent::channel::abi::Endpoint as AbiEndpoint;
    use keyhold_devices::crypto::channel::ChannelCiphers;
    use std::mem::MaybeUninit;

    let plan = &PLAN[4];
    let (local, peer) = (plan.local(), plan.peer());
    let abi =
        |e: Endpoint| AbiEndpoint { node: e.node, partition: e.partition, process: e.process };
    let key = channel_key(0x1234_5678, 4);
    let salt: [u8; 16] = std::array::from_fn(|i| key_byte(99, i));
    let mut slot = Box::new(MaybeUninit::<ChannelCiphers>::uninit());
    ChannelCiphers::init(&mut slot, &key, &salt, &abi(local), &abi(peer));
    // SAFETY: `init` initialised it.
    let ciphers = unsafe { slot.assume_init_mut() };
    ciphers.tx.advance();
    ciphers.tx.advance();
    std::hint::black_box(&ciphers);
    let needles = needles_of(&key, &salt, [2, 0]);

    // Read the pages that hold the ciphers, through /proc/self/mem as the nodes are read.
    let at = ciphers as *const ChannelCiphers as u64;
    let len = std::mem::size_of::<ChannelCiphers>() as u64;
    let start = at / PAGE * PAGE;
    let end = (at + len).div_ceil(PAGE) * PAGE;
    let maps = vec![Mapping { start, end, line: "heap".into(), name: String::new() }];
    let mut scan = ProcessScan::default();
    let mem = File::open("/proc/self/mem").unwrap();
    scan_mapping(&mem, &maps, 0, CHUNK, &needles, &mut scan);
    let found: BTreeSet<&str> = scan
        .hits
        .iter()
        .filter(|h| (at..at + len).contains(&h.addr))
        .map(|h| needles.what[h.needle as usize].as_str())
        .collect();
    let name = channel_name(4);
    let tx = format!("{local} -> {peer} of {name}");
    let rx = format!("{peer} -> {local} of {name}");
    let mut want: Vec<String> = vec![];
    // ring keeps the round keys as FIPS-197 writes them, and H twisted, where it uses AES-NI
    // and carry-less multiplication (every x86-64 CPU KVM runs on here); other code paths keep
    // other forms.
    let hardware = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    for (dir, e) in [(&tx, 2), (&rx, 0)] {
        for half in ["0..16", "16..32"] {
            want.push(format!("C_{e} {dir} bytes {half}"));
        }
        if hardware {
            for r in 0..15 {
                want.push(format!("round key {r} of M_{e} {dir}"));
            }
            want.push(format!("twisted H of M_{e} {dir}"));
        }
    }
    for w in &want {
        assert!(found.iter().any(|f| f.contains(w.as_str())), "{w} not found; found: {found:#?}");
    }
    let now = [format!("M_2 {tx}"), format!("C_2 {tx}"), format!("M_0 {rx}"), format!("C_0 {rx}")];
    for f in &found {
        let ok = f.split(" = ").all(|part| now.iter().any(|w| part.contains(w.as_str())));
        assert!(ok, "{f} is still there after the direction moved on");
    }
    let plain_h = found.iter().any(|f| f.contains("GHASH key H of"));
    eprintln!(
        "keyhold's ciphers ({len} bytes) hold {} of the forms searched for (H as computed: {plain_h})",
        found.len()
    );
}
