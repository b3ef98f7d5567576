//! The NAT's two hooks and the life of its flows, run in the kernel on
//! hand-made packets (BPF_PROG_TEST_RUN): the fragment-capable XDP program
//! on frames larger than a page (the kernel hands it several buffers), the
//! tc program on GSO packets as an skb, both giving the same bytes; the
//! guard's rules for VLAN tags, IPv6 extension headers and every
//! port-carrying protocol; ended flows giving their source port back and
//! swept away. Helpers and addresses come from `nat_tests` (the parent).

use super::*;

/// Payload bytes whose checksum is not all zeros.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn xdp_nat_translates_a_frame_larger_than_a_page_across_its_buffers() {
    let nat = nat_or_skip!();
    open_flow(&nat, CONSUMER_PORT);
    // A 9000-byte MTU frame: the kernel's test run puts what does not fit
    // one page into fragments, as a multi-buffer driver does.
    let payload = pattern(8960);
    let frame = tcp4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, LISTENER),
        PSH_ACK,
        &payload,
    );
    assert!(frame.len() > 4096);
    let out = translated(&nat, &frame);
    assert_eq!(out.dst, (TARGET, TARGET_PORT));
    assert_eq!(out.payload, payload, "payload across the buffers intact");
    let counted = nat.session_counters(LISTENER).unwrap().unwrap();
    assert_eq!(counted.forward_bytes, payload.len() as u64);
}

#[test]
fn tc_nat_translates_gso_packets_with_checksums_a_receiver_accepts() {
    let nat = nat_or_skip!();
    let syn = tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, LISTENER), SYN, &[]);
    let (action, out) = nat.tc_run_on_packet(&syn, None).expect("tc test run");
    assert!(
        matches!(action, Action::Pass | Action::Forward),
        "{action:?}"
    );
    let opened = parse_checked(&out);
    assert_eq!(opened.dst, (TARGET, TARGET_PORT));
    // Two MSS-sized segments in one GSO packet, as the stack hands a veth
    // (the largest linear skb a test run takes is under a page).
    let payload = pattern(2 * 1448 + 1);
    let data = tcp4(
        (CONSUMER, CONSUMER_PORT),
        (GATEWAY_IN, LISTENER),
        PSH_ACK,
        &payload,
    );
    let (action, out) = nat
        .tc_run_on_packet(&data, Some((1448, 3)))
        .expect("tc test run");
    assert!(
        matches!(action, Action::Pass | Action::Forward),
        "{action:?}"
    );
    let seen = parse_checked(&out);
    assert_eq!((seen.src, seen.dst), (opened.src, (TARGET, TARGET_PORT)));
    assert_eq!(seen.payload, payload);
    let reply = tcp4((TARGET, TARGET_PORT), opened.src, PSH_ACK, b"odd!!");
    let (_, out) = nat
        .tc_run_on_packet(&reply, Some((1448, 1)))
        .expect("tc test run");
    let back = parse_checked(&out);
    assert_eq!(
        (back.src, back.dst),
        ((GATEWAY_IN, LISTENER), (CONSUMER, CONSUMER_PORT))
    );
}

#[test]
fn both_hooks_write_the_same_bytes_for_the_same_flow() {
    let nat = nat_or_skip!();
    let port = open_flow(&nat, CONSUMER_PORT);
    for frame in [
        tcp4(
            (CONSUMER, CONSUMER_PORT),
            (GATEWAY_IN, LISTENER),
            PSH_ACK,
            &pattern(1001),
        ),
        tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, port), ACK, &[]),
    ] {
        let (_, by_xdp) = run(&nat, &frame);
        let (_, by_tc) = nat.tc_run_on_packet(&frame, None).expect("tc test run");
        // From the IP header on (a redirect may have set the MACs).
        assert_eq!(by_xdp[14..], by_tc[14..]);
        assert_ne!(by_xdp[14..], frame[14..], "translated");
    }
}

#[test]
fn guarding_matches_the_guard_for_vlan_ipv6_extensions_and_every_port_protocol() {
    let nat = nat_or_skip!();
    let to = |port: u16, protocol: u8| {
        let mut f = frame4(
            (CONSUMER, CONSUMER_PORT),
            (GATEWAY_IN, port),
            UDP,
            0,
            &[0; 16],
            0,
        );
        f[14 + 9] = protocol; // SCTP, DCCP, UDP-Lite: ports where UDP has them
        f
    };
    for protocol in [132u8, 33, 136, UDP] {
        assert_eq!(
            run(&nat, &to(OTHER_IN_RANGE, protocol)).0,
            Action::Drop,
            "protocol {protocol}"
        );
        assert_eq!(
            run(&nat, &to(OUTSIDE, protocol)).0,
            Action::Pass,
            "protocol {protocol}"
        );
    }
    // A VLAN tag before IPv4: guarded the same.
    let tagged = |port: u16| {
        let mut f = to(port, UDP);
        f.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        f
    };
    assert_eq!(run(&nat, &tagged(OTHER_IN_RANGE)).0, Action::Drop);
    assert_eq!(run(&nat, &tagged(OUTSIDE)).0, Action::Pass);
    // IPv6 with a hop-by-hop and a destination options header before TCP.
    let ipv6 = |port: u16| {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 36, 0, 64]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop -> dest opts
        f.extend_from_slice(&[TCP, 0, 1, 4, 0, 0, 0, 0]); // dest opts -> TCP
        f.extend_from_slice(&CONSUMER_PORT.to_be_bytes());
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN, 0xff, 0xff, 0, 0, 0, 0]);
        f
    };
    assert_eq!(run(&nat, &ipv6(OTHER_IN_RANGE)).0, Action::Drop);
    assert_eq!(run(&nat, &ipv6(OUTSIDE)).0, Action::Pass);
    assert_eq!(
        nat.tc_run_on_packet(&ipv6(OTHER_IN_RANGE), None).unwrap().0,
        Action::Drop
    );
}

#[test]
fn an_ended_flow_gives_its_source_port_to_the_next_syn_and_the_sweep_empties_the_map() {
    let Some(mut nat) = load_nat() else { return };
    // One source port: a second flow can only have it once the first ended.
    nat.set_ranges(DATA, (61000, 61000)).unwrap();
    nat.set_lifetimes(7440, 0, 30).unwrap();
    nat.add_service(LISTENER, service(1)).unwrap();
    assert_eq!(open_flow(&nat, 40001), 61000);
    let second = tcp4((CONSUMER, 40002), (GATEWAY_IN, LISTENER), SYN, &[]);
    assert_eq!(run(&nat, &second).0, Action::Drop, "the only port is taken");
    assert_eq!(nat.events(Event::PortsExhausted).unwrap().packets, 1);

    // FIN each way (linger 0): the next SYN may take the port.
    translated(
        &nat,
        &tcp4((CONSUMER, 40001), (GATEWAY_IN, LISTENER), FIN_ACK, &[]),
    );
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, 61000), FIN_ACK, &[]),
    );
    assert_eq!(open_flow(&nat, 40002), 61000);

    // A reset ends it too; a SYN on the same consumer port then opens a
    // fresh flow instead of reusing the ended one.
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, 61000), RST, &[]),
    );
    assert_eq!(open_flow(&nat, 40002), 61000);
    assert_eq!(nat.session_counters(LISTENER).unwrap().unwrap().flows, 3);
    assert_eq!(nat.flow_entries(), 2);

    // Open and answered: the sweep keeps it; closed: it goes.
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, 61000), SYN_ACK, &[]),
    );
    assert_eq!(nat.sweep_ended(uptime_s()).unwrap(), 0);
    assert_eq!(nat.flow_entries(), 2);
    translated(
        &nat,
        &tcp4((CONSUMER, 40002), (GATEWAY_IN, LISTENER), RST, &[]),
    );
    assert_eq!(nat.sweep_ended(uptime_s()).unwrap(), 1);
    assert_eq!(nat.flow_entries(), 0);
}

#[test]
fn a_reset_followed_by_more_traffic_does_not_end_the_flow() {
    let Some(mut nat) = load_nat() else { return };
    nat.set_ranges(DATA, NAT_PORTS).unwrap();
    nat.set_lifetimes(7440, 0, 30).unwrap();
    nat.add_service(LISTENER, service(1)).unwrap();
    let port = open_flow(&nat, CONSUMER_PORT);
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, port), SYN_ACK, &[]),
    );
    // A forged reset (its sender goes on): the next frame clears it.
    translated(
        &nat,
        &tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, LISTENER), RST, &[]),
    );
    translated(
        &nat,
        &tcp4((CONSUMER, CONSUMER_PORT), (GATEWAY_IN, LISTENER), ACK, &[]),
    );
    assert_eq!(nat.sweep_ended(uptime_s()).unwrap(), 0);
    assert_eq!(nat.flow_entries(), 2);
}

#[test]
fn unanswered_syns_expire_but_answered_flows_wait_for_the_idle_timeout() {
    let Some(mut nat) = load_nat() else { return };
    nat.set_ranges(DATA, NAT_PORTS).unwrap();
    nat.add_service(LISTENER, service(1)).unwrap();
    let answered = open_flow(&nat, 40001);
    translated(
        &nat,
        &tcp4((TARGET, TARGET_PORT), (GATEWAY_OUT, answered), SYN_ACK, &[]),
    );
    open_flow(&nat, 40002);
    let later = uptime_s() + u32::from(scistream_common::nat::UNANSWERED_S);
    assert_eq!(nat.sweep_ended(later).unwrap(), 1, "the unanswered one");
    assert_eq!(nat.flow_entries(), 2);
    assert_eq!(
        nat.sweep_ended(uptime_s() + scistream_common::nat::IDLE_S)
            .unwrap(),
        1
    );
    assert_eq!(nat.flow_entries(), 0);
}
