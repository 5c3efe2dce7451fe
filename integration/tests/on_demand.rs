//! Links on demand (`[links] on_demand = true`): real nodes on loopback link only when a
//! channel needs it, close links no channel has used for their idle time, link again for the
//! next channel, and fail an OPEN to a node that cannot be reached with UNREACHABLE.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use keyhold_integration::nodes::{audit, cluster, ctl, free_port, keygen, wait_until};
use keyhold_integration::{finish, fixture, require_kvm, spawn_keyhold, terminate};

const ON_DEMAND: &str = "[links]\non_demand = true\nidle_secs = 1\n";

/// Node `id`'s config in `dir`: links on demand, an API socket, and `partitions`
/// (`(firmware, args)`, IDs from 1).
fn node(dir: &Path, id: u32, cluster: &Path, partitions: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        "[node]\nid = {id}\naudit_log = \"audit-{id}.jsonl\"\napi_socket = \"{id}.sock\"\n\
         cluster = \"{}\"\nprivate_key_file = \"{id}.key\"\n\n{ON_DEMAND}\n",
        cluster.display()
    );
    for (i, (firmware, args)) in partitions.iter().enumerate() {
        text += &format!(
            "[[partition]]\nid = {}\nfirmware = \"{}\"\nargs = \"{args}\"\n",
            i + 1,
            fixture(firmware).display()
        );
    }
    let path = dir.join(format!("node-{id}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn start(config: &Path) -> Child {
    spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "240"])
}

/// How many audit records of node `id` have `event` and `reason` and name `peer`.
fn count(dir: &Path, id: u32, event: &str, reason: &str, peer: u32) -> usize {
    audit(dir, &id.to_string())
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == event && r["reason"] == reason && r["peer"] == peer)
        .count()
}

/// The state `keyhold ctl links` on node `id` shows for `peer`.
fn link_state(dir: &Path, id: u32, peer: u32) -> String {
    let out = ctl(dir, &id.to_string(), &["links"]);
    let links: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    let link = links.as_array().and_then(|all| all.iter().find(|l| l["peer"] == peer).cloned());
    link.map(|l| l["state"].as_str().unwrap_or("").to_owned()).unwrap_or_default()
}

/// Whether partition `partition` of node `id` has stopped.
fn stopped(dir: &Path, id: u32, partition: u64) -> bool {
    let out = ctl(dir, &id.to_string(), &["partitions"]);
    let all: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    all.as_array().is_some_and(|all| {
        all.iter().any(|p| p["id"].as_u64() == Some(partition) && p["running"] == false)
    })
}

#[test]
fn links_on_demand_come_with_a_channel_and_go_when_it_is_idle() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys: Vec<String> = (1..=3).map(|id| keygen(d, &format!("{id}.key")).1).collect();
    let nodes: Vec<(u32, u16, &str)> =
        (1..=3).map(|id| (id, free_port(), keys[id as usize - 1].as_str())).collect();
    let c = cluster(d, "three", &nodes);
    // Node 2 pings node 1's echo; every node also has a partition that listens for a peer
    // that never comes, which keeps it up and parked.
    let ping = "peer=1:1:1 count=50 batch=4";
    let configs = [
        node(d, 1, &c, &[("echo", "peer=2:1:1"), ("echo", "peer=3:1:9")]),
        node(d, 2, &c, &[("ping", ping), ("echo", "peer=3:1:9")]),
        node(d, 3, &c, &[("echo", "peer=1:1:9")]),
    ];
    let children: Vec<Child> = configs.iter().map(|c| start(c)).collect();

    // The channel brings the link up; once it closes, the link goes after its idle second,
    // closed by one node (`idle`) and seen go by the other (`goodbye`).
    let idle_closed = || {
        let (a, b) = (count(d, 1, "link_down", "idle", 2), count(d, 2, "link_down", "idle", 1));
        let (ga, gb) =
            (count(d, 1, "link_down", "goodbye", 2), count(d, 2, "link_down", "goodbye", 1));
        (a + b, ga + gb)
    };
    assert!(
        wait_until(Duration::from_secs(120), || idle_closed() == (1, 1)),
        "{:?}\n{}\n{}",
        idle_closed(),
        audit(d, "1"),
        audit(d, "2")
    );
    assert!(stopped(d, 2, 1), "the ping finished before its link went idle");
    assert_eq!(count(d, 2, "link_up", "authenticated", 1), 1, "{}", audit(d, "2"));
    assert!(wait_until(Duration::from_secs(30), || link_state(d, 2, 1) == "idle"));

    // No channel ever needed node 3: nobody linked with it, and it shows every peer idle.
    for (id, peer) in [(1, 3), (2, 3), (3, 1), (3, 2)] {
        assert_eq!(count(d, id, "link_up", "authenticated", peer), 0, "{}", audit(d, "3"));
        assert_eq!(link_state(d, id, peer), "idle", "node {id}'s link to {peer}");
    }

    // The next channel links again: both partitions started anew, the ping runs again.
    for id in [1, 2] {
        let out = ctl(d, &id.to_string(), &["start", "1"]);
        assert_eq!(out.code(), 0, "{out:#?}");
    }
    assert!(
        wait_until(Duration::from_secs(120), || count(d, 2, "link_up", "authenticated", 1) == 2
            && stopped(d, 2, 1)),
        "{}",
        audit(d, "2")
    );
    let outs: Vec<_> = children
        .into_iter()
        .map(|child| {
            terminate(&child);
            finish(child, Duration::from_secs(60))
        })
        .collect();
    for out in &outs {
        out.assert_no_panic();
    }
    let pings = outs[1].stdout.matches("ping: 50 messages of 64 bytes").count();
    assert_eq!(pings, 2, "{:#?}", outs[1]);
}

#[test]
fn an_open_to_a_node_that_cannot_be_reached_fails_unreachable() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p1, p3) = (keygen(d, "1.key").1, keygen(d, "3.key").1);
    // Node 3 is in the cluster but never started: nothing listens at its address.
    let c = cluster(d, "absent", &[(1, free_port(), &p1), (3, free_port(), &p3)]);
    let config = node(d, 1, &c, &[("lifecycle", "peer=3:1:1 role=open")]);
    let child = start(&config);
    let refused = || count(d, 1, "link_failed", "connection_refused", 3) >= 1;
    let told =
        || audit(d, "1").contains("\"event\":\"request_refused\",\"reason\":\"unreachable\"");
    assert!(wait_until(Duration::from_secs(60), || refused() && told()), "{}", audit(d, "1"));
    // No link came up: the peer shows as idle, not linked.
    assert_eq!(link_state(d, 1, 3), "idle");
    terminate(&child);
    let out = finish(child, Duration::from_secs(60));
    out.assert_no_panic();
}
