//! The control plane as `s2uc inbound-request` drives it: `req` + `hello` +
//! `update` against an in-process `s2cs` over TLS on loopback, on one open
//! connection (so the TLS handshake is not in the figure; `cargo xtask bench`
//! measures the whole command, process start and handshake included).
//!
//! `cargo bench -p scistream-benches --bench control_round_trip`

use std::net::TcpListener;
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion};
use scistream_ctl::client::Connection;
use scistream_ctl::config::ServerArgs;
use tokio::runtime::Runtime;

/// Data listener ports the in-process s2cs may hand out; each session is
/// released before the next, so a few suffice.
const PORT_RANGE: &str = "47100-47163";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn round_trip(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let state = tempfile::tempdir().expect("state dir");
    let port = free_port();
    let state_dir = state.path().to_str().expect("UTF-8 temp dir").to_owned();
    let args = ServerArgs::parse_from([
        "s2cs",
        "--listener_ip",
        "127.0.0.1",
        "--control_ip",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--port_range",
        PORT_RANGE,
        // splice needs no peer certificate; the control path is the same for every backend.
        "--type",
        "splice",
        // The benchmark's targets are on loopback.
        "--allow_target_nets",
        "127.0.0.0/8",
        "--state_dir",
        &state_dir,
    ]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(scistream_ctl::control::server::run(args, async {
        let _ = stopped.await;
    }));

    let target = format!("127.0.0.1:{port}");
    let cert = state.path().join("server.crt");
    let conn = rt.block_on(async {
        // The server writes its certificate and binds shortly after the spawn.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if cert.is_file() {
                if let Ok(conn) =
                    Connection::open(&target, Some(&cert), true, None, Duration::from_secs(10))
                        .await
                {
                    return conn;
                }
            }
            assert!(
                Instant::now() < deadline,
                "s2cs did not come up on {target}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let producer = vec!["127.0.0.1:9".to_owned()];
    let mut group = c.benchmark_group("control_tls_loopback");
    group.sample_size(50);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    group.bench_function("req_hello_update", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let conn = conn.clone();
            let producer = producer.clone();
            async move {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let uid = uuid::Uuid::new_v4().hyphenated().to_string();
                    let started = Instant::now();
                    let resp = conn
                        .req_with_hello(&uid, "PROD", 1, 10_000, &producer, "PROD")
                        .await
                        .expect("req + hello");
                    conn.update(&uid, &resp.prod_listeners, "PROD")
                        .await
                        .expect("update");
                    timed += started.elapsed();
                    // Untimed: give the listener port back for the next session.
                    conn.release(&uid).await.expect("release");
                }
                timed
            }
        })
    });
    group.finish();

    let _ = stop.send(());
    rt.block_on(server)
        .expect("s2cs task")
        .expect("s2cs shut down cleanly");
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
