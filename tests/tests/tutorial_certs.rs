//! Certificates made the way SciStream's tutorial makes them: the `openssl`
//! binary with the tutorial's own line, which under OpenSSL 3 marks them
//! CA:TRUE. Our `s2uc --server_cert` and `s2cs --peer_ca` take such a
//! self-signed file as "exactly this certificate", a CA's as "signed by it",
//! and refuse everything else with a reason a user can act on.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Gateway, MIB};
use testbed::netns::addr;
use testbed::{consume_parallel, in_netns, require_root, Node, Producer, Topology};

const PRODUCER_PORT: u16 = 7000;

/// A fresh directory for one test's certificate files.
fn cert_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ss-certs-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("certificate directory");
    dir
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tutorial's line, word for word but for the IP, run in `dir/name/`:
/// returns (server.crt, server.key).
fn tutorial_cert(dir: &Path, name: &str, ip: IpAddr) -> (PathBuf, PathBuf) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("dir");
    let (cn, san) = (format!("/CN={ip}"), format!("subjectAltName=IP:{ip}"));
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-nodes",
            "-days",
            "365",
            "-newkey",
            "rsa:2048",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
            "-subj",
            &cn,
            "-addext",
            &san,
        ],
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "basicConstraints", "-in"])
        .arg(d.join("server.crt"))
        .output()
        .expect("openssl x509");
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"),
        "the tutorial's line makes a CA:TRUE certificate here"
    );
    (d.join("server.crt"), d.join("server.key"))
}

/// The tutorial certificate `crt` re-signed by its own key to have expired yesterday.
fn expired_copy(crt: &Path, key: &Path) -> PathBuf {
    let out = crt.with_file_name("expired.crt");
    let dir = crt.parent().expect("dir");
    openssl(
        dir,
        &[
            "x509",
            "-in",
            path(crt),
            "-signkey",
            path(key),
            "-days",
            "-1",
            "-out",
            path(&out),
        ],
    );
    out
}

/// A facility CA (itself from `openssl req -x509`) and a CA:FALSE leaf for
/// `ip` that it signed: returns (ca.crt, leaf.crt, leaf.key).
fn ca_and_leaf(dir: &Path, ip: IpAddr) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir.join("ca");
    std::fs::create_dir_all(&d).expect("dir");
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-nodes",
            "-days",
            "30",
            "-newkey",
            "rsa:2048",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=Facility CA",
        ],
    );
    openssl(
        &d,
        &[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "rsa:2048",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            &format!("/CN={ip}"),
        ],
    );
    std::fs::write(
        d.join("leaf.ext"),
        format!("basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:{ip}\n"),
    )
    .expect("ext");
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.crt",
        ],
    );
    (d.join("ca.crt"), d.join("leaf.crt"), d.join("leaf.key"))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Starts `s2cs` in `ns` presenting `crt`/`key` (control port and tunnel),
/// plus `extra`; clients of the returned gateway give `trust` as --server_cert.
fn gateway(ns: &str, ip: IpAddr, crt: &Path, key: &Path, trust: &Path, extra: &[&str]) -> Gateway {
    let mut args = vec!["--server_crt", path(crt), "--server_key", path(key)];
    args.extend_from_slice(extra);
    let mut g = Gateway::start(ns, ip, "5100-5199", "tls", &args);
    g.cert = trust.to_path_buf();
    g
}

/// s2uc's one-line error when it is refused.
fn refused(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "s2uc succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("s2uc refused: {e}");
    e
}

#[test]
fn tutorial_openssl_certificates_carry_the_whole_tutorial_flow() {
    let test = "tutorial_openssl_certificates_carry_the_whole_tutorial_flow";
    if !require_root(test) {
        return;
    }
    let dir = cert_dir(test);
    let topo = Topology::new().expect("topology");
    let (gin_ip, gout_ip): (IpAddr, IpAddr) =
        (addr::INBOUND_GW_WAN.into(), addr::OUTBOUND_GW_LAN.into());
    let (in_crt, in_key) = tutorial_cert(&dir, "inbound", gin_ip);
    let (out_crt, out_key) = tutorial_cert(&dir, "outbound", gout_ip);
    let bytes = 16 * MIB;
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    let gin = gateway(
        topo.ns(Node::InboundGw),
        gin_ip,
        &in_crt,
        &in_key,
        &in_crt,
        &[],
    );
    let gout = gateway(
        topo.ns(Node::OutboundGw),
        gout_ip,
        &out_crt,
        &out_key,
        &out_crt,
        &["--peer_ca", path(&in_crt)],
    );

    let inbound = gin.inbound(topo.ns(Node::InboundGw), producer.addr(), 1);
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, 1);
    assert_eq!(outbound.uid, inbound.uid);
    let transfers = consume_parallel(topo.ns(Node::Consumer), &outbound.listeners, bytes, 1)
        .unwrap_or_else(|e| {
            panic!(
                "transfer failed: {e:#}\ninbound:\n{}\noutbound:\n{}",
                gin.daemon.log_contents(),
                gout.daemon.log_contents()
            )
        });
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("producer records");
    for t in &transfers {
        t.verify_with(&seen, bytes)
            .expect("SHA-256 equal both ways");
    }
    for g in [&gout, &gin] {
        let out = g.s2uc(topo.ns(g_node(g, &gin)), "release", &[&inbound.uid]);
        assert!(
            out.status.success(),
            "release: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("Release completed"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn g_node(g: &Gateway, gin: &Gateway) -> Node {
    if std::ptr::eq(g, gin) {
        Node::InboundGw
    } else {
        Node::OutboundGw
    }
}

/// A session whose outbound gateway trusts `peer_ca` while the inbound one
/// presents `in_crt`: the consumer's bytes must never reach the producer,
/// and the outbound gateway's log must say `why`.
fn tunnel_refused(test: &str, dir: &Path, in_crt: &Path, in_key: &Path, peer_ca: &Path, why: &str) {
    let topo = Topology::new().expect("topology");
    let (gin_ip, gout_ip): (IpAddr, IpAddr) =
        (addr::INBOUND_GW_WAN.into(), addr::OUTBOUND_GW_LAN.into());
    let (out_crt, out_key) = tutorial_cert(dir, &format!("outbound-{test}"), gout_ip);
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        MIB,
    )
    .expect("producer");
    // The control channel is not under test here (the tunnel is): plain gRPC
    // lets the inbound gateway present a certificate no client would accept.
    let gin = gateway(
        topo.ns(Node::InboundGw),
        gin_ip,
        in_crt,
        in_key,
        in_crt,
        &["--ssl", "false"],
    );
    let gout = gateway(
        topo.ns(Node::OutboundGw),
        gout_ip,
        &out_crt,
        &out_key,
        &out_crt,
        &["--peer_ca", path(peer_ca)],
    );
    let ip = producer.addr().ip().to_string();
    let port = producer.addr().port().to_string();
    let inbound = gin.s2uc_json(
        topo.ns(Node::InboundGw),
        "inbound-request",
        &[
            "--ssl",
            "false",
            "--remote_ip",
            &ip,
            "--receiver_ports",
            &port,
            "--num_conn",
            "1",
        ],
    );
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, 1);
    let listener = outbound.listeners[0];
    in_netns(topo.ns(Node::Consumer), || {
        let mut s = TcpStream::connect(listener).expect("the outbound listener accepts");
        let _ = s.write_all(b"must never reach the producer");
        let since = std::time::Instant::now();
        assert!(
            common::closed_by_peer(&s, since, Duration::from_secs(15)).is_some(),
            "the refused tunnel's consumer connection is closed"
        );
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(producer.accepted(), 0, "no connection reached the producer");
    let log = gout.daemon.log_contents();
    eprintln!(
        "{test}: {}",
        log.lines()
            .filter(|l| l.contains(why))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        log.contains(why),
        "{test}: the outbound gateway's log names the cause ({why:?}):\n{log}"
    );
}

#[test]
fn another_tutorial_certificate_for_the_same_ip_is_refused_as_server_cert() {
    let test = "another_tutorial_certificate_for_the_same_ip_is_refused_as_server_cert";
    if !require_root(test) {
        return;
    }
    let dir = cert_dir(test);
    let topo = Topology::new().expect("topology");
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let (crt, key) = tutorial_cert(&dir, "real", gin_ip);
    let (other, _) = tutorial_cert(&dir, "other", gin_ip);
    let gin = gateway(topo.ns(Node::InboundGw), gin_ip, &crt, &key, &other, &[]);
    let e = refused(&gin.s2uc(
        topo.ns(Node::InboundGw),
        "inbound-request",
        &[
            "--remote_ip",
            "10.0.0.1",
            "--receiver_ports",
            "7000",
            "--num_conn",
            "1",
        ],
    ));
    assert!(
        e.contains("is not the one in") && e.contains("other/server.crt"),
        "{e}"
    );
    assert!(
        !e.contains("CaUsedAsEndEntity") && !e.contains("UnknownIssuer"),
        "no webpki enum names: {e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_tutorial_certificate_for_the_same_ip_is_refused_as_peer_ca() {
    let test = "another_tutorial_certificate_for_the_same_ip_is_refused_as_peer_ca";
    if !require_root(test) {
        return;
    }
    let dir = cert_dir(test);
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let (crt, key) = tutorial_cert(&dir, "real", gin_ip);
    let (other, _) = tutorial_cert(&dir, "other", gin_ip);
    tunnel_refused(test, &dir, &crt, &key, &other, "is not the one in");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn expired_tutorial_certificate_is_refused_as_server_cert_and_peer_ca() {
    let test = "expired_tutorial_certificate_is_refused_as_server_cert_and_peer_ca";
    if !require_root(test) {
        return;
    }
    let dir = cert_dir(test);
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let (crt, key) = tutorial_cert(&dir, "real", gin_ip);
    let expired = expired_copy(&crt, &key);
    {
        let topo = Topology::new().expect("topology");
        let gin = gateway(
            topo.ns(Node::InboundGw),
            gin_ip,
            &expired,
            &key,
            &expired,
            &[],
        );
        let e = refused(&gin.s2uc(
            topo.ns(Node::InboundGw),
            "inbound-request",
            &[
                "--remote_ip",
                "10.0.0.1",
                "--receiver_ports",
                "7000",
                "--num_conn",
                "1",
            ],
        ));
        assert!(e.contains("expired on"), "{e}");
    }
    tunnel_refused(test, &dir, &expired, &key, &expired, "expired on");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tutorial_certificate_naming_another_ip_is_refused_as_server_cert_and_peer_ca() {
    let test = "tutorial_certificate_naming_another_ip_is_refused_as_server_cert_and_peer_ca";
    if !require_root(test) {
        return;
    }
    let dir = cert_dir(test);
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let elsewhere: IpAddr = "192.0.2.77".parse().expect("ip");
    let (crt, key) = tutorial_cert(&dir, "elsewhere", elsewhere);
    {
        let topo = Topology::new().expect("topology");
        let gin = gateway(topo.ns(Node::InboundGw), gin_ip, &crt, &key, &crt, &[]);
        let e = refused(&gin.s2uc(
            topo.ns(Node::InboundGw),
            "inbound-request",
            &[
                "--remote_ip",
                "10.0.0.1",
                "--receiver_ports",
                "7000",
                "--num_conn",
                "1",
            ],
        ));
        assert!(e.contains("names IP:192.0.2.77"), "{e}");
    }
    tunnel_refused(test, &dir, &crt, &key, &crt, "names IP:192.0.2.77");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn facility_ca_with_a_leaf_it_signed_works_for_server_cert_and_peer_ca() {
    let test = "facility_ca_with_a_leaf_it_signed_works_for_server_cert_and_peer_ca";
    if !require_root(test) {
        return;
    }
    let dir = cert_dir(test);
    let topo = Topology::new().expect("topology");
    let (gin_ip, gout_ip): (IpAddr, IpAddr) =
        (addr::INBOUND_GW_WAN.into(), addr::OUTBOUND_GW_LAN.into());
    let (ca, leaf, leaf_key) = ca_and_leaf(&dir, gin_ip);
    let (out_crt, out_key) = tutorial_cert(&dir, "outbound", gout_ip);
    let bytes = 4 * MIB;
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    let gin = gateway(topo.ns(Node::InboundGw), gin_ip, &leaf, &leaf_key, &ca, &[]);
    let gout = gateway(
        topo.ns(Node::OutboundGw),
        gout_ip,
        &out_crt,
        &out_key,
        &out_crt,
        &["--peer_ca", path(&ca)],
    );
    let inbound = gin.inbound(topo.ns(Node::InboundGw), producer.addr(), 1);
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, 1);
    let transfers = consume_parallel(topo.ns(Node::Consumer), &outbound.listeners, bytes, 1)
        .unwrap_or_else(|e| {
            panic!(
                "transfer failed: {e:#}\noutbound:\n{}",
                gout.daemon.log_contents()
            )
        });
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("producer records");
    transfers[0]
        .verify_with(&seen, bytes)
        .expect("SHA-256 equal both ways");
    let _ = std::fs::remove_dir_all(&dir);
}
