//! The peers scistream-rs is measured against, run as a gateway pair on the same
//! path: HAProxy in TCP mode (plaintext, like `splice`) and stunnel with TLS 1.3
//! and AES-GCM (encrypted, like `tls`). Their configurations go to a temporary
//! directory; both run in the foreground so the test bed's Daemon owns them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use testbed::netns::{Link, Node, Topology};
use testbed::process::{spawn_in, Daemon};

use crate::gateways::{path_str, wait_listening};

/// Port both peer gateways listen on (outside s2cs's control and data ports).
const PEER_PORT: u16 = 6000;
const START: Duration = Duration::from_secs(15);

/// A running pair of peer gateways; dropping it stops both.
pub struct PeerPair {
    pub outbound: Daemon,
    pub inbound: Daemon,
    /// Where the consumer connects (the outbound gateway's listener).
    pub entry: SocketAddr,
}

impl PeerPair {
    pub fn pids(&self) -> [u32; 2] {
        [self.outbound.pid(), self.inbound.pid()]
    }
}

fn hops(topo: &Topology) -> (SocketAddr, SocketAddr) {
    (
        topo.sock4(Node::OutboundGw, Link::ConsumerLan, PEER_PORT),
        topo.sock4(Node::InboundGw, Link::Wan, PEER_PORT),
    )
}

/// Starts the inbound one first, so the outbound one's readiness probe (which is
/// forwarded) finds the whole chain up.
fn start_pair(
    topo: &Topology,
    inbound: (&Path, &[&str]),
    outbound: (&Path, &[&str]),
    entry: SocketAddr,
    wan: SocketAddr,
) -> Result<PeerPair> {
    let in_ns = topo.ns(Node::InboundGw);
    let out_ns = topo.ns(Node::OutboundGw);
    let mut inbound = spawn_in(in_ns, inbound.0, inbound.1)?;
    wait_listening(&mut inbound, in_ns, wan, START).context("inbound gateway")?;
    let mut outbound = spawn_in(out_ns, outbound.0, outbound.1)?;
    wait_listening(&mut outbound, out_ns, entry, START).context("outbound gateway")?;
    Ok(PeerPair {
        outbound,
        inbound,
        entry,
    })
}

/// HAProxy 2.6 in TCP mode on both gateways: consumer -> haproxy -> haproxy -> producer.
pub fn haproxy(topo: &Topology, producer: SocketAddr, dir: &Path) -> Result<PeerPair> {
    let (entry, wan) = hops(topo);
    let conf = |bind: SocketAddr, next: SocketAddr| {
        // Generous client/server timeouts: iperf3's control connection sits idle
        // for the whole run.
        format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 120s\n    timeout server 120s\n\
             frontend gateway\n    bind {bind}\n    default_backend next\n\
             backend next\n    server next {next}\n"
        )
    };
    let in_cfg = dir.join("haproxy-inbound.cfg");
    let out_cfg = dir.join("haproxy-outbound.cfg");
    write(&in_cfg, &conf(wan, producer))?;
    write(&out_cfg, &conf(entry, wan))?;
    let haproxy = Path::new("haproxy");
    let (in_cfg, out_cfg) = (path_str(&in_cfg)?, path_str(&out_cfg)?);
    // -db: stay in the foreground, no daemon fork, so the pid we hold is the proxy.
    start_pair(
        topo,
        (haproxy, &["-db", "-f", &in_cfg]),
        (haproxy, &["-db", "-f", &out_cfg]),
        entry,
        wan,
    )
}

/// TLS 1.3 suites stunnel may use: AES-GCM only, as scistream-rs's `tls`.
const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384";

/// stunnel 5 pair: client mode on the outbound gateway verifying the inbound
/// gateway's certificate, server mode on the inbound gateway, TLS 1.3 between.
pub fn stunnel(topo: &Topology, producer: SocketAddr, dir: &Path) -> Result<PeerPair> {
    let (entry, wan) = hops(topo);
    let cert = dir.join("stunnel-server.crt");
    let key = dir.join("stunnel-server.key");
    self_signed(&cert, &key, &wan.ip().to_string())?;
    let (cert, key) = (path_str(&cert)?, path_str(&key)?);
    // `pid =` (empty) means no pid file; output goes to stderr in the foreground.
    let common = format!(
        "foreground = yes\npid =\nsyslog = no\n\n[tunnel]\nsslVersion = TLSv1.3\nciphersuites = {TLS13_SUITES}\n"
    );
    let server =
        format!("{common}accept = {wan}\nconnect = {producer}\ncert = {cert}\nkey = {key}\n");
    let client = format!(
        "{common}client = yes\naccept = {entry}\nconnect = {wan}\nverifyPeer = yes\nCAfile = {cert}\n"
    );
    let in_cfg = dir.join("stunnel-inbound.conf");
    let out_cfg = dir.join("stunnel-outbound.conf");
    write(&in_cfg, &server)?;
    write(&out_cfg, &client)?;
    let stunnel = Path::new("stunnel");
    let (in_cfg, out_cfg) = (path_str(&in_cfg)?, path_str(&out_cfg)?);
    start_pair(
        topo,
        (stunnel, &[in_cfg.as_str()]),
        (stunnel, &[out_cfg.as_str()]),
        entry,
        wan,
    )
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A P-256 self-signed certificate for `ip` with openssl (the stunnel server's).
fn self_signed(cert: &Path, key: &Path, ip: &str) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=scistream-bench-inbound",
        ])
        .arg("-addext")
        .arg(format!("subjectAltName=IP:{ip}"))
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .context("running openssl (Debian package `openssl`)")?;
    if !out.status.success() {
        bail!(
            "openssl req -x509 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
