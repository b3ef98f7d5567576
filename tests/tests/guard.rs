//! The guard inside `s2cs`: while a session streams, a scan of the whole
//! data range gets nowhere (SYNs to ports no session holds are dropped, so
//! connects time out instead of being refused), the session's bytes stay
//! intact, released ports are dropped again, and no program is left on the
//! interface once s2cs exits. A session that names its peers has other
//! sources' frames dropped and counted on it, while its peer streams. On the
//! test bed's veths the guard runs at tc (the default `auto` policy), which
//! the kernel confirms; forced to XDP it takes driver mode even at MTU 9000.
//! A guarded `splice` session moves 64 MiB each way intact at MTU 9000 and 1500.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{http_get, ports, Gateway, MIB};
use testbed::netns::addr;
use testbed::{consume, in_netns, require_root, spawn_in_netns, Node, Producer, Stream, Topology};

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
                    .map(|p| {
                        (
                            p,
                            TcpStream::connect_timeout(&SocketAddr::new(ip, p), SCAN_TIMEOUT)
                                .map(drop)
                                .map_err(|e| e.kind()),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().expect("scan worker"))
        .collect()
}

/// `guard_dropped_packets=N` from the release log line of the inbound gateway.
fn dropped_at_release(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("guard counters at release"))
        .unwrap_or_else(|| panic!("no guard counters line:\n{log}"));
    let field = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("guard_dropped_packets="))
        .expect("guard_dropped_packets field");
    field.parse().expect("a number")
}

#[test]
fn guard_drops_scans_of_the_data_range_while_a_session_streams_intact() {
    const TEST: &str = "guard_drops_scans_of_the_data_range_while_a_session_streams_intact";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo producer");
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let range = format!("{}-{}", RANGE.0, RANGE.1);
    let mut gin = Gateway::start(topo.ns(Node::InboundGw), gin_ip, &range, "splice", &[]);
    let gout = Gateway::start(
        topo.ns(Node::OutboundGw),
        addr::OUTBOUND_GW_LAN.into(),
        &range,
        "splice",
        &[],
    );
    gin.daemon
        .wait_for_log("guard attached (veth-wan: tc)", Duration::from_secs(5))
        .expect("guard attached at tc on the inbound gateway");
    assert_eq!(
        tcx_ingress_programs(topo.ns(Node::InboundGw), "veth-wan"),
        1,
        "the kernel has the guard on tc ingress"
    );
    assert_no_xdp(topo.ns(Node::InboundGw), "veth-wan");

    let inbound = gin.inbound(topo.ns(Node::InboundGw), echo.addr(), 1);
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, 1);
    let session_ports = ports(&inbound.listeners);
    let stream = Stream::start(topo.ns(Node::Consumer), outbound.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));

    // The scan comes from the outbound gateway, which does reach the session
    // port (its tunnel connection is live): only the guard can stop it.
    let others: Vec<u16> = (RANGE.0..=RANGE.1)
        .filter(|p| !session_ports.contains(p))
        .collect();
    for (port, result) in scan(topo.ns(Node::OutboundGw), gin_ip, others.clone()) {
        assert_eq!(
            result,
            Err(ErrorKind::TimedOut),
            "port {port}: a SYN to a port no session holds must be dropped, not answered"
        );
    }
    stream.assert_progress(Duration::from_secs(5));
    let summary = stream
        .finish()
        .expect("the session's bytes all came back intact");
    assert!(summary.echoed_bytes > 0);

    let out = gin.s2uc(topo.ns(Node::InboundGw), "release", &[&inbound.uid]);
    assert!(
        out.status.success(),
        "release: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    gin.daemon
        .wait_for_log("guard counters at release", Duration::from_secs(5))
        .expect("release logged");
    let dropped = dropped_at_release(&gin.daemon.log_contents());
    assert!(
        dropped >= others.len() as u64,
        "{dropped} packets dropped for {} scanned ports",
        others.len()
    );

    // Released ports are dropped like any other.
    for (port, result) in scan(topo.ns(Node::OutboundGw), gin_ip, session_ports.clone()) {
        assert_eq!(
            result,
            Err(ErrorKind::TimedOut),
            "released port {port} must be dropped again"
        );
    }

    // SIGTERM: s2cs detaches on its way out.
    gin.daemon
        .signal(nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    gin.daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits on SIGTERM");
    assert!(
        gin.daemon.log_contents().contains("guard detached"),
        "{}",
        gin.daemon.log_contents()
    );
    assert_eq!(
        tcx_ingress_programs(topo.ns(Node::InboundGw), "veth-wan"),
        0,
        "a tc program is still attached"
    );
    let links = Command::new("ip")
        .args(["-n", topo.ns(Node::InboundGw), "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains("xdp"),
        "an XDP program is still attached:\n{links}"
    );
}

/// The value of the first series of `name` whose labels contain `label` on a
/// Prometheus page.
fn metric(page: &str, name: &str, label: &str) -> u64 {
    let line = page
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(label))
        .unwrap_or_else(|| panic!("no {name} series with {label} on:\n{page}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad value in {line:?}"))
}

/// `guard_dropped_packets` of `s2uc status --json`.
fn status_dropped(gw: &Gateway, ns: &str, uid: &str) -> u64 {
    let out = gw.s2uc(ns, "status", &[uid, "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    v["guard_dropped_packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no guard_dropped_packets in {v}"))
}

#[test]
fn frames_from_peers_a_session_does_not_allow_are_dropped_and_counted_on_it() {
    const TEST: &str = "frames_from_peers_a_session_does_not_allow_are_dropped_and_counted_on_it";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo producer");
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let (gin_ns, consumer_ns) = (topo.ns(Node::InboundGw), topo.ns(Node::Consumer));
    let metrics: SocketAddr = SocketAddr::new(gin_ip, 9101);
    let range = format!("{}-{}", RANGE.0, RANGE.1);
    let mut gin = Gateway::start(
        gin_ns,
        gin_ip,
        &range,
        "splice",
        &["--metrics_addr", &metrics.to_string()],
    );
    // Another range on the outbound gateway: its own guard checks destination
    // ports only and would otherwise drop the consumer's routed frames to the
    // inbound gateway's ports before they get there.
    let gout = Gateway::start(
        topo.ns(Node::OutboundGw),
        addr::OUTBOUND_GW_LAN.into(),
        "5300-5399",
        "splice",
        &[],
    );
    gin.daemon
        .wait_for_log("guard attached (veth-wan: tc)", Duration::from_secs(5))
        .expect("guard attached at tc on the inbound gateway");
    assert_eq!(
        tcx_ingress_programs(gin_ns, "veth-wan"),
        1,
        "the kernel has the guard on tc ingress"
    );

    // Only the outbound gateway may reach the session's listeners.
    let producer_ip = echo.addr().ip().to_string();
    let producer_port = echo.addr().port().to_string();
    let peer = addr::OUTBOUND_GW_WAN.to_string();
    let inbound = gin.s2uc_json(
        gin_ns,
        "inbound-request",
        &[
            "--remote_ip",
            &producer_ip,
            "--receiver_ports",
            &producer_port,
            "--num_conn",
            "1",
            "--allowed_peers",
            &peer,
        ],
    );
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, 1);
    let session_ports = ports(&inbound.listeners);
    let stream = Stream::start(consumer_ns, outbound.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    assert_eq!(
        status_dropped(&gin, gin_ns, &inbound.uid),
        0,
        "the allowed peer's frames are not drops"
    );

    // The consumer is routed to the inbound gateway through the outbound one
    // and keeps its own address: not a peer of the session. Its SYNs get no
    // answer (a dropped SYN times out; a closed port would refuse).
    const ATTEMPTS: u64 = 3;
    for _ in 0..ATTEMPTS {
        for (port, result) in scan(consumer_ns, gin_ip, session_ports.clone()) {
            assert_eq!(
                result,
                Err(ErrorKind::TimedOut),
                "port {port}: a SYN from a peer the session does not allow must be dropped"
            );
        }
    }
    stream.assert_progress(Duration::from_secs(5));
    let on_session = status_dropped(&gin, gin_ns, &inbound.uid);
    assert!(
        on_session >= ATTEMPTS,
        "{on_session} drops counted on the session for {ATTEMPTS} SYNs"
    );

    // A port no session holds: a scan, counted host-wide, not on the session.
    let free_port = (RANGE.0..=RANGE.1)
        .find(|p| !session_ports.contains(p))
        .expect("a free port");
    let page = http_get(gin_ns, metrics, "/metrics");
    let global_before = metric(&page, "scistream_guard_dropped_packets", "");
    for (port, result) in scan(consumer_ns, gin_ip, vec![free_port]) {
        assert_eq!(
            result,
            Err(ErrorKind::TimedOut),
            "port {port} of no session must be dropped"
        );
    }
    assert_eq!(
        status_dropped(&gin, gin_ns, &inbound.uid),
        on_session,
        "a scan of another port is not the session's drop"
    );
    let page = http_get(gin_ns, metrics, "/metrics");
    let uid_label = format!("uid=\"{}\"", inbound.uid);
    assert_eq!(
        metric(&page, "scistream_guard_session_dropped_packets", &uid_label),
        on_session,
        "{page}"
    );
    assert!(
        metric(&page, "scistream_guard_dropped_packets", "") > global_before,
        "the scan counts host-wide:\n{page}"
    );
    assert!(
        global_before >= on_session,
        "host-wide drops include the session's"
    );

    let summary = stream
        .finish()
        .expect("the allowed peer's bytes all came back intact");
    assert!(summary.echoed_bytes > 0);

    // kill -9 and a new s2cs on the same state directory: the restored
    // session keeps its peers, not just its ports.
    gin.daemon
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL");
    gin.daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs killed");
    gin.respawn(&range, "splice", &["--metrics_addr", &metrics.to_string()]);
    gin.daemon
        .wait_for_log("session restored", Duration::from_secs(10))
        .expect("session restored");
    for (port, result) in scan(consumer_ns, gin_ip, session_ports.clone()) {
        assert_eq!(
            result,
            Err(ErrorKind::TimedOut),
            "port {port}: the restored session must still refuse other peers"
        );
    }
    assert!(
        status_dropped(&gin, gin_ns, &inbound.uid) > 0,
        "drops counted on the restored session"
    );
    let again =
        Stream::start(consumer_ns, outbound.listeners[0]).expect("stream after the restart");
    again.assert_progress(Duration::from_secs(5));
    again
        .finish()
        .expect("the allowed peer streams again, intact");
}

/// `ip -d link show` of `iface` in `ns`: what the kernel says is attached.
fn link_details(ns: &str, iface: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "dev", iface])
        .output()
        .expect("ip link show");
    assert!(
        out.status.success(),
        "ip link show {iface}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_no_xdp(ns: &str, iface: &str) {
    let link = link_details(ns, iface);
    assert!(
        !link.contains("xdp"),
        "no XDP program belongs on {iface} (it would strip GSO from the peer):\n{link}"
    );
}

/// How many programs the kernel runs on `iface`'s tc ingress (tcx), asked
/// with BPF_PROG_QUERY from inside `ns` (iproute2 6.1 does not show tcx links).
fn tcx_ingress_programs(ns: &str, iface: &str) -> u32 {
    let iface = iface.to_owned();
    in_netns(ns, move || {
        let index = nix::net::if_::if_nametoindex(iface.as_str())
            .unwrap_or_else(|e| panic!("no interface {iface}: {e}"));
        prog_query_count(index, BPF_TCX_INGRESS)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY on {iface}: {e}"))
    })
}

const BPF_PROG_QUERY: nix::libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;

/// `union bpf_attr`'s query member (uapi linux/bpf.h), padded to the size
/// the kernel accepts for it.
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Programs attached at `attach_type` of interface `ifindex` (of the calling
/// thread's network namespace). With no id buffer the kernel fills in the
/// count only.
fn prog_query_count(ifindex: u32, attach_type: u32) -> std::io::Result<u32> {
    let mut attr = ProgQuery {
        target_ifindex: ifindex,
        attach_type,
        ..ProgQuery::default()
    };
    // SAFETY: bpf(2) with a pointer to a live, fully initialised attr of the
    // size passed; the kernel writes only inside it.
    let ret = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQuery,
            std::mem::size_of::<ProgQuery>() as u32,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.count)
}

/// The guard's hook per interface as `/metrics` shows it.
fn attached_metric(page: &str, iface: &str, hook: &str) -> bool {
    let series =
        format!("scistream_ebpf_attached{{program=\"guard\",iface=\"{iface}\",hook=\"{hook}\"}} 1");
    page.lines().any(|l| l == series)
}

/// A guarded `splice` path at `mtu`: the guard on both gateways' data
/// interfaces at the hook `policy` gives (checked in the kernel), then one
/// connection moving 64 MiB each way, SHA-256 equal at both ends.
fn guarded_splice_moves_64_mib_each_way(test: &str, mtu: u32, policy: &str) {
    const BYTES: u64 = 64 * MIB;
    if !require_root(test) {
        return;
    }
    let topo = Topology::new().expect("topology");
    topo.set_mtu(mtu).expect("mtu on every veth");
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        BYTES,
    )
    .expect("producer");
    let (gin_ns, gout_ns) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let metrics = SocketAddr::new(gin_ip, 9102);
    let gin = Gateway::start(
        gin_ns,
        gin_ip,
        "5100-5199",
        "splice",
        &[
            "--ebpf_attach",
            policy,
            "--metrics_addr",
            &metrics.to_string(),
        ],
    );
    let gout = Gateway::start(
        gout_ns,
        addr::OUTBOUND_GW_LAN.into(),
        "5300-5399",
        "splice",
        &["--ebpf_attach", policy],
    );

    // Where each gateway's guard runs, in the kernel's own words.
    let expected_hook = if policy == "xdp" { "xdp" } else { "tc" };
    for (ns, iface, gw) in [(gin_ns, "veth-wan", &gin), (gout_ns, "veth-clan", &gout)] {
        let log = gw.daemon.log_contents();
        assert!(
            log.contains(&format!("guard attached ({iface}: {expected_hook})")),
            "{log}"
        );
        let link = link_details(ns, iface);
        assert!(link.contains(&format!("mtu {mtu} ")), "{link}");
        assert!(
            !link.contains("xdpgeneric"),
            "generic XDP on {iface}:\n{link}"
        );
        match expected_hook {
            "xdp" => {
                assert!(link.contains("xdp"), "no XDP program on {iface}:\n{link}");
                assert_eq!(tcx_ingress_programs(ns, iface), 0, "XDP only on {iface}");
            }
            _ => {
                assert_no_xdp(ns, iface);
                assert_eq!(
                    tcx_ingress_programs(ns, iface),
                    1,
                    "the guard on tc ingress of {iface}"
                );
            }
        }
    }
    let page = http_get(gin_ns, metrics, "/metrics");
    assert!(attached_metric(&page, "veth-wan", expected_hook), "{page}");

    let inbound = gin.inbound(gin_ns, producer.addr(), 1);
    let outbound = gout.outbound(gout_ns, &inbound, 1);
    let status = gin.s2uc(gin_ns, "status", &[&inbound.uid, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json");
    assert_eq!(
        status["guard_attach"],
        format!("veth-wan={expected_hook}"),
        "s2uc status names the guard's hook: {status}"
    );
    let transfer = consume(
        topo.ns(Node::Consumer),
        outbound.listeners[0],
        BYTES,
        0x9a7d,
    )
    .expect("64 MiB each way through the guarded gateways");
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("the producer's side of the connection");
    transfer
        .verify_with(&seen, BYTES)
        .expect("both directions intact");
    eprintln!("{test}: 64 MiB each way at MTU {mtu}, guard at {expected_hook}: {:.2} Gbit/s both directions together", transfer.gbit_per_s());

    // The session's bytes crossed the guard and were counted there.
    let page = http_get(gin_ns, metrics, "/metrics");
    assert_eq!(
        metric(&page, "scistream_guard_dropped_packets", ""),
        0,
        "nothing of the session dropped:\n{page}"
    );
}

#[test]
fn guarded_splice_moves_64_mib_each_way_intact_at_mtu_9000() {
    guarded_splice_moves_64_mib_each_way(
        "guarded_splice_moves_64_mib_each_way_intact_at_mtu_9000",
        9000,
        "auto",
    );
}

#[test]
fn guarded_splice_moves_64_mib_each_way_intact_at_mtu_1500() {
    guarded_splice_moves_64_mib_each_way(
        "guarded_splice_moves_64_mib_each_way_intact_at_mtu_1500",
        1500,
        "auto",
    );
}

/// Forced to XDP, the fragment-capable guard gets driver mode on a veth at
/// MTU 9000 (never generic XDP) and jumbo frames cross it intact.
#[test]
fn guard_forced_to_xdp_takes_driver_mode_at_mtu_9000_and_moves_64_mib_each_way_intact() {
    guarded_splice_moves_64_mib_each_way(
        "guard_forced_to_xdp_takes_driver_mode_at_mtu_9000_and_moves_64_mib_each_way_intact",
        9000,
        "xdp",
    );
}
