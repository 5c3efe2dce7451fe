//! A small client of etcd's v3 API through its JSON gateway (`POST /v3/...`, keys and values
//! in base64, 64-bit integers as decimal strings), enough for a membership directory: leases,
//! a create-or-own transaction, a prefix read, and a watch. It speaks HTTP/1.1 with `ureq`,
//! blocking, on the membership thread; no async runtime comes into the VMM for it. Each call
//! tries the endpoints in turn, starting with the last one that answered.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use thiserror::Error;
use ureq::Agent;

/// Longest a single request may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Keys read per request of a prefix read. etcd takes values of up to 1.5 MiB (2 MiB in
/// base64), so a page stays within [`MAX_ANSWER`] whatever has been written under the prefix.
const PAGE: u64 = 16;
/// Largest answer read from one request.
const MAX_ANSWER: u64 = 40 << 20;
/// Most keys a prefix read looks at: far more than a fleet has, and a bound on how long an
/// etcd that answers `more` without end can hold the membership thread.
const MAX_KEYS: usize = 1_000_000;
/// Longest answer a watch may send at once (one line of its stream): room for thousands of
/// registrations. An etcd that sends more is not believed: the node reads afresh.
const MAX_WATCH_LINE: u64 = 16 << 20;

/// Why etcd could not be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("no etcd endpoint answered (last: {0})")]
    Unreachable(String),
    /// An endpoint answered with something else than the API's answer.
    #[error("etcd answered unexpectedly: {0}")]
    Answer(String),
}

/// The outcome of [`Etcd::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours now, under our lease.
    Ours,
    /// A live registration holds it that is not ours: its value.
    Held(Vec<u8>),
}

/// One change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key was written.
    Put(Kv),
    /// A key was deleted, or its lease expired.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// A key and its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
    /// The revision that created the key (kept through later writes; a key deleted and
    /// written again is created anew).
    pub created: i64,
}

impl Kv {
    fn from_json(kv: &Value) -> Self {
        Self {
            key: bytes(&kv["key"]),
            value: bytes(&kv["value"]),
            created: int(&kv["create_revision"]).unwrap_or(i64::MAX),
        }
    }
}

/// How to reach etcd.
pub struct Etcd {
    endpoints: Vec<String>,
    next: usize,
    unary: Agent,
    stream: Agent,
}

impl Etcd {
    /// A client of `endpoints` (`http://HOST:PORT` or `https://...`), with `tls` for https.
    pub fn new(endpoints: Vec<String>, tls: ureq::tls::TlsConfig) -> Self {
        let unary = Agent::config_builder()
            .tls_config(tls.clone())
            .timeout_global(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        // A watch's answer never ends: only the wait for its start is bounded.
        let stream = Agent::config_builder()
            .tls_config(tls)
            .timeout_connect(Some(CALL_TIMEOUT))
            .timeout_recv_response(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Self { endpoints, next: 0, unary, stream }
    }

    /// The endpoint that answered last (or will be tried first).
    pub fn endpoint(&self) -> &str {
        self.endpoints.get(self.next).map_or("", String::as_str)
    }

    /// Posts `body` to `path` on the first endpoint that answers; its answer.
    fn call(&mut self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let mut last = String::new();
        for i in 0..self.endpoints.len() {
            let at = (self.next + i) % self.endpoints.len();
            let url = format!("{}{path}", self.endpoints[at].trim_end_matches('/'));
            // An endpoint that answers an error (a member without a leader, a proxy with no
            // backend) is passed over like one that does not answer.
            match self.unary.post(&url).send_json(body) {
                Ok(mut response) if response.status().is_success() => {
                    self.next = at;
                    return response
                        .body_mut()
                        .with_config()
                        .limit(MAX_ANSWER)
                        .read_json()
                        .map_err(|e| EtcdError::Answer(format!("{path}: {e}")));
                }
                Ok(response) => last = format!("{url}: {}", response.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    /// A new lease of `ttl` seconds; its ID.
    pub fn grant(&mut self, ttl: u64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/lease/grant", &json!({ "TTL": ttl }))?;
        int(&answer["ID"]).ok_or_else(|| EtcdError::Answer(format!("lease grant: {answer}")))
    }

    /// Renews `lease`; the seconds it has left (0: it expired, and its keys are gone).
    pub fn keep_alive(&mut self, lease: i64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        Ok(int(&answer["result"]["TTL"]).unwrap_or(0))
    }

    /// Ends `lease` now: its keys go at once.
    pub fn revoke(&mut self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })).map(drop)
    }

    /// Writes `value` at `key` under `lease` if no key is there, or if the one there is
    /// `ours` (this node's own registration, from before a restart, or nothing a live node
    /// holds) or is under no lease at all (nothing live holds it); otherwise leaves it and
    /// returns it. One transaction each way, so two nodes never both think they hold it.
    pub fn claim(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        ours: impl Fn(&[u8]) -> bool,
    ) -> Result<Claim, EtcdError> {
        let put = json!({ "request_put": {
            "key": STANDARD.encode(key), "value": STANDARD.encode(value), "lease": lease.to_string()
        }});
        let absent = json!({ "key": STANDARD.encode(key), "result": "EQUAL", "target": "CREATE",
                             "create_revision": "0" });
        let txn = json!({ "compare": [absent], "success": [put],
                          "failure": [{ "request_range": { "key": STANDARD.encode(key) } }] });
        let answer = self.call("/v3/kv/txn", &txn)?;
        if answer["succeeded"].as_bool() == Some(true) {
            return Ok(Claim::Ours);
        }
        let kv = &answer["responses"][0]["response_range"]["kvs"][0];
        let held = bytes(&kv["value"]);
        let revision = kv["mod_revision"].clone();
        let leased = int(&kv["lease"]).is_some_and(|lease| lease != 0);
        if leased && !ours(&held) {
            return Ok(Claim::Held(held));
        }
        // Ours from before: overwrite it, as long as nobody changed it meanwhile.
        let same = json!({ "key": STANDARD.encode(key), "result": "EQUAL", "target": "MOD",
                           "mod_revision": revision });
        let answer = self.call("/v3/kv/txn", &json!({ "compare": [same], "success": [put] }))?;
        if answer["succeeded"].as_bool() == Some(true) {
            Ok(Claim::Ours)
        } else {
            Err(EtcdError::Answer("the registration changed while it was claimed".into()))
        }
    }

    /// Every key under `prefix`, read a page at a time, every page at the revision of the
    /// first (so the whole is one consistent view, however many keys there are). Each key
    /// goes to `each` as its page arrives, so that the caller keeps only what it believes:
    /// nothing here holds more than a page. Returns the revision read.
    pub fn read(&mut self, prefix: &[u8], each: &mut dyn FnMut(Kv)) -> Result<i64, EtcdError> {
        let end = STANDARD.encode(prefix_end(prefix));
        let mut from = prefix.to_vec();
        let (mut revision, mut seen) = (0, 0);
        loop {
            let mut range = json!({ "key": STANDARD.encode(&from), "range_end": end,
                                    "limit": PAGE.to_string() });
            if revision > 0 {
                range["revision"] = json!(revision.to_string());
            }
            let answer = self.call("/v3/kv/range", &range)?;
            let at = int(&answer["header"]["revision"])
                .ok_or_else(|| EtcdError::Answer(format!("range: {answer}")))?;
            if revision == 0 {
                revision = at;
            }
            let page = answer["kvs"].as_array().map(Vec::as_slice).unwrap_or_default();
            let more = answer["more"].as_bool() == Some(true);
            let last = page.last().map(|kv| bytes(&kv["key"]));
            seen += page.len();
            for kv in page {
                each(Kv::from_json(kv));
            }
            if !more {
                return Ok(revision);
            }
            // The next page starts just after the last key read. Keys come in order, so an
            // answer that does not move forward is not believed, nor one past MAX_KEYS (an
            // etcd that said `more` for ever would hold the node here).
            if seen > MAX_KEYS {
                return Err(EtcdError::Answer(format!(
                    "range: more than {MAX_KEYS} keys under the prefix"
                )));
            }
            match last {
                Some(last) if last >= from => {
                    from = last;
                    from.push(0);
                }
                _ => return Err(EtcdError::Answer("range: a page that does not go on".into())),
            }
        }
    }

    /// Watches every key under `prefix` from `revision` on: the changes, in order, until the
    /// stream ends (etcd went away, or compacted that revision).
    pub fn watch(&mut self, prefix: &[u8], revision: i64) -> Result<Watch, EtcdError> {
        let create = json!({ "create_request": {
            "key": STANDARD.encode(prefix), "range_end": STANDARD.encode(prefix_end(prefix)),
            "start_revision": revision.to_string() }});
        let url = format!("{}/v3/watch", self.endpoint().trim_end_matches('/'));
        let response = self
            .stream
            .post(&url)
            .send_json(&create)
            .map_err(|e| EtcdError::Unreachable(format!("{url}: {e}")))?;
        if !response.status().is_success() {
            return Err(EtcdError::Answer(format!("watch: {}", response.status())));
        }
        let reader: Box<dyn Read + Send> = Box::new(response.into_body().into_reader());
        Ok(Watch { answers: BufReader::new(reader), line: Vec::new() })
    }
}

/// The changes a watch reports, a batch at a time, each with the store's revision after it.
/// The gateway writes one JSON answer per line.
pub struct Watch {
    answers: BufReader<Box<dyn Read + Send>>,
    line: Vec<u8>,
}

impl Watch {
    /// The next answer: `None` when the stream ended.
    fn answer(&mut self) -> Option<Result<Value, EtcdError>> {
        self.line.clear();
        let read = (&mut self.answers).take(MAX_WATCH_LINE).read_until(b'\n', &mut self.line);
        match read {
            Ok(0) => None,
            Ok(n) if n as u64 == MAX_WATCH_LINE && !self.line.ends_with(b"\n") => {
                Some(Err(EtcdError::Answer("a watch answer past 16 MiB".into())))
            }
            Ok(_) => Some(
                serde_json::from_slice(&self.line)
                    .map_err(|e| EtcdError::Answer(format!("watch: {e}"))),
            ),
            Err(e) => Some(Err(EtcdError::Unreachable(format!("watch: {e}")))),
        }
    }
}

impl Iterator for Watch {
    type Item = Result<(i64, Vec<Change>), EtcdError>;

    fn next(&mut self) -> Option<Self::Item> {
        let answer = match self.answer()? {
            Ok(answer) => answer,
            Err(e) => return Some(Err(e)),
        };
        let result = &answer["result"];
        if result["canceled"].as_bool() == Some(true) || !answer["error"].is_null() {
            return Some(Err(EtcdError::Answer(format!("watch ended: {answer}"))));
        }
        let revision = int(&result["header"]["revision"]).unwrap_or(-1);
        let events = result["events"].as_array().map(Vec::as_slice).unwrap_or_default();
        let changes = events
            .iter()
            .map(|event| {
                let kv = Kv::from_json(&event["kv"]);
                match event["type"].as_str() {
                    Some("DELETE") => Change::Delete { key: kv.key },
                    _ => Change::Put(kv),
                }
            })
            .collect();
        Some(Ok((revision, changes)))
    }
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // A prefix of 0xff bytes only: every key from it on.
    vec![0]
}

/// A 64-bit integer the gateway wrote as a decimal string (or a number).
fn int(value: &Value) -> Option<i64> {
    value.as_str().and_then(|s| s.parse().ok()).or_else(|| value.as_i64())
}

/// Bytes the gateway wrote in base64 (empty if absent or not base64).
fn bytes(value: &Value) -> Vec<u8> {
    value.as_str().and_then(|s| STANDARD.decode(s).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_past_its_last_key() {
        assert_eq!(prefix_end(b"/keyhold/nodes/"), b"/keyhold/nodes0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    fn watch_of(bytes: Vec<u8>) -> Watch {
        Watch { answers: BufReader::new(Box::new(std::io::Cursor::new(bytes))), line: Vec::new() }
    }

    #[test]
    fn a_watch_reads_one_answer_a_line_and_refuses_what_it_cannot_believe() {
        let key = STANDARD.encode("/k/1");
        let value = STANDARD.encode("v");
        let stream = format!(
            "{{\"result\":{{\"header\":{{\"revision\":\"2\"}},\"created\":true}}}}\n\
             {{\"result\":{{\"header\":{{\"revision\":\"3\"}},\"events\":[{{\"kv\":{{\"key\":\"{key}\",\"value\":\"{value}\",\"create_revision\":\"3\"}}}},{{\"type\":\"DELETE\",\"kv\":{{\"key\":\"{key}\"}}}}]}}}}\n"
        );
        let mut watch = watch_of(stream.into_bytes());
        assert_eq!(watch.next(), Some(Ok((2, Vec::new()))));
        let put = Change::Put(Kv { key: b"/k/1".to_vec(), value: b"v".to_vec(), created: 3 });
        let delete = Change::Delete { key: b"/k/1".to_vec() };
        assert_eq!(watch.next(), Some(Ok((3, vec![put, delete]))));
        assert_eq!(watch.next(), None, "the stream ended");
        // A compacted revision cancels the watch; garbage and endless lines end it too.
        let canceled = b"{\"result\":{\"canceled\":true,\"compact_revision\":\"9\"}}\n".to_vec();
        assert!(matches!(watch_of(canceled).next(), Some(Err(EtcdError::Answer(_)))));
        assert!(matches!(watch_of(b"not json\n".to_vec()).next(), Some(Err(EtcdError::Answer(_)))));
        let endless = vec![b' '; MAX_WATCH_LINE as usize + 10];
        let Some(Err(EtcdError::Answer(why))) = watch_of(endless).next() else {
            panic!("an endless answer was believed")
        };
        assert!(why.contains("16 MiB"), "{why}");
    }

    #[test]
    fn integers_come_as_strings_or_numbers() {
        assert_eq!(int(&json!("7587")), Some(7587));
        assert_eq!(int(&json!(12)), Some(12));
        assert_eq!(int(&json!(null)), None);
    }
}
