//! Faults around a live session (default `tls` backend on both gateways):
//! the producer killed mid-stream, the peer gateway killed and restarted,
//! and a consumer that stops reading while the producer keeps writing.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{closed_by_peer, Gateway, Outcome, MIB};
use testbed::netns::addr;
use testbed::process::Signal;
use testbed::{consume, in_netns, require_root, spawn_in, Node, Producer, Topology};

const RANGE: &str = "5100-5199";
const PRODUCER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(addr::PRODUCER), 7000);
/// How long a consumer may wait to see its stream end after a fault.
const CLOSE_SEEN_WITHIN: Duration = Duration::from_secs(10);

struct Path {
    topo: Topology,
    gin: Gateway,
    gout: Gateway,
    inbound: Outcome,
    outbound: Outcome,
}

/// Both gateways and one session with one listener towards `PRODUCER`.
fn path(topo: Topology) -> Path {
    let (ns_in, ns_out) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    let gin = Gateway::start(ns_in, addr::INBOUND_GW_WAN.into(), RANGE, "tls", &[]);
    let gout = Gateway::start(
        ns_out,
        addr::OUTBOUND_GW_LAN.into(),
        RANGE,
        "tls",
        &["--peer_ca", gin.cert_str()],
    );
    let inbound = gin.inbound(ns_in, PRODUCER, 1);
    let outbound = gout.outbound(ns_out, &inbound, 1);
    Path {
        topo,
        gin,
        gout,
        inbound,
        outbound,
    }
}

/// A consumer connection that has seen at least `at_least` bytes arrive.
fn streaming_consumer(p: &Path, at_least: usize) -> TcpStream {
    let to = p.outbound.listeners[0];
    let mut s = in_netns(p.topo.ns(Node::Consumer), || TcpStream::connect(to)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < at_least {
        match s.read(&mut buf) {
            Ok(0) => panic!("the stream ended after {got} bytes"),
            Ok(n) => got += n,
            Err(e) => panic!("no data through the session after {got} bytes: {e}"),
        }
    }
    s
}

/// How long `s` took to see its stream end (an EOF or a reset); panics
/// if it hangs.
fn seen_closed(s: &TcpStream) -> Duration {
    closed_by_peer(s, Instant::now(), CLOSE_SEEN_WITHIN).unwrap_or_else(|| {
        panic!("the consumer saw no close within {CLOSE_SEEN_WITHIN:?}: it hangs")
    })
}

/// A fresh connection through the session streams `bytes` each way, verified.
fn next_connection_streams(p: &Path, producer: &Producer, bytes: u64, seed: u64) {
    let t = consume(
        p.topo.ns(Node::Consumer),
        p.outbound.listeners[0],
        bytes,
        seed,
    )
    .unwrap_or_else(|e| {
        panic!(
            "the next connection failed: {e:#}\ninbound:\n{}\noutbound:\n{}",
            p.gin.daemon.log_contents(),
            p.gout.daemon.log_contents()
        )
    });
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("producer record");
    t.verify_with(&seen, bytes).expect("both directions intact");
}

#[test]
fn producer_killed_mid_stream_closes_the_consumer_and_the_session_serves_the_next_connection() {
    if !require_root(
        "producer_killed_mid_stream_closes_the_consumer_and_the_session_serves_the_next_connection",
    ) {
        return;
    }
    let topo = Topology::new().expect("topology");
    // A producer process that streams zeros for ever, to be SIGKILLed.
    let listen = format!(
        "TCP-LISTEN:{},bind={},reuseaddr",
        PRODUCER.port(),
        PRODUCER.ip()
    );
    let mut doomed = spawn_in(
        topo.ns(Node::Producer),
        "socat",
        ["-u", "OPEN:/dev/zero", listen.as_str()],
    )
    .expect("socat");
    // socat serves one connection: no probe, just time to bind.
    std::thread::sleep(Duration::from_millis(300));
    let p = path(topo);
    let consumer = streaming_consumer(&p, 4 * MIB as usize);

    doomed.signal(Signal::SIGKILL).unwrap();
    doomed.wait_exit(Duration::from_secs(5)).unwrap();
    let after = seen_closed(&consumer);
    eprintln!("consumer saw the producer's death after {after:?}");

    // The session lives on: a new producer, a new connection, every byte checked.
    let bytes = 8 * MIB;
    let producer = Producer::start(p.topo.ns(Node::Producer), PRODUCER, bytes).expect("producer");
    next_connection_streams(&p, &producer, bytes, 1);
}

#[test]
fn peer_gateway_killed_and_restarted_new_connections_work() {
    if !require_root("peer_gateway_killed_and_restarted_new_connections_work") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let producer = Producer::start(topo.ns(Node::Producer), PRODUCER, 1 << 40).expect("producer");
    let mut p = path(topo);
    let consumer = streaming_consumer(&p, 4 * MIB as usize);

    // The inbound gateway dies under a live stream.
    p.gin.daemon.signal(Signal::SIGKILL).unwrap();
    p.gin.daemon.wait_exit(Duration::from_secs(5)).unwrap();
    let after = seen_closed(&consumer);
    eprintln!("consumer saw the peer gateway's death after {after:?}");
    assert!(
        p.gout.daemon.is_running(),
        "the outbound gateway died with its peer"
    );

    // Back with its stored sessions; the outbound gateway was never touched.
    p.gin.respawn(RANGE, "tls", &[]);
    p.gin
        .daemon
        .wait_for_log("restored 1 stored sessions", Duration::from_secs(10))
        .expect("the peer restored the session");
    drop(producer);
    let bytes = 8 * MIB;
    let producer = Producer::start(p.topo.ns(Node::Producer), PRODUCER, bytes).expect("producer");
    next_connection_streams(&p, &producer, bytes, 2);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("s2cs status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn bytes_from_producer(p: &Path) -> u64 {
    let out = p.gin.s2uc(&p.gin.ns, "status", &[&p.inbound.uid, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    s["bytes_backward"].as_u64().expect("bytes_backward")
}

/// What each gateway may grow by while its consumer reads nothing.
const RSS_BOUND_KIB: u64 = 16 * 1024;

#[test]
fn consumer_that_stops_reading_keeps_gateway_memory_bounded() {
    if !require_root("consumer_that_stops_reading_keeps_gateway_memory_bounded") {
        return;
    }
    let topo = Topology::new().expect("topology");
    // Far more than any buffer on the path: the producer never runs out.
    let producer = Producer::start(topo.ns(Node::Producer), PRODUCER, 1 << 40).expect("producer");
    let p = path(topo);
    let stalled = streaming_consumer(&p, MIB as usize);
    // Let the path's socket buffers fill, then watch.
    std::thread::sleep(Duration::from_secs(2));
    let (in0, out0, b0) = (
        rss_kib(p.gin.daemon.pid()),
        rss_kib(p.gout.daemon.pid()),
        bytes_from_producer(&p),
    );
    std::thread::sleep(Duration::from_secs(4));
    let (in1, out1, b1) = (
        rss_kib(p.gin.daemon.pid()),
        rss_kib(p.gout.daemon.pid()),
        bytes_from_producer(&p),
    );
    eprintln!(
        "over 4 s of a stalled consumer: inbound RSS {in0} -> {in1} KiB, outbound {out0} -> {out1} KiB, \
         bytes taken from the producer {b0} -> {b1}"
    );
    assert!(
        producer.results().is_empty(),
        "the producer stopped writing: {:?}",
        producer.results()
    );
    assert!(
        in1.saturating_sub(in0) < RSS_BOUND_KIB,
        "inbound gateway grew {} KiB",
        in1 - in0
    );
    assert!(
        out1.saturating_sub(out0) < RSS_BOUND_KIB,
        "outbound gateway grew {} KiB",
        out1 - out0
    );
    // Back-pressure reached the producer: the gateways stopped taking its bytes.
    assert!(
        b1 - b0 < 4 * MIB,
        "the inbound gateway took {} more bytes with nobody reading",
        b1 - b0
    );
    drop(stalled);
}
