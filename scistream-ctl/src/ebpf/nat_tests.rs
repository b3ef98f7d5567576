//! The XDP NAT, run in the kernel on hand-made frames (BPF_PROG_TEST_RUN):
//! translation both ways with checksums recomputed from scratch here, the
//! guard's decisions on the data range, malformed and fragmented frames,
//! and flows of a released session.
//!
//! They need root and BPF. With CI=true they must run and fail otherwise;
//! elsewhere they skip with one line on stderr.

use crate::error_chain;
use scistream_common::nat::{Event, FlowKey, RateBucket, Service};

use super::{Action, Nat};

const DATA: (u16, u16) = (5100, 5200);
const NAT_PORTS: (u16, u16) = (61000, 61999);
const LISTENER: u16 = 5101;
const OTHER_IN_RANGE: u16 = 5150;
const OUTSIDE: u16 = 22;

// Documentation addresses: consumer -> gateway listener; gateway -> target.
const CONSUMER: [u8; 4] = [192, 0, 2, 2];
const GATEWAY_IN: [u8; 4] = [192, 0, 2, 1];
const GATEWAY_OUT: [u8; 4] = [198, 51, 100, 1];
const TARGET: [u8; 4] = [198, 51, 100, 7];
const TARGET_PORT: u16 = 7000;
const CONSUMER_PORT: u16 = 40000;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;
const SYN_ACK: u8 = 0x12;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn load_nat() -> Option<Nat> {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root".to_string()
    } else {
        match Nat::load() {
            Ok(nat) => return Some(nat),
            Err(e) => error_chain(&e),
        }
    };
    assert!(!in_ci(), "CI=true but this eBPF test cannot run: {why}");
    eprintln!("skipping eBPF test: {why}");
    None
}

fn service(tag: u32) -> Service {
    Service {
        target_addr: TARGET,
        snat_addr: GATEWAY_OUT,
        target_port: TARGET_PORT,
        tag,
        ..Default::default()
    }
}

/// A NAT on the test ranges with [`LISTENER`] pointing at the target, or skip.
macro_rules! nat_or_skip {
    () => {{
        let Some(mut nat) = load_nat() else {
            return;
        };
        nat.set_ranges(DATA, NAT_PORTS).unwrap();
        nat.add_service(LISTENER, service(1)).unwrap();
        nat
    }};
}

// --- Frames with correct checksums, and the checks of them, from scratch.

/// One's complement sum of `data` as big-endian 16-bit words.
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    !(ones_sum(data, initial) as u16)
}

fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    ones_sum(&pseudo, 0)
}

/// An IPv4 packet (no options) in an Ethernet frame; the IP checksum is
/// computed, the L4 checksum (TCP or UDP) too.
fn frame4(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    protocol: u8,
    flags: u8,
    payload: &[u8],
    fragment: u16,
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.1.to_be_bytes());
    l4.extend_from_slice(&dst.1.to_be_bytes());
    if protocol == TCP {
        l4.extend_from_slice(&[
            0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0,
        ]);
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let check_at = if protocol == TCP { 16 } else { 6 };
    let l4_check = checksum(&l4, pseudo_header_sum(src.0, dst.0, protocol, l4.len()));
    l4[check_at..check_at + 2].copy_from_slice(&l4_check.to_be_bytes());

    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34]);
    ip.extend_from_slice(&fragment.to_be_bytes());
    ip.extend_from_slice(&[64, protocol, 0, 0]);
    ip.extend_from_slice(&src.0);
    ip.extend_from_slice(&dst.0);
    let ip_check = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    ip.extend_from_slice(&l4);

    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame
}

fn tcp4(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    frame4(src, dst, TCP, flags, payload, 0)
}

/// Addresses and ports of a TCP/IPv4 frame, after asserting that both
/// checksums are what a from-scratch computation gives.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    payload: Vec<u8>,
}

fn parse_checked(frame: &[u8]) -> Seen {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let mut header = ip[..ihl].to_vec();
    let carried = u16::from_be_bytes([header[10], header[11]]);
    header[10..12].copy_from_slice(&[0, 0]);
    assert_eq!(carried, checksum(&header, 0), "IPv4 header checksum");

    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let mut segment = ip[ihl..total].to_vec();
    let carried = u16::from_be_bytes([segment[16], segment[17]]);
    segment[16..18].copy_from_slice(&[0, 0]);
    let expected = checksum(&segment, pseudo_header_sum(src, dst, TCP, segment.len()));
    // 0x0000 and 0xffff are the same one's complement number.
    let same_zero = matches!((carried, expected), (0, 0xffff) | (0xffff, 0));
    assert!(
        carried == expected || same_zero,
        "TCP checksum {carried:#06x}, recomputed {expected:#06x}"
    );
    let offset = usize::from(segment[12] >> 4) * 4;
    Seen {
        src: (src, u16::from_be_bytes([segment[0], segment[1]])),
        dst: (dst, u16::from_be_bytes([segment[2], segment[3]])),
        payload: segment[offset..].to_vec(),
    }
}

fn run(nat: &Nat, frame: &[u8]) -> (Action, Vec<u8>) {
    nat.run_on_frame(frame).expect("BPF_PROG_TEST_RUN")
}

/// Translated frames leave by redirect or, where this host has no route for
/// the test addresses, up the stack; either way they are translated.
fn translated(nat: &Nat, frame: &[u8]) -> Seen {
    let (action, out) = run(nat, frame);
    assert!(
        matches!(action, Action::Pass | Action::Forward),
        "{action:?}"
    );
    parse_checked(&out)
}

/// Opens a flow from `consumer_port` and returns the NAT source port it got.
fn open_flow(nat: &Nat, consumer_port: u16) -> u16 {
    let syn = tcp4((CONSUMER, consumer_port), (GATEWAY_IN, LISTENER), SYN, &[]);
    let out = translated(nat, &syn);
    assert_eq!(out.dst, (TARGET, TARGET_PORT));
    assert_eq!(out.src.0, GATEWAY_OUT);
    out.src.1
}

// --- Translation.

#[test]
fn syn_to_a_session_port_goes_to_the_target_from_the_gateway_with_valid_checksums() {
    let nat = nat_or_skip!();
    let syn = tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, LISTENER), SYN, &[]);
    let out = translated(&nat, &syn);
    assert_eq!(out.dst, (TARGET, TARGET_PORT));
    assert_eq!(out.src.0, GATEWAY_OUT);
    assert!(
        (NAT_PORTS.0..=NAT_PORTS.1).contains(&out.src.1),
        "source port {} outside the NAT range",
        out.src.1
    );
    assert_eq!(nat.session_counters(LISTENER).unwrap().unwrap().flows, 1);
    assert_eq!(
        nat.flow_keys_of(LISTENER).unwrap().len(),
        2,
        "both directions recorded"
    );
}

#[test]
fn replies_are_translated_back_to_the_consumer_with_valid_checksums() {
    let nat = nat_or_skip!();
    let port = open_flow(&nat, CONSUMER_PORT);
    let reply = tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, port), SYN_ACK, &[]);
    let out = translated(&nat, &reply);
    assert_eq!(out.src, (GATEWAY_IN, LISTENER));
    assert_eq!(out.dst, (CONSUMER, CONSUMER_PORT));

    // Data both ways (odd length: the checksum's padding byte matters).
    let data = tcp4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, LISTENER),
        PSH_ACK,
        b"seventeen bytes!!",
    );
    let out = translated(&nat, &data);
    assert_eq!(
        (out.src, out.dst),
        ((GATEWAY_OUT, port), (TARGET, TARGET_PORT))
    );
    assert_eq!(out.payload, b"seventeen bytes!!");
    let back = tcp4(
        (TARGET, TARGET_PORT),
        (GATEWAY_OUT, port),
        PSH_ACK,
        &[0xff; 1000],
    );
    let out = translated(&nat, &back);
    assert_eq!(
        (out.src, out.dst),
        ((GATEWAY_IN, LISTENER), (CONSUMER, CONSUMER_PORT))
    );
    assert_eq!(out.payload, vec![0xff; 1000]);

    let counters = nat.session_counters(LISTENER).unwrap().unwrap();
    assert_eq!((counters.forward_packets, counters.forward_bytes), (2, 17));
    assert_eq!(
        (counters.backward_packets, counters.backward_bytes),
        (2, 1000)
    );
}

#[test]
fn parallel_flows_get_distinct_source_ports() {
    let nat = nat_or_skip!();
    let mut ports: Vec<u16> = (0..32)
        .map(|i| open_flow(&nat, CONSUMER_PORT + i))
        .collect();
    // The same flow again (a retransmitted SYN) keeps its port.
    assert_eq!(open_flow(&nat, CONSUMER_PORT), ports[0]);
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 32);
    assert_eq!(nat.session_counters(LISTENER).unwrap().unwrap().flows, 32);
}

// --- The guard's job on the data range.

#[test]
fn data_range_ports_without_a_session_are_dropped_and_others_pass_untouched() {
    let nat = nat_or_skip!();
    let denied = tcp4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, OTHER_IN_RANGE),
        SYN,
        &[],
    );
    assert_eq!(run(&nat, &denied).0, Action::Drop);
    let udp = frame4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, OTHER_IN_RANGE),
        UDP,
        0,
        b"x",
        0,
    );
    assert_eq!(run(&nat, &udp).0, Action::Drop);
    assert_eq!(nat.events(Event::NotAllowed).unwrap().packets, 2);
    for port in [OUTSIDE, DATA.0 - 1, DATA.1 + 1] {
        let frame = tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, port), SYN, &[]);
        assert_eq!(
            run(&nat, &frame),
            (Action::Pass, frame.clone()),
            "port {port}"
        );
    }
    // A segment of no known flow to a session port (not a SYN) goes to the
    // listener's socket untouched, which resets it.
    let stray = tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, LISTENER), ACK, &[]);
    assert_eq!(run(&nat, &stray), (Action::Pass, stray.clone()));
    assert!(nat.flow_keys_of(LISTENER).unwrap().is_empty());
}

#[test]
fn truncated_headers_to_the_data_range_are_dropped() {
    let nat = nat_or_skip!();
    let syn = tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, LISTENER), SYN, &[]);
    // Cut inside the ports, inside the TCP header, inside the IP header.
    for len in [14 + 20 + 3, 14 + 20 + 12, 14 + 10] {
        assert_eq!(run(&nat, &syn[..len]).0, Action::Drop, "cut at {len}");
    }
    assert_eq!(nat.events(Event::Malformed).unwrap().packets, 3);
    assert!(
        nat.flow_keys_of(LISTENER).unwrap().is_empty(),
        "no flow from a truncated SYN"
    );
    // Truncated, but outside the range: not the NAT's business.
    let outside = tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, OUTSIDE), SYN, &[]);
    assert_eq!(run(&nat, &outside[..14 + 20 + 12]).0, Action::Pass);
}

#[test]
fn first_fragments_to_a_session_are_dropped_and_later_ones_pass() {
    let nat = nat_or_skip!();
    const MORE_FRAGMENTS: u16 = 0x2000;
    let first = frame4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, LISTENER),
        TCP,
        SYN,
        &[0; 8],
        MORE_FRAGMENTS,
    );
    assert_eq!(run(&nat, &first).0, Action::Drop);
    assert_eq!(nat.events(Event::Fragment).unwrap().packets, 1);
    let tail = frame4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, LISTENER),
        TCP,
        ACK,
        &[0; 8],
        185,
    );
    assert_eq!(run(&nat, &tail), (Action::Pass, tail.clone()));
    assert!(nat.flow_keys_of(LISTENER).unwrap().is_empty());
}

#[test]
fn ipv6_is_guarded_but_never_translated() {
    let nat = nat_or_skip!();
    let frame6 = |dport: u16| {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, TCP, 64]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&CONSUMER_PORT.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN, 0xff, 0xff, 0, 0, 0, 0]);
        f
    };
    assert_eq!(run(&nat, &frame6(OTHER_IN_RANGE)).0, Action::Drop);
    let outside = frame6(OUTSIDE);
    assert_eq!(run(&nat, &outside), (Action::Pass, outside.clone()));
    let to_session = frame6(LISTENER);
    assert_eq!(run(&nat, &to_session), (Action::Pass, to_session.clone()));
}

// --- Release.

#[test]
fn released_session_flows_are_removed_and_no_longer_translated() {
    let mut nat = nat_or_skip!();
    let port = open_flow(&nat, CONSUMER_PORT);
    let data = tcp4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, LISTENER),
        PSH_ACK,
        b"abc",
    );
    translated(&nat, &data);

    let last = nat.remove_service(LISTENER).unwrap();
    assert_eq!(
        (last.flows, last.forward_bytes),
        (1, 3),
        "final counters handed back"
    );
    assert!(
        nat.flow_keys_of(LISTENER).unwrap().is_empty(),
        "flow entries left after release"
    );
    assert_eq!(nat.session_counters(LISTENER).unwrap(), None);
    assert_eq!(
        run(&nat, &data).0,
        Action::Drop,
        "frames to a released port are dropped"
    );
    let reply = tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, port), PSH_ACK, b"late");
    assert_eq!(
        run(&nat, &reply),
        (Action::Pass, reply.clone()),
        "replies are not translated any more"
    );
}

#[test]
fn a_port_handed_to_a_new_session_does_not_revive_old_flows() {
    let mut nat = nat_or_skip!();
    let port = open_flow(&nat, CONSUMER_PORT);
    // The port changes hands without the sweep (as if the kernel raced it).
    nat.retarget(LISTENER, service(2)).unwrap();
    let reply = tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, port), PSH_ACK, b"old");
    assert_eq!(run(&nat, &reply), (Action::Pass, reply.clone()));
    assert_eq!(nat.events(Event::StaleFlow).unwrap().packets, 1);
    let key = FlowKey {
        saddr: TARGET,
        daddr: GATEWAY_OUT,
        sport: TARGET_PORT,
        dport: port,
        protocol: TCP,
        _pad: [0; 3],
    };
    assert_eq!(
        nat.flow(&key).unwrap(),
        None,
        "the stale entry is forgotten"
    );
    // A new connection of the new session is translated.
    open_flow(&nat, CONSUMER_PORT + 1);
}

#[test]
fn a_fresh_program_passes_everything_until_configured() {
    let Some(nat) = load_nat() else {
        return;
    };
    let frame = tcp4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, OTHER_IN_RANGE),
        SYN,
        &[],
    );
    assert_eq!(run(&nat, &frame), (Action::Pass, frame.clone()));
}

#[test]
fn overlapping_or_empty_ranges_are_rejected() {
    let Some(mut nat) = load_nat() else {
        return;
    };
    assert!(nat.set_ranges((5100, 5200), (5150, 6000)).is_err());
    assert!(nat.set_ranges((5200, 5100), NAT_PORTS).is_err());
    assert!(nat.set_ranges(DATA, (0, 0)).is_err());
    assert!(nat.set_ranges(DATA, NAT_PORTS).is_ok());
}

// --- Rate policer, connection tracking, pinning.

const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

#[test]
fn policed_session_drops_payload_over_its_rate_but_never_a_bare_ack() {
    let mut nat = nat_or_skip!();
    nat.retarget(
        LISTENER,
        Service {
            flags: Service::POLICED,
            ..service(1)
        },
    )
    .unwrap();
    // 8 kbit/s = 1000 bytes a second, 64 KiB deep: the bucket starts empty,
    // so after the first segment nothing with payload passes within this test.
    nat.set_bucket(1, RateBucket::new(8, 64 * 1024)).unwrap();
    open_flow(&nat, CONSUMER_PORT);
    let data = tcp4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, LISTENER),
        PSH_ACK,
        &[7; 1000],
    );
    let ack = tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, LISTENER), ACK, &[]);
    translated(&nat, &data);
    for _ in 0..3 {
        assert_eq!(run(&nat, &data).0, Action::Drop, "over the rate");
        translated(&nat, &ack);
    }
    let c = nat.session_counters(LISTENER).unwrap().unwrap();
    assert_eq!((c.over_rate_packets, c.over_rate_bytes), (3, 3000));
    assert_eq!(
        c.forward_bytes, 1000,
        "only the conforming segment counted as moved"
    );
    assert_eq!(nat.events(Event::OverRate).unwrap().packets, 3);
    // Without the flag the same session is not policed.
    nat.retarget(LISTENER, service(1)).unwrap();
    translated(&nat, &data);
}

#[test]
fn open_connections_end_with_a_fin_each_way_or_one_reset() {
    let nat = nat_or_skip!();
    let now = uptime_s;
    let (a, b) = (open_flow(&nat, 40001), open_flow(&nat, 40002));
    let open = |n: &Nat| {
        n.open_connections(now(), 120)
            .unwrap()
            .get(&LISTENER)
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(open(&nat), 2);
    // a: FIN from the consumer, then from the target (its reply direction).
    translated(
        &nat,
        &tcp4((CONSUMER, 40001), (GATEWAY_IN, LISTENER), FIN_ACK, &[]),
    );
    assert_eq!(open(&nat), 2, "half-closed is still open");
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, a), FIN_ACK, &[]),
    );
    assert_eq!(open(&nat), 1);
    // b: a reset from the target.
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, b), RST, &[]),
    );
    assert_eq!(open(&nat), 0);
    // Idle flows stop counting: none seen within the last 0 s of a clock
    // a minute ahead.
    open_flow(&nat, 40003);
    assert_eq!(
        nat.open_connections(now() + 60, 30).unwrap().get(&LISTENER),
        None
    );
}

#[test]
fn the_sweep_frees_ended_flows_and_orphaned_halves_and_tolerates_gone_keys() {
    let mut nat = nat_or_skip!();
    let now = uptime_s();
    let ended = open_flow(&nat, 40011);
    let orphan = open_flow(&nat, 40012);
    let live = open_flow(&nat, 40013);
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, ended), RST, &[]),
    );
    // The orphan keeps its consumer-side half only.
    let reply_key = |port: u16| FlowKey {
        saddr: TARGET,
        daddr: GATEWAY_OUT,
        sport: TARGET_PORT,
        dport: port,
        protocol: TCP,
        _pad: [0; 3],
    };
    assert!(
        nat.flow(&reply_key(orphan)).unwrap().is_some(),
        "key layout"
    );
    nat.forget_flow_entry(&reply_key(orphan));
    assert_eq!(nat.flow_entries(), 5);

    // Past the linger of the reset, well inside the idle time of the live flow.
    let freed = nat
        .sweep_ended(now + 10)
        .expect("a sweep over a missing half");
    assert_eq!(freed, 2, "the reset flow and the orphan");
    assert_eq!(
        nat.flow_entries(),
        2,
        "only the live flow's two halves remain"
    );
    assert!(nat.flow(&reply_key(live)).unwrap().is_some());
    assert_eq!(
        nat.sweep_ended(now + 10).unwrap(),
        0,
        "a second sweep finds nothing"
    );

    // Deletes of keys that are already gone are not errors.
    nat.remove_bucket(0xdead).expect("unknown bucket");
    let last = nat.remove_service(OTHER_IN_RANGE).expect("never a service");
    assert_eq!(last.flows, 0);
}

/// Seconds since boot, the clock the program stamps flows with.
#[test]
fn the_sweep_never_takes_the_half_of_a_flow_that_reused_a_port() {
    let mut nat = nat_or_skip!();
    let (old, new) = (open_flow(&nat, 40021), open_flow(&nat, 40022));
    // The old flow's forward entry now names the new flow's source port, as
    // when the program handed its port on: its reply key is the new flow's.
    let old_key = FlowKey {
        saddr: CONSUMER,
        daddr: GATEWAY_IN,
        sport: 40021,
        dport: LISTENER,
        protocol: TCP,
        _pad: [0; 3],
    };
    let mut stale = nat.flow(&old_key).unwrap().expect("old forward entry");
    assert_eq!(stale.sport, old);
    stale.sport = new;
    stale.flags |= scistream_common::nat::Rewrite::RST_SEEN;
    nat.set_flow_entry(&old_key, stale);

    // Past the reset's linger: judged with the new reply, the old flow
    // would look ended and take that reply with it.
    assert_eq!(
        nat.sweep_ended(uptime_s() + 10).unwrap(),
        2,
        "the two old halves"
    );
    assert_eq!(nat.flow(&old_key).unwrap(), None);
    let reply = tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, new), PSH_ACK, b"new");
    assert_eq!(
        translated(&nat, &reply).dst,
        (CONSUMER, 40022),
        "the new flow still translates its replies"
    );
}

fn uptime_s() -> u32 {
    let text = std::fs::read_to_string("/proc/uptime").expect("/proc/uptime");
    text.split('.')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("seconds")
}

/// A bpffs directory for one test, removed with its pins on drop.
struct TestPins(std::path::PathBuf);

impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = Nat::remove_pins(&self.0);
    }
}

#[test]
fn a_pinned_nat_is_adopted_with_its_flows_and_leaves_nothing_once_unpinned() {
    let Some(_) = load_nat() else { return };
    let root = std::path::Path::new("/sys/fs/bpf");
    super::ensure_bpffs(root).expect("bpffs");
    let pins = TestPins(root.join(format!("scistream-nat-test-{}", std::process::id())));
    let mut first = Nat::load_pinned(&pins.0).expect("pinned load");
    assert!(!first.adopted());
    first.set_ranges(DATA, NAT_PORTS).unwrap();
    first.add_service(LISTENER, service(9)).unwrap();
    let port = open_flow(&first, CONSUMER_PORT);
    drop(first); // as a killed s2cs: the pins hold the maps

    let mut second = Nat::load_pinned(&pins.0).expect("adopting load");
    assert!(second.adopted());
    assert_eq!(second.services().unwrap(), vec![(LISTENER, service(9))]);
    // The same session's service again keeps its flow and counters.
    second.add_service(LISTENER, service(9)).unwrap();
    assert_eq!(second.session_counters(LISTENER).unwrap().unwrap().flows, 1);
    let reply = tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, port), PSH_ACK, b"on");
    assert_eq!(translated(&second, &reply).dst, (CONSUMER, CONSUMER_PORT));

    second.unpin().expect("unpin");
    assert!(!pins.0.exists(), "pins left in {}", pins.0.display());
}

#[path = "nat_hooks_tests.rs"]
mod hooks;
