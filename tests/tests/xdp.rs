//! The `xdp` backend on both gateways, across the four namespaces: the
//! gateways translate and redirect frames, so each TCP connection runs end to
//! end from consumer to producer (neither gateway's TCP stack opens one),
//! bytes arrive intact in parallel, a released session's flows stop being
//! translated, a stream goes on while s2cs is killed and restarted (pinned
//! program and maps), a clean exit leaves no XDP program or pin behind, the
//! rate is enforced in XDP, and open connections and drops are reported.
//!
//! s2cs runs under `ip netns exec`, which gives it a fresh /sys: the pins go
//! to a bpffs mounted in the host's mount namespace (`SCISTREAM_BPFFS`), as
//! /sys/fs/bpf is for an s2cs run the usual way.
//!
//! The veths keep their default settings (GSO, unfinished CHECKSUM_PARTIAL
//! checksums, no GRO): the NAT attaches at tc on them, where it sees whole
//! GSO packets and fixes checksums with the kernel's helpers. At MTU 9000 and
//! 1500 a 64 MiB stream each way crosses it intact, and 20,000 connections in
//! a row go through one session, whose flows are all freed afterwards.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{Gateway, MIB};
use testbed::netns::addr;
use testbed::process::Signal;
use testbed::{
    consume, consume_parallel, in_netns, require_root, Node, Producer, Stream, Topology,
};

const PRODUCER_PORT: u16 = 7000;
const RANGE: &str = "5100-5199";
/// The bpffs the gateways pin to, mounted in the host's mount namespace.
const TEST_BPFFS: &str = "/run/scistream-tests/bpffs";

/// Mounts [`TEST_BPFFS`] (once per host; left mounted for the next run) and
/// points the s2cs started from now on at it.
fn shared_bpffs() {
    let path = std::path::Path::new(TEST_BPFFS);
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .expect("/proc/self/mounts")
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(TEST_BPFFS) && l.contains(" bpf "));
    if !mounted {
        std::fs::create_dir_all(path).expect("bpffs mount point");
        nix::mount::mount(
            Some("bpf"),
            path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting bpffs");
    }
    std::env::set_var("SCISTREAM_BPFFS", TEST_BPFFS);
}

/// The pin directory an xdp s2cs logged at start.
fn pin_dir_of(gw: &Gateway) -> std::path::PathBuf {
    let log = gw.daemon.log_contents();
    let line = log
        .lines()
        .find(|l| l.contains("xdp NAT attached"))
        .unwrap_or_else(|| panic!("no attach line:\n{log}"));
    let pins = line
        .split("pins=")
        .nth(1)
        .expect("pins= in the attach line");
    pins.split_whitespace().next().expect("a path").into()
}

struct Session {
    gin: Gateway,
    gout: Gateway,
    uid: String,
    listeners: Vec<SocketAddr>,
}

/// Both gateways on `xdp` with a session of `num_conn` connections to `producer`.
fn xdp_session(topo: &Topology, producer: SocketAddr, num_conn: usize) -> Session {
    xdp_session_with(topo, producer, num_conn, &[], &[])
}

/// [`xdp_session`] with more s2cs flags and more request flags (`--rate`).
fn xdp_session_with(
    topo: &Topology,
    producer: SocketAddr,
    num_conn: usize,
    s2cs_extra: &[&str],
    request_extra: &[&str],
) -> Session {
    shared_bpffs();
    let (gin_ip, gout_ip): (IpAddr, IpAddr) =
        (addr::INBOUND_GW_WAN.into(), addr::OUTBOUND_GW_LAN.into());
    let gin = Gateway::start(topo.ns(Node::InboundGw), gin_ip, RANGE, "xdp", s2cs_extra);
    let gout = Gateway::start(topo.ns(Node::OutboundGw), gout_ip, RANGE, "xdp", s2cs_extra);
    let (ip, port, n) = (
        producer.ip().to_string(),
        producer.port().to_string(),
        num_conn.to_string(),
    );
    let mut args = vec![
        "--remote_ip",
        &ip,
        "--receiver_ports",
        &port,
        "--num_conn",
        &n,
    ];
    args.extend_from_slice(request_extra);
    let inbound = gin.s2uc_json(topo.ns(Node::InboundGw), "inbound-request", &args);
    let joined = inbound
        .listeners
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--num_conn", &n];
    args.extend_from_slice(request_extra);
    args.extend([inbound.uid.as_str(), joined.as_str()]);
    let outbound = gout.s2uc_json(topo.ns(Node::OutboundGw), "outbound-request", &args);
    assert_eq!(outbound.listeners.len(), num_conn);
    for gw in [&gin, &gout] {
        let log = gw.daemon.log_contents();
        assert!(log.contains("backend xdp"), "{log}");
        assert!(
            log.contains("XDP guard not attached"),
            "the guard must yield the interfaces to the NAT:\n{log}"
        );
    }
    Session {
        gin,
        gout,
        uid: inbound.uid,
        listeners: outbound.listeners,
    }
}

/// The four namespaces with the veths as created: no ethtool tuning.
fn topology() -> Topology {
    Topology::new().expect("topology")
}

fn topology_with_mtu(mtu: u32) -> Topology {
    let topo = topology();
    topo.set_mtu(mtu).expect("MTU on the veths");
    topo
}

/// TCP connections this namespace's stack accepted so far (`PassiveOpens`).
fn passive_opens(ns: &str) -> u64 {
    // thread-self: /proc/net follows the process's main thread, not this one's namespace.
    let snmp = in_netns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .expect("/proc/thread-self/net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    let column = names
        .split_whitespace()
        .position(|n| n == "PassiveOpens")
        .expect("PassiveOpens column");
    values
        .split_whitespace()
        .nth(column)
        .and_then(|v| v.parse().ok())
        .expect("a number")
}

/// The NAT's attachments in `ns` as the kernel reports them, one line each:
/// `<iface> xdp` / `xdpgeneric` (from `ip link`) or `<iface> tc` (a tcx
/// program named tc_nat on ingress).
fn xdp_programs(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .expect("ip link");
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(iface) = line
            .split(": ")
            .nth(1)
            .map(|i| i.split('@').next().unwrap_or(i))
        else {
            continue;
        };
        for mode in ["xdp", "xdpgeneric", "xdpdrv", "xdpoffload"] {
            if line.split_whitespace().any(|w| w == mode) {
                found.push(format!("{iface} {mode}"));
            }
        }
        if !iface.starts_with("veth") {
            continue;
        }
        let tcx = in_netns(ns, || {
            aya::programs::SchedClassifier::query_tcx(iface, aya::programs::TcAttachType::Ingress)
        });
        if let Ok((_, programs)) = tcx {
            if programs.iter().any(|p| p.name_as_str() == Some("tc_nat")) {
                found.push(format!("{iface} tc"));
            }
        }
    }
    found.join("\n")
}

fn logs(s: &Session) -> String {
    format!(
        "inbound s2cs:\n{}\noutbound s2cs:\n{}",
        s.gin.daemon.log_contents(),
        s.gout.daemon.log_contents()
    )
}

#[test]
fn xdp_session_streams_64mib_each_way_on_four_connections_end_to_end() {
    const TEST: &str = "xdp_session_streams_64mib_each_way_on_four_connections_end_to_end";
    if !require_root(TEST) {
        return;
    }
    let (num_conn, bytes) = (4, 64 * MIB);
    let topo = topology();
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    let s = xdp_session(&topo, producer.addr(), num_conn);
    let gateways = [topo.ns(Node::OutboundGw), topo.ns(Node::InboundGw)];
    let opens_before: Vec<u64> = gateways.iter().map(|ns| passive_opens(ns)).collect();

    let transfers = consume_parallel(topo.ns(Node::Consumer), &s.listeners, bytes, 1)
        .unwrap_or_else(|e| panic!("transfer failed: {e:#}\n{}", logs(&s)));
    let seen = producer
        .wait_for(num_conn, Duration::from_secs(30))
        .expect("producer records");
    for t in &transfers {
        t.verify_with(&seen, bytes).expect("both directions intact");
        eprintln!(
            "{TEST}: {} -> {}: {:.2} Gbit/s both ways",
            t.local,
            t.peer,
            t.gbit_per_s()
        );
    }
    let opens_after: Vec<u64> = gateways.iter().map(|ns| passive_opens(ns)).collect();
    assert_eq!(
        opens_before,
        opens_after,
        "a gateway's TCP stack accepted a data connection: TCP was terminated\n{}",
        logs(&s)
    );
    let mut used: Vec<_> = transfers.iter().map(|t| t.peer).collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), num_conn, "each stream used its own listener");
}

/// A path with an echo producer and a one-connection xdp session to it.
fn echo_session() -> (Topology, Producer, Session) {
    let topo = topology();
    let bind = SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT);
    let echo = Producer::start_echo(topo.ns(Node::Producer), bind).expect("echo producer");
    let session = xdp_session(&topo, echo.addr(), 1);
    (topo, echo, session)
}

/// Writes `data` on `c` and reads the echo back (the socket's read timeout applies).
fn echo_round(c: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    c.write_all(data)?;
    let mut back = vec![0; data.len()];
    c.read_exact(&mut back)?;
    Ok(back)
}

#[test]
fn released_xdp_session_stops_translating_its_flows_while_another_goes_on() {
    const TEST: &str = "released_xdp_session_stops_translating_its_flows_while_another_goes_on";
    if !require_root(TEST) {
        return;
    }
    let (topo, echo, mut s) = echo_session();
    // A second session on the same gateways, to the same producer.
    let inbound = s.gin.inbound(topo.ns(Node::InboundGw), echo.addr(), 1);
    let other = s
        .gout
        .outbound(topo.ns(Node::OutboundGw), &inbound, 1)
        .listeners[0];
    let connect = |to: SocketAddr| {
        let c = in_netns(topo.ns(Node::Consumer), || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        });
        let c = c.unwrap_or_else(|e| panic!("connect to {to}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        c
    };
    let (mut c, mut d) = (connect(s.listeners[0]), connect(other));
    assert_eq!(
        echo_round(&mut c, b"before release").expect("echo while live"),
        b"before release"
    );
    assert_eq!(
        echo_round(&mut d, b"other session").expect("echo on the other session"),
        b"other session"
    );

    for (gw, ns) in [
        (&mut s.gout, topo.ns(Node::OutboundGw)),
        (&mut s.gin, topo.ns(Node::InboundGw)),
    ] {
        let out = gw.s2uc(ns, "release", &[&s.uid]);
        assert!(
            out.status.success(),
            "release: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        gw.daemon
            .wait_for_log("xdp session released", Duration::from_secs(5))
            .expect("release logged");
    }
    // The live connection's next bytes are not translated any more: they
    // never reach the producer, so no echo comes back.
    let after = echo_round(&mut c, b"after release");
    assert!(
        after.is_err(),
        "bytes crossed a released session: {after:?}\n{}",
        logs(&s)
    );
    // Nor does a new connection get through.
    let listener = s.listeners[0];
    let fresh = in_netns(topo.ns(Node::Consumer), || {
        TcpStream::connect_timeout(&listener, Duration::from_millis(500))
    });
    assert!(
        fresh.is_err(),
        "a new connection crossed a released session\n{}",
        logs(&s)
    );
    // The other session streams on.
    assert_eq!(
        echo_round(&mut d, b"still here").expect("echo after the other release"),
        b"still here"
    );
    assert_eq!(
        echo_round(&mut connect(other), b"new one").expect("new connection"),
        b"new one"
    );
}

#[test]
fn xdp_flows_without_a_known_neighbour_get_through_on_their_first_syn() {
    const TEST: &str = "xdp_flows_without_a_known_neighbour_get_through_on_their_first_syn";
    if !require_root(TEST) {
        return;
    }
    let (topo, _echo, s) = echo_session();
    // No neighbour on either gateway: bpf_fib_lookup cannot give a MAC. At tc
    // (these veths) bpf_redirect_neigh has the kernel resolve it and queue the
    // packet meanwhile; at XDP the program hands the translated frame to the
    // kernel's forwarding (a local source address: accept_local).
    for gw in [Node::OutboundGw, Node::InboundGw] {
        let out = Command::new("ip")
            .args(["-n", topo.ns(gw), "neigh", "flush", "all"])
            .output()
            .expect("ip neigh flush");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listener = s.listeners[0];
    // Well under the first SYN retransmission (1 s): the first SYN made it.
    let mut c = in_netns(topo.ns(Node::Consumer), || {
        TcpStream::connect_timeout(&listener, Duration::from_millis(800))
    })
    .unwrap_or_else(|e| {
        panic!(
            "connect through both gateways without neighbours: {e}\n{}",
            logs(&s)
        )
    });
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(
        echo_round(&mut c, b"via the kernel").expect("echo"),
        b"via the kernel"
    );
    assert!(
        s.gout.daemon.log_contents().contains("accept_local=1"),
        "{}",
        logs(&s)
    );
}

#[test]
fn xdp_clean_exit_leaves_nothing_and_a_killed_ones_program_is_removed_by_a_start_with_no_sessions()
{
    const TEST: &str = "xdp_clean_exit_leaves_nothing_and_a_killed_ones_program_is_removed_by_a_start_with_no_sessions";
    if !require_root(TEST) {
        return;
    }
    shared_bpffs();
    let topo = topology();
    let bytes = 4 * MIB;
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    let gw_ns = topo.ns(Node::InboundGw);
    let mut gin = Gateway::start(gw_ns, addr::INBOUND_GW_WAN.into(), RANGE, "xdp", &[]);
    let pins = pin_dir_of(&gin);
    let attached = xdp_programs(gw_ns);
    assert_eq!(
        attached.lines().count(),
        2,
        "the NAT on both of the gateway's veths:\n{attached}"
    );
    assert!(
        pins.join("link-veth-wan").exists(),
        "link pinned in {}",
        pins.display()
    );

    // SIGKILL: the pinned program stays attached, with its pins.
    gin.daemon.signal(Signal::SIGKILL).expect("signal");
    gin.daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits");
    assert_eq!(
        xdp_programs(gw_ns).lines().count(),
        2,
        "killed s2cs took its program along"
    );
    assert!(pins.exists());

    // A start without sessions to restore removes them and attaches afresh.
    gin.respawn(RANGE, "xdp", &[]);
    gin.daemon
        .wait_for_log("no xdp session to restore", Duration::from_secs(10))
        .expect("the earlier run's pins were removed");
    assert_eq!(xdp_programs(gw_ns).lines().count(), 2);

    // SIGTERM: nothing left, attached or pinned, and accept_local restored.
    gin.daemon.signal(Signal::SIGTERM).expect("signal");
    gin.daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits");
    let accept_local = in_netns(gw_ns, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/veth-wan/accept_local")
    })
    .expect("sysctl");
    assert_eq!(
        accept_local.trim(),
        "0",
        "accept_local not restored at exit"
    );
    let left = xdp_programs(gw_ns);
    assert!(
        left.is_empty(),
        "XDP program left after SIGTERM:\n{left}\n{}",
        gin.daemon.log_contents()
    );
    assert!(!pins.exists(), "pins left in {}", pins.display());
    drop(gin);

    // A fresh pair of gateways carries a session as before.
    let s = xdp_session(&topo, producer.addr(), 1);
    let transfers = consume_parallel(topo.ns(Node::Consumer), &s.listeners, bytes, 7)
        .unwrap_or_else(|e| panic!("transfer failed: {e:#}\n{}", logs(&s)));
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("producer records");
    transfers[0]
        .verify_with(&seen, bytes)
        .expect("intact after restart");
}

#[test]
fn xdp_stream_goes_on_while_both_gateways_s2cs_are_sigkilled_and_restarted() {
    const TEST: &str = "xdp_stream_goes_on_while_both_gateways_s2cs_are_sigkilled_and_restarted";
    if !require_root(TEST) {
        return;
    }
    let (topo, _echo, mut s) = echo_session();
    let stream = Stream::start(topo.ns(Node::Consumer), s.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    let pins = [pin_dir_of(&s.gin), pin_dir_of(&s.gout)];

    for gw in [&mut s.gin, &mut s.gout] {
        gw.daemon.signal(Signal::SIGKILL).expect("signal");
        gw.daemon
            .wait_exit(Duration::from_secs(10))
            .expect("s2cs exits");
    }
    // No s2cs runs on either gateway: the pinned programs translate on.
    stream.assert_progress(Duration::from_secs(2));
    stream.assert_progress(Duration::from_secs(2));

    for gw in [&mut s.gin, &mut s.gout] {
        gw.respawn(RANGE, "xdp", &[]);
        gw.daemon
            .wait_for_log("restored 1 stored sessions", Duration::from_secs(10))
            .expect("session restored");
        let line = gw.daemon.log_contents();
        assert!(line.contains("adopted the pinned xdp NAT"), "{line}");
    }
    for (ns, pins) in [topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw)]
        .into_iter()
        .zip(&pins)
    {
        assert_eq!(
            xdp_programs(ns).lines().count(),
            2,
            "one program per veth, not two"
        );
        assert!(pins.exists());
    }
    stream.assert_progress(Duration::from_secs(5));
    // New connections go through the restored session as well.
    let listener = s.listeners[0];
    let mut fresh = in_netns(topo.ns(Node::Consumer), || {
        TcpStream::connect_timeout(&listener, Duration::from_secs(2))
    })
    .unwrap_or_else(|e| panic!("new connection after the restart: {e}\n{}", logs(&s)));
    fresh
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(
        echo_round(&mut fresh, b"after restart").expect("echo"),
        b"after restart"
    );
    drop(fresh);
    // Every byte sent before, during and after came back verified, no reset.
    let summary = stream
        .finish()
        .unwrap_or_else(|e| panic!("stream across the restart: {e:#}\n{}", logs(&s)));
    eprintln!(
        "{TEST}: {} bytes echoed intact over {:?} across the kills",
        summary.echoed_bytes, summary.elapsed
    );
    // Clean stop: nothing attached, nothing pinned.
    for gw in [&mut s.gin, &mut s.gout] {
        gw.daemon.signal(Signal::SIGTERM).expect("signal");
        gw.daemon
            .wait_exit(Duration::from_secs(10))
            .expect("s2cs exits");
    }
    for (ns, pins) in [topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw)]
        .into_iter()
        .zip(&pins)
    {
        assert!(
            xdp_programs(ns).is_empty(),
            "program left after SIGTERM in {ns}"
        );
        assert!(!pins.exists(), "pins left in {}", pins.display());
    }
}

#[test]
fn xdp_refuses_to_start_without_root_with_a_one_line_reason_while_splice_starts() {
    const TEST: &str =
        "xdp_refuses_to_start_without_root_with_a_one_line_reason_while_splice_starts";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().expect("topology");
    let ns = topo.ns(Node::InboundGw);
    // An unprivileged user needs a binary and a state directory it can reach.
    let dir = TempDir(std::env::temp_dir().join(format!("ss-xdp-noroot-{}", std::process::id())));
    std::fs::create_dir_all(dir.path()).expect("temp dir");
    let s2cs = dir.path().join("s2cs");
    std::fs::copy(testbed::bin("s2cs"), &s2cs).expect("copy s2cs");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    for path in [dir.path(), state.as_path()] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
    }
    let as_nobody = |backend: &str| {
        let mut cmd = testbed::process::netns_command(ns, "setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&s2cs);
        cmd.args([
            "--listener_ip",
            &addr::INBOUND_GW_WAN.to_string(),
            "--port_range",
            RANGE,
            "--type",
            backend,
        ]);
        cmd.args(["--ssl", "false", "--state_dir"]).arg(&state);
        cmd
    };
    let out = testbed::process::run_command(as_nobody("xdp"), Duration::from_secs(20))
        .expect("running s2cs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "xdp started without root:\n{stderr}");
    let reason: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("backend xdp cannot run here"))
        .collect();
    assert_eq!(reason.len(), 1, "one line with the reason:\n{stderr}");
    assert!(reason[0].contains("needs root"), "{}", reason[0]);
    assert!(
        xdp_programs(ns).is_empty(),
        "a refused start attached a program"
    );

    let mut splice = testbed::Daemon::spawn(as_nobody("splice")).expect("spawn splice");
    let control = SocketAddr::new(addr::INBOUND_GW_WAN.into(), common::CONTROL_PORT);
    testbed::wait_for_tcp(ns, control, Duration::from_secs(20)).unwrap_or_else(|e| {
        panic!(
            "splice did not start without root: {e:#}\n{}",
            splice.log_contents()
        )
    });
    assert!(splice.is_running());
}

/// A directory removed on drop, also when the test fails.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 80 Mbit/s, as the other backends' rate tests use.
const RATE_KBPS: u64 = 80_000;

#[test]
fn xdp_enforced_rate_holds_a_session_within_10_percent_of_its_rate() {
    const TEST: &str = "xdp_enforced_rate_holds_a_session_within_10_percent_of_its_rate";
    if !require_root(TEST) {
        return;
    }
    let topo = topology();
    let bytes = 24 * MIB;
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    let rate = RATE_KBPS.to_string();
    let s = xdp_session_with(
        &topo,
        producer.addr(),
        1,
        &["--enforce_rate"],
        &["--rate", &rate],
    );
    let t = consume(topo.ns(Node::Consumer), s.listeners[0], bytes, 1)
        .unwrap_or_else(|e| panic!("transfer: {e:#}\n{}", logs(&s)));
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("producer record");
    t.verify_with(&seen, bytes).expect("every byte intact");
    let got = t.received_bytes as f64 * 8.0 / t.elapsed.as_secs_f64() / 1e6;
    let want = RATE_KBPS as f64 / 1000.0;
    eprintln!(
        "{TEST}: {got:.1} Mbit/s from the producer with rate {want} Mbit/s ({:?} for {} bytes each way)",
        t.elapsed, t.received_bytes
    );
    assert!(
        (got - want).abs() <= want * 0.10,
        "{got:.1} Mbit/s is not within 10 % of the session's {want} Mbit/s\n{}",
        logs(&s)
    );
}

/// The session's `connections_active` as `s2uc status --json` reports it.
fn connections_active(gw: &Gateway, uid: &str) -> u64 {
    let out = gw.s2uc(&gw.ns, "status", &[uid, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    v["connections_active"]
        .as_u64()
        .expect("connections_active")
}

/// Polls until `connections_active` is `want` (the figure is at most 1 s old).
fn wait_for_active(gw: &Gateway, uid: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = connections_active(gw, uid);
        if now == want || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn xdp_reports_open_connections_from_its_flows_and_nat_drops_in_metrics() {
    const TEST: &str = "xdp_reports_open_connections_from_its_flows_and_nat_drops_in_metrics";
    if !require_root(TEST) {
        return;
    }
    let topo = topology();
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
    )
    .expect("echo producer");
    let s = xdp_session_with(
        &topo,
        echo.addr(),
        2,
        &["--metrics_addr", "0.0.0.0:9100"],
        &[],
    );
    assert_eq!(connections_active(&s.gout, &s.uid), 0, "no connection yet");
    let connect = |to: SocketAddr| {
        let mut c = in_netns(topo.ns(Node::Consumer), || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        assert_eq!(echo_round(&mut c, b"ping").expect("echo"), b"ping");
        c
    };
    let (mut first, second) = (connect(s.listeners[0]), connect(s.listeners[1]));
    let third = connect(s.listeners[1]);
    for gw in [&s.gout, &s.gin] {
        assert_eq!(
            wait_for_active(gw, &s.uid, 3),
            3,
            "three open connections\n{}",
            logs(&s)
        );
    }
    // A FIN each way closes the first; a reset the third (linger 0).
    first
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut rest = Vec::new();
    first
        .read_to_end(&mut rest)
        .expect("the echo server closes too");
    nix::sys::socket::setsockopt(
        &third,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("SO_LINGER");
    drop(third);
    for gw in [&s.gout, &s.gin] {
        assert_eq!(
            wait_for_active(gw, &s.uid, 1),
            1,
            "closed connections still counted\n{}",
            logs(&s)
        );
    }
    drop(second);

    // A SYN to a data port no session holds is dropped at the driver and counted.
    let unused = SocketAddr::new(addr::OUTBOUND_GW_LAN.into(), 5150);
    let refused = in_netns(topo.ns(Node::Consumer), || {
        TcpStream::connect_timeout(&unused, Duration::from_millis(300))
    });
    assert!(refused.is_err(), "a connection to an unused data port");
    let metrics = SocketAddr::new(addr::OUTBOUND_GW_LAN.into(), 9100);
    let page = common::http_get(topo.ns(Node::OutboundGw), metrics, "/metrics");
    let dropped: u64 = page
        .lines()
        .find(|l| l.starts_with("scistream_xdp_nat_dropped_packets_total{reason=\"not_allowed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no NAT drop counter:\n{page}"));
    assert!(dropped >= 1, "the SYN was not counted:\n{page}");
    assert!(
        page.contains("scistream_xdp_nat_dropped_packets_total{reason=\"over_rate\"} 0"),
        "{page}"
    );
    for iface in ["veth-clan", "veth-wan"] {
        let series =
            format!("scistream_ebpf_attached{{program=\"nat\",iface=\"{iface}\",hook=\"tc\"}} 1");
        assert!(page.contains(&series), "no {series}:\n{page}");
    }
}

/// One echo round on a fresh connection through `listener`.
fn fresh_echo(topo: &Topology, listener: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = in_netns(topo.ns(Node::Consumer), || {
        TcpStream::connect_timeout(&listener, Duration::from_secs(2))
    })?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    echo_round(&mut c, data)
}

#[test]
fn xdp_stop_with_keep_sessions_leaves_the_nat_pinned_for_the_next_start_to_adopt() {
    const TEST: &str =
        "xdp_stop_with_keep_sessions_leaves_the_nat_pinned_for_the_next_start_to_adopt";
    if !require_root(TEST) {
        return;
    }
    let topo = topology();
    let bind = SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT);
    let echo = Producer::start_echo(topo.ns(Node::Producer), bind).expect("echo producer");
    let mut s = xdp_session_with(&topo, echo.addr(), 1, &["--keep_sessions"], &[]);
    let listener = s.listeners[0];
    assert_eq!(
        fresh_echo(&topo, listener, b"before").expect("echo"),
        b"before"
    );
    let gw_ns = topo.ns(Node::InboundGw);
    let pins = pin_dir_of(&s.gin);

    // SIGTERM with --keep_sessions: the session is stored, the NAT stays
    // attached and pinned (guarding the range) for the next start.
    s.gin.daemon.signal(Signal::SIGTERM).expect("signal");
    s.gin
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits");
    assert_eq!(
        xdp_programs(gw_ns).lines().count(),
        2,
        "--keep_sessions must leave the NAT attached:\n{}",
        s.gin.daemon.log_contents()
    );
    assert!(pins.exists(), "pins gone after a --keep_sessions stop");

    // The next start restores the session into the adopted NAT.
    s.gin.respawn(RANGE, "xdp", &["--keep_sessions"]);
    s.gin
        .daemon
        .wait_for_log("restored 1 stored sessions", Duration::from_secs(10))
        .expect("session restored");
    let log = s.gin.daemon.log_contents();
    assert!(log.contains("adopted the pinned xdp NAT"), "{log}");
    assert_eq!(
        xdp_programs(gw_ns).lines().count(),
        2,
        "one program per veth, not two"
    );
    assert_eq!(
        fresh_echo(&topo, listener, b"after").unwrap_or_else(|e| panic!("{e}\n{}", logs(&s))),
        b"after"
    );

    // A start without --keep_sessions and a SIGTERM then leave nothing.
    s.gin.daemon.signal(Signal::SIGTERM).expect("signal");
    s.gin
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits");
    s.gin.respawn(RANGE, "xdp", &[]);
    s.gin
        .daemon
        .wait_for_log("restored 1 stored sessions", Duration::from_secs(10))
        .expect("session restored");
    s.gin.daemon.signal(Signal::SIGTERM).expect("signal");
    s.gin
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits");
    let left = xdp_programs(gw_ns);
    assert!(left.is_empty(), "XDP program left after SIGTERM:\n{left}");
    assert!(!pins.exists(), "pins left in {}", pins.display());
}

/// Asserts that both gateways hold the NAT at tc on both veths (asked of the
/// kernel) and that nothing runs in generic XDP; their logs say so too.
fn assert_nat_at_tc(topo: &Topology, s: &Session) {
    for gw in [Node::OutboundGw, Node::InboundGw] {
        let found = xdp_programs(topo.ns(gw));
        let mut lines: Vec<&str> = found.lines().collect();
        lines.sort();
        let lan = if gw == Node::InboundGw {
            "veth-plan tc"
        } else {
            "veth-clan tc"
        };
        let mut want = vec![lan, "veth-wan tc"];
        want.sort();
        assert_eq!(
            lines,
            want,
            "{gw:?}: the NAT at tc on both veths, nothing else\n{}",
            logs(s)
        );
    }
    for gw in [&s.gin, &s.gout] {
        let log = gw.daemon.log_contents();
        let line = log
            .lines()
            .find(|l| l.contains("xdp NAT attached"))
            .expect("attach line");
        assert!(line.contains("veth-wan:tc"), "{line}");
    }
}

/// 64 MiB each way (consumer -> producer and back, at once) on two
/// connections through `xdp` at `mtu`, veths as created.
fn streams_64mib_each_way_at_mtu(test: &str, mtu: u32) {
    if !require_root(test) {
        return;
    }
    let (num_conn, bytes) = (2, 64 * MIB);
    let topo = topology_with_mtu(mtu);
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    let s = xdp_session(&topo, producer.addr(), num_conn);
    assert_nat_at_tc(&topo, &s);
    let gateways = [topo.ns(Node::OutboundGw), topo.ns(Node::InboundGw)];
    let opens_before: Vec<u64> = gateways.iter().map(|ns| passive_opens(ns)).collect();
    let transfers = consume_parallel(topo.ns(Node::Consumer), &s.listeners, bytes, 3)
        .unwrap_or_else(|e| panic!("transfer failed: {e:#}\n{}", logs(&s)));
    let seen = producer
        .wait_for(num_conn, Duration::from_secs(30))
        .expect("producer records");
    for t in &transfers {
        t.verify_with(&seen, bytes)
            .expect("SHA-256 equal both ways");
        eprintln!("{test}: MTU {mtu}: {:.2} Gbit/s both ways", t.gbit_per_s());
    }
    let opens_after: Vec<u64> = gateways.iter().map(|ns| passive_opens(ns)).collect();
    assert_eq!(
        opens_before,
        opens_after,
        "TCP was terminated at a gateway\n{}",
        logs(&s)
    );
}

#[test]
fn xdp_nat_at_tc_streams_64mib_each_way_at_mtu_9000_with_default_veth_settings() {
    streams_64mib_each_way_at_mtu(
        "xdp_nat_at_tc_streams_64mib_each_way_at_mtu_9000_with_default_veth_settings",
        9000,
    );
}

#[test]
fn xdp_nat_at_tc_streams_64mib_each_way_at_mtu_1500_with_default_veth_settings() {
    streams_64mib_each_way_at_mtu(
        "xdp_nat_at_tc_streams_64mib_each_way_at_mtu_1500_with_default_veth_settings",
        1500,
    );
}

/// Entries in a gateway's pinned flow map, read from the kernel.
fn flow_entries(gw: &Gateway) -> usize {
    let path = pin_dir_of(gw).join("NAT_FLOWS");
    let data = aya::maps::MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let flows: aya::maps::HashMap<_, [u8; 16], [u8; 24]> = aya::maps::Map::LruHashMap(data)
        .try_into()
        .expect("the flow map");
    flows.keys().filter(|k| k.is_ok()).count()
}

#[test]
fn xdp_session_takes_20000_sequential_connections_at_mtu_9000_and_frees_every_flow() {
    const TEST: &str =
        "xdp_session_takes_20000_sequential_connections_at_mtu_9000_and_frees_every_flow";
    if !require_root(TEST) {
        return;
    }
    const CONNECTIONS: usize = 20_000;
    let topo = topology_with_mtu(9000);
    let bind = SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT);
    let _echo = Producer::start_echo(topo.ns(Node::Producer), bind).expect("echo producer");
    let s = xdp_session(&topo, bind, 1);
    let listener = s.listeners[0];
    let started = std::time::Instant::now();
    let result = in_netns(topo.ns(Node::Consumer), || -> std::io::Result<usize> {
        // First: large writes on a jumbo path, so segments bigger than a
        // page cross both NATs each way.
        let mut c = TcpStream::connect_timeout(&listener, Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mss = nix::sys::socket::getsockopt(&c, nix::sys::socket::sockopt::TcpMaxSeg)
            .map_err(std::io::Error::from)?;
        assert!(mss > 4096, "MSS {mss}: the path is not jumbo");
        let big: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
        assert!(echo_round(&mut c, &big)? == big, "1 MiB echo differs");
        drop(c);
        for i in 0..CONNECTIONS {
            let mut c = TcpStream::connect_timeout(&listener, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let data = format!("connection {i:05}");
            if echo_round(&mut c, data.as_bytes())? != data.as_bytes() {
                return Err(std::io::Error::other(format!(
                    "connection {i}: echo differs"
                )));
            }
        }
        Ok(CONNECTIONS)
    });
    let done =
        result.unwrap_or_else(|e| panic!("after {:?}: {e}\n{}", started.elapsed(), logs(&s)));
    eprintln!("{TEST}: {done} connections in {:?}", started.elapsed());
    // Every flow ended (FIN each way): the sweeper frees them within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = [flow_entries(&s.gout), flow_entries(&s.gin)];
        if left == [0, 0] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flow entries left: {left:?}\n{}",
            logs(&s)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
