//! node.toml's `[etcd]` section: membership from etcd instead of a cluster file.
//!
//! ```toml
//! [node]
//! id = 3
//! private_key_file = "node3.key"
//! listen = "10.0.0.3:7000"
//!
//! [etcd]
//! endpoints = ["http://10.0.0.10:2379", "http://10.0.0.11:2379"]
//! prefix = "/keyhold/nodes/"        # optional, this default
//! lease_ttl_secs = 10               # optional: peers drop a crashed node after this
//! operator_public_key = "..."       # keyhold operator-pubkey < operator.key
//! registration_signature = "..."    # keyhold sign-node, over (id, advertise, public key)
//! advertise = "10.0.0.3:7000"       # optional: where peers dial; default: listen
//! ca_file = "etcd-ca.pem"           # optional, for https endpoints
//! cert_file = "node3-etcd.pem"      # optional: a client certificate for etcd
//! key_file = "node3-etcd-key.pem"   #   and its private key
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyhold_devices::link::{Directory, LinkSettings, Peer};
use serde::Deserialize;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use super::registration::{self, Registration};
use super::EtcdConfig;
use crate::cluster_config::{self, invalid, ClusterLinks, DirectorySource};
use crate::node_config::ConfigError;

/// The default key prefix of registrations.
pub const DEFAULT_PREFIX: &str = "/keyhold/nodes/";
/// The default lease time to live, in seconds, and its bounds.
pub const DEFAULT_TTL: u64 = 10;
const TTL_RANGE: std::ops::RangeInclusive<u64> = 2..=3600;

/// `[etcd]`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    endpoints: Vec<String>,
    prefix: Option<String>,
    lease_ttl_secs: Option<u64>,
    operator_public_key: String,
    registration_signature: String,
    advertise: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// The links of a node whose members come from etcd: at start its directory is itself alone.
pub fn etcd_links(
    node_path: &Path,
    node: u32,
    section: &EtcdSection,
    private_key_file: &Path,
    listen: Option<&str>,
    settings: LinkSettings,
) -> Result<ClusterLinks, ConfigError> {
    let bad = |field: &str, problem: String| invalid(node_path, format!("etcd.{field}"), problem);
    let base = node_path.parent().unwrap_or(Path::new("."));
    let key = cluster_config::node_key(node_path, private_key_file)?;
    let Some(listen) = listen else {
        return Err(invalid(node_path, "node.listen", "a node on etcd needs its listen address"));
    };
    let listen = cluster_config::listen_address(node_path, listen)?;
    let advertise: SocketAddr = match &section.advertise {
        Some(text) => {
            text.parse().map_err(|_| bad("advertise", format!("{text:?} is not IP:PORT")))?
        }
        None if listen.ip().is_unspecified() => {
            return Err(bad("advertise", format!("needed: peers cannot dial {listen}")))
        }
        None => listen,
    };
    if section.endpoints.is_empty() {
        return Err(bad("endpoints", "at least one, as http://HOST:PORT".into()));
    }
    for (i, endpoint) in section.endpoints.iter().enumerate() {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(bad(
                &format!("endpoints[{i}]"),
                format!("{endpoint:?} is not http(s)://HOST:PORT"),
            ));
        }
    }
    let prefix = section.prefix.clone().unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    if prefix.is_empty() {
        return Err(bad("prefix", "must not be empty".into()));
    }
    let ttl = section.lease_ttl_secs.unwrap_or(DEFAULT_TTL);
    if !TTL_RANGE.contains(&ttl) {
        return Err(bad("lease_ttl_secs", format!("{ttl} is out of range: 2 to 3600")));
    }
    let operator_key = registration::operator_public_key(&section.operator_public_key)
        .map_err(|e| bad("operator_public_key", e.to_string()))?;
    let signature = registration::signature(&section.registration_signature)
        .map_err(|e| bad("registration_signature", e.to_string()))?;
    let own = Registration { id: node, address: advertise, public_key: *key.public(), signature };
    // Checked here, so that a node whose registration its peers would refuse does not start.
    Registration::verified(own.to_json().as_bytes(), &operator_key).map_err(|_| {
        bad(
            "registration_signature",
            format!(
                "not the operator key's signature over node {node} at {advertise} with this \
                 node's key: make it with keyhold sign-node"
            ),
        )
    })?;
    let tls = tls_config(base, section).map_err(|(field, problem)| bad(field, problem))?;
    let directory =
        Directory::new(vec![Peer { id: node, address: advertise, public_key: *key.public() }]);
    let config = EtcdConfig {
        endpoints: section.endpoints.clone(),
        prefix,
        lease_ttl_secs: ttl,
        operator_key,
        own,
        tls,
    };
    Ok(ClusterLinks {
        key: Arc::new(key),
        directory,
        listen,
        settings,
        source: DirectorySource::Etcd(Box::new(config)),
    })
}

/// TLS to etcd: the CA that signed its certificates, and this node's client certificate.
fn tls_config(base: &Path, section: &EtcdSection) -> Result<TlsConfig, (&'static str, String)> {
    let mut tls = TlsConfig::builder();
    if let Some(file) = &section.ca_file {
        let certs = certificates(pem(base, file, "ca_file")?);
        if certs.is_empty() {
            return Err(("ca_file", format!("{}: no certificate in it", file.display())));
        }
        tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
    }
    match (&section.cert_file, &section.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let certs = certificates(pem(base, cert_file, "cert_file")?);
            let key: Option<PrivateKey<'static>> =
                pem(base, key_file, "key_file")?.into_iter().find_map(|item| match item {
                    PemItem::PrivateKey(key) => Some(key),
                    _ => None,
                });
            let Some(key) = key else {
                return Err(("key_file", format!("{}: no private key in it", key_file.display())));
            };
            if certs.is_empty() {
                return Err((
                    "cert_file",
                    format!("{}: no certificate in it", cert_file.display()),
                ));
            }
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&certs, key)));
        }
        (None, None) => {}
        (Some(_), None) => return Err(("key_file", "cert_file needs its key_file".into())),
        (None, Some(_)) => return Err(("cert_file", "key_file needs its cert_file".into())),
    }
    Ok(tls.build())
}

/// The certificates among `items`.
fn certificates(items: Vec<PemItem<'static>>) -> Vec<Certificate<'static>> {
    let certs = items.into_iter().filter_map(|item| match item {
        PemItem::Certificate(cert) => Some(cert),
        _ => None,
    });
    certs.collect()
}

/// The PEM items of `file` (relative to the node config's directory).
fn pem(
    base: &Path,
    file: &Path,
    field: &'static str,
) -> Result<Vec<PemItem<'static>>, (&'static str, String)> {
    let path = base.join(file);
    let bytes = std::fs::read(&path).map_err(|e| (field, format!("{}: {e}", path.display())))?;
    ureq::tls::parse_pem(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (field, format!("{}: not PEM: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use crate::membership::operator;
    use crate::node_config;

    /// A directory with node 3's key and an operator key; `config(extra_node, etcd)` parses a
    /// node.toml there.
    struct Setup {
        dir: tempfile::TempDir,
        operator_public: String,
        signature: String,
    }

    impl Setup {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let key = crate::keys::generate().unwrap();
            let key_file = dir.path().join("node3.key");
            std::fs::write(&key_file, key.private_base64()).unwrap();
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
            let operator_key = operator::generate().unwrap();
            let operator_file = dir.path().join("operator.key");
            std::fs::write(&operator_file, &operator_key).unwrap();
            let address = "10.0.0.3:7000".parse().unwrap();
            let signature =
                operator::sign_node(&operator_file, 3, address, &key.public_base64()).unwrap();
            Self { dir, operator_public: operator::public(&operator_key).unwrap(), signature }
        }

        fn parse(&self, node: &str, etcd: &str) -> Result<crate::launch::Launch, String> {
            let text = format!(
                "[node]\nid = 3\nprivate_key_file = \"node3.key\"\n{node}\n[etcd]\n\
                 operator_public_key = \"{}\"\nregistration_signature = \"{}\"\n{etcd}\n\
                 [[partition]]\nid = 1\nfirmware = \"a\"\n",
                self.operator_public, self.signature
            );
            let path = self.dir.path().join("node.toml");
            node_config::parse(&path, &text).map_err(|e| e.to_string())
        }
    }

    const ENDPOINTS: &str = "endpoints = [\"http://127.0.0.1:2379\"]\n";

    #[test]
    fn a_node_on_etcd_starts_with_itself_and_its_signed_registration() {
        let setup = Setup::new();
        let launch = setup.parse("listen = \"10.0.0.3:7000\"", ENDPOINTS).unwrap();
        let links = launch.links.unwrap();
        let crate::cluster_config::DirectorySource::Etcd(etcd) = &links.source else {
            panic!("not from etcd")
        };
        assert_eq!(links.directory.peers().len(), 1);
        assert_eq!(links.directory.by_id(3).unwrap().address, etcd.own.address);
        assert_eq!((etcd.prefix.as_str(), etcd.lease_ttl_secs), (super::DEFAULT_PREFIX, 10));
        // Listening everywhere, advertising the address the signature covers.
        let anywhere = "listen = \"0.0.0.0:7000\"";
        assert!(setup
            .parse(anywhere, &format!("{ENDPOINTS}advertise = \"10.0.0.3:7000\""))
            .is_ok());
    }

    #[test]
    fn bad_etcd_configs_name_the_field() {
        let setup = Setup::new();
        let listen = "listen = \"10.0.0.3:7000\"";
        let cases = [
            (
                format!("{listen}\ncluster = \"c.toml\""),
                ENDPOINTS.to_owned(),
                "etcd: a node has a cluster file or etcd, not both",
            ),
            (
                String::new(),
                ENDPOINTS.to_owned(),
                "node.listen: a node on etcd needs its listen address",
            ),
            ("listen = \"0.0.0.0:7000\"".into(), ENDPOINTS.to_owned(), "etcd.advertise: needed"),
            (
                listen.into(),
                "endpoints = [\"127.0.0.1:2379\"]".into(),
                "etcd.endpoints[0]: \"127.0.0.1:2379\" is not http(s)://HOST:PORT",
            ),
            (listen.into(), "endpoints = []".into(), "etcd.endpoints: at least one"),
            (
                listen.into(),
                format!("{ENDPOINTS}lease_ttl_secs = 1"),
                "etcd.lease_ttl_secs: 1 is out of range",
            ),
            (
                listen.into(),
                format!("{ENDPOINTS}advertise = \"10.0.0.4:7000\""),
                "etcd.registration_signature: not the operator key's signature",
            ),
            (
                listen.into(),
                format!("{ENDPOINTS}cert_file = \"c.pem\""),
                "etcd.key_file: cert_file needs its key_file",
            ),
            (listen.into(), format!("{ENDPOINTS}ca_file = \"missing.pem\""), "etcd.ca_file: "),
            (listen.into(), format!("{ENDPOINTS}colour = \"red\""), "unknown field `colour`"),
        ];
        for (node, etcd, want) in cases {
            let err = setup.parse(&node, &etcd).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
