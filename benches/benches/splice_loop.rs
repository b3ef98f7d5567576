//! The `splice` backend's forwarding loop between two loopback TCP connections:
//! app_a -> [relay_a | splice_bidirectional | relay_b] -> app_b, one direction
//! loaded, against tokio's copy_bidirectional (user-space copies) as the yardstick.
//!
//! `cargo bench -p scistream-benches --bench splice_loop`

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use scistream_ctl::dataplane::splice::splice_bidirectional;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Bytes per iteration: large enough that connection set-up (~0.1 ms) is noise.
const TRANSFER: usize = 64 << 20;
const CHUNK: usize = 256 << 10;

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = l.local_addr().expect("local addr");
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    (c.expect("connect"), s.expect("accept").0)
}

/// Writes TRANSFER bytes into `a`, reads them from `b`, while `relay` forwards.
async fn push_through(
    relay: impl std::future::Future<Output = ()>,
    mut a: TcpStream,
    mut b: TcpStream,
) {
    let chunk = vec![0x5a_u8; CHUNK];
    let writer = async move {
        let mut left = TRANSFER;
        while left > 0 {
            let n = left.min(CHUNK);
            a.write_all(&chunk[..n]).await.expect("write");
            left -= n;
        }
        a.shutdown().await.expect("shutdown");
        // Keep our read side open until the relay is done, as a real client would.
        let mut rest = Vec::new();
        let _ = a.read_to_end(&mut rest).await;
    };
    let reader = async move {
        let mut buf = vec![0_u8; CHUNK];
        let mut got = 0;
        loop {
            let n = b.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, TRANSFER, "the relay lost bytes");
        b.shutdown().await.expect("shutdown");
    };
    tokio::join!(relay, writer, reader);
}

fn forwarding(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let mut group = c.benchmark_group("forward_64MiB_loopback");
    group.throughput(Throughput::Bytes(TRANSFER as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(6));
    group.warm_up_time(Duration::from_secs(1));

    group.bench_function("splice_bidirectional", |bench| {
        bench.to_async(&rt).iter(|| async {
            let (app_a, relay_a) = pair().await;
            let (relay_b, app_b) = pair().await;
            let (fwd, back) = (AtomicU64::new(0), AtomicU64::new(0));
            let relay = async {
                splice_bidirectional(&relay_a, &relay_b, &fwd, &back)
                    .await
                    .expect("splice relay");
            };
            push_through(relay, app_a, app_b).await;
        })
    });

    group.bench_function("tokio_copy_bidirectional", |bench| {
        bench.to_async(&rt).iter(|| async {
            let (app_a, mut relay_a) = pair().await;
            let (mut relay_b, app_b) = pair().await;
            let relay = async {
                tokio::io::copy_bidirectional(&mut relay_a, &mut relay_b)
                    .await
                    .expect("copy relay");
            };
            push_through(relay, app_a, app_b).await;
        })
    });
    group.finish();
}

criterion_group!(benches, forwarding);
criterion_main!(benches);
