//! `--enforce_rate`: the `rate` of a request (kbit/s) caps the session's
//! throughput, measured end to end through both gateways; without the flag
//! the rate is only recorded and shown by `status`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Gateway, MIB};
use testbed::netns::addr;
use testbed::{consume, require_root, Node, Producer, Topology, Transfer};

/// 80 Mbit/s: slow enough to be steady on a busy two-core machine, fast
/// enough that a few seconds move tens of MiB.
const RATE_KBPS: u64 = 80_000;
const BYTES: u64 = 24 * MIB;

struct Run {
    transfer: Transfer,
    status: serde_json::Value,
}

/// One session through both gateways, requested with `--rate RATE_KBPS`;
/// streams BYTES each way on one connection.
fn stream_at_rate(backend: &str, extra: &[&str]) -> Run {
    let topo = Topology::new().expect("topology");
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        BYTES,
    )
    .expect("producer");
    let (ns_in, ns_out) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    let gin = Gateway::start(
        ns_in,
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        backend,
        extra,
    );
    let mut out_extra = extra.to_vec();
    out_extra.extend(["--peer_ca", gin.cert_str()]);
    let gout = Gateway::start(
        ns_out,
        addr::OUTBOUND_GW_LAN.into(),
        "5100-5199",
        backend,
        &out_extra,
    );
    let rate = RATE_KBPS.to_string();
    let p = producer.addr();
    let inbound = gin.s2uc_json(
        ns_in,
        "inbound-request",
        &[
            "--remote_ip",
            &p.ip().to_string(),
            "--receiver_ports",
            &p.port().to_string(),
            "--num_conn",
            "1",
            "--rate",
            &rate,
        ],
    );
    let listeners = inbound
        .listeners
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let outbound = gout.s2uc_json(
        ns_out,
        "outbound-request",
        &["--num_conn", "1", "--rate", &rate, &inbound.uid, &listeners],
    );
    let transfer = consume(topo.ns(Node::Consumer), outbound.listeners[0], BYTES, 1)
        .unwrap_or_else(|e| {
            panic!(
                "transfer: {e:#}\ninbound:\n{}\noutbound:\n{}",
                gin.daemon.log_contents(),
                gout.daemon.log_contents()
            )
        });
    let seen = producer
        .wait_for(1, Duration::from_secs(30))
        .expect("producer record");
    transfer
        .verify_with(&seen, BYTES)
        .expect("every byte intact");
    let out = gout.s2uc(ns_out, "status", &[&outbound.uid, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = serde_json::from_slice(&out.stdout).expect("status --json");
    Run { transfer, status }
}

fn mbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

fn assert_capped(test: &str, backend: &str) {
    if !require_root(test) {
        return;
    }
    let run = stream_at_rate(backend, &["--enforce_rate"]);
    let t = &run.transfer;
    let got = mbit_per_s(t.received_bytes, t.elapsed);
    let want = RATE_KBPS as f64 / 1000.0;
    eprintln!(
        "{test}: {got:.1} Mbit/s from the producer with rate {want} Mbit/s ({:?} for {} bytes)",
        t.elapsed, t.received_bytes
    );
    assert!(
        (got - want).abs() <= want * 0.10,
        "{backend}: {got:.1} Mbit/s is not within 10 % of the session's {want} Mbit/s"
    );
}

#[test]
fn enforced_rate_caps_a_tls_session_within_10_percent() {
    assert_capped("enforced_rate_caps_a_tls_session_within_10_percent", "tls");
}

#[test]
fn enforced_rate_caps_a_splice_session_within_10_percent() {
    assert_capped(
        "enforced_rate_caps_a_splice_session_within_10_percent",
        "splice",
    );
}

#[test]
fn without_enforce_rate_the_rate_is_recorded_and_shown_but_not_applied() {
    let test = "without_enforce_rate_the_rate_is_recorded_and_shown_but_not_applied";
    if !require_root(test) {
        return;
    }
    let run = stream_at_rate("splice", &[]);
    assert_eq!(
        run.status["rate_kbps"],
        serde_json::json!(RATE_KBPS),
        "{}",
        run.status
    );
    let got = mbit_per_s(run.transfer.received_bytes, run.transfer.elapsed);
    eprintln!("{test}: {got:.1} Mbit/s");
    assert!(
        got > 2.0 * RATE_KBPS as f64 / 1000.0,
        "{got:.1} Mbit/s: the rate was applied without --enforce_rate"
    );
}
