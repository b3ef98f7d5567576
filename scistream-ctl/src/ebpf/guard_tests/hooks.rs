//! The guard's two entry points and multi-buffer frames: every decision test
//! of the parent module again at tc and at XDP with the headers in
//! fragments; jumbo frames in several buffers; a GSO packet at tc; and
//! attachment to a real veth at tc, by the Auto policy, and in driver mode
//! at MTU 9000.

use super::*;
use crate::ebpf::{tc_ingress_programs, AttachPolicy};

/// For each named decision test of the parent module, a test of the same
/// name here that runs it with its frames shaped as `$shape`.
macro_rules! again_as {
    ($shape:expr) => {
        again_as!(
            $shape;
            allowed_port_passes_and_is_counted,
            port_in_range_not_allowed_is_dropped_and_counted,
            range_bounds_are_guarded_and_ports_outside_pass,
            ipv6_is_guarded_like_ipv4,
            udp_is_guarded_like_tcp,
            truncated_tcp_header_to_data_range_is_dropped,
            non_ip_frames_pass,
            zero_range_disables_the_guard,
            denied_port_drops_again_and_hands_back_final_counts,
            vlan_tagged_traffic_is_guarded,
            only_first_fragments_carry_ports_and_are_checked,
            ipv6_extension_headers_are_walked,
            restricted_port_drops_other_sources_and_counts_them_on_the_port,
            peer_networks_match_by_prefix,
            ipv4_networks_never_admit_ipv6_sources,
            one_sessions_peers_do_not_open_another_sessions_port,
            restricted_port_without_peers_passes_nothing_and_denied_peers_stop_passing,
            restricting_a_live_port_keeps_its_counters,
            sctp_dccp_and_udplite_are_guarded_like_tcp,
            ports_behind_every_ipv6_extension_header_are_checked,
            ipv6_extension_chains_that_cannot_be_walked_are_dropped,
            ipv6_non_first_fragments_and_final_headers_pass,
        );
    };
    ($shape:expr; $($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                super::super::SHAPE.set($shape);
                super::super::$test();
            }
        )+
    };
}

mod at_tc {
    again_as!(super::Shape::Skb);
}

mod at_xdp_headers_in_fragments {
    again_as!(super::Shape::XdpHeadersInFragments);
}

/// An Ethernet frame of `len` bytes: IPv4, TCP to `dport`, payload filling the rest.
fn tcp4_sized(dport: u16, len: usize) -> Vec<u8> {
    let mut l4 = tcp(dport);
    l4.resize(len - 14 - 20, 0xa5);
    ethernet(ETH_P_IP, &ipv4(TCP, &l4))
}

fn tcp6_sized(dport: u16, len: usize) -> Vec<u8> {
    let mut l4 = tcp(dport);
    l4.resize(len - 14 - 40, 0xa5);
    ethernet(ETH_P_IPV6, &ipv6(TCP, &l4))
}

/// A jumbo frame (MTU 9000) through the XDP program arrives in several
/// buffers (the kernel's test run keeps one page minus head- and tailroom
/// linear and puts the rest into fragments, as veth and NIC drivers do); the
/// guard decides on its headers and counts all of its bytes.
#[test]
fn jumbo_frames_in_several_buffers_are_guarded_and_counted_whole() {
    let guard = guard_on_range_or_skip!();
    let (allowed, allowed6) = (tcp4_sized(ALLOWED, 9014), tcp6_sized(ALLOWED, 9014));
    let denied = tcp4_sized(NOT_ALLOWED, 9014);
    assert_eq!(guard.run_on_frame(&allowed).unwrap(), Verdict::Pass);
    assert_eq!(guard.run_on_frame(&allowed6).unwrap(), Verdict::Pass);
    assert_eq!(guard.run_on_frame(&denied).unwrap(), Verdict::Drop);
    assert_eq!(
        guard.port_stats(ALLOWED).unwrap(),
        Some(counted(&[&allowed, &allowed6]))
    );
    assert_eq!(
        guard.dropped_for(DropReason::NotAllowed).unwrap(),
        counted(&[&denied])
    );
}

/// The first buffer may end anywhere in the headers: inside the Ethernet
/// header's tail, the IP header, the ports or the rest of the TCP header.
#[test]
fn headers_split_across_buffers_are_read_whole() {
    let guard = guard_on_range_or_skip!();
    let allowed = tcp4_sized(ALLOWED, 9014);
    let denied = tcp4_sized(NOT_ALLOWED, 9014);
    let outside = tcp4_sized(OUTSIDE, 9014);
    let cuts = [14, 20, 30, 34, 36, 40, 50, 54, 1500];
    for linear in cuts {
        assert_eq!(
            guard.run_on_multibuffer_frame(&allowed, linear).unwrap(),
            Verdict::Pass,
            "first buffer {linear} bytes"
        );
        assert_eq!(
            guard.run_on_multibuffer_frame(&denied, linear).unwrap(),
            Verdict::Drop,
            "first buffer {linear} bytes"
        );
        assert_eq!(
            guard.run_on_multibuffer_frame(&outside, linear).unwrap(),
            Verdict::Pass,
            "first buffer {linear} bytes"
        );
    }
    let n = cuts.len() as u64;
    assert_eq!(
        guard.port_stats(ALLOWED).unwrap().unwrap(),
        Counters {
            packets: n,
            bytes: n * 9014
        }
    );
    assert_eq!(
        guard.dropped().unwrap(),
        Counters {
            packets: n,
            bytes: n * 9014
        }
    );
}

/// A peer-restricted port in a multi-buffer frame: the source address may
/// lie beyond the first buffer too.
#[test]
fn peer_check_reads_a_source_beyond_the_first_buffer() {
    let mut guard = guard_on_range_or_skip!();
    guard.allow_peer(2, &net("198.51.100.0/24")).unwrap();
    guard.allow_port_from_peers(NOT_ALLOWED, 2).unwrap();
    let mut l4 = tcp(NOT_ALLOWED);
    l4.resize(9000 - 20, 0);
    let from_peer = ethernet(ETH_P_IP, &ipv4_full([198, 51, 100, 9], TCP, 0, &l4));
    let from_other = ethernet(ETH_P_IP, &ipv4_full([203, 0, 113, 9], TCP, 0, &l4));
    // The source address spans bytes 26..30: cut inside it.
    for linear in [14, 28] {
        assert_eq!(
            guard.run_on_multibuffer_frame(&from_peer, linear).unwrap(),
            Verdict::Pass
        );
        assert_eq!(
            guard.run_on_multibuffer_frame(&from_other, linear).unwrap(),
            Verdict::Drop
        );
    }
    let c = port_counters(&guard, NOT_ALLOWED);
    assert_eq!((c.passed.packets, c.dropped.packets), (2, 2));
}

/// tc sees a GRO/GSO packet whole: one decision for all of it, counted as
/// its segments and its bytes. (Kernel 6.18's test run builds linear skbs of
/// at most a page, so two segments of 1448 bytes; whole 64 KB packets cross
/// the guard in the namespace tests.)
#[test]
fn a_gso_packet_at_tc_is_guarded_whole_and_counted_as_its_segments() {
    let guard = guard_on_range_or_skip!();
    let (mss, segs) = (1448u32, 2u32);
    let len = 14 + 20 + 20 + (mss * segs) as usize;
    let allowed = tcp4_sized(ALLOWED, len);
    let denied = tcp4_sized(NOT_ALLOWED, len);
    assert_eq!(
        guard.run_on_skb(&allowed, Some((mss, segs))).unwrap(),
        Verdict::Pass
    );
    assert_eq!(
        guard.run_on_skb(&denied, Some((mss, segs))).unwrap(),
        Verdict::Drop
    );
    let whole = Counters {
        packets: u64::from(segs),
        bytes: len as u64,
    };
    assert_eq!(guard.port_stats(ALLOWED).unwrap(), Some(whole));
    assert_eq!(guard.dropped_for(DropReason::NotAllowed).unwrap(), whole);
    // Without GSO metadata the same packet is one frame.
    assert_eq!(guard.run_on_skb(&allowed, None).unwrap(), Verdict::Pass);
    assert_eq!(
        guard.port_stats(ALLOWED).unwrap().unwrap().packets,
        u64::from(segs) + 1
    );
}

#[test]
fn attached_at_tc_guards_real_traffic_and_detaches_on_drop() {
    with_veth_guard(1500, |pair, mut guard, socket| {
        guard.attach_at(&pair.gateway_if, Hook::Tc).unwrap();
        let programs = tc_ingress_programs(&pair.gateway_if).unwrap();
        assert_eq!(programs, ["tc_guard"], "tc ingress of {}", pair.gateway_if);
        assert!(
            !pair.gateway_link().contains("xdp"),
            "tc attachment must leave XDP alone:\n{}",
            pair.gateway_link()
        );
        // At tc ingress the frame is counted from its Ethernet header on, as at XDP.
        let (passed, dropped) = send_until_counted(&guard, socket, 100);
        assert_eq!(passed.bytes, passed.packets * 142, "{passed:?}");
        assert_eq!(dropped.bytes, dropped.packets * 142, "{dropped:?}");
        drop(guard);
        assert_eq!(
            tc_ingress_programs(&pair.gateway_if).unwrap(),
            Vec::<String>::new(),
            "tc program left attached after drop"
        );
    });
}

/// Auto puts the guard on a veth at tc (XDP there would strip GSO from the
/// peer), and says where.
#[test]
fn auto_puts_the_guard_on_a_veth_at_tc() {
    with_veth_guard(1500, |pair, mut guard, _| {
        let attached = guard.attach(&pair.gateway_if, AttachPolicy::Auto).unwrap();
        assert_eq!((attached.hook, attached.xdp_refused), (Hook::Tc, None));
        assert_eq!(guard.attached(), [(pair.gateway_if.clone(), Hook::Tc)]);
        assert_eq!(tc_ingress_programs(&pair.gateway_if).unwrap(), ["tc_guard"]);
        guard.detach(&pair.gateway_if).unwrap();
        assert!(guard.attached().is_empty());
        assert!(
            tc_ingress_programs(&pair.gateway_if).unwrap().is_empty(),
            "detach leaves no program"
        );
    });
}

/// Fragment support is what lets the XDP guard into the driver at MTU 9000
/// (veth refuses a program without it above about 3.5 KB); jumbo datagrams
/// then reach it in several buffers and are guarded and counted whole.
#[test]
fn fragment_capable_xdp_attaches_in_driver_mode_at_mtu_9000() {
    with_veth_guard(9000, |pair, mut guard, socket| {
        guard.attach_at(&pair.gateway_if, Hook::XdpDriver).unwrap();
        let link = pair.gateway_link();
        assert!(
            link.contains("mtu 9000") && link.contains("xdp") && !link.contains("xdpgeneric"),
            "{link}"
        );
        // 8000 bytes of UDP payload: one frame of 8042 bytes, over two pages.
        let (passed, dropped) = send_until_counted(&guard, socket, 8000);
        assert_eq!(
            passed.bytes,
            passed.packets * 8042,
            "frames counted whole: {passed:?}"
        );
        assert_eq!(dropped.bytes, dropped.packets * 8042, "{dropped:?}");
    });
}

/// With the XDP policy forced on a veth at MTU 9000 the guard still gets
/// driver mode, never generic XDP.
#[test]
fn forced_xdp_policy_at_mtu_9000_gets_driver_mode() {
    with_veth_guard(9000, |pair, mut guard, _| {
        let attached = guard.attach(&pair.gateway_if, AttachPolicy::Xdp).unwrap();
        assert_eq!(
            (attached.hook, attached.xdp_refused),
            (Hook::XdpDriver, None)
        );
        assert!(!pair.gateway_link().contains("xdpgeneric"));
    });
}
