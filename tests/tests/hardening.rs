//! A hostile client cannot redirect a gateway into itself, flood a data
//! port, or stall other sessions' streams with control calls: real `s2cs`
//! processes on 127.0.0.1 (ports 27400-27519, below the ephemeral range),
//! producers on 127.0.0.2 (the one network they are allowed to reach), and
//! each test with another session streaming meanwhile.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::loopback::{open_session, raise_fd_limit, Feeder, LoopGw, Sink};
use common::raw::{block_on, expect_code, RawClient};
use tonic::Code;

#[test]
fn update_targets_looping_into_the_gateway_are_refused_while_another_session_streams() {
    let gw = LoopGw::start(
        "loops",
        27400,
        8,
        "splice",
        &["--metrics_addr", "127.0.0.1:27409"],
    );
    let sink = Sink::start();
    let control = gw.control;
    block_on(async {
        let c = RawClient::connect(control).await;
        let (_, streaming) = open_session(&c, sink.addr, 1).await;
        let _feed = Feeder::start(streaming[0]);
        sink.assert_progress(1 << 20, Duration::from_secs(5));
        let (uid, own) = open_session(&c, sink.addr, 1).await;
        let own_listener = own[0].to_string();
        let cases = [
            (own_listener.as_str(), "own data port"),
            ("127.0.0.1:27401", "own data port"),
            ("127.0.0.2:27405", "own data port"),
            ("127.0.0.1:27400", "control or metrics port"),
            ("127.0.0.2:27400", "control or metrics port"),
            ("127.0.0.1:27409", "control or metrics port"),
            ("127.0.0.1:22", "loopback"),
            ("[::1]:22", "loopback"),
            ("[::ffff:127.0.0.1]:22", "loopback"),
            ("0.0.0.0:22", "unspecified"),
            ("169.254.169.254:80", "link-local"),
            ("[fe80::1]:80", "link-local"),
        ];
        for (target, why) in cases {
            let msg = expect_code(
                c.update(&uid, &[target], "PROD").await,
                Code::InvalidArgument,
            );
            assert!(
                msg.contains(why),
                "update to {target}: {msg:?} does not say {why:?}"
            );
        }
        // A list with one bad entry is refused whole.
        let good = sink.addr.to_string();
        expect_code(
            c.update(&uid, &[&good, "127.0.0.1:22"], "PROD").await,
            Code::InvalidArgument,
        );
        // The session still forwards to its old target, and the other streams on.
        let mut probe = TcpStream::connect(own[0]).expect("own session still listens");
        std::io::Write::write_all(&mut probe, b"x").expect("write through the session");
        sink.assert_progress(1 << 20, Duration::from_secs(5));
    });
}

#[test]
fn five_thousand_connects_to_one_data_port_are_capped_and_another_session_streams() {
    raise_fd_limit();
    const CAP_PER_LISTENER: usize = 4;
    const CONNECTS: usize = 5000;
    let gw = LoopGw::start(
        "flood",
        27420,
        8,
        "splice",
        &["--max_conn_per_listener", "4"],
    );
    let sink = Sink::start();
    let control = gw.control;
    let (streaming, flooded) = block_on(async {
        let c = RawClient::connect(control).await;
        let (_, a) = open_session(&c, sink.addr, 1).await;
        let (_, b) = open_session(&c, sink.addr, 1).await;
        (a[0], b[0])
    });
    let _feed = Feeder::start(streaming);
    sink.assert_progress(1 << 20, Duration::from_secs(5));
    let base = gw.fds();
    let mut held = Vec::with_capacity(CONNECTS);
    let mut max_fds = base;
    let start = Instant::now();
    for i in 0..CONNECTS {
        if let Ok(s) = TcpStream::connect_timeout(&flooded, Duration::from_secs(2)) {
            held.push(s);
        }
        if i % 250 == 0 {
            max_fds = max_fds.max(gw.fds());
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    max_fds = max_fds.max(gw.fds());
    eprintln!(
        "{CONNECTS} connects in {:?}: s2cs fds {base} before, at most {max_fds} during",
        start.elapsed()
    );
    // Each admitted splice connection holds 2 sockets and 2 pipes (4 fds) at most.
    let bound = base + CAP_PER_LISTENER * 6 + 16;
    assert!(
        max_fds <= bound,
        "s2cs held {max_fds} descriptors (bound {bound}, {base} before the flood)"
    );
    // Those over the cap were closed (reset) by s2cs: reading gives EOF or an error at once.
    let closed = held
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(1))).ok();
            let mut b = [0u8; 1];
            matches!(std::io::Read::read(&mut &**s, &mut b), Ok(0) | Err(_))
                && !matches!(std::io::Read::read(&mut &**s, &mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert!(
        closed >= held.len() - CAP_PER_LISTENER - 8,
        "only {closed} of {} connections were closed",
        held.len()
    );
    sink.assert_progress(1 << 20, Duration::from_secs(5));
    drop(held);
    // Both legs of a relayed connection carry TCP keepalive: the one s2cs
    // accepted (local address the listener) and the one it opened (peer the sink).
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let (listener, sink_addr) = (streaming.to_string(), sink.addr.to_string());
    let legs: Vec<&str> = text
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 4 && (f[2] == listener || f[3] == sink_addr)
        })
        .collect();
    let keepalive = legs.iter().filter(|l| l.contains("keepalive")).count();
    assert!(
        legs.len() >= 2 && keepalive == legs.len(),
        "s2cs's legs of the stream without a keepalive timer:\n{}",
        legs.join("\n")
    );
}

#[test]
fn fifty_concurrent_updates_never_stall_another_sessions_stream_over_200ms() {
    const SESSIONS: usize = 50;
    const ROUNDS: usize = 6;
    let gw = LoopGw::start("stall", 27440, 60, "splice", &[]);
    let sink = Sink::start();
    let control = gw.control;
    block_on(async {
        let c = RawClient::connect(control).await;
        let (_, streaming) = open_session(&c, sink.addr, 1).await;
        let mut uids = Vec::new();
        for _ in 0..SESSIONS {
            uids.push(open_session(&c, sink.addr, 1).await.0);
        }
        let _feed = Feeder::start(streaming[0]);
        sink.assert_progress(1 << 20, Duration::from_secs(5));
        sink.reset();
        let start = Instant::now();
        for round in 0..ROUNDS {
            let target = SocketAddr::from(([127, 0, 0, 2], 20000 + round as u16)).to_string();
            let calls = uids.iter().map(|uid| {
                let (c, uid, target) = (c.clone(), uid.clone(), target.clone());
                tokio::spawn(async move { c.update(&uid, &[&target], "PROD").await })
            });
            for call in futures_join(calls.collect()).await {
                call.expect("join").expect("update");
            }
        }
        let took = start.elapsed();
        // Past the last update, one more gap can open; wait it out.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let gap = sink.max_gap();
        eprintln!(
            "{} updates in {took:?}; longest pause of the other stream {gap:?}",
            SESSIONS * ROUNDS
        );
        assert!(
            gap <= Duration::from_millis(200),
            "the stream stalled {gap:?} while updates ran"
        );
    });
}

async fn futures_join<T>(
    handles: Vec<tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}
