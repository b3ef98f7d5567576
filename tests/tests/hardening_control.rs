//! The control port and the state directory against a hostile client or a
//! second server: partial messages on many HTTP/2 streams (a raw `h2`
//! client), a flood of junk tokens, a second `s2cs` on a directory in use,
//! and a corrupt session store. Real `s2cs` processes on 127.0.0.1, ports
//! 27520-27599 (below the ephemeral range).

mod auth_server;
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_server::{OAuthServer, S2cs, TokenClient, TokenSpec, User};
use bytes::Bytes;
use common::loopback::{open_session, state_dir, Feeder, LoopGw, Sink};
use common::raw::{block_on, RawClient};
use testbed::{bin, Daemon};

const MIB: u64 = 1024;

/// An HTTP/2 connection of a raw client, from `source`.
async fn h2_connect(control: SocketAddr, source: &str) -> h2::client::SendRequest<Bytes> {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse().expect("source"))
        .expect("bind source");
    let tcp = sock.connect(control).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn grpc_request(control: SocketAddr, path: &str, token: Option<&str>) -> http::Request<()> {
    let mut r = http::Request::builder()
        .method("POST")
        .uri(format!("http://{control}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        r = r.header("authorization", t);
    }
    r.body(()).expect("request")
}

#[test]
fn partial_messages_on_many_streams_and_connections_stay_under_a_memory_bound_while_a_client_completes_its_flow(
) {
    const CONNS: usize = 32;
    const STREAMS: usize = 100;
    /// Growth of s2cs's RSS allowed under the attack (which, unbounded, would
    /// park CONNS x STREAMS x 64 KiB = 200 MiB).
    const BOUND_KIB: u64 = 48 * MIB;
    let gw = LoopGw::start(
        "preauth",
        27520,
        8,
        "splice",
        &["--control_body_timeout", "5"],
    );
    let sink = Sink::start();
    let control = gw.control;
    block_on(async {
        // Warm up: one full flow, so the allocator and threads are in place.
        let c = RawClient::connect(control).await;
        let (uid, _) = open_session(&c, sink.addr, 1).await;
        c.release(&uid).await.expect("release");
        let before = gw.rss_kib();
        let attack_start = Instant::now();
        let paths = [
            "/scistream.Control/update",
            "/scistream.Control/hello",
            "/scistream.Control/req",
            "/scistream.Control/release",
        ];
        let mut held = Vec::new();
        let mut opened = 0usize;
        for i in 0..CONNS {
            let client = h2_connect(control, "127.0.0.1").await;
            for j in 0..STREAMS {
                let Ok(Ok(mut c)) =
                    tokio::time::timeout(Duration::from_millis(100), client.clone().ready()).await
                else {
                    break;
                };
                let Ok((resp, mut send)) = c.send_request(
                    grpc_request(control, paths[(i + j) % paths.len()], None),
                    false,
                ) else {
                    break;
                };
                // A message announcing 65,535 bytes, all but the last sent.
                let mut body = vec![0u8; 5 + 65_534];
                body[1..5].copy_from_slice(&65_535u32.to_be_bytes());
                send.reserve_capacity(body.len());
                let _ = send.send_data(Bytes::from(body), false);
                held.push((resp, send));
                opened += 1;
            }
        }
        // Meanwhile a real client does the whole flow and streams.
        let flow = Instant::now();
        let c = RawClient::connect(control).await;
        let (uid, listeners) = open_session(&c, sink.addr, 1).await;
        let feed = Feeder::start(listeners[0]);
        let fed_from = sink.bytes();
        let mut peak = 0;
        while attack_start.elapsed() < Duration::from_secs(3) {
            peak = peak.max(gw.rss_kib());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // On 2 busy cores the attack's own churn can hold the stream back a
        // while; it must move within 10 s of starting.
        let streaming_deadline = Instant::now() + Duration::from_secs(7);
        while sink.bytes() - fed_from < 256 << 10 && Instant::now() < streaming_deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let streamed = sink.bytes() - fed_from;
        eprintln!("the real client's stream moved {streamed} bytes under the attack");
        assert!(
            streamed >= 256 << 10,
            "the real client's stream moved only {streamed} bytes"
        );
        drop(feed);
        c.release(&uid).await.expect("release during the attack");
        let flow_took = flow.elapsed();
        eprintln!(
            "{opened} partial streams on {CONNS} connections; s2cs RSS {before} KiB before, peak {peak} KiB; the real flow took {flow_took:?}"
        );
        assert!(
            peak <= before + BOUND_KIB,
            "s2cs RSS grew by {} KiB (bound {BOUND_KIB} KiB)",
            peak.saturating_sub(before)
        );
        // Past --control_body_timeout every partial call is answered with an error.
        let answered = tokio::time::timeout(Duration::from_secs(8), async {
            let mut codes = Vec::new();
            for (resp, _send) in held.iter_mut().take(STREAMS) {
                let code = match resp.await {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("trailers")
                        .to_string(),
                    Err(e) => format!("stream error {e}"),
                };
                codes.push(code);
            }
            codes
        })
        .await
        .expect("partial calls still held past the body timeout");
        assert!(
            answered.iter().all(|c| c != "0"),
            "a partial message was accepted: {answered:?}"
        );
    });
}

#[test]
fn a_valid_user_keeps_working_under_a_thousand_junk_token_calls_a_second() {
    // Two calls per millisecond tick: a flood of at least 1,000 a second even when ticks are late.
    const RATE_PER_MS: usize = 2;
    let oauth = OAuthServer::start();
    // A remote authorization server: each introspection takes a while.
    oauth.set_introspect_delay(Duration::from_millis(100));
    let s2cs = S2cs::with_auth(27540, &oauth, &[]);
    let control = s2cs.addr;
    let alice = User::new("alice");
    let token = oauth.issue(TokenSpec::valid(&alice));

    // A repeated junk token is asked about once, then answered from memory.
    let c = TokenClient::connect(control);
    let before = oauth.counts().introspections.load(Ordering::Relaxed);
    for _ in 0..20 {
        let (code, _) =
            auth_server::failure(c.release(&auth_server::new_uid(), "junk-token-repeated"));
        assert_eq!(code, tonic::Code::Unauthenticated);
    }
    assert_eq!(
        oauth.counts().introspections.load(Ordering::Relaxed) - before,
        1,
        "rejections are not cached"
    );

    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = std::thread::spawn({
        let (sent, stop) = (sent.clone(), stop.clone());
        move || {
            block_on(async move {
                let mut conns = Vec::new();
                for _ in 0..8 {
                    conns.push(h2_connect(control, "127.0.0.5").await);
                }
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    tick.tick().await;
                    for _ in 0..RATE_PER_MS {
                        n += 1;
                        let client = conns[n % conns.len()].clone();
                        let sent = sent.clone();
                        tokio::spawn(async move {
                            let token = format!("junk-{}", uuid::Uuid::new_v4().simple());
                            let Ok(Ok(mut c)) =
                                tokio::time::timeout(Duration::from_secs(2), client.ready()).await
                            else {
                                return;
                            };
                            let Ok((resp, mut send)) = c.send_request(
                                grpc_request(control, "/scistream.Control/list", Some(&token)),
                                false,
                            ) else {
                                return;
                            };
                            let _ = send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
                            sent.fetch_add(1, Ordering::Relaxed);
                            let _ = tokio::time::timeout(Duration::from_secs(5), resp).await;
                        });
                    }
                }
            })
        }
    });
    std::thread::sleep(Duration::from_millis(1000));
    let flood_start = (Instant::now(), sent.load(Ordering::Relaxed));
    // The valid user's whole flow, its first call needing an introspection.
    let flow = Instant::now();
    let c = TokenClient::connect(control);
    let uid = auth_server::new_uid();
    let pending = c.req_in_background(&uid, &token);
    c.hello(&uid, "127.0.0.2:9", &token)
        .expect("hello under the flood");
    pending
        .join()
        .expect("req thread")
        .expect("req under the flood");
    c.update(&uid, "127.0.0.2:9", &token)
        .expect("update under the flood");
    c.release(&uid, &token).expect("release under the flood");
    let took = flow.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rate = (sent.load(Ordering::Relaxed) - flood_start.1) as f64
        / flood_start.0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    flood.join().expect("flood thread");
    eprintln!("junk calls at {rate:.0}/s; the valid user's req+hello+update+release took {took:?}");
    assert!(rate >= 1000.0, "the flood ran at only {rate:.0} calls/s");
    assert!(
        took < Duration::from_secs(3),
        "the valid user waited {took:?}"
    );
}

#[test]
fn a_second_s2cs_on_a_directory_in_use_touches_nothing_in_it() {
    let first = LoopGw::start("lock", 27560, 4, "splice", &[]);
    let crt = first.dir.join("server.crt");
    assert!(crt.exists());
    // Gone now: a second s2cs that made certificates before finding the
    // lock would put new ones here.
    std::fs::remove_file(&crt).unwrap();
    std::fs::remove_file(first.dir.join("server.key")).unwrap();
    let mut cmd = std::process::Command::new(bin("s2cs"));
    cmd.args([
        "--listener_ip",
        "127.0.0.1",
        "--control_ip",
        "127.0.0.1",
        "--ssl",
        "false",
        "--guard",
        "false",
        "--port",
        "27570",
        "--port_range",
        "27571-27574",
    ])
    .arg("--state_dir")
    .arg(&first.dir);
    let out = testbed::process::run_command(cmd, Duration::from_secs(20)).expect("second s2cs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second s2cs ran: {err}");
    assert!(
        err.contains("in use by another s2cs")
            && err.contains(&format!("pid {}", first.daemon.pid())),
        "{err}"
    );
    assert!(
        !crt.exists(),
        "the second s2cs wrote a certificate into the directory in use"
    );
}

#[test]
fn a_corrupt_session_store_is_moved_aside_and_s2cs_starts_empty() {
    let dir = state_dir("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = b"definitely not redb\n".repeat(200);
    std::fs::write(dir.join("sessions.redb"), &junk).unwrap();
    let mut cmd = std::process::Command::new(bin("s2cs"));
    cmd.args([
        "--listener_ip",
        "127.0.0.1",
        "--control_ip",
        "127.0.0.1",
        "--ssl",
        "false",
        "--guard",
        "false",
        "--port",
        "27580",
        "--port_range",
        "27581-27584",
    ])
    .args(["--allow_target_nets", "127.0.0.2/32"])
    .arg("--state_dir")
    .arg(&dir);
    let mut daemon = Daemon::spawn(cmd).expect("s2cs");
    daemon
        .wait_for_log("serving scistream.Control", Duration::from_secs(20))
        .expect("s2cs carries on");
    let log = daemon.log_contents();
    assert!(
        log.contains("moved to") && log.contains("sessions.redb.corrupt-"),
        "{log}"
    );
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("sessions.redb.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        junk,
        "the bad store kept as it was"
    );
    // And it works: a session is made and stored.
    let sink = Sink::start();
    block_on(async {
        let c = RawClient::connect(SocketAddr::from(([127, 0, 0, 1], 27580))).await;
        let (uid, _) = open_session(&c, sink.addr, 1).await;
        c.release(&uid).await.expect("release");
    });
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
