//! Cost per packet of the XDP programs, measured by the kernel itself
//! (BPF_PROG_TEST_RUN reports the time spent in the program): the guard
//! every backend runs behind, and the `xdp` backend's NAT on a translated
//! flow, on frames it passes untouched and on frames it drops.
//!
//! The kernel repeats each run on the same buffer, so the NAT's session is
//! set up as a fixed point: the target is the listener itself and the one
//! NAT source port is the consumer's, so every pass finds the flow, does the
//! full translation (lookups, rewrite, checksum updates, counters, route
//! lookup) and leaves the frame as it found it. `bpf_fib_lookup` answers from
//! this host's routing table; the redirect itself (devmap enqueue) is not
//! part of a test run.
//!
//! `sudo cargo bench -p scistream-benches --bench xdp_cost` (needs root).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use scistream_common::nat::Service;
use scistream_ctl::ebpf::{Guard, Nat};

const DATA: (u16, u16) = (5100, 5200);
const LISTENER: u16 = 5101;
const CONSUMER: ([u8; 4], u16) = ([192, 0, 2, 2], 40000);
const GATEWAY_IN: [u8; 4] = [192, 0, 2, 1];
/// A full-size segment: what a bulk stream is made of.
const PAYLOAD: usize = 1448;

/// A TCP/IPv4 frame; checksums are left zero (XDP never verifies them, and
/// the incremental update costs the same whatever their value).
fn frame(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8, payload: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&((40 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.resize(f.len() + payload, 0x5a);
    f
}

/// Criterion's iterations as one kernel loop of that many runs.
fn kernel_time(iters: u64, per_run: impl Fn(u32) -> Duration) -> Duration {
    let mut left = iters;
    let mut total = Duration::ZERO;
    while left > 0 {
        let n = left.min(u64::from(u32::MAX)) as u32;
        total += per_run(n) * n;
        left -= u64::from(n);
    }
    total
}

fn bench(c: &mut Criterion) {
    if !nix_is_root() {
        eprintln!("xdp_cost: skipped, needs root (BPF_PROG_TEST_RUN)");
        return;
    }
    let (mut guard, mut nat) = match (Guard::load(), Nat::load()) {
        (Ok(g), Ok(n)) => (g, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("xdp_cost: skipped, cannot load the XDP programs: {e}");
            return;
        }
    };
    guard.set_port_range(DATA.0, DATA.1).expect("guard range");
    guard.allow_port(LISTENER, 1).expect("guard port");
    // A session that names its peers: one more (LPM trie) lookup per frame.
    let restricted = LISTENER + 1;
    let peer = format!("{}/32", std::net::Ipv4Addr::from(CONSUMER.0));
    guard
        .allow_peer(2, &peer.parse().expect("peer"))
        .expect("guard peer");
    guard
        .allow_port_from_peers(restricted, 2)
        .expect("guard restricted port");
    let from_peer = frame(CONSUMER, (GATEWAY_IN, restricted), 0x10, PAYLOAD);
    nat.set_ranges(DATA, (CONSUMER.1, CONSUMER.1))
        .expect("nat ranges");
    let fixed_point = Service {
        target_addr: GATEWAY_IN,
        snat_addr: CONSUMER.0,
        target_port: LISTENER,
        tag: 1,
        ..Default::default()
    };
    nat.add_service(LISTENER, fixed_point).expect("nat service");
    let forward = frame(CONSUMER, (GATEWAY_IN, LISTENER), 0x10, PAYLOAD);
    let backward = frame((GATEWAY_IN, LISTENER), CONSUMER, 0x10, PAYLOAD);
    let (_, syn_out) = nat
        .run_on_frame(&frame(CONSUMER, (GATEWAY_IN, LISTENER), 0x02, 0))
        .expect("SYN");
    assert_eq!(
        &syn_out[26..38],
        &forward[26..38],
        "the session translates onto itself"
    );
    for f in [&forward, &backward] {
        assert_eq!(
            nat.run_on_frame(f).expect("run").1,
            *f,
            "a translated frame changed: not a fixed point"
        );
    }
    let outside = frame(CONSUMER, (GATEWAY_IN, 22), 0x10, PAYLOAD);
    let denied = frame(CONSUMER, (GATEWAY_IN, 5150), 0x02, 0);
    let allowed = frame(CONSUMER, (GATEWAY_IN, LISTENER), 0x10, PAYLOAD);

    let mut g = c.benchmark_group("xdp_per_packet");
    let cases: [(&str, &dyn Fn(u32) -> Duration); 8] = [
        ("guard/session_port_pass", &|n| {
            guard.time_per_frame(&allowed, n).expect("run")
        }),
        ("guard/peer_restricted_pass", &|n| {
            guard.time_per_frame(&from_peer, n).expect("run")
        }),
        ("guard/outside_range_pass", &|n| {
            guard.time_per_frame(&outside, n).expect("run")
        }),
        ("guard/not_allowed_drop", &|n| {
            guard.time_per_frame(&denied, n).expect("run")
        }),
        ("nat/flow_forward_translate", &|n| {
            nat.time_per_frame(&forward, n).expect("run")
        }),
        ("nat/flow_backward_translate", &|n| {
            nat.time_per_frame(&backward, n).expect("run")
        }),
        ("nat/outside_range_pass", &|n| {
            nat.time_per_frame(&outside, n).expect("run")
        }),
        ("nat/not_allowed_drop", &|n| {
            nat.time_per_frame(&denied, n).expect("run")
        }),
    ];
    for (name, run) in cases {
        g.bench_function(name, |b| b.iter_custom(|iters| kernel_time(iters, run)));
    }
    g.finish();
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
