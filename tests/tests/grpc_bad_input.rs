//! Bad input on the control (gRPC) port of a gateway that carries a live
//! session: garbage bytes, hundreds of connections that never speak, TLS
//! followed by garbage instead of HTTP/2, and a request message far over the
//! size limit. Each is refused or timed out without disturbing the session,
//! and the gateway keeps answering `s2uc` and gives back every socket.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::raw::{block_on, expect_code, new_uid, RawClient};
use common::{closed_by_peer, Gateway, MIB};
use testbed::netns::addr;
use testbed::{
    consume, in_netns, require_root, spawn_in, wait_for_tcp, Node, Producer, Stream, Topology,
};
use tonic::Code;

const RANGE: &str = "5100-5199";
const ECHO: SocketAddr = SocketAddr::new(IpAddr::V4(addr::PRODUCER), 7000);
const PRODUCER: SocketAddr = SocketAddr::new(IpAddr::V4(addr::PRODUCER), 7001);
/// A plaintext port that socat relays over TLS to the inbound gateway's
/// control port: the test's gRPC client speaks HTTP/2 without TLS.
const BRIDGE: SocketAddr = SocketAddr::new(IpAddr::V4(addr::OUTBOUND_GW_WAN), 6000);
/// s2cs's default `--control_timeout`: TLS handshake and HTTP/2 preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// s2cs's request size limit (control/server.rs MAX_MESSAGE_BYTES).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
const SILENT_CONNECTIONS: usize = 200;
/// The longest a normal `s2uc inbound-request` may take while under attack.
const QUICK: Duration = Duration::from_secs(5);

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("s2cs fds")
        .count()
}

/// Polls until `ok(fds)` holds; returns the last count and whether it did.
fn wait_fds(pid: u32, within: Duration, ok: impl Fn(usize) -> bool) -> (usize, bool) {
    let deadline = Instant::now() + within;
    loop {
        let n = fds(pid);
        if ok(n) || Instant::now() >= deadline {
            return (n, ok(n));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic junk that is neither TLS nor HTTP/2.
fn junk(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_silent_and_oversize_clients_on_the_control_port_leave_sessions_streaming() {
    if !require_root(
        "garbage_silent_and_oversize_clients_on_the_control_port_leave_sessions_streaming",
    ) {
        return;
    }
    let topo = Topology::new().expect("topology");
    let (ns_in, ns_out, ns_cons) = (
        topo.ns(Node::InboundGw),
        topo.ns(Node::OutboundGw),
        topo.ns(Node::Consumer),
    );
    let _echo = Producer::start_echo(topo.ns(Node::Producer), ECHO).expect("echo producer");
    let mut gin = Gateway::start(ns_in, addr::INBOUND_GW_WAN.into(), RANGE, "tls", &[]);
    let gout = Gateway::start(
        ns_out,
        addr::OUTBOUND_GW_LAN.into(),
        RANGE,
        "tls",
        &["--peer_ca", gin.cert_str()],
    );
    let inbound = gin.inbound(ns_in, ECHO, 1);
    let outbound = gout.outbound(ns_out, &inbound, 1);
    let stream = Stream::start(ns_cons, outbound.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    let pid = gin.daemon.pid();
    let base = fds(pid);
    // The attacker sits on the WAN, where the peer gateway reaches the control port.
    let control = gin.control;

    // Garbage where a TLS ClientHello belongs: refused at once.
    for seed in 0..20 {
        let s = in_netns(ns_out, || TcpStream::connect(control)).expect("connect");
        let _ = (&s).write_all(&junk(16 * 1024, seed));
        closed_by_peer(&s, Instant::now(), Duration::from_secs(5))
            .expect("garbage instead of TLS: s2cs still holds the connection open");
    }
    stream.assert_progress(Duration::from_secs(5));

    // Connections that never say a word.
    let opened = Instant::now();
    let silent: Vec<TcpStream> = in_netns(ns_out, || {
        (0..SILENT_CONNECTIONS)
            .map(|_| TcpStream::connect(control).expect("connect"))
            .collect()
    });
    let (held, all_held) = wait_fds(pid, Duration::from_secs(5), |n| {
        n >= base + SILENT_CONNECTIONS
    });
    assert!(all_held, "s2cs holds {held} fds, {base} before {SILENT_CONNECTIONS} silent connections: it did not accept them");

    // While they wait for their handshake timeout, s2cs serves everyone else.
    let _bridge = spawn_in(
        ns_out,
        "socat",
        [
            format!(
                "TCP-LISTEN:{},bind={},reuseaddr,fork",
                BRIDGE.port(),
                BRIDGE.ip()
            ),
            format!("OPENSSL:{control},verify=0"),
        ],
    )
    .expect("socat");
    wait_for_tcp(ns_out, BRIDGE, Duration::from_secs(5)).expect("the TLS bridge listens");

    // TLS completes, then bytes that are not HTTP/2.
    let s = in_netns(ns_out, || TcpStream::connect(BRIDGE)).expect("connect to the bridge");
    (&s).write_all(b"GET / HTTP/1.1\r\nHost: s2cs\r\n\r\n")
        .expect("write");
    let _ = (&s).write_all(&junk(64 * 1024, 99));
    closed_by_peer(&s, Instant::now(), Duration::from_secs(5))
        .expect("garbage instead of HTTP/2 over TLS: s2cs still holds the connection open");

    // An 8 MiB hello, refused with a status that says why; a 17 KiB one is
    // read and judged on its content (its uid is no UUID).
    let (oversize, under_limit) = in_netns(ns_out, || {
        block_on(async {
            let client = RawClient::connect(BRIDGE).await;
            let many: Vec<String> = (0..MIB as usize * 8 / 20)
                .map(|i| format!("10.0.{}.{}:5100", i / 250 % 250, i % 250))
                .collect();
            let many: Vec<&str> = many.iter().map(String::as_str).collect();
            let oversize = client.hello(&new_uid(), &many, "PROD").await;
            let under_limit = client.hello("not-a-uuid", &many[..1000], "PROD").await;
            (oversize, under_limit)
        })
    });
    let msg = expect_code(oversize, Code::ResourceExhausted);
    assert!(
        msg.contains(&MAX_MESSAGE_BYTES.to_string()),
        "the refusal does not name the limit: {msg}"
    );
    let msg = expect_code(under_limit, Code::InvalidArgument);
    assert!(msg.contains("not a UUID"), "{msg}");

    let started = Instant::now();
    let during = gin.inbound(ns_in, PRODUCER, 1);
    let took = started.elapsed();
    assert!(took < QUICK, "inbound-request took {took:?} under attack");
    eprintln!("inbound-request with {SILENT_CONNECTIONS} silent connections held: {took:?}");
    let out = gin.s2uc(ns_in, "release", &[&during.uid]);
    assert!(
        out.status.success(),
        "release: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stream.assert_progress(Duration::from_secs(5));

    // The handshake timeout closes every silent connection and gives its fd back.
    for s in &silent {
        closed_by_peer(s, opened, HANDSHAKE_TIMEOUT + Duration::from_secs(5))
            .expect("a silent connection: s2cs still holds the connection open");
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= HANDSHAKE_TIMEOUT - Duration::from_secs(1),
        "closed after {closed_after:?}, before the timeout"
    );
    drop(silent);
    let (now, back) = wait_fds(pid, Duration::from_secs(5), |n| n <= base + 2);
    assert!(back, "s2cs holds {now} fds, {base} before the attack");
    eprintln!("silent connections closed {closed_after:?} after opening; s2cs fds {base} -> {held} -> {now}");

    // Afterwards: a new session set up quickly, its bytes checked by SHA-256,
    // and the session that streamed all along came through intact.
    let producer = Producer::start(topo.ns(Node::Producer), PRODUCER, 8 * MIB).expect("producer");
    let started = Instant::now();
    let inbound2 = gin.inbound(ns_in, PRODUCER, 1);
    let outbound2 = gout.outbound(ns_out, &inbound2, 1);
    let took = started.elapsed();
    assert!(
        took < QUICK * 2,
        "a session took {took:?} to set up after the attack"
    );
    let t = consume(ns_cons, outbound2.listeners[0], 8 * MIB, 7)
        .expect("transfer through the new session");
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("producer record");
    t.verify_with(&seen, 8 * MIB)
        .expect("SHA-256 of both directions");
    let summary = stream.finish().expect("the streaming session's bytes");
    eprintln!(
        "the live session echoed {} verified bytes through it all",
        summary.echoed_bytes
    );
    assert!(
        gin.daemon.is_running(),
        "s2cs died:\n{}",
        gin.daemon.log_contents()
    );
}
