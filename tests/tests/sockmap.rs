//! The `sockmap` backend on both gateways, across the four namespaces: bytes
//! moved by the kernel's sk_skb redirect arrive intact, in parallel, and an
//! EOF crosses both gateways as a half-close while the other direction goes on.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{Gateway, MIB};
use testbed::netns::addr;
use testbed::{consume_parallel, in_netns, require_root, Node, Producer, Topology};

const PRODUCER_PORT: u16 = 7000;
const RANGE: &str = "5100-5199";

/// Both gateways on `sockmap`, with a session of `num_conn` connections to
/// `producer`; returns the gateways and the consumer-side listeners.
fn sockmap_session(
    topo: &Topology,
    producer: SocketAddr,
    num_conn: usize,
) -> (Gateway, Gateway, Vec<SocketAddr>) {
    let (gin_ip, gout_ip): (IpAddr, IpAddr) =
        (addr::INBOUND_GW_WAN.into(), addr::OUTBOUND_GW_LAN.into());
    let gin = Gateway::start(
        topo.ns(Node::InboundGw),
        gin_ip,
        RANGE,
        "sockmap",
        &["--experimental"],
    );
    let gout = Gateway::start(
        topo.ns(Node::OutboundGw),
        gout_ip,
        RANGE,
        "sockmap",
        &["--experimental"],
    );
    let inbound = gin.inbound(topo.ns(Node::InboundGw), producer, num_conn);
    let outbound = gout.outbound(topo.ns(Node::OutboundGw), &inbound, num_conn);
    assert_eq!(outbound.listeners.len(), num_conn);
    assert!(
        gin.daemon.log_contents().contains("backend sockmap"),
        "{}",
        gin.daemon.log_contents()
    );
    let listeners = outbound.listeners.clone();
    (gin, gout, listeners)
}

#[test]
#[ignore = "Linux 6.18's sk_skb redirect sometimes sends bytes twice (1448 to 65160 extra bytes in about 1 of 12 runs of this test); the backend detects it and resets the connection, so the test cannot pass reliably: run with --ignored"]
fn sockmap_session_streams_64mib_each_way_on_four_connections() {
    const TEST: &str = "sockmap_session_streams_64mib_each_way_on_four_connections";
    if !require_root(TEST) {
        return;
    }
    let (num_conn, bytes) = (4, 64 * MIB);
    let topo = Topology::new().expect("topology");
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    let (gin, gout, listeners) = sockmap_session(&topo, producer.addr(), num_conn);

    let transfers =
        consume_parallel(topo.ns(Node::Consumer), &listeners, bytes, 1).unwrap_or_else(|e| {
            panic!(
                "transfer failed: {e:#}\ninbound s2cs:\n{}\noutbound s2cs:\n{}",
                gin.daemon.log_contents(),
                gout.daemon.log_contents()
            )
        });
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
    let mut used: Vec<_> = transfers.iter().map(|t| t.peer).collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), num_conn, "each stream used its own listener");
    for gw in [&gin, &gout] {
        let log = gw.daemon.log_contents();
        assert!(
            !log.contains("moving the connection to splice"),
            "the kernel path stalled:\n{log}"
        );
    }
}

#[test]
fn sockmap_passes_half_close_on_while_the_other_direction_flows() {
    const TEST: &str = "sockmap_passes_half_close_on_while_the_other_direction_flows";
    if !require_root(TEST) {
        return;
    }
    const REQUEST: usize = 3 * 1024 * 1024;
    const REPLY: &[u8] = b"got it all; here is the answer";
    let topo = Topology::new().expect("topology");
    let bind = SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT);
    let listener =
        in_netns(topo.ns(Node::Producer), || TcpListener::bind(bind)).expect("producer listener");
    // The producer reads the whole request up to EOF, and only then answers:
    // without the consumer's half-close crossing both gateways it never would.
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut request = Vec::new();
        s.read_to_end(&mut request)?;
        s.write_all(REPLY)?;
        s.shutdown(Shutdown::Write)?;
        Ok(request.len())
    });
    let (gin, gout, listeners) = sockmap_session(&topo, bind, 1);

    let mut c = in_netns(topo.ns(Node::Consumer), || {
        TcpStream::connect_timeout(&listeners[0], Duration::from_secs(10))
    })
    .expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    c.write_all(&vec![0x5a; REQUEST]).expect("request");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut reply = Vec::new();
    let read = c.read_to_end(&mut reply);
    let received = server.join().expect("server thread");
    assert!(
        read.is_ok() && reply == REPLY,
        "reply {:?} ({read:?})\ninbound s2cs:\n{}\noutbound s2cs:\n{}",
        String::from_utf8_lossy(&reply),
        gin.daemon.log_contents(),
        gout.daemon.log_contents()
    );
    assert_eq!(
        received.expect("producer side"),
        REQUEST,
        "the producer saw the whole request, then EOF"
    );
}
