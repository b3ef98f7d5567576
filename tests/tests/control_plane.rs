//! The control protocol against a real `s2cs`: SciStream 1.2's call
//! sequences from a client written only from docs/protocol.md, sessions isolated
//! from each other, ports checked and returned, and every error code leaving
//! a live session streaming.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::raw::{block_on, expect_code, new_uid, RawClient};
use common::Gateway;
use testbed::netns::addr;
use testbed::{consume, in_netns, require_root, Node, Producer, Stream, Topology};
use tonic::Code;

fn gin_ip() -> std::net::IpAddr {
    addr::INBOUND_GW_WAN.into()
}

/// A plaintext (`--ssl false`) s2cs on the inbound gateway, for the raw client.
fn plain_gateway(topo: &Topology, range: &str, extra: &[&str]) -> Gateway {
    let mut args = vec!["--ssl", "false"];
    args.extend_from_slice(extra);
    Gateway::start(topo.ns(Node::InboundGw), gin_ip(), range, "splice", &args)
}

/// Runs `f` with a raw client inside the inbound gateway's namespace.
fn with_client<T: Send>(
    topo: &Topology,
    gw: &Gateway,
    f: impl AsyncFnOnce(RawClient) -> T + Send,
) -> T {
    let control = gw.control;
    in_netns(topo.ns(Node::InboundGw), move || {
        block_on(async move { f(RawClient::connect(control).await).await })
    })
}

fn port_of(s: &str) -> u16 {
    s.parse::<SocketAddr>()
        .unwrap_or_else(|_| panic!("listener {s:?} is not ip:port"))
        .port()
}

#[test]
fn scistream_sequence_req_then_hello_half_a_second_later() {
    if !require_root("scistream_sequence_req_then_hello_half_a_second_later") {
        return;
    }
    let topo = Topology::new().unwrap();
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        1 << 20,
    )
    .unwrap();
    let gw = plain_gateway(&topo, "5100-5199", &[]);
    let prod = producer.addr().to_string();
    let (uid, listeners) = with_client(&topo, &gw, async |c| {
        let uid = new_uid();
        let pending = tokio::spawn({
            let (c, uid) = (c.clone(), uid.clone());
            async move { c.req(&uid, "PROD", 2, 10000).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let app = c
            .hello(&uid, &[prod.as_str()], "PROD")
            .await
            .expect("hello");
        assert!(!app.message.is_empty());
        let resp = pending
            .await
            .unwrap()
            .expect("req completes once the hello came");
        assert_eq!(resp.listeners.len(), 2);
        for l in &resp.listeners {
            assert!(l.starts_with("10.91.2.2:"), "listener {l} uses listener_ip");
            assert!((5100..=5199).contains(&port_of(l)));
        }
        assert_eq!(resp.prod_listeners, vec![prod.clone()]);
        let upd = c
            .update(&uid, &[prod.as_str()], "PROD")
            .await
            .expect("update");
        assert_eq!(upd.listeners, resp.listeners);
        assert_eq!(
            upd.prod_listeners,
            vec![prod.clone(), prod.clone()],
            "targets cycled to num_conn"
        );
        (uid, resp.listeners)
    });
    // The session forwards: the other gateway's side reaches the producer.
    let t = consume(
        topo.ns(Node::OutboundGw),
        listeners[1].parse().unwrap(),
        1 << 20,
        9,
    )
    .expect("through the listener");
    t.verify_with(
        &producer.wait_for(1, Duration::from_secs(10)).unwrap(),
        1 << 20,
    )
    .unwrap();
    with_client(&topo, &gw, async |c| {
        c.release(&uid).await.expect("release");
        expect_code(c.release(&uid).await, Code::NotFound);
    });
}

#[test]
fn hello_before_req_is_accepted_and_req_role_counts() {
    if !require_root("hello_before_req_is_accepted_and_req_role_counts") {
        return;
    }
    let topo = Topology::new().unwrap();
    let gw = plain_gateway(&topo, "5100-5199", &[]);
    with_client(&topo, &gw, async |c| {
        let uid = new_uid();
        let early = tokio::spawn({
            let (c, uid) = (c.clone(), uid.clone());
            async move { c.hello(&uid, &["10.91.3.2:7000"], "PROD").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let resp = c
            .req(&uid, "PROD", 1, 10000)
            .await
            .expect("req after its hello");
        let app = early.await.unwrap().expect("the early hello succeeds");
        assert_eq!(app.listeners, resp.listeners);
        assert_eq!(resp.prod_listeners, vec!["10.91.3.2:7000".to_string()]);

        // SciStream 1.2's outbound-request says "PROD" in the hello of a CONS session.
        let cons = new_uid();
        let pending = tokio::spawn({
            let (c, cons) = (c.clone(), cons.clone());
            async move { c.req(&cons, "CONS", 1, 10000).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let app = c
            .hello(&cons, &["10.91.3.2:80"], "PROD")
            .await
            .expect("hello");
        let resp = pending.await.unwrap().expect("req");
        assert_eq!(app.listeners, resp.listeners);
        assert!(
            resp.prod_listeners.is_empty(),
            "a CONS session ignores the hello's addresses"
        );
    });
}

#[test]
fn interleaved_sessions_get_disjoint_ports_and_their_own_producer() {
    if !require_root("interleaved_sessions_get_disjoint_ports_and_their_own_producer") {
        return;
    }
    let topo = Topology::new().unwrap();
    let pa = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7001),
        1 << 20,
    )
    .unwrap();
    let pb = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7002),
        1 << 20,
    )
    .unwrap();
    let gw = plain_gateway(&topo, "5100-5199", &[]);
    let (a_addr, b_addr) = (pa.addr().to_string(), pb.addr().to_string());
    let (la, lb) = with_client(&topo, &gw, async |c| {
        let (ua, ub) = (new_uid(), new_uid());
        let ra = tokio::spawn({
            let (c, u) = (c.clone(), ua.clone());
            async move { c.req(&u, "PROD", 2, 1).await }
        });
        let rb = tokio::spawn({
            let (c, u) = (c.clone(), ub.clone());
            async move { c.req(&u, "PROD", 2, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Hellos in the opposite order: each req must still get its own answer.
        c.hello(&ub, &[b_addr.as_str()], "PROD").await.unwrap();
        c.hello(&ua, &[a_addr.as_str()], "PROD").await.unwrap();
        let (ra, rb) = (ra.await.unwrap().unwrap(), rb.await.unwrap().unwrap());
        assert_eq!(ra.prod_listeners, vec![a_addr.clone()]);
        assert_eq!(rb.prod_listeners, vec![b_addr.clone()]);
        assert!(
            ra.listeners.iter().all(|l| !rb.listeners.contains(l)),
            "{:?} vs {:?}",
            ra.listeners,
            rb.listeners
        );
        c.update(&ua, &[a_addr.as_str()], "PROD").await.unwrap();
        c.update(&ub, &[b_addr.as_str()], "PROD").await.unwrap();
        (ra.listeners, rb.listeners)
    });
    let out = topo.ns(Node::OutboundGw);
    consume(out, la[0].parse().unwrap(), 1 << 20, 1)
        .unwrap()
        .verify_with(&pa.wait_for(1, Duration::from_secs(10)).unwrap(), 1 << 20)
        .unwrap();
    consume(out, lb[1].parse().unwrap(), 1 << 20, 2)
        .unwrap()
        .verify_with(&pb.wait_for(1, Duration::from_secs(10)).unwrap(), 1 << 20)
        .unwrap();
    assert_eq!(
        (pa.accepted(), pb.accepted()),
        (1, 1),
        "each session reached only its own producer"
    );
}

#[test]
fn req_without_hello_times_out_and_returns_its_ports() {
    if !require_root("req_without_hello_times_out_and_returns_its_ports") {
        return;
    }
    let topo = Topology::new().unwrap();
    let gw = plain_gateway(&topo, "5100-5101", &["--hello_timeout", "1"]);
    with_client(&topo, &gw, async |c| {
        let start = Instant::now();
        let msg = expect_code(
            c.req(&new_uid(), "PROD", 2, 1).await,
            Code::DeadlineExceeded,
        );
        assert!(msg.contains("hello"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(5));
        // Both ports came back: a new session can take them.
        let uid = new_uid();
        let pending = tokio::spawn({
            let (c, uid) = (c.clone(), uid.clone());
            async move { c.req(&uid, "PROD", 2, 1).await }
        });
        c.hello(&uid, &["10.91.3.2:7000"], "PROD").await.unwrap();
        let r = pending
            .await
            .unwrap()
            .expect("the freed ports are allocated again");
        let mut ports: Vec<u16> = r.listeners.iter().map(|l| port_of(l)).collect();
        ports.sort();
        assert_eq!(ports, vec![5100, 5101]);
    });
}

/// One connection may hold only half of its 32 streams (`--max_control_streams`)
/// in reqs waiting for their hello: a thousand reqs sent on it leave 16
/// pending and are refused past that, so a hello always finds a stream.
#[test]
fn a_thousand_pending_reqs_do_not_stop_a_hello() {
    if !require_root("a_thousand_pending_reqs_do_not_stop_a_hello") {
        return;
    }
    const HELD: usize = 16;
    let topo = Topology::new().unwrap();
    let gw = plain_gateway(&topo, "20000-21099", &["--hello_timeout", "120"]);
    let daemon = &gw.daemon;
    let control = gw.control;
    with_client(&topo, &gw, async |c| {
        let mut pending = Vec::new();
        for _ in 0..1000 {
            let c = c.clone();
            pending.push(tokio::spawn(async move {
                c.req(&new_uid(), "PROD", 1, 1).await
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while pending.iter().filter(|p| p.is_finished()).count() < 1000 - HELD {
            assert!(
                Instant::now() < deadline,
                "the reqs past the connection's share were not refused in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (done, waiting): (Vec<_>, Vec<_>) = pending.into_iter().partition(|p| p.is_finished());
        assert_eq!(
            waiting.len(),
            HELD,
            "reqs waiting for their hello on one connection"
        );
        for p in done {
            // Refused either by s2cs (past the req share) or by HTTP/2 itself
            // (past the connection's stream limit): never held.
            match p.await.unwrap() {
                Err(s) if s.code() == Code::ResourceExhausted => {}
                Err(s)
                    if s.code() == Code::Unavailable
                        && format!("{s:?}").contains("REFUSED_STREAM") => {}
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(
            daemon.log_contents().matches("session requested").count(),
            HELD
        );
        let start = Instant::now();
        let uid = new_uid();
        let other = RawClient::connect(control).await;
        let probe = tokio::spawn({
            let uid = uid.clone();
            async move { other.req(&uid, "PROD", 1, 1).await }
        });
        // The hello on the connection whose req share is full.
        tokio::time::timeout(
            Duration::from_secs(10),
            c.hello(&uid, &["10.91.3.2:7000"], "PROD"),
        )
        .await
        .expect("hello answered while the connection's reqs wait")
        .expect("hello");
        let r = tokio::time::timeout(Duration::from_secs(10), probe)
            .await
            .expect("req answered")
            .unwrap()
            .unwrap();
        assert!(
            port_of(&r.listeners[0]) >= 20000 + HELD as u16,
            "the pending sessions hold their ports: {:?}",
            r.listeners
        );
        eprintln!(
            "req+hello with {HELD} pending on one connection: {:?}",
            start.elapsed()
        );
        assert!(
            waiting.iter().all(|p| !p.is_finished()),
            "pending reqs stay pending"
        );
        for p in waiting {
            p.abort();
        }
    });
}

#[test]
fn release_frees_ports_closes_connections_and_busy_ports_are_skipped() {
    if !require_root("release_frees_ports_closes_connections_and_busy_ports_are_skipped") {
        return;
    }
    let topo = Topology::new().unwrap();
    // Another process's listener on 5101, inside the range.
    let squatter = in_netns(topo.ns(Node::InboundGw), || {
        TcpListener::bind("10.91.2.2:5101")
    })
    .expect("squatting 5101");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .unwrap();
    let gw = plain_gateway(&topo, "5100-5102", &[]);
    let target = echo.addr().to_string();
    let open = |c: RawClient, n: i32| {
        let target = target.clone();
        async move {
            let uid = new_uid();
            let pending = tokio::spawn({
                let (c, uid) = (c.clone(), uid.clone());
                async move { c.req(&uid, "PROD", n, 1).await }
            });
            c.hello(&uid, &[target.as_str()], "PROD").await?;
            let r = pending.await.expect("join")?;
            c.update(&uid, &[target.as_str()], "PROD").await?;
            Ok::<_, tonic::Status>((uid, r.listeners))
        }
    };
    let (uid, listeners) = with_client(&topo, &gw, async |c| open(c, 2).await.expect("session"));
    let ports: Vec<u16> = listeners.iter().map(|l| port_of(l)).collect();
    assert_eq!(ports, vec![5100, 5102], "the busy port 5101 is skipped");

    let stream = Stream::start(topo.ns(Node::OutboundGw), listeners[0].parse().unwrap()).unwrap();
    stream.assert_progress(Duration::from_secs(5));
    with_client(&topo, &gw, async |c| {
        c.release(&uid).await.expect("release")
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    while stream.error().is_none() {
        assert!(
            Instant::now() < deadline,
            "the live connection was not closed by release"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(stream);
    // Still the same two ports, free again.
    let (_, again) = with_client(&topo, &gw, async |c| {
        open(c, 2).await.expect("ports reusable after release")
    });
    assert_eq!(
        again.iter().map(|l| port_of(l)).collect::<Vec<_>>(),
        vec![5100, 5102]
    );
    drop(squatter);
}

#[test]
fn every_error_code_leaves_a_live_session_streaming() {
    if !require_root("every_error_code_leaves_a_live_session_streaming") {
        return;
    }
    let topo = Topology::new().unwrap();
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .unwrap();
    let gw = plain_gateway(&topo, "5100-5103", &[]);
    let target = echo.addr().to_string();
    let (live_uid, live) = with_client(&topo, &gw, async |c| {
        let uid = new_uid();
        let pending = tokio::spawn({
            let (c, uid) = (c.clone(), uid.clone());
            async move { c.req(&uid, "PROD", 1, 1).await }
        });
        c.hello(&uid, &[target.as_str()], "PROD").await.unwrap();
        let r = pending.await.unwrap().unwrap();
        c.update(&uid, &[target.as_str()], "PROD").await.unwrap();
        (uid, r.listeners[0].clone())
    });
    let stream = Stream::start(topo.ns(Node::OutboundGw), live.parse().unwrap()).unwrap();
    stream.assert_progress(Duration::from_secs(5));
    let alive = || stream.assert_progress(Duration::from_secs(5));

    with_client(&topo, &gw, async |c| {
        let unknown = new_uid();
        // NOT_FOUND
        expect_code(
            c.update(&unknown, &["10.91.3.2:7000"], "PROD").await,
            Code::NotFound,
        );
        alive();
        expect_code(c.release(&unknown).await, Code::NotFound);
        alive();
        let m = expect_code(
            c.hello(&unknown, &["10.91.3.2:7000"], "PROD").await,
            Code::NotFound,
        );
        assert!(m.contains(&unknown), "{m}");
        alive();
        // ALREADY_EXISTS
        expect_code(c.req(&live_uid, "PROD", 1, 1).await, Code::AlreadyExists);
        alive();
        // RESOURCE_EXHAUSTED, with nothing half-allocated: 3 ports are free, ask for 4.
        let m = expect_code(
            c.req(&new_uid(), "PROD", 4, 1).await,
            Code::ResourceExhausted,
        );
        assert!(m.contains("5100-5103"), "{m}");
        alive();
        let uid3 = new_uid();
        let pending = tokio::spawn({
            let (c, uid3) = (c.clone(), uid3.clone());
            async move { c.req(&uid3, "PROD", 3, 1).await }
        });
        // INVALID_ARGUMENT: a malformed address in the hello leaves the req pending...
        tokio::time::sleep(Duration::from_millis(100)).await;
        expect_code(
            c.hello(&uid3, &["10.91.3.2"], "PROD").await,
            Code::InvalidArgument,
        );
        c.hello(&uid3, &["10.91.3.2:7000"], "PROD")
            .await
            .expect("a good hello after a bad one");
        assert_eq!(
            pending
                .await
                .unwrap()
                .expect("all three free ports")
                .listeners
                .len(),
            3
        );
        alive();
        expect_code(
            c.update(&uid3, &["garbage"], "PROD").await,
            Code::InvalidArgument,
        );
        expect_code(c.update(&uid3, &[], "PROD").await, Code::InvalidArgument);
        c.release(&uid3).await.unwrap();
        alive();
        for (uid, role, n, rate) in [
            (new_uid(), "BOTH", 1, 1),
            (new_uid(), "PROD", 0, 1),
            (new_uid(), "PROD", 129, 1),
            (new_uid(), "PROD", 1, -5),
            ("not-a-uid".to_string(), "PROD", 1, 1),
        ] {
            let m = expect_code(c.req(&uid, role, n, rate).await, Code::InvalidArgument);
            assert!(!m.is_empty());
            alive();
        }
        expect_code(c.release("'; DROP TABLE").await, Code::InvalidArgument);
    });
    alive();
    let summary = stream
        .finish()
        .expect("the live session's bytes all came back intact");
    assert!(summary.echoed_bytes > 0);
}
