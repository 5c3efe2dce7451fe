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
    tls: Option<Tls>,
}

/// TLS for an etcd's clients: a CA, etcd's certificate from it (for 127.0.0.1), and a client
/// certificate from it, which etcd demands. Made with openssl in a directory.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// etcd's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// A client's certificate and key.
    pub client: (PathBuf, PathBuf),
}

impl Tls {
    /// Makes them in `dir`.
    pub fn make(dir: &Path) -> Self {
        let openssl = |args: &[&str]| {
            let out =
                Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "openssl {args:?}: {stderr}");
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=keyhold test CA"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca-key.pem", "-out", "ca.pem"]);
        openssl(&ca);
        let uses =
            [("etcd", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")];
        for (name, ext) in uses {
            let subject = format!("/CN={name}");
            let (key, csr) = (format!("{name}-key.pem"), format!("{name}.csr"));
            let mut req = vec!["req", "-subj", &subject];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr]);
            openssl(&req);
            let (extfile, cert) = (format!("{name}.ext"), format!("{name}.pem"));
            std::fs::write(dir.join(&extfile), format!("{ext}\n")).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-extfile",
                &extfile,
                "-out",
                &cert,
            ]);
        }
        let file = |name: &str| dir.join(name);
        Self {
            ca: file("ca.pem"),
            server: (file("etcd.pem"), file("etcd-key.pem")),
            client: (file("client.pem"), file("client-key.pem")),
        }
    }
}

impl Etcd {
    /// Starts one in `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    /// Starts one in `dir`; with `tls`, it speaks only TLS and wants client certificates from
    /// that CA. Waits until it answers (with TLS: until it listens).
    pub fn start_with(dir: &Path, tls: Option<Tls>) -> Self {
        let (client, peer) = (free_port(), free_port());
        let mut etcd = Self { child: None, dir: dir.to_owned(), client, peer, tls };
        etcd.resume();
        etcd
    }

    /// `http://127.0.0.1:PORT` (`https` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client)
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
        let (client, peer) = (self.url(), format!("http://127.0.0.1:{}", self.peer));
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let mut command = Command::new("etcd");
        command
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("etcd-data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")]);
        if let Some(tls) = &self.tls {
            command.arg("--cert-file").arg(&tls.server.0).arg("--key-file").arg(&tls.server.1);
            command.arg("--trusted-ca-file").arg(&tls.ca).arg("--client-cert-auth");
        }
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn();
        self.child = Some(child.expect("start etcd"));
        let answers = || match &self.tls {
            Some(_) => TcpStream::connect(("127.0.0.1", self.client)).is_ok(),
            None => self.post("/v3/kv/range", r#"{"key":"AA=="}"#).is_some(),
        };
        assert!(wait_until(Duration::from_secs(30), answers), "etcd did not answer");
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

    /// Deletes `key`, as anyone with write access could.
    pub fn delete(&self, key: &str) {
        let body = format!(r#"{{"key":"{}"}}"#, STANDARD.encode(key));
        assert!(self.post("/v3/kv/deleterange", &body).is_some(), "etcd refused a delete");
    }

    /// Whether `key` holds a value.
    pub fn has(&self, key: &str) -> bool {
        let body = format!(r#"{{"key":"{}"}}"#, STANDARD.encode(key));
        self.post("/v3/kv/range", &body).is_some_and(|answer| answer.contains("\"kvs\""))
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
