//! The `tls` tunnel admits only a peer gateway that proves the session secret
//! over this very TLS channel. Wrong secrets, plain TCP garbage, TLS 1.2,
//! TLS clients without the proof and silent peers are cut off, nothing reaches
//! the producer, the refusal is logged and counted, and another session keeps
//! streaming meanwhile.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{closed_by_peer, Gateway, MIB};
use testbed::netns::addr;
use testbed::{consume, in_netns, require_root, Node, Producer, Stream, Topology};

/// Waits until the gateway's log mentions `needle` at least `n` times.
fn wait_log_count(gw: &Gateway, needle: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let log = gw.daemon.log_contents();
        if log.matches(needle).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n}x {needle:?} in the s2cs log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const REFUSED: &str = "tunnel peer refused";

#[test]
fn wrong_session_secret_is_refused_while_another_session_streams() {
    if !require_root("wrong_session_secret_is_refused_while_another_session_streams") {
        return;
    }
    let topo = Topology::new().unwrap();
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7001),
    )
    .unwrap();
    let data = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        MIB,
    )
    .unwrap();
    let gin = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "tls",
        &[],
    );
    let gout = Gateway::start(
        topo.ns(Node::OutboundGw),
        addr::OUTBOUND_GW_LAN.into(),
        "5100-5199",
        "tls",
        &["--peer_ca", gin.cert_str()],
    );
    let (gin_ns, gout_ns) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));

    // A good session that keeps streaming through everything below.
    let good_in = gin.inbound(gin_ns, echo.addr(), 1);
    let good_out = gout.outbound(gout_ns, &good_in, 1);
    let stream = Stream::start(topo.ns(Node::Consumer), good_out.listeners[0]).unwrap();
    stream.assert_progress(Duration::from_secs(5));

    // The victim session, and an outbound session that names its listeners
    // with another uid: it derives another secret.
    let victim = gin.inbound(gin_ns, data.addr(), 1);
    let mut forged = victim.clone();
    forged.uid = uuid::Uuid::new_v4().to_string();
    let forged_out = gout.outbound(gout_ns, &forged, 1);
    let r = consume(topo.ns(Node::Consumer), forged_out.listeners[0], MIB, 3);
    assert!(
        r.as_ref().map(|t| t.received_bytes == 0).unwrap_or(true),
        "nothing may come back: {r:?}"
    );
    wait_log_count(&gin, REFUSED, 1, Duration::from_secs(10));
    assert!(
        gin.daemon.log_contents().contains("10.91.2.1"),
        "the refusal names the peer address"
    );
    stream.assert_progress(Duration::from_secs(5));
    assert_eq!(data.accepted(), 0, "no connection reached the producer");

    // The right uid passes on the same listener.
    let real_out = gout.outbound(gout_ns, &victim, 1);
    let t = consume(topo.ns(Node::Consumer), real_out.listeners[0], MIB, 4)
        .expect("the real session streams");
    t.verify_with(&data.wait_for(1, Duration::from_secs(10)).unwrap(), MIB)
        .unwrap();
    stream
        .finish()
        .expect("the good session's bytes all came back intact");
}

#[test]
fn garbage_tls12_silent_and_proofless_peers_are_cut_off() {
    if !require_root("garbage_tls12_silent_and_proofless_peers_are_cut_off") {
        return;
    }
    let topo = Topology::new().unwrap();
    let data = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        MIB,
    )
    .unwrap();
    let gin = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "tls",
        &["--tunnel_timeout", "2"],
    );
    let gin_ns = topo.ns(Node::InboundGw);
    let session = gin.inbound(gin_ns, data.addr(), 1);
    let listener = session.listeners[0];
    let gout_ns = topo.ns(Node::OutboundGw);

    // Plain TCP garbage.
    let s = in_netns(gout_ns, || TcpStream::connect(listener)).unwrap();
    (&s).write_all(&[0x42u8; 4096]).unwrap();
    assert!(
        closed_by_peer(&s, Instant::now(), Duration::from_secs(3)).is_some(),
        "garbage must get the connection closed"
    );

    // Silent peer: connects and says nothing; the handshake timeout cuts it.
    let s = in_netns(gout_ns, || TcpStream::connect(listener)).unwrap();
    let start = Instant::now();
    assert!(
        closed_by_peer(&s, start, Duration::from_secs(6)).is_some(),
        "a silent peer must be cut off"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "cut at the configured timeout, not before"
    );

    // TLS 1.2 is refused in the handshake.
    let target = listener.to_string();
    let tls12 = in_netns(gout_ns, || {
        Command::new("openssl")
            .args(["s_client", "-connect", &target, "-tls1_2"])
            .stdin(Stdio::null())
            .output()
    })
    .expect("openssl");
    let out = String::from_utf8_lossy(&tls12.stdout).to_string()
        + &String::from_utf8_lossy(&tls12.stderr);
    assert!(
        out.contains("Cipher is (NONE)") && !out.contains("New, TLSv1.2"),
        "a TLS 1.2 session was established:\n{out}"
    );

    // A real TLS 1.3 client that sends something other than the proof.
    let tls13 = in_netns(gout_ns, || {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &target, "-tls1_3", "-quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("stdin").write_all(&[b'x'; 64])?;
        child.wait_with_output()
    })
    .expect("openssl");
    // Neither the server's proof nor producer data comes back to it.
    assert!(
        tls13.stdout.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&tls13.stdout)
    );

    assert_eq!(data.accepted(), 0, "no byte reached the producer");
    wait_log_count(&gin, REFUSED, 4, Duration::from_secs(10));
}
