//! The guard, run in the kernel: hand-made frames through
//! BPF_PROG_TEST_RUN, and one attachment to a real veth with real traffic.
//! The decision tests run at XDP here; `hooks` runs them again at tc and on
//! XDP frames whose headers lie outside the first buffer.
//!
//! They need root and BPF. With CI=true they must run and fail otherwise;
//! elsewhere they skip with one line on stderr.

use crate::error_chain;
use std::{
    fs::File,
    net::UdpSocket,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use super::{Counters, DropReason, EbpfError, Guard, Hook, PeerNet, Verdict};
use scistream_common::guard::PortCounters;

const RANGE: (u16, u16) = (5100, 5200);
const ALLOWED: u16 = 5101;
const NOT_ALLOWED: u16 = 5150;
const OUTSIDE: u16 = 22;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips (outside CI) or fails (in CI) a test that cannot run here.
fn cannot_run(why: &str) -> Option<Guard> {
    assert!(!in_ci(), "CI=true but this eBPF test cannot run: {why}");
    eprintln!("skipping eBPF test: {why}");
    None
}

fn load_guard() -> Option<Guard> {
    if !nix::unistd::geteuid().is_root() {
        return cannot_run("needs root");
    }
    match Guard::load() {
        Ok(guard) => Some(guard),
        Err(e) => cannot_run(&error_chain(&e)),
    }
}

/// A loaded guard on the test range with [`ALLOWED`] allowed, or skip.
macro_rules! guard_on_range_or_skip {
    () => {{
        let Some(mut guard) = load_guard() else {
            return;
        };
        guard.set_port_range(RANGE.0, RANGE.1).unwrap();
        guard.allow_port(ALLOWED, 1).unwrap();
        guard
    }};
}

// --- Frames. Addresses are documentation ranges; checksums are left zero
// because XDP runs before anything verifies them.

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const TCP: u8 = 6;
const UDP: u8 = 17;

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn vlan(vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut tagged = vid.to_be_bytes().to_vec();
    tagged.extend_from_slice(&ethertype.to_be_bytes());
    tagged.extend_from_slice(payload);
    ethernet(ETH_P_8021Q, &tagged)
}

/// Source of the frames unless a test says otherwise.
const SRC4: [u8; 4] = [192, 0, 2, 2];
const SRC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// `fragment` is the 16-bit flags + fragment offset field.
fn ipv4_with(protocol: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
    ipv4_full(SRC4, protocol, fragment, l4)
}

fn ipv4_full(src: [u8; 4], protocol: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&fragment.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&[192, 0, 2, 1]);
    p.extend_from_slice(l4);
    p
}

fn ipv4(protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_with(protocol, 0, l4)
}

fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_from(SRC6, next_header, payload)
}

fn ipv6_from(src: [u8; 16], next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    let mut dst = SRC6;
    dst[15] = 1;
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 extension header of 8 bytes (hop-by-hop, destination options,
/// routing) in front of `rest`.
fn ipv6_ext(next_header: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![next_header, 0, 1, 4, 0, 0, 0, 0]; // PadN fills it
    p.extend_from_slice(rest);
    p
}

fn tcp(dport: u16) -> Vec<u8> {
    let mut h = 40000u16.to_be_bytes().to_vec();
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

fn udp(dport: u16) -> Vec<u8> {
    let payload = b"scistream";
    let mut h = 40000u16.to_be_bytes().to_vec();
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

fn tcp4(dport: u16) -> Vec<u8> {
    ethernet(ETH_P_IP, &ipv4(TCP, &tcp(dport)))
}

fn tcp6(dport: u16) -> Vec<u8> {
    ethernet(ETH_P_IPV6, &ipv6(TCP, &tcp(dport)))
}

fn udp4(dport: u16) -> Vec<u8> {
    ethernet(ETH_P_IP, &ipv4(UDP, &udp(dport)))
}

fn udp6(dport: u16) -> Vec<u8> {
    ethernet(ETH_P_IPV6, &ipv6(UDP, &udp(dport)))
}

fn counted(frames: &[&[u8]]) -> Counters {
    Counters {
        packets: frames.len() as u64,
        bytes: frames.iter().map(|f| f.len() as u64).sum(),
    }
}

/// How [`run`] hands a frame to the guard; set per test thread by `hooks`.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// The XDP program, frame in one buffer.
    Xdp,
    /// The XDP program, only the Ethernet header in the first buffer and
    /// the rest in fragments: every later header goes through the helper.
    XdpHeadersInFragments,
    /// The tc program. (Kernel 6.18's test run builds linear skbs only:
    /// it refuses a linear size in the context, so the tc program's path for
    /// headers outside the linear part cannot be run here.)
    Skb,
}

thread_local! {
    static SHAPE: std::cell::Cell<Shape> = const { std::cell::Cell::new(Shape::Xdp) };
}

const ETH_HLEN: u32 = 14;

fn run(guard: &Guard, frame: &[u8]) -> Verdict {
    let first = ETH_HLEN.min(frame.len() as u32);
    let verdict = match SHAPE.get() {
        Shape::Xdp => guard.run_on_frame(frame),
        Shape::XdpHeadersInFragments => guard.run_on_multibuffer_frame(frame, first),
        Shape::Skb => guard.run_on_skb(frame, None),
    };
    verdict.unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN as {:?}: {}",
            SHAPE.get(),
            error_chain(&e)
        )
    })
}

// --- Decisions.

#[test]
fn allowed_port_passes_and_is_counted() {
    let guard = guard_on_range_or_skip!();
    let frame = tcp4(ALLOWED);
    assert_eq!(run(&guard, &frame), Verdict::Pass);
    assert_eq!(run(&guard, &frame), Verdict::Pass);
    assert_eq!(
        guard.port_stats(ALLOWED).unwrap(),
        Some(counted(&[&frame, &frame]))
    );
    assert_eq!(guard.dropped().unwrap(), Counters::ZERO);
}

#[test]
fn port_in_range_not_allowed_is_dropped_and_counted() {
    let guard = guard_on_range_or_skip!();
    let frame = tcp4(NOT_ALLOWED);
    assert_eq!(run(&guard, &frame), Verdict::Drop);
    assert_eq!(
        guard.dropped_for(DropReason::NotAllowed).unwrap(),
        counted(&[&frame])
    );
    assert_eq!(guard.dropped().unwrap(), counted(&[&frame]));
    assert_eq!(guard.port_stats(NOT_ALLOWED).unwrap(), None);
    assert_eq!(guard.port_stats(ALLOWED).unwrap(), Some(Counters::ZERO));
}

#[test]
fn range_bounds_are_guarded_and_ports_outside_pass() {
    let guard = guard_on_range_or_skip!();
    for port in [OUTSIDE, RANGE.0 - 1, RANGE.1 + 1, 65535] {
        assert_eq!(run(&guard, &tcp4(port)), Verdict::Pass, "port {port}");
    }
    assert_eq!(guard.dropped().unwrap(), Counters::ZERO);
    for port in [RANGE.0, RANGE.1] {
        assert_eq!(run(&guard, &tcp4(port)), Verdict::Drop, "port {port}");
    }
    assert_eq!(guard.dropped().unwrap().packets, 2);
}

#[test]
fn ipv6_is_guarded_like_ipv4() {
    let guard = guard_on_range_or_skip!();
    let allowed = tcp6(ALLOWED);
    let denied = tcp6(NOT_ALLOWED);
    assert_eq!(run(&guard, &allowed), Verdict::Pass);
    assert_eq!(run(&guard, &denied), Verdict::Drop);
    assert_eq!(run(&guard, &tcp6(OUTSIDE)), Verdict::Pass);
    assert_eq!(
        guard.port_stats(ALLOWED).unwrap(),
        Some(counted(&[&allowed]))
    );
    assert_eq!(
        guard.dropped_for(DropReason::NotAllowed).unwrap(),
        counted(&[&denied])
    );
}

#[test]
fn udp_is_guarded_like_tcp() {
    let guard = guard_on_range_or_skip!();
    let (allowed4, allowed6) = (udp4(ALLOWED), udp6(ALLOWED));
    let (denied4, denied6) = (udp4(NOT_ALLOWED), udp6(NOT_ALLOWED));
    assert_eq!(run(&guard, &allowed4), Verdict::Pass);
    assert_eq!(run(&guard, &allowed6), Verdict::Pass);
    assert_eq!(run(&guard, &denied4), Verdict::Drop);
    assert_eq!(run(&guard, &denied6), Verdict::Drop);
    assert_eq!(run(&guard, &udp4(OUTSIDE)), Verdict::Pass);
    assert_eq!(
        guard.port_stats(ALLOWED).unwrap(),
        Some(counted(&[&allowed4, &allowed6]))
    );
    assert_eq!(guard.dropped().unwrap(), counted(&[&denied4, &denied6]));
}

#[test]
fn truncated_tcp_header_to_data_range_is_dropped() {
    let guard = guard_on_range_or_skip!();
    // Cut inside the destination port: the port cannot be known.
    let no_port = ethernet(ETH_P_IP, &ipv4(TCP, &tcp(ALLOWED)[..3]));
    // Port readable and allowed, but no full TCP header behind it.
    let short_allowed = ethernet(ETH_P_IP, &ipv4(TCP, &tcp(ALLOWED)[..10]));
    let short_allowed6 = ethernet(ETH_P_IPV6, &ipv6(TCP, &tcp(ALLOWED)[..10]));
    for frame in [&no_port, &short_allowed, &short_allowed6] {
        assert_eq!(run(&guard, frame), Verdict::Drop);
    }
    assert_eq!(
        guard.dropped_for(DropReason::Malformed).unwrap(),
        counted(&[&no_port, &short_allowed, &short_allowed6])
    );
    assert_eq!(guard.port_stats(ALLOWED).unwrap(), Some(Counters::ZERO));
    // A short header to a port outside the range is not the guard's business.
    let short_outside = ethernet(ETH_P_IP, &ipv4(TCP, &tcp(OUTSIDE)[..10]));
    assert_eq!(run(&guard, &short_outside), Verdict::Pass);
}

/// XDP only: the kernel's test run refuses (EINVAL) to build an skb whose
/// IPv4 header is cut short, so the tc program cannot be run on one here;
/// it shares the header walk that decides this.
#[test]
fn truncated_ipv4_header_is_dropped() {
    let guard = guard_on_range_or_skip!();
    let short_ip = ethernet(ETH_P_IP, &ipv4(TCP, &tcp(ALLOWED))[..12]);
    assert_eq!(run(&guard, &short_ip), Verdict::Drop);
    assert_eq!(
        guard.dropped_for(DropReason::Malformed).unwrap(),
        counted(&[&short_ip])
    );
}

#[test]
fn non_ip_frames_pass() {
    let guard = guard_on_range_or_skip!();
    assert_eq!(run(&guard, &ethernet(ETH_P_ARP, &[0u8; 28])), Verdict::Pass);
    assert_eq!(run(&guard, &ethernet(0x88cc, &[])), Verdict::Pass); // LLDP, header only
                                                                    // IP but neither TCP nor UDP (ICMP echo), into the range's numbers.
    let icmp = ipv4(1, &[8, 0, 0, 0, 0x13, 0xce, 0, 1]);
    assert_eq!(run(&guard, &ethernet(ETH_P_IP, &icmp)), Verdict::Pass);
    assert_eq!(guard.dropped().unwrap(), Counters::ZERO);
}

#[test]
fn zero_range_disables_the_guard() {
    let Some(mut guard) = load_guard() else {
        return;
    };
    assert_eq!(
        guard.port_range().unwrap(),
        None,
        "a fresh guard starts disabled"
    );
    assert_eq!(run(&guard, &tcp4(NOT_ALLOWED)), Verdict::Pass);
    guard.set_port_range(RANGE.0, RANGE.1).unwrap();
    assert_eq!(guard.port_range().unwrap(), Some(RANGE));
    assert_eq!(run(&guard, &tcp4(NOT_ALLOWED)), Verdict::Drop);
    guard.set_port_range(0, 0).unwrap();
    assert_eq!(run(&guard, &tcp4(NOT_ALLOWED)), Verdict::Pass);
    assert_eq!(
        run(&guard, &ethernet(ETH_P_IP, &ipv4(TCP, &[0x9c]))),
        Verdict::Pass
    );
}

#[test]
fn invalid_port_ranges_are_rejected() {
    let Some(mut guard) = load_guard() else {
        return;
    };
    for (lo, hi) in [(0, 10), (200, 100)] {
        assert!(matches!(
            guard.set_port_range(lo, hi),
            Err(EbpfError::InvalidPortRange { .. })
        ));
    }
    assert_eq!(guard.port_range().unwrap(), None);
}

#[test]
fn denied_port_drops_again_and_hands_back_final_counts() {
    let Some(mut guard) = load_guard() else {
        return;
    };
    guard.set_port_range(RANGE.0, RANGE.1).unwrap();
    guard.allow_port(ALLOWED, 7).unwrap();
    let frame = udp4(ALLOWED);
    assert_eq!(run(&guard, &frame), Verdict::Pass);
    guard.allow_port(ALLOWED, 7).unwrap(); // same session again: counts stay
    assert_eq!(guard.deny_port(ALLOWED).unwrap(), counted(&[&frame]));
    assert_eq!(guard.port_stats(ALLOWED).unwrap(), None);
    assert_eq!(run(&guard, &frame), Verdict::Drop);
    assert_eq!(
        guard.deny_port(ALLOWED).unwrap(),
        Counters::ZERO,
        "deny is idempotent"
    );
    // The port handed to a new session starts from zero.
    guard.allow_port(ALLOWED, 8).unwrap();
    assert_eq!(guard.port_stats(ALLOWED).unwrap(), Some(Counters::ZERO));
    assert_eq!(run(&guard, &frame), Verdict::Pass);
}

#[test]
fn vlan_tagged_traffic_is_guarded() {
    let guard = guard_on_range_or_skip!();
    let ip = ipv4(TCP, &tcp(NOT_ALLOWED));
    assert_eq!(run(&guard, &vlan(100, ETH_P_IP, &ip)), Verdict::Drop);
    let allowed = vlan(100, ETH_P_IP, &ipv4(TCP, &tcp(ALLOWED)));
    assert_eq!(run(&guard, &allowed), Verdict::Pass);
    // Three tags: the payload is out of sight, so it cannot pass the range.
    let inner = [
        &[0, 200][..],
        &ETH_P_8021Q.to_be_bytes(),
        &[1, 44],
        &ETH_P_IP.to_be_bytes(),
        &ip,
    ]
    .concat();
    assert_eq!(run(&guard, &vlan(100, ETH_P_8021Q, &inner)), Verdict::Drop);
    assert_eq!(guard.dropped_for(DropReason::Malformed).unwrap().packets, 1);
}

#[test]
fn only_first_fragments_carry_ports_and_are_checked() {
    let guard = guard_on_range_or_skip!();
    const MORE_FRAGMENTS: u16 = 0x2000;
    let first = ethernet(ETH_P_IP, &ipv4_with(UDP, MORE_FRAGMENTS, &udp(NOT_ALLOWED)));
    assert_eq!(run(&guard, &first), Verdict::Drop);
    // Offset 185 * 8 bytes: payload bytes, no header; passes (see the program's
    // doc for why this is safe).
    let tail = ethernet(ETH_P_IP, &ipv4_with(UDP, 185, &[0x13, 0xce, 0x13, 0xce]));
    assert_eq!(run(&guard, &tail), Verdict::Pass);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let guard = guard_on_range_or_skip!();
    const HOP_BY_HOP: u8 = 0;
    const DEST_OPTS: u8 = 60;
    let behind_ext = |port| ethernet(ETH_P_IPV6, &ipv6(HOP_BY_HOP, &ipv6_ext(TCP, &tcp(port))));
    assert_eq!(run(&guard, &behind_ext(NOT_ALLOWED)), Verdict::Drop);
    assert_eq!(run(&guard, &behind_ext(ALLOWED)), Verdict::Pass);
    // A chain longer than the program walks cannot be ruled out: dropped.
    let mut payload = ipv6_ext(TCP, &tcp(OUTSIDE));
    for _ in 0..8 {
        payload = ipv6_ext(DEST_OPTS, &payload);
    }
    assert_eq!(
        run(&guard, &ethernet(ETH_P_IPV6, &ipv6(DEST_OPTS, &payload))),
        Verdict::Drop
    );
    assert_eq!(guard.dropped_for(DropReason::Malformed).unwrap().packets, 1);
}

// --- Peer-restricted sessions.

const RESTRICTED: u16 = 5102;
const TAG: u32 = 2;

fn net(s: &str) -> PeerNet {
    s.parse().expect("test network")
}

fn tcp4_from(src: [u8; 4], dport: u16) -> Vec<u8> {
    ethernet(ETH_P_IP, &ipv4_full(src, TCP, 0, &tcp(dport)))
}

fn tcp6_from(src: [u8; 16], dport: u16) -> Vec<u8> {
    ethernet(ETH_P_IPV6, &ipv6_from(src, TCP, &tcp(dport)))
}

fn port_counters(guard: &Guard, port: u16) -> PortCounters {
    guard.port_counters(port).unwrap().expect("port allowed")
}

#[test]
fn restricted_port_drops_other_sources_and_counts_them_on_the_port() {
    let mut guard = guard_on_range_or_skip!();
    guard.allow_peer(TAG, &net("192.0.2.2")).unwrap();
    guard.allow_port_from_peers(RESTRICTED, TAG).unwrap();
    let peer = tcp4_from(SRC4, RESTRICTED);
    let stranger = tcp4_from([198, 51, 100, 9], RESTRICTED);
    assert_eq!(run(&guard, &peer), Verdict::Pass);
    assert_eq!(run(&guard, &stranger), Verdict::Drop);
    assert_eq!(run(&guard, &stranger), Verdict::Drop);
    assert_eq!(
        port_counters(&guard, RESTRICTED),
        PortCounters {
            passed: counted(&[&peer]),
            dropped: counted(&[&stranger, &stranger])
        }
    );
    // Host-wide: the session's drops under their own reason, none as scans.
    assert_eq!(
        guard.dropped_for(DropReason::PeerNotAllowed).unwrap(),
        counted(&[&stranger, &stranger])
    );
    assert_eq!(
        guard.dropped_for(DropReason::NotAllowed).unwrap(),
        Counters::ZERO
    );
    // A port of no session stays a global drop, counted on no port.
    assert_eq!(
        run(&guard, &tcp4_from([198, 51, 100, 9], NOT_ALLOWED)),
        Verdict::Drop
    );
    assert_eq!(
        guard.dropped_for(DropReason::NotAllowed).unwrap().packets,
        1
    );
    assert_eq!(port_counters(&guard, RESTRICTED).dropped.packets, 2);
    // An unrestricted session's port still takes any source.
    assert_eq!(
        run(&guard, &tcp4_from([198, 51, 100, 9], ALLOWED)),
        Verdict::Pass
    );
}

#[test]
fn peer_networks_match_by_prefix() {
    let mut guard = guard_on_range_or_skip!();
    guard.allow_peer(TAG, &net("198.51.100.77/24")).unwrap(); // host bits ignored
    guard.allow_peer(TAG, &net("2001:db8:1::/48")).unwrap();
    guard.allow_port_from_peers(RESTRICTED, TAG).unwrap();
    assert_eq!(
        run(&guard, &tcp4_from([198, 51, 100, 0], RESTRICTED)),
        Verdict::Pass
    );
    assert_eq!(
        run(&guard, &tcp4_from([198, 51, 100, 255], RESTRICTED)),
        Verdict::Pass
    );
    assert_eq!(
        run(&guard, &tcp4_from([198, 51, 101, 1], RESTRICTED)),
        Verdict::Drop
    );
    assert_eq!(
        run(&guard, &tcp4_from([198, 51, 99, 255], RESTRICTED)),
        Verdict::Drop
    );
    let mut inside = SRC6;
    inside[5] = 1; // 2001:db8:1::2
    assert_eq!(run(&guard, &tcp6_from(inside, RESTRICTED)), Verdict::Pass);
    assert_eq!(run(&guard, &tcp6_from(SRC6, RESTRICTED)), Verdict::Drop); // 2001:db8::2
    assert_eq!(port_counters(&guard, RESTRICTED).passed.packets, 3);
    assert_eq!(port_counters(&guard, RESTRICTED).dropped.packets, 3);
}

#[test]
fn ipv4_networks_never_admit_ipv6_sources() {
    let mut guard = guard_on_range_or_skip!();
    // Every IPv4 source: lives under ::ffff:0:0/96 in the trie, so no native
    // IPv6 address falls in it.
    guard.allow_peer(TAG, &net("0.0.0.0/0")).unwrap();
    guard.allow_port_from_peers(RESTRICTED, TAG).unwrap();
    assert_eq!(
        run(&guard, &tcp4_from([203, 0, 113, 5], RESTRICTED)),
        Verdict::Pass
    );
    assert_eq!(run(&guard, &tcp6_from(SRC6, RESTRICTED)), Verdict::Drop);
    let mut zero6 = [0u8; 16];
    zero6[15] = 1; // ::1, all-zero leading bits
    assert_eq!(run(&guard, &tcp6_from(zero6, RESTRICTED)), Verdict::Drop);
}

#[test]
fn one_sessions_peers_do_not_open_another_sessions_port() {
    let mut guard = guard_on_range_or_skip!();
    const OTHER: u16 = 5103;
    guard.allow_peer(TAG, &net("192.0.2.2")).unwrap();
    guard.allow_port_from_peers(RESTRICTED, TAG).unwrap();
    guard.allow_peer(TAG + 1, &net("203.0.113.1")).unwrap();
    guard.allow_port_from_peers(OTHER, TAG + 1).unwrap();
    assert_eq!(run(&guard, &tcp4_from(SRC4, OTHER)), Verdict::Drop);
    assert_eq!(
        run(&guard, &tcp4_from([203, 0, 113, 1], RESTRICTED)),
        Verdict::Drop
    );
    assert_eq!(
        run(&guard, &tcp4_from([203, 0, 113, 1], OTHER)),
        Verdict::Pass
    );
    assert_eq!(port_counters(&guard, RESTRICTED).dropped.packets, 1);
    assert_eq!(port_counters(&guard, OTHER).dropped.packets, 1);
}

#[test]
fn restricted_port_without_peers_passes_nothing_and_denied_peers_stop_passing() {
    let mut guard = guard_on_range_or_skip!();
    guard.allow_port_from_peers(RESTRICTED, TAG).unwrap();
    assert_eq!(run(&guard, &tcp4_from(SRC4, RESTRICTED)), Verdict::Drop);
    guard.allow_peer(TAG, &net("192.0.2.0/24")).unwrap();
    assert_eq!(run(&guard, &tcp4_from(SRC4, RESTRICTED)), Verdict::Pass);
    guard.deny_peer(TAG, &net("192.0.2.0/24")).unwrap();
    guard.deny_peer(TAG, &net("192.0.2.0/24")).unwrap(); // absent: not an error
    assert_eq!(run(&guard, &tcp4_from(SRC4, RESTRICTED)), Verdict::Drop);
}

#[test]
fn restricting_a_live_port_keeps_its_counters() {
    let mut guard = guard_on_range_or_skip!();
    let frame = tcp4_from([198, 51, 100, 9], ALLOWED);
    assert_eq!(run(&guard, &frame), Verdict::Pass);
    guard.allow_port_from_peers(ALLOWED, 1).unwrap(); // same session (tag 1)
    assert_eq!(run(&guard, &frame), Verdict::Drop);
    assert_eq!(
        port_counters(&guard, ALLOWED),
        PortCounters {
            passed: counted(&[&frame]),
            dropped: counted(&[&frame])
        }
    );
    guard.allow_port(ALLOWED, 1).unwrap();
    assert_eq!(run(&guard, &frame), Verdict::Pass);
    assert_eq!(port_counters(&guard, ALLOWED).passed.packets, 2);
}

// --- Transports with TCP's port layout.

#[test]
fn sctp_dccp_and_udplite_are_guarded_like_tcp() {
    let guard = guard_on_range_or_skip!();
    const DCCP: u8 = 33;
    const SCTP: u8 = 132;
    const UDPLITE: u8 = 136;
    for proto in [DCCP, SCTP, UDPLITE] {
        let header = |dport: u16| {
            [
                &40000u16.to_be_bytes()[..],
                &dport.to_be_bytes(),
                &[0u8; 12],
            ]
            .concat()
        };
        let to = |dport| ethernet(ETH_P_IP, &ipv4(proto, &header(dport)));
        assert_eq!(
            run(&guard, &to(NOT_ALLOWED)),
            Verdict::Drop,
            "protocol {proto}"
        );
        assert_eq!(run(&guard, &to(ALLOWED)), Verdict::Pass, "protocol {proto}");
        assert_eq!(run(&guard, &to(OUTSIDE)), Verdict::Pass, "protocol {proto}");
        let v6 = ethernet(ETH_P_IPV6, &ipv6(proto, &header(NOT_ALLOWED)));
        assert_eq!(
            run(&guard, &v6),
            Verdict::Drop,
            "protocol {proto} over IPv6"
        );
    }
    // SCTP's common header is 12 bytes: 8 cannot be a packet to a socket.
    let short_sctp = ethernet(
        ETH_P_IP,
        &ipv4(
            SCTP,
            &[&40000u16.to_be_bytes()[..], &ALLOWED.to_be_bytes(), &[0; 4]].concat(),
        ),
    );
    assert_eq!(run(&guard, &short_sctp), Verdict::Drop);
    assert_eq!(guard.dropped_for(DropReason::Malformed).unwrap().packets, 1);
}

// --- IPv6 extension headers: every way a port can hide behind them.

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTS: u8 = 60;

/// A fragment header; `offset_flags` is the 16-bit offset + M field.
fn ipv6_frag(next_header: u8, offset_flags: u16, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![next_header, 0];
    p.extend_from_slice(&offset_flags.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 7]);
    p.extend_from_slice(rest);
    p
}

/// An AH of 24 bytes (payload length field 4: (4 + 2) * 4), ICV zero.
fn ipv6_auth(next_header: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![next_header, 4, 0, 0];
    p.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 1]); // SPI, sequence
    p.extend_from_slice(&[0; 12]);
    p.extend_from_slice(rest);
    p
}

/// A 24-byte routing header (length field 2), segments left 0.
fn ipv6_routing(next_header: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![next_header, 2, 4, 0];
    p.extend_from_slice(&[0; 20]);
    p.extend_from_slice(rest);
    p
}

/// A name, the first next-header value, and the headers behind it towards a port.
type Chain = (&'static str, u8, fn(u16) -> Vec<u8>);

#[test]
fn ports_behind_every_ipv6_extension_header_are_checked() {
    let guard = guard_on_range_or_skip!();
    let chains: [Chain; 6] = [
        ("routing", ROUTING, |p| ipv6_routing(TCP, &tcp(p))),
        ("auth", AUTH, |p| ipv6_auth(TCP, &tcp(p))),
        ("dest opts", DEST_OPTS, |p| ipv6_ext(TCP, &tcp(p))),
        ("first fragment", FRAGMENT, |p| {
            ipv6_frag(TCP, 0x0001, &tcp(p))
        }),
        ("hop, routing, frag, dest, auth", HOP_BY_HOP, |p| {
            ipv6_ext(
                ROUTING,
                &ipv6_routing(
                    FRAGMENT,
                    &ipv6_frag(DEST_OPTS, 1, &ipv6_ext(AUTH, &ipv6_auth(TCP, &tcp(p)))),
                ),
            )
        }),
        ("auth, then udp", AUTH, |p| ipv6_auth(UDP, &udp(p))),
    ];
    for (name, first, chain) in chains {
        let frame = |port| ethernet(ETH_P_IPV6, &ipv6(first, &chain(port)));
        assert_eq!(run(&guard, &frame(NOT_ALLOWED)), Verdict::Drop, "{name}");
        assert_eq!(run(&guard, &frame(ALLOWED)), Verdict::Pass, "{name}");
        assert_eq!(run(&guard, &frame(OUTSIDE)), Verdict::Pass, "{name}");
    }
    assert_eq!(
        guard.dropped_for(DropReason::NotAllowed).unwrap().packets,
        6
    );
    assert_eq!(
        guard.dropped_for(DropReason::Malformed).unwrap(),
        Counters::ZERO
    );
}

#[test]
fn ipv6_extension_chains_that_cannot_be_walked_are_dropped() {
    let guard = guard_on_range_or_skip!();
    let cases: [(&str, Vec<u8>); 4] = [
        // Length field says 8 * (255 + 1) bytes; the frame ends long before.
        (
            "overlong dest opts",
            ipv6(
                DEST_OPTS,
                &[&[TCP, 255][..], &[0; 6], &tcp(OUTSIDE)].concat(),
            ),
        ),
        ("hop-by-hop cut inside", ipv6(HOP_BY_HOP, &[TCP])),
        ("fragment header cut", ipv6(FRAGMENT, &[TCP, 0, 0, 1])),
        // The first fragment ends before the TCP ports (RFC 7112 forbids it).
        (
            "first fragment without ports",
            ipv6(FRAGMENT, &ipv6_frag(TCP, 0x0001, &tcp(ALLOWED)[..2])),
        ),
    ];
    for (name, packet) in &cases {
        assert_eq!(
            run(&guard, &ethernet(ETH_P_IPV6, packet)),
            Verdict::Drop,
            "{name}"
        );
    }
    assert_eq!(
        guard.dropped_for(DropReason::Malformed).unwrap().packets,
        cases.len() as u64
    );
    // Exactly as many headers as the program walks, then TCP: still checked.
    let mut six = ipv6_ext(TCP, &tcp(NOT_ALLOWED));
    for _ in 0..5 {
        six = ipv6_ext(DEST_OPTS, &six);
    }
    assert_eq!(
        run(&guard, &ethernet(ETH_P_IPV6, &ipv6(DEST_OPTS, &six))),
        Verdict::Drop
    );
    assert_eq!(
        guard.dropped_for(DropReason::NotAllowed).unwrap().packets,
        1,
        "six headers are walked to the port"
    );
}

#[test]
fn ipv6_non_first_fragments_and_final_headers_pass() {
    let guard = guard_on_range_or_skip!();
    // Offset 8 (in 8-byte units): no transport header in it, like IPv4 tails.
    let tail = ipv6(FRAGMENT, &ipv6_frag(TCP, 8 << 3, &tcp(NOT_ALLOWED)));
    assert_eq!(run(&guard, &ethernet(ETH_P_IPV6, &tail)), Verdict::Pass);
    // No Next Header, ESP (a terminated tunnel), mobility: the stack never
    // hands what follows to a TCP or UDP socket.
    for last in [59u8, 50, 135] {
        let frame = ethernet(
            ETH_P_IPV6,
            &ipv6(DEST_OPTS, &ipv6_ext(last, &tcp(NOT_ALLOWED))),
        );
        assert_eq!(run(&guard, &frame), Verdict::Pass, "next header {last}");
    }
    assert_eq!(guard.dropped().unwrap(), Counters::ZERO);
}

mod hooks;

// --- A real interface.

/// Two network namespaces joined by a veth pair; removed on drop, also when
/// the test fails.
pub(super) struct VethPair {
    gateway_ns: String,
    client_ns: String,
    gateway_if: String,
    client_if: String,
}

const GATEWAY_IP: &str = "192.0.2.1";
const CLIENT_IP: &str = "192.0.2.2";

impl VethPair {
    fn create() -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pair = Self {
            gateway_ns: format!("ssg-gw-{id}"),
            client_ns: format!("ssg-cl-{id}"),
            // IFNAMSIZ is 16; kept free of "xdp" so `ip link` output is unambiguous.
            gateway_if: format!("ssgg{id}"),
            client_if: format!("ssgc{id}"),
        };
        let client_if = pair.client_if.clone();
        let (gw, cl) = (&pair.gateway_ns, &pair.client_ns);
        ip(&["netns", "add", gw])?;
        ip(&["netns", "add", cl])?;
        ip(&[
            "-n",
            gw,
            "link",
            "add",
            &pair.gateway_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            cl,
        ])?;
        ip(&[
            "-n",
            gw,
            "addr",
            "add",
            &format!("{GATEWAY_IP}/24"),
            "dev",
            &pair.gateway_if,
        ])?;
        ip(&[
            "-n",
            cl,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            &client_if,
        ])?;
        ip(&["-n", gw, "link", "set", &pair.gateway_if, "up"])?;
        ip(&["-n", cl, "link", "set", &client_if, "up"])?;
        Ok(pair)
    }

    /// Sets the MTU on both ends (veth defaults to 1500).
    fn set_mtu(&self, mtu: u32) -> Result<(), String> {
        let mtu = mtu.to_string();
        ip(&[
            "-n",
            &self.gateway_ns,
            "link",
            "set",
            &self.gateway_if,
            "mtu",
            &mtu,
        ])?;
        ip(&[
            "-n",
            &self.client_ns,
            "link",
            "set",
            &self.client_if,
            "mtu",
            &mtu,
        ])?;
        Ok(())
    }

    fn gateway_link(&self) -> String {
        ip(&[
            "-n",
            &self.gateway_ns,
            "link",
            "show",
            "dev",
            &self.gateway_if,
        ])
        .expect("ip link show")
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.gateway_ns]);
        let _ = ip(&["netns", "del", &self.client_ns]);
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread (only) into a named network namespace.
fn enter_netns(name: &str) {
    let ns = File::open(format!("/run/netns/{name}")).expect("open netns");
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Runs `body` on a thread inside the gateway namespace of a fresh veth
/// pair (both ends at `mtu`), with a loaded guard on the test range
/// ([`ALLOWED`] allowed) and a UDP socket bound in the client namespace.
fn with_veth_guard(mtu: u32, body: impl FnOnce(&VethPair, Guard, &UdpSocket) + Send) {
    if !nix::unistd::geteuid().is_root() {
        cannot_run("needs root");
        return;
    }
    let pair = match VethPair::create().and_then(|p| p.set_mtu(mtu).map(|()| p)) {
        Ok(pair) => pair,
        Err(e) => {
            cannot_run(&format!("cannot create network namespaces: {e}"));
            return;
        }
    };
    // Interface names and the attachment live in the gateway namespace, so
    // everything touching the guard runs on a thread that entered it.
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&pair.gateway_ns);
            let Some(mut guard) = load_guard() else {
                return;
            };
            guard.set_port_range(RANGE.0, RANGE.1).unwrap();
            guard.allow_port(ALLOWED, 1).unwrap();
            let client = s.spawn(|| {
                enter_netns(&pair.client_ns);
                UdpSocket::bind((CLIENT_IP, 0)).expect("bind in client namespace")
            });
            let socket = client.join().expect("client thread");
            body(&pair, guard, &socket);
        });
    });
}

/// Sends `len`-byte datagrams to [`ALLOWED`] and [`NOT_ALLOWED`] until the
/// guard has counted both; returns what passed to the one and what was
/// dropped at the other.
fn send_until_counted(guard: &Guard, socket: &UdpSocket, len: usize) -> (Counters, Counters) {
    let payload = vec![0x5a; len];
    // Datagrams can wait for ARP; resend until both were seen.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut passed, mut dropped) = (Counters::ZERO, Counters::ZERO);
    while (passed.packets == 0 || dropped.packets == 0) && Instant::now() < deadline {
        socket.send_to(&payload, (GATEWAY_IP, ALLOWED)).unwrap();
        socket.send_to(&payload, (GATEWAY_IP, NOT_ALLOWED)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        passed = guard.port_stats(ALLOWED).unwrap().unwrap_or_default();
        dropped = guard.dropped_for(DropReason::NotAllowed).unwrap();
    }
    assert!(
        passed.packets > 0,
        "no datagram to the allowed port was counted"
    );
    assert!(
        dropped.packets > 0,
        "no datagram to a port not allowed was dropped"
    );
    (passed, dropped)
}

#[test]
fn attached_in_driver_mode_guards_real_traffic_and_detaches_on_drop() {
    with_veth_guard(1500, |pair, mut guard, socket| {
        guard.attach_at(&pair.gateway_if, Hook::XdpDriver).unwrap();
        let link = pair.gateway_link();
        assert!(
            link.contains("xdp") && !link.contains("xdpgeneric"),
            "no driver-mode XDP program on the veth:\n{link}"
        );
        send_until_counted(&guard, socket, 16);
        drop(guard);
        let link = pair.gateway_link();
        assert!(
            !link.contains("xdp"),
            "XDP program left attached after drop:\n{link}"
        );
    });
}
