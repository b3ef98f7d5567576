//! The XDP guard, run in the kernel: hand-made frames through
//! BPF_PROG_TEST_RUN, and one attachment to a real veth with real traffic.
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

use super::{AttachMode, Counters, DropReason, EbpfError, Guard, Verdict};

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

/// `fragment` is the 16-bit flags + fragment offset field.
fn ipv4_with(protocol: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&fragment.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&[192, 0, 2, 2, 192, 0, 2, 1]);
    p.extend_from_slice(l4);
    p
}

fn ipv4(protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_with(protocol, 0, l4)
}

fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    let mut dst = src;
    src[15] = 2;
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

fn run(guard: &Guard, frame: &[u8]) -> Verdict {
    guard.run_on_frame(frame).expect("BPF_PROG_TEST_RUN")
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
    // IPv4 header itself cut short.
    let short_ip = ethernet(ETH_P_IP, &ipv4(TCP, &tcp(ALLOWED))[..12]);
    for frame in [&no_port, &short_allowed, &short_allowed6, &short_ip] {
        assert_eq!(run(&guard, frame), Verdict::Drop);
    }
    assert_eq!(
        guard.dropped_for(DropReason::Malformed).unwrap(),
        counted(&[&no_port, &short_allowed, &short_allowed6, &short_ip])
    );
    assert_eq!(guard.port_stats(ALLOWED).unwrap(), Some(Counters::ZERO));
    // A short header to a port outside the range is not the guard's business.
    let short_outside = ethernet(ETH_P_IP, &ipv4(TCP, &tcp(OUTSIDE)[..10]));
    assert_eq!(run(&guard, &short_outside), Verdict::Pass);
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

// --- A real interface.

/// Two network namespaces joined by a veth pair; removed on drop, also when
/// the test fails.
struct VethPair {
    gateway_ns: String,
    client_ns: String,
    gateway_if: String,
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
        };
        let client_if = format!("ssgc{id}");
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

#[test]
fn attached_in_driver_mode_guards_real_traffic_and_detaches_on_drop() {
    if !nix::unistd::geteuid().is_root() {
        cannot_run("needs root");
        return;
    }
    let pair = match VethPair::create() {
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
            guard.attach(&pair.gateway_if, AttachMode::Driver).unwrap();
            assert!(
                pair.gateway_link().contains("xdp"),
                "no XDP program on the veth:\n{}",
                pair.gateway_link()
            );

            let client = s.spawn(|| {
                enter_netns(&pair.client_ns);
                UdpSocket::bind((CLIENT_IP, 0)).expect("bind in client namespace")
            });
            let socket = client.join().expect("client thread");
            // Datagrams can wait for ARP; resend until both were seen.
            let deadline = Instant::now() + Duration::from_secs(5);
            let (mut passed, mut dropped) = (0, 0);
            while (passed == 0 || dropped == 0) && Instant::now() < deadline {
                socket.send_to(b"allowed", (GATEWAY_IP, ALLOWED)).unwrap();
                socket
                    .send_to(b"not allowed", (GATEWAY_IP, NOT_ALLOWED))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(50));
                passed = guard
                    .port_stats(ALLOWED)
                    .unwrap()
                    .unwrap_or_default()
                    .packets;
                dropped = guard.dropped_for(DropReason::NotAllowed).unwrap().packets;
            }
            assert!(passed > 0, "no datagram to the allowed port was counted");
            assert!(dropped > 0, "no datagram to a port not allowed was dropped");

            drop(guard);
            let link = pair.gateway_link();
            assert!(
                !link.contains("xdp"),
                "XDP program left attached after drop:\n{link}"
            );
        });
    });
}
