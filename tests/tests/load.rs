//! Load: 200 connections at once through one session (default `tls`
//! backend, both gateways), every byte of every connection checked both ways
//! by SHA-256, and the gateways' own counters agreeing.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Gateway;
use testbed::netns::addr;
use testbed::{consume_parallel, require_root, Node, Producer, Topology};

const CONNECTIONS: usize = 200;
const NUM_CONN: usize = 4;
/// Per connection and direction; 50 MiB each way in all.
const BYTES: u64 = 256 * 1024;

/// 200 connections hold about 1200 descriptors in this process (consumer
/// and producer ends, each with a clone per thread): over the usual soft
/// limit of 1024.
fn raise_fd_limit() {
    use nix::libc;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn two_hundred_concurrent_connections_through_one_session_all_verified() {
    if !require_root("two_hundred_concurrent_connections_through_one_session_all_verified") {
        return;
    }
    raise_fd_limit();
    let topo = Topology::new().expect("topology");
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        BYTES,
    )
    .expect("producer");
    let (ns_in, ns_out) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    // 200 connections over 4 listeners: past s2cs's default cap of 8 per listener.
    let cap = ["--max_conn_per_listener", "100"];
    let gin = Gateway::start(ns_in, addr::INBOUND_GW_WAN.into(), "5100-5199", "tls", &cap);
    let gout = Gateway::start(
        ns_out,
        addr::OUTBOUND_GW_LAN.into(),
        "5100-5199",
        "tls",
        &["--peer_ca", gin.cert_str(), cap[0], cap[1]],
    );
    let inbound = gin.inbound(ns_in, producer.addr(), NUM_CONN);
    let outbound = gout.outbound(ns_out, &inbound, NUM_CONN);

    // 50 connections on each of the session's 4 listeners, all at once.
    let targets: Vec<SocketAddr> = (0..CONNECTIONS)
        .map(|i| outbound.listeners[i % NUM_CONN])
        .collect();
    let transfers = consume_parallel(topo.ns(Node::Consumer), &targets, BYTES, 1000)
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\ninbound s2cs:\n{}\noutbound s2cs:\n{}",
                gin.daemon.log_contents(),
                gout.daemon.log_contents()
            )
        });
    assert_eq!(transfers.len(), CONNECTIONS);
    let seen = producer
        .wait_for(CONNECTIONS, Duration::from_secs(60))
        .expect("producer records");
    assert_eq!(seen.len(), CONNECTIONS);
    for t in &transfers {
        t.verify_with(&seen, BYTES)
            .expect("every connection intact both ways");
    }

    // Each gateway counted every connection and every byte.
    for (gw, ns) in [(&gin, ns_in), (&gout, ns_out)] {
        let out = gw.s2uc(ns, "status", &[&inbound.uid, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
        assert_eq!(s["connections_total"], CONNECTIONS as u64, "{s}");
        assert_eq!(s["connections_failed"], 0, "{s}");
        assert_eq!(s["bytes_forward"], CONNECTIONS as u64 * BYTES, "{s}");
        assert_eq!(s["bytes_backward"], CONNECTIONS as u64 * BYTES, "{s}");
    }
}
