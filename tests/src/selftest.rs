//! Tests of the test bed itself on real namespaces (root only; skipped otherwise).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::netns::{addr, Link, Node, Topology};
use crate::process::{run_in, spawn_in, wait_for_tcp};
use crate::require_root;
use crate::traffic::{consume, consume_parallel, Producer, Stream};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn topology_routes_tcp_from_consumer_to_producer_directly() {
    if !require_root("topology_routes_tcp_from_consumer_to_producer_directly") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let bytes = 8 << 20;
    for (port, target) in [
        (7000, topo.sock4(Node::Producer, Link::ProducerLan, 7000)),
        (7001, topo.sock6(Node::Producer, Link::ProducerLan, 7001)),
    ] {
        let producer = Producer::start(topo.ns(Node::Producer), target, bytes).expect("producer");
        assert_eq!(producer.addr().port(), port);
        let transfer = consume(topo.ns(Node::Consumer), target, 3 << 20, 5).expect("transfer");
        let records = producer.wait_for(1, WAIT).expect("producer records");
        transfer
            .verify_with(&records, bytes)
            .expect("verified both ways");
        // Routed, not proxied: the producer sees the consumer's own address.
        let consumer_ip = if target.is_ipv4() {
            addr::CONSUMER.into()
        } else {
            std::net::IpAddr::from(addr::CONSUMER_V6)
        };
        assert_eq!(records[0].peer.ip(), consumer_ip);
        assert_eq!(records[0].error, None);
    }
}

#[test]
fn parallel_connections_are_verified_individually() {
    if !require_root("parallel_connections_are_verified_individually") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let target = topo.sock4(Node::Producer, Link::ProducerLan, 7100);
    let producer = Producer::start(topo.ns(Node::Producer), target, 1 << 20).expect("producer");
    let transfers =
        consume_parallel(topo.ns(Node::Consumer), &[target; 4], 2 << 20, 100).expect("transfers");
    let records = producer.wait_for(4, WAIT).expect("records");
    assert_eq!(records.len(), 4);
    for t in &transfers {
        t.verify_with(&records, 1 << 20).expect("verified");
    }
    // A record from another seed must not be accepted as this transfer's twin.
    let other = consume(topo.ns(Node::Consumer), target, 2 << 20, 999).expect("transfer");
    assert!(other.verify_with(&records, 1 << 20).is_err());
}

#[test]
fn namespaces_are_isolated_and_removed_on_drop() {
    if !require_root("namespaces_are_isolated_and_removed_on_drop") {
        return;
    }
    let a = Topology::new().expect("topology a");
    let b = Topology::new().expect("topology b");
    let names: Vec<String> = a
        .namespaces()
        .iter()
        .chain(b.namespaces().iter())
        .map(|s| s.to_string())
        .collect();
    for name in &names {
        assert!(name.len() <= 15, "{name} too long");
        assert!(Path::new("/run/netns").join(name).exists());
    }
    // Same address in both, yet a listener in one is invisible from the other.
    let target = a.sock4(Node::Producer, Link::ProducerLan, 7200);
    let _producer = Producer::start(a.ns(Node::Producer), target, 0).expect("producer");
    assert!(wait_for_tcp(a.ns(Node::Consumer), target, WAIT).is_ok());
    assert!(wait_for_tcp(b.ns(Node::Consumer), target, Duration::from_millis(300)).is_err());
    drop(_producer);
    drop(a);
    drop(b);
    for name in &names {
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "{name} still exists"
        );
    }
}

#[test]
fn stream_keeps_moving_and_verifies_the_echo() {
    if !require_root("stream_keeps_moving_and_verifies_the_echo") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let target = topo.sock6(Node::Producer, Link::ProducerLan, 7300);
    let echo = Producer::start_echo(topo.ns(Node::Producer), target).expect("echo");
    let stream = Stream::start(topo.ns(Node::Consumer), target).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    stream.assert_progress(Duration::from_secs(5));
    let summary = stream.finish().expect("finish");
    assert!(summary.sent_bytes > 0);
    assert_eq!(summary.sent_bytes, summary.echoed_bytes);
    let records = echo.wait_for(1, WAIT).expect("echo record");
    assert_eq!(records[0].received_bytes, summary.sent_bytes);
}

#[test]
fn stream_reports_a_path_that_stops() {
    if !require_root("stream_reports_a_path_that_stops") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let target = topo.sock4(Node::Producer, Link::ProducerLan, 7400);
    let echo = Producer::start_echo(topo.ns(Node::Producer), target).expect("echo");
    let stream = Stream::start(topo.ns(Node::Consumer), target).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    drop(echo); // resets the connection
    let stalled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..50 {
            stream.assert_progress(Duration::from_millis(200));
        }
    }));
    assert!(stalled.is_err(), "a dead path must fail assert_progress");
    assert!(stream.finish().is_err());
}

#[test]
fn daemon_logs_output_and_stops_on_drop() {
    if !require_root("daemon_logs_output_and_stops_on_drop") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let ns = topo.ns(Node::InboundGw);
    let mut daemon = spawn_in(
        ns,
        "sh",
        [
            "-c",
            "ip -o addr show dev veth-wan; echo to-stderr >&2; exec sleep 600",
        ],
    )
    .expect("spawn");
    let line = daemon
        .wait_for_log("10.91.2.2/24", WAIT)
        .expect("address in the log");
    assert!(line.contains("veth-wan"));
    daemon
        .wait_for_log("to-stderr", WAIT)
        .expect("stderr in the log");
    assert!(daemon.is_running());
    let pid = daemon.pid();
    let log = daemon.log_path().to_path_buf();
    drop(daemon);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z"))
    );
    assert!(log.exists(), "logs are kept for debugging");
    let _ = std::fs::remove_file(log);
}

#[test]
fn run_in_captures_output_and_enforces_the_timeout() {
    if !require_root("run_in_captures_output_and_enforces_the_timeout") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let out = run_in(
        topo.ns(Node::Consumer),
        "ip",
        ["-4", "route", "show", "default"],
    )
    .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("via 10.91.1.1"));
    let mut cmd = crate::process::netns_command(topo.ns(Node::Consumer), "sleep");
    cmd.arg("30");
    let started = std::time::Instant::now();
    let err =
        crate::process::run_command(cmd, Duration::from_millis(300)).expect_err("must time out");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(format!("{err}").contains("still running"));
}

#[test]
fn wait_for_tcp_gives_up_when_nothing_listens() {
    if !require_root("wait_for_tcp_gives_up_when_nothing_listens") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let addr: SocketAddr = (addr::INBOUND_GW_WAN, 5999).into();
    assert!(wait_for_tcp(topo.ns(Node::OutboundGw), addr, Duration::from_millis(300)).is_err());
}
