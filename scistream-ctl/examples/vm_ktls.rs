//! The test `cargo xtask vm-test` runs inside a VM (static musl build, started
//! by the initramfs' /init): checks that the kernel takes the TLS ULP, then
//! runs a whole `tls`-backend session through two in-process s2cs gateways on
//! loopback (127.0.0.1 outbound, 127.0.0.2 inbound, producer on 127.0.0.3),
//! streams data both ways with SHA-256 checked, and reads /proc/net/tls_stat
//! to prove the tunnel ran in kernel TLS. Its last line is the marker the
//! xtask looks for: `SCISTREAM-VM-TEST: PASS` or `SCISTREAM-VM-TEST: FAIL ...`.
//!
//! On a host without kernel TLS it runs too (the tunnel then stays in rustls):
//! `cargo run --release --example vm_ktls -- --size-mib 16`.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use scistream_ctl::client::Connection;
use scistream_ctl::config::ServerArgs;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    /// MiB streamed in each direction.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Fail unless the tunnel sockets ran in kernel TLS (set inside the VM).
    #[arg(long)]
    require_ktls: bool,
}

const PRODUCER: &str = "127.0.0.3:7000";
const CHUNK: usize = 256 * 1024;

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter("info").with_writer(std::io::stderr).with_ansi(false).init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(&args)) {
        Ok(()) => println!("SCISTREAM-VM-TEST: PASS"),
        Err(e) => println!("SCISTREAM-VM-TEST: FAIL {e:#}"),
    }
    // The VM powers off right after us; make sure the marker is out.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

async fn run(args: &Args) -> Result<()> {
    println!("kernel: {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim());
    let ulp = ulp_probe();
    println!("TCP_ULP tls: {}", match &ulp { Ok(()) => "ok".to_string(), Err(e) => format!("unavailable ({e})") });
    if args.require_ktls {
        ulp.context("setsockopt(TCP_ULP, \"tls\")")?;
    }
    // Taken once both gateways are up: their start-up probes count too.
    let before = session(args.size_mib << 20).await?;
    let after = tls_stat();
    for (name, v) in &after {
        println!("tls_stat {name} {v}");
    }
    let grew = |name: &str| after.iter().find(|(n, _)| n == name).map(|x| x.1).unwrap_or(0)
        - before.iter().find(|(n, _)| n == name).map(|x| x.1).unwrap_or(0);
    // One tunnel connection: the outbound and the inbound end each install TX and RX.
    let (tx, rx) = (grew("TlsTxSw"), grew("TlsRxSw"));
    println!("kernel TLS sessions opened by this run: TX {tx}, RX {rx}");
    if args.require_ktls {
        ensure!(tx >= 2 && rx >= 2, "the tunnel did not run in kernel TLS (TlsTxSw +{tx}, TlsRxSw +{rx})");
    }
    Ok(())
}

/// `setsockopt(TCP_ULP, "tls")` on a connected loopback socket.
fn ulp_probe() -> Result<()> {
    let l = StdListener::bind("127.0.0.1:0")?;
    let c = StdStream::connect(l.local_addr()?)?;
    let _s = l.accept()?;
    nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::TcpUlp::default(), b"tls")?;
    Ok(())
}

fn tls_stat() -> Vec<(String, u64)> {
    let text = std::fs::read_to_string("/proc/net/tls_stat").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn gateway(ip: &str, state: &str) -> ServerArgs {
    use clap::Parser as _;
    ServerArgs::parse_from([
        "s2cs", "--listener_ip", ip, "--control_ip", ip, "--port", "5000", "--port_range", "5100-5110", "--type", "tls",
        "--ssl", "false", "--guard", "false", "--state_dir", state,
    ])
}

/// Returns /proc/net/tls_stat as it was just before the data connection.
async fn session(size: u64) -> Result<Vec<(String, u64)>> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for (ip, state) in [("127.0.0.1", "/tmp/s2cs-out"), ("127.0.0.2", "/tmp/s2cs-in")] {
        let mut rx = stop_rx.clone();
        let args = gateway(ip, state);
        servers.push(tokio::spawn(async move {
            scistream_ctl::control::server::run(args, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    let producer = TcpListener::bind(PRODUCER).await.context("producer listener")?;
    let result = tokio::time::timeout(Duration::from_secs(1800), stream(producer, size)).await;
    let _ = stop_tx.send(true);
    for s in servers {
        s.await.context("s2cs task")?.context("s2cs")?;
    }
    result.context("transfer timed out")?
}

async fn open(addr: &str) -> Result<Connection> {
    // The servers start in the background; retry until they listen.
    for _ in 0..100 {
        if let Ok(c) = Connection::open(addr, None, false, None, Duration::from_secs(60)).await {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("s2cs at {addr} never came up")
}

async fn stream(producer: TcpListener, size: u64) -> Result<Vec<(String, u64)>> {
    let uid = uuid::Uuid::new_v4().to_string();
    let inbound = open("127.0.0.2:5000").await?;
    let resp = inbound.req_with_hello(&uid, "PROD", 1, 0, &[PRODUCER.to_string()], "PROD").await?;
    inbound.update(&uid, &resp.prod_listeners, "PROD").await?;
    // What s2uc prints as the inbound gateway's `listeners`: the tunnel's far end.
    let tunnel = resp.listeners;
    let outbound = open("127.0.0.1:5000").await?;
    let resp = outbound.req_with_hello(&uid, "CONS", 1, 0, &[], "CONS").await?;
    outbound.update(&uid, &tunnel, "CONS").await?;
    let consumer_addr: SocketAddr = resp.listeners.first().context("no outbound listener")?.parse()?;
    let before = tls_stat();
    println!("session {uid}: consumer -> {consumer_addr} -> {} -> {PRODUCER}", tunnel.join(","));

    let start = Instant::now();
    let consumer = async {
        let s = TcpStream::connect(consumer_addr).await?;
        exchange(s, size, 1).await
    };
    let prod = async {
        let (s, _) = producer.accept().await?;
        exchange(s, size, 2).await
    };
    let ((c_sent, c_got), (p_sent, p_got)) = tokio::try_join!(consumer, prod)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "streamed {} MiB each way in {secs:.1} s ({:.0} MB/s per direction)",
        size >> 20,
        size as f64 / secs / 1e6
    );
    ensure!(c_sent == p_got, "consumer -> producer: bytes differ (sha256 {} vs {})", hex(&c_sent.0), hex(&p_got.0));
    ensure!(p_sent == c_got, "producer -> consumer: bytes differ (sha256 {} vs {})", hex(&p_sent.0), hex(&c_got.0));
    println!("sha256 consumer->producer {} ({} bytes)", hex(&c_sent.0), c_sent.1);
    println!("sha256 producer->consumer {} ({} bytes)", hex(&p_sent.0), p_sent.1);
    inbound.release(&uid).await?;
    outbound.release(&uid).await?;
    Ok(before)
}

type Summary = ([u8; 32], u64);

/// Sends `size` generated bytes (then half-closes) while reading until EOF;
/// returns the SHA-256 and length of each direction.
async fn exchange(s: TcpStream, size: u64, seed: u64) -> Result<(Summary, Summary)> {
    let (mut r, mut w) = s.into_split();
    let send = async move {
        let mut h = Sha256::new();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut buf = vec![0u8; CHUNK];
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            for word in buf[..n].chunks_mut(8) {
                // xorshift64: cheap bytes that differ per direction.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
            }
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        w.shutdown().await?;
        anyhow::Ok((h.finalize().into(), size))
    };
    let recv = async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        anyhow::Ok((h.finalize().into(), total))
    };
    let (a, b) = tokio::try_join!(send, recv)?;
    Ok((a, b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
