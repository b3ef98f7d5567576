//! The XDP guard inside `s2cs`: while a session streams, a scan of the whole
//! data range gets nowhere (SYNs to ports no session holds are dropped in the
//! driver, so connects time out instead of being refused), the session's
//! bytes stay intact, released ports are dropped again, and no XDP program is
//! left on the interface once s2cs exits. A session that names its peers has
//! other sources' frames dropped and counted on it, while its peer streams.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{http_get, ports, Gateway};
use testbed::netns::addr;
use testbed::{require_root, spawn_in_netns, Node, Producer, Stream, Topology};

const RANGE: (u16, u16) = (5100, 5199);
/// A dropped SYN shows as a connect timeout; the first retransmission comes
/// after 1 s, so this is far longer than a reachable port needs on veth.
const SCAN_TIMEOUT: Duration = Duration::from_millis(300);

/// Tries to connect from `ns` to every port of `ports` on `ip`, in parallel;
/// returns each port with how the attempt ended.
fn scan(ns: &str, ip: IpAddr, ports: Vec<u16>) -> Vec<(u16, Result<(), ErrorKind>)> {
    let workers: Vec<_> = ports
        .chunks(4)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            spawn_in_netns(ns, move || {
                chunk
                    .into_iter()
                    .map(|p| (p, TcpStream::connect_timeout(&SocketAddr::new(ip, p), SCAN_TIMEOUT).map(drop).map_err(|e| e.kind())))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers.into_iter().flat_map(|w| w.join().expect("scan worker")).collect()
}

/// `guard_dropped_packets=N` from the release log line of the inbound gateway.
fn dropped_at_release(log: &str) -> u64 {
    let line = log.lines().find(|l| l.contains("guard counters at release")).unwrap_or_else(|| panic!("no guard counters line:\n{log}"));
    let field = line.split_whitespace().find_map(|w| w.strip_prefix("guard_dropped_packets=")).expect("guard_dropped_packets field");
    field.parse().expect("a number")
}

#[test]
fn guard_drops_scans_of_the_data_range_while_a_session_streams_intact() {
    const TEST: &str = "guard_drops_scans_of_the_data_range_while_a_session_streams_intact";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(topo.ns(Node::Producer), SocketAddr::new(addr::PRODUCER.into(), 7000)).expect("echo producer");
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let range = format!("{}-{}", RANGE.0, RANGE.1);
    let mut gin = Gateway::start(topo.ns(Node::InboundGw), gin_ip, &range, "splice", &[]);
    let gout = Gateway::start(topo.ns(Node::OutboundGw), addr::OUTBOUND_GW_LAN.into(), &range, "splice", &[]);
    gin.daemon.wait_for_log("XDP guard attached", Duration::from_secs(5)).expect("guard attached on the inbound gateway");

    let inbound = gin.inbound(topo.ns(Node::InboundGw), echo.addr(), 1);
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, 1);
    let session_ports = ports(&inbound.listeners);
    let stream = Stream::start(topo.ns(Node::Consumer), outbound.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));

    // The scan comes from the outbound gateway, which does reach the session
    // port (its tunnel connection is live): only the guard can stop it.
    let others: Vec<u16> = (RANGE.0..=RANGE.1).filter(|p| !session_ports.contains(p)).collect();
    for (port, result) in scan(topo.ns(Node::OutboundGw), gin_ip, others.clone()) {
        assert_eq!(result, Err(ErrorKind::TimedOut), "port {port}: a SYN to a port no session holds must be dropped, not answered");
    }
    stream.assert_progress(Duration::from_secs(5));
    let summary = stream.finish().expect("the session's bytes all came back intact");
    assert!(summary.echoed_bytes > 0);

    let out = gin.s2uc(topo.ns(Node::InboundGw), "release", &[&inbound.uid]);
    assert!(out.status.success(), "release: {}", String::from_utf8_lossy(&out.stderr));
    gin.daemon.wait_for_log("guard counters at release", Duration::from_secs(5)).expect("release logged");
    let dropped = dropped_at_release(&gin.daemon.log_contents());
    assert!(dropped >= others.len() as u64, "{dropped} packets dropped for {} scanned ports", others.len());

    // Released ports are dropped like any other.
    for (port, result) in scan(topo.ns(Node::OutboundGw), gin_ip, session_ports.clone()) {
        assert_eq!(result, Err(ErrorKind::TimedOut), "released port {port} must be dropped again");
    }

    // SIGTERM: s2cs detaches on its way out.
    gin.daemon.signal(nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    gin.daemon.wait_exit(Duration::from_secs(10)).expect("s2cs exits on SIGTERM");
    assert!(gin.daemon.log_contents().contains("XDP guard detached"), "{}", gin.daemon.log_contents());
    let links = Command::new("ip").args(["-n", topo.ns(Node::InboundGw), "link", "show"]).output().expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("xdp"), "an XDP program is still attached:\n{links}");
}

/// The value of the first series of `name` whose labels contain `label` on a
/// Prometheus page.
fn metric(page: &str, name: &str, label: &str) -> u64 {
    let line = page
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(label))
        .unwrap_or_else(|| panic!("no {name} series with {label} on:\n{page}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad value in {line:?}"))
}

/// `guard_dropped_packets` of `s2uc status --json`.
fn status_dropped(gw: &Gateway, ns: &str, uid: &str) -> u64 {
    let out = gw.s2uc(ns, "status", &[uid, "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    v["guard_dropped_packets"].as_u64().unwrap_or_else(|| panic!("no guard_dropped_packets in {v}"))
}

#[test]
fn frames_from_peers_a_session_does_not_allow_are_dropped_and_counted_on_it() {
    const TEST: &str = "frames_from_peers_a_session_does_not_allow_are_dropped_and_counted_on_it";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(topo.ns(Node::Producer), SocketAddr::new(addr::PRODUCER.into(), 7000)).expect("echo producer");
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let (gin_ns, consumer_ns) = (topo.ns(Node::InboundGw), topo.ns(Node::Consumer));
    let metrics: SocketAddr = SocketAddr::new(gin_ip, 9101);
    let range = format!("{}-{}", RANGE.0, RANGE.1);
    let mut gin = Gateway::start(gin_ns, gin_ip, &range, "splice", &["--metrics_addr", &metrics.to_string()]);
    // Another range on the outbound gateway: its own guard checks destination
    // ports only and would otherwise drop the consumer's routed frames to the
    // inbound gateway's ports before they get there.
    let gout = Gateway::start(topo.ns(Node::OutboundGw), addr::OUTBOUND_GW_LAN.into(), "5300-5399", "splice", &[]);
    gin.daemon.wait_for_log("XDP guard attached", Duration::from_secs(5)).expect("guard attached on the inbound gateway");

    // Only the outbound gateway may reach the session's listeners.
    let producer_ip = echo.addr().ip().to_string();
    let producer_port = echo.addr().port().to_string();
    let peer = addr::OUTBOUND_GW_WAN.to_string();
    let inbound = gin.s2uc_json(
        gin_ns,
        "inbound-request",
        &["--remote_ip", &producer_ip, "--receiver_ports", &producer_port, "--num_conn", "1", "--allowed_peers", &peer],
    );
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, 1);
    let session_ports = ports(&inbound.listeners);
    let stream = Stream::start(consumer_ns, outbound.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    assert_eq!(status_dropped(&gin, gin_ns, &inbound.uid), 0, "the allowed peer's frames are not drops");

    // The consumer is routed to the inbound gateway through the outbound one
    // and keeps its own address: not a peer of the session. Its SYNs get no
    // answer (a dropped SYN times out; a closed port would refuse).
    const ATTEMPTS: u64 = 3;
    for _ in 0..ATTEMPTS {
        for (port, result) in scan(consumer_ns, gin_ip, session_ports.clone()) {
            assert_eq!(result, Err(ErrorKind::TimedOut), "port {port}: a SYN from a peer the session does not allow must be dropped");
        }
    }
    stream.assert_progress(Duration::from_secs(5));
    let on_session = status_dropped(&gin, gin_ns, &inbound.uid);
    assert!(on_session >= ATTEMPTS, "{on_session} drops counted on the session for {ATTEMPTS} SYNs");

    // A port no session holds: a scan, counted host-wide, not on the session.
    let free_port = (RANGE.0..=RANGE.1).find(|p| !session_ports.contains(p)).expect("a free port");
    let page = http_get(gin_ns, metrics, "/metrics");
    let global_before = metric(&page, "scistream_guard_dropped_packets", "");
    for (port, result) in scan(consumer_ns, gin_ip, vec![free_port]) {
        assert_eq!(result, Err(ErrorKind::TimedOut), "port {port} of no session must be dropped");
    }
    assert_eq!(status_dropped(&gin, gin_ns, &inbound.uid), on_session, "a scan of another port is not the session's drop");
    let page = http_get(gin_ns, metrics, "/metrics");
    let uid_label = format!("uid=\"{}\"", inbound.uid);
    assert_eq!(metric(&page, "scistream_guard_session_dropped_packets", &uid_label), on_session, "{page}");
    assert!(metric(&page, "scistream_guard_dropped_packets", "") > global_before, "the scan counts host-wide:\n{page}");
    assert!(global_before >= on_session, "host-wide drops include the session's");

    let summary = stream.finish().expect("the allowed peer's bytes all came back intact");
    assert!(summary.echoed_bytes > 0);

    // kill -9 and a new s2cs on the same state directory: the restored
    // session keeps its peers, not just its ports.
    gin.daemon.signal(nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    gin.daemon.wait_exit(Duration::from_secs(10)).expect("s2cs killed");
    gin.respawn(&range, "splice", &["--metrics_addr", &metrics.to_string()]);
    gin.daemon.wait_for_log("session restored", Duration::from_secs(10)).expect("session restored");
    for (port, result) in scan(consumer_ns, gin_ip, session_ports.clone()) {
        assert_eq!(result, Err(ErrorKind::TimedOut), "port {port}: the restored session must still refuse other peers");
    }
    assert!(status_dropped(&gin, gin_ns, &inbound.uid) > 0, "drops counted on the restored session");
    let again = Stream::start(consumer_ns, outbound.listeners[0]).expect("stream after the restart");
    again.assert_progress(Duration::from_secs(5));
    again.finish().expect("the allowed peer streams again, intact");
}
