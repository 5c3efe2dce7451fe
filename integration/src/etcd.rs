//! A one-member etcd for the tests, on loopback ports of its own, in a directory of its own;
//! and what a test needs to say to it (a raw registration, as an attacker with write access
//! would write one) over etcd's JSON gateway.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::nodes::{free_port, wait_until};

/// Whether `etcd` can run here. In CI (`CI=true`) a missing etcd fails the test instead of
/// skipping it (`scripts/test.sh` installs Debian's etcd-server).
pub fn etcd_available() -> bool {
    let found = Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but etcd is not installed");
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
    }
    found
}

/// A running etcd; killed when dropped.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
}

impl Etcd {
    /// Starts one in `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Self {
        let mut etcd =
            Self { child: None, dir: dir.to_owned(), client: free_port(), peer: free_port() };
        etcd.resume();
        etcd
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// Stops it (SIGKILL): no quorum, nothing answers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on its data, and waits until it answers.
    pub fn resume(&mut self) {
        let (client, peer) = (
            format!("http://127.0.0.1:{}", self.client),
            format!("http://127.0.0.1:{}", self.peer),
        );
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("etcd-data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(30), || self
                .post("/v3/kv/range", r#"{"key":"AA=="}"#)
                .is_some()),
            "etcd did not answer"
        );
    }

    /// Posts `body` to `path`; the answer's body, if it answered 200.
    pub fn post(&self, path: &str, body: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.client)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    /// Writes `value` at `key`, as anyone with write access could.
    pub fn put(&self, key: &str, value: &str) {
        let body =
            format!(r#"{{"key":"{}","value":"{}"}}"#, STANDARD.encode(key), STANDARD.encode(value));
        assert!(self.post("/v3/kv/put", &body).is_some(), "etcd refused a put");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
