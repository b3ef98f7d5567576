//! The XDP guard inside `s2cs`: while a session streams, a scan of the whole
//! data range gets nowhere (SYNs to ports no session holds are dropped in the
//! driver, so connects time out instead of being refused), the session's
//! bytes stay intact, released ports are dropped again, and no XDP program is
//! left on the interface once s2cs exits.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{ports, Gateway};
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
