//! Restart without loss: `s2cs` killed (SIGKILL) or stopped (SIGTERM, with
//! and without `--keep_sessions`) and started again on the same state
//! directory, with real sessions, real connections and SHA-256-checked bytes.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::raw::{block_on, new_uid, RawClient};
use common::{closed_within, Gateway, MIB};
use testbed::netns::addr;
use testbed::process::Signal;
use testbed::{consume_parallel, in_netns, require_root, Node, Producer, Stream, Topology};

const RANGE: &str = "5100-5199";

/// uid -> (listeners, targets) as `s2uc list --json` reports them.
fn sessions(gw: &Gateway) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    sessions_with(gw, &[])
}

fn sessions_with(gw: &Gateway, extra: &[&str]) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    let out = gw.s2uc(&gw.ns, "list", &[&["--json"], extra].concat());
    assert!(
        out.status.success(),
        "s2uc list: {}\ns2cs log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.daemon.log_contents()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list --json");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("an array")
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect()
    };
    v.as_array()
        .expect("an array of sessions")
        .iter()
        .map(|s| {
            (
                s["uid"].as_str().expect("uid").to_string(),
                (strings(&s["listeners"]), strings(&s["targets"])),
            )
        })
        .collect()
}

fn kill(gw: &mut Gateway, signal: Signal) -> std::process::ExitStatus {
    gw.daemon.signal(signal).expect("signalling s2cs");
    gw.daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits")
}

fn status_not_found(gw: &Gateway, uid: &str) -> bool {
    let out = gw.s2uc(&gw.ns, "status", &[uid]);
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound")
}

#[test]
fn sigkilled_gateways_restore_every_session_and_new_connections_stream() {
    if !require_root("sigkilled_gateways_restore_every_session_and_new_connections_stream") {
        return;
    }
    const BYTES: u64 = 8 * MIB;
    let topo = Topology::new().expect("topology");
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        BYTES,
    )
    .expect("producer");
    // tls: the restored tunnel must still prove the session secret to its peer.
    let mut gin = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        RANGE,
        "tls",
        &[],
    );
    let peer_ca = ["--peer_ca".to_string(), gin.cert_str().to_string()];
    let peer_ca: Vec<&str> = peer_ca.iter().map(String::as_str).collect();
    let mut gout = Gateway::start(
        topo.ns(Node::OutboundGw),
        addr::OUTBOUND_GW_LAN.into(),
        RANGE,
        "tls",
        &peer_ca,
    );

    let (nin, nout) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    let a_in = gin.inbound(nin, producer.addr(), 2);
    let a_out = gout.outbound(nout, &a_in, 2);
    let b_in = gin.inbound(nin, producer.addr(), 1);
    let b_out = gout.outbound(nout, &b_in, 1);
    let first = consume_parallel(topo.ns(Node::Consumer), &a_out.listeners, BYTES, 1)
        .expect("streams before the kill");
    let (before_in, before_out) = (sessions(&gin), sessions(&gout));
    assert_eq!(before_in.len(), 2);
    assert_eq!(before_out.len(), 2);

    assert!(kill(&mut gin, Signal::SIGKILL).signal().is_some());
    assert!(kill(&mut gout, Signal::SIGKILL).signal().is_some());
    gin.respawn(RANGE, "tls", &[]);
    gout.respawn(RANGE, "tls", &peer_ca);
    for gw in [&mut gin, &mut gout] {
        gw.daemon
            .wait_for_log("restored 2 stored sessions", Duration::from_secs(5))
            .expect("restore reported");
    }

    assert_eq!(
        sessions(&gin),
        before_in,
        "inbound sessions came back with the same listeners and targets"
    );
    assert_eq!(
        sessions(&gout),
        before_out,
        "outbound sessions came back with the same listeners and targets"
    );
    // New connections through every listener of both sessions, after the restart.
    let addrs: Vec<SocketAddr> = a_out
        .listeners
        .iter()
        .chain(&b_out.listeners)
        .copied()
        .collect();
    let after = consume_parallel(topo.ns(Node::Consumer), &addrs, BYTES, 10).unwrap_or_else(|e| {
        panic!(
            "after restart: {e:#}\ninbound s2cs:\n{}\noutbound s2cs:\n{}",
            gin.daemon.log_contents(),
            gout.daemon.log_contents()
        )
    });
    let seen = producer
        .wait_for(first.len() + after.len(), Duration::from_secs(30))
        .expect("producer records");
    for t in first.iter().chain(&after) {
        t.verify_with(&seen, BYTES).expect("both directions intact");
    }
    assert_eq!(after.len(), 3);
}

#[test]
fn sigterm_without_keep_sessions_forgets_them_and_with_it_they_come_back() {
    if !require_root("sigterm_without_keep_sessions_forgets_them_and_with_it_they_come_back") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo");
    let ns = topo.ns(Node::InboundGw);
    let mut gw = Gateway::start(ns, addr::INBOUND_GW_WAN.into(), RANGE, "splice", &[]);

    // Without --keep_sessions: a clean stop closes the live stream and forgets the session.
    let gone = gw.inbound(ns, echo.addr(), 1);
    let stream = Stream::start(topo.ns(Node::OutboundGw), gone.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    assert!(
        kill(&mut gw, Signal::SIGTERM).success(),
        "clean exit on SIGTERM"
    );
    assert!(
        closed_within(&stream, Duration::from_secs(1)).is_some(),
        "the live connection was closed at shutdown"
    );
    gw.respawn(RANGE, "splice", &["--keep_sessions"]);
    assert!(
        sessions(&gw).is_empty(),
        "nothing stored after a stop without --keep_sessions"
    );
    assert!(status_not_found(&gw, &gone.uid));

    // With --keep_sessions: the data plane stops, the session comes back and streams.
    let kept = gw.inbound(ns, echo.addr(), 2);
    assert_eq!(
        common::ports(&kept.listeners),
        vec![5100, 5101],
        "the forgotten session's port was free again"
    );
    let stream = Stream::start(topo.ns(Node::OutboundGw), kept.listeners[1]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    let before = sessions(&gw);
    assert!(
        kill(&mut gw, Signal::SIGTERM).success(),
        "clean exit on SIGTERM"
    );
    assert!(
        closed_within(&stream, Duration::from_secs(1)).is_some(),
        "the data plane was released at shutdown even though the session is kept"
    );
    for port in common::ports(&kept.listeners) {
        in_netns(ns, || {
            std::net::TcpListener::bind((addr::INBOUND_GW_WAN, port))
        })
        .expect("port free while s2cs is down");
    }
    gw.respawn(RANGE, "splice", &[]);
    assert_eq!(
        sessions(&gw),
        before,
        "kept session back with its listeners and targets"
    );
    let stream =
        Stream::start(topo.ns(Node::OutboundGw), kept.listeners[1]).expect("stream after restart");
    stream.assert_progress(Duration::from_secs(5));
    stream.finish().expect("echo intact after restart");
    let out = gw.s2uc(ns, "release", &[&kept.uid]);
    assert!(out.status.success());
}

#[test]
fn a_stored_session_whose_port_is_taken_fails_alone() {
    if !require_root("a_stored_session_whose_port_is_taken_fails_alone") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo");
    let ns = topo.ns(Node::InboundGw);
    let mut gw = Gateway::start(ns, addr::INBOUND_GW_WAN.into(), RANGE, "splice", &[]);
    let blocked = gw.inbound(ns, echo.addr(), 1);
    let fine = gw.inbound(ns, echo.addr(), 1);
    kill(&mut gw, Signal::SIGKILL);
    // Another program takes the first session's port while s2cs is down.
    let squatter = in_netns(ns, || std::net::TcpListener::bind(blocked.listeners[0]))
        .expect("taking the port");
    gw.respawn(RANGE, "splice", &[]);
    let line = gw
        .daemon
        .wait_for_log("could not be restored", Duration::from_secs(5))
        .expect("the failure is logged");
    assert!(line.contains(&blocked.uid), "{line}");
    gw.daemon
        .wait_for_log("restored 1 stored sessions", Duration::from_secs(5))
        .expect("count reported");
    let now = sessions(&gw);
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        vec![&fine.uid],
        "the other session came back"
    );
    let stream = Stream::start(topo.ns(Node::OutboundGw), fine.listeners[0]).expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    stream.finish().expect("echo intact");
    drop(squatter);
    // The failed session was forgotten, not left to fail at every start.
    kill(&mut gw, Signal::SIGKILL);
    gw.respawn(RANGE, "splice", &[]);
    assert_eq!(sessions(&gw).keys().collect::<Vec<_>>(), vec![&fine.uid]);
}

#[test]
fn sigterm_answers_a_req_still_waiting_for_its_hello_and_exits() {
    if !require_root("sigterm_answers_a_req_still_waiting_for_its_hello_and_exits") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let ns = topo.ns(Node::InboundGw);
    let mut gw = Gateway::start(ns, addr::INBOUND_GW_WAN.into(), RANGE, "splice", &[]);
    // prod-req waits for a hello that never comes (the default hello timeout is 180 s).
    let control = gw.control.to_string();
    let args = [
        "prod-req",
        "--s2cs",
        &control,
        "--server_cert",
        gw.cert_str(),
        "--num_conn",
        "1",
    ];
    let mut client = testbed::spawn_in(ns, testbed::bin("s2uc"), args).expect("s2uc prod-req");
    gw.daemon
        .wait_for_log("session requested", Duration::from_secs(10))
        .expect("req arrived");
    let t0 = std::time::Instant::now();
    assert!(
        kill(&mut gw, Signal::SIGTERM).success(),
        "clean exit on SIGTERM"
    );
    eprintln!(
        "s2cs exited {:?} after SIGTERM with a pending req",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "the pending req did not hold up the shutdown"
    );
    let status = client.wait_exit(Duration::from_secs(5)).expect("s2uc ends");
    assert!(
        !status.success(),
        "the pending req failed: {}",
        client.log_contents()
    );
}

#[test]
fn an_answered_session_waits_for_its_update_across_a_restart_and_an_unanswered_req_is_dropped() {
    if !require_root("an_answered_session_waits_for_its_update_across_a_restart_and_an_unanswered_req_is_dropped") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo");
    let ns = topo.ns(Node::InboundGw);
    let mut gw = Gateway::start(
        ns,
        addr::INBOUND_GW_WAN.into(),
        RANGE,
        "splice",
        &["--ssl", "false"],
    );
    let (control, producer) = (gw.control, echo.addr().to_string());
    let (answered, unanswered) = (new_uid(), new_uid());
    let listeners = in_netns(ns, || {
        block_on(async {
            let c = RawClient::connect(control).await;
            let req = tokio::spawn({
                let (c, uid) = (c.clone(), answered.clone());
                async move { c.req(&uid, "PROD", 1, 1).await }
            });
            c.hello(&answered, &[&producer], "PROD")
                .await
                .expect("hello");
            let granted = req.await.expect("join").expect("req answered");
            // This one never gets its hello: s2cs dies while it waits.
            let c2 = c.clone();
            let uid = unanswered.clone();
            tokio::spawn(async move { c2.req(&uid, "PROD", 1, 1).await });
            tokio::time::sleep(Duration::from_millis(200)).await;
            granted.listeners
        })
    });
    gw.daemon
        .wait_for_log(&format!("uid={unanswered}"), Duration::from_secs(5))
        .expect("the second req arrived");
    kill(&mut gw, Signal::SIGKILL);
    gw.respawn(RANGE, "splice", &["--ssl", "false"]);
    let now = sessions_with(&gw, &["--ssl", "false"]);
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        vec![&answered],
        "only the answered session is back"
    );
    assert_eq!(
        now[&answered],
        (listeners.clone(), vec![]),
        "same listeners, no targets yet"
    );
    // The dropped req's port (the next one) is free; the update completes the kept session.
    in_netns(ns, || {
        std::net::TcpListener::bind((addr::INBOUND_GW_WAN, 5101))
    })
    .expect("the unanswered req's port is free");
    in_netns(ns, || {
        block_on(async {
            RawClient::connect(control)
                .await
                .update(&answered, &[&producer], "PROD")
                .await
        })
    })
    .expect("update after the restart");
    let stream = Stream::start(
        topo.ns(Node::OutboundGw),
        listeners[0].parse().expect("an address"),
    )
    .expect("stream");
    stream.assert_progress(Duration::from_secs(5));
    stream.finish().expect("echo intact");
}
