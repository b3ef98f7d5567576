//! Lifecycle hygiene: a session lease (`--session_ttl`) reclaims what
//! nobody uses and spares what carries traffic; `release` cuts a live
//! connection at once, on either gateway of a pair.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw::{block_on, RawClient};
use common::{closed_within, Gateway};
use testbed::netns::addr;
use testbed::{in_netns, require_root, Node, Producer, Stream, Topology};

#[test]
fn session_ttl_reclaims_an_idle_session_but_not_one_carrying_traffic() {
    if !require_root("session_ttl_reclaims_an_idle_session_but_not_one_carrying_traffic") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo");
    let ns = topo.ns(Node::InboundGw);
    let mut gw = Gateway::start(
        ns,
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "splice",
        &["--session_ttl", "2"],
    );
    let idle = gw.inbound(ns, echo.addr(), 1);
    let busy = gw.inbound(ns, echo.addr(), 1);
    assert_eq!(common::ports(&idle.listeners), vec![5100]);
    // A trickle (64 KiB/s) is traffic too.
    let stream = Stream::start_with_rate(topo.ns(Node::OutboundGw), busy.listeners[0], 64 * 1024)
        .expect("stream");
    stream.assert_progress(Duration::from_secs(5));

    let line = gw
        .daemon
        .wait_for_log("idle past --session_ttl", Duration::from_secs(6))
        .expect("the idle session is reclaimed");
    assert!(line.contains(&idle.uid), "{line}");
    let started = Instant::now();
    let out = gw.s2uc(ns, "status", &[&idle.uid]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{out:?}"
    );
    // Its port went back: free to bind, and the next session gets it.
    in_netns(ns, || std::net::TcpListener::bind(idle.listeners[0]))
        .expect("the reclaimed port is free");
    let next = gw.inbound(ns, echo.addr(), 1);
    assert_eq!(next.listeners, idle.listeners);

    // The busy one outlives several TTLs and keeps streaming.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    let out = gw.s2uc(ns, "status", &[&busy.uid]);
    assert!(
        out.status.success(),
        "the session carrying traffic is still there: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stream.assert_progress(Duration::from_secs(2));
    stream.finish().expect("echo intact");
    let log = gw.daemon.log_contents();
    assert!(
        !log.lines()
            .any(|l| l.contains("idle past --session_ttl") && l.contains(&busy.uid)),
        "{log}"
    );
}

#[test]
fn release_closes_a_live_connection_within_one_second_on_either_gateway() {
    if !require_root("release_closes_a_live_connection_within_one_second_on_either_gateway") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo");
    let (nin, nout) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    // Plaintext control so the release below is one RPC, timed without a process start.
    let gin = Gateway::start(
        nin,
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "tls",
        &["--ssl", "false"],
    );
    let gout = Gateway::start(
        nout,
        addr::OUTBOUND_GW_LAN.into(),
        "5100-5199",
        "tls",
        &["--ssl", "false"],
    );
    let (ip, port) = (echo.addr().ip().to_string(), echo.addr().port().to_string());
    for release_on in [&gin, &gout] {
        let inbound = gin.s2uc_json(
            nin,
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
        let joined = inbound.listeners[0].to_string();
        let outbound = gout.s2uc_json(
            nout,
            "outbound-request",
            &["--ssl", "false", "--num_conn", "1", &inbound.uid, &joined],
        );
        let stream = Stream::start(topo.ns(Node::Consumer), outbound.listeners[0]).expect("stream");
        stream.assert_progress(Duration::from_secs(5));

        let control = release_on.control;
        let t0 = Instant::now();
        in_netns(&release_on.ns, || {
            block_on(async {
                RawClient::connect(control)
                    .await
                    .release(&inbound.uid)
                    .await
                    .expect("release")
            })
        });
        let answered = t0.elapsed();
        let closed = closed_within(&stream, Duration::from_secs(1)).map(|after| answered + after);
        eprintln!(
            "release on {}: answered in {answered:?}, consumer connection closed after {closed:?}",
            release_on.ns
        );
        let closed = closed.unwrap_or_else(|| {
            panic!(
                "release on {}: the consumer's connection still open 1 s after the answer",
                release_on.ns
            )
        });
        assert!(
            closed <= Duration::from_secs(1),
            "release on {}: connection closed only after {closed:?}",
            release_on.ns
        );
        // The other gateway still has its half; release it too.
        let other = if std::ptr::eq(release_on, &gin) {
            &gout
        } else {
            &gin
        };
        let out = other.s2uc(&other.ns, "release", &["--ssl", "false", &inbound.uid]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
