//! The test `cargo xtask vm-test` runs inside a VM (static musl build, started
//! by the initramfs' /init). It runs a whole `tls`-backend session through two
//! in-process s2cs gateways, streams data both ways with SHA-256 checked, and
//! reads /proc/net/tls_stat to prove where the tunnel ran. With `--netns` the
//! inbound gateway and the producer live in their own network namespace
//! (a thread that unshared it, so one process holds both sides), joined to
//! the consumer's and outbound gateway's by a veth pair (10.99.0.1 |
//! 10.99.0.2); without it all four share loopback (127.0.0.1 outbound,
//! 127.0.0.2 inbound, producer on 127.0.0.3).
//!
//! - `--expect kernel`: kernel TLS sessions in use on both gateways during the
//!   stream; with `SCISTREAM_REKEY_BYTES` set, the kernel's re-key counters
//!   show every forced KeyUpdate installed on both ends.
//! - `--expect rustls`: no kernel TLS session (a kernel that cannot re-key
//!   keeps the tunnel in rustls under `SCISTREAM_KTLS=auto`).
//!
//! Then a peer that knows the session secret floods KeyUpdates: it must be
//! cut off, nothing may reach the producer, and the session's failed
//! connection counter must move. With `--mixed-mib` (and `--netns`), two more
//! sessions run with one gateway in a child process under `SCISTREAM_KTLS=off`
//! (rustls) and the other in kernel TLS, once each way round, both forcing
//! re-keys: the data must arrive intact and each namespace's tls_stat must
//! show kernel TLS, re-keyed both ways, only on the kernel side. With
//! `--compare-mib`, child processes time
//! the same exchange over plain loopback, through kernel TLS and through
//! rustls, and print throughput and CPU per GB (under TCG only the ratios
//! mean anything). The last line is the marker the xtask looks for:
//! `SCISTREAM-VM-TEST: PASS` or `SCISTREAM-VM-TEST: FAIL ...`.
//!
//! On a host without kernel TLS it runs too (the tunnel stays in rustls):
//! `cargo run --release --example vm_ktls -- --size-mib 16 --expect rustls`.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use scistream_ctl::client::Connection;
use scistream_ctl::config::ServerArgs;
use scistream_ctl::dataplane::tls::ktls::{self, Tier};
use scistream_ctl::dataplane::tls::session_auth::{self, Role, SessionSecret};
use scistream_ctl::dataplane::tls::REKEY_VAR;
use scistream_ctl::dataplane::Side;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    /// MiB streamed in each direction.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Where the tunnel must run: `kernel` or `rustls`; `any` checks only the data.
    #[arg(long, default_value = "any")]
    expect: String,
    /// MiB each way for the kernel TLS vs rustls comparison (0: none).
    #[arg(long, default_value_t = 0)]
    compare_mib: u64,
    /// Internal: time one exchange (`direct` or `tunnel`) and print a MEASURE line.
    #[arg(long)]
    measure: Option<String>,
    /// Inbound side in its own network namespace behind a veth (root; busybox `ip`).
    #[arg(long)]
    netns: bool,
    /// MiB each way for each mixed-tier session (one gateway in rustls, the
    /// other in kernel TLS, both forcing re-keys); 0: none. Needs `--netns`.
    #[arg(long, default_value_t = 0)]
    mixed_mib: u64,
    /// Internal: run one s2cs gateway on this IP until stdin closes (the
    /// mixed test's user-space gateway, started with SCISTREAM_KTLS=off).
    #[arg(long)]
    serve: Option<String>,
    /// Internal, with `--serve`: its state directory.
    #[arg(long, default_value = "/tmp/s2cs-user")]
    state: String,
}

/// Where the four parties listen; `ns` runs the inbound side's sockets.
struct Net {
    out_ip: &'static str,
    in_ip: &'static str,
    producer: SocketAddr,
    ns: Option<InboundNs>,
}

impl Net {
    fn new(netns: bool) -> Result<Self> {
        if !netns {
            return Ok(Self {
                out_ip: "127.0.0.1",
                in_ip: "127.0.0.2",
                producer: "127.0.0.3:7000".parse()?,
                ns: None,
            });
        }
        let ns = InboundNs::create()?;
        Ok(Self {
            out_ip: "10.99.0.1",
            in_ip: "10.99.0.2",
            producer: "10.99.0.2:7000".parse()?,
            ns: Some(ns),
        })
    }

    /// The producer's listener, created on the inbound side.
    async fn producer_listener(&self) -> Result<TcpListener> {
        let addr = self.producer;
        let bind = move || -> std::io::Result<StdListener> {
            let l = StdListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let l = match &self.ns {
            Some(ns) => ns.handle.spawn(async move { bind() }).await??,
            None => bind()?,
        };
        TcpListener::from_std(l).context("producer listener")
    }
}

/// A network namespace of its own for the inbound side: a thread unshares
/// it and runs a tokio runtime there, whose threads (started from it) share
/// it, so every socket its tasks open lives there.
struct InboundNs {
    /// The thread that unshared the namespace: /proc/self/task/<tid>/net is its view.
    tid: i32,
    handle: tokio::runtime::Handle,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    host_if: String,
}

impl InboundNs {
    fn create() -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let made = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    Ok(tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?)
                });
            match made {
                Ok(rt) => {
                    let _ =
                        ready_tx.send(Ok((rt.handle().clone(), nix::unistd::gettid().as_raw())));
                    let _ = stop_rx.recv();
                    rt.shutdown_timeout(Duration::from_secs(5));
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        let (handle, tid) = ready_rx.recv().context("namespace thread")??;
        // Unique per process: measurement children build their own.
        let host_if = format!("ss{}", std::process::id());
        let ns = Self {
            tid,
            handle,
            stop: Some(stop),
            thread: Some(thread),
            host_if,
        };
        ip(&["link", "add", &ns.host_if, "type", "veth"])?;
        // busybox names the peer itself: find it through the host end's iflink.
        let peer = veth_peer(&ns.host_if)?;
        ip(&["link", "set", &peer, "netns", &tid.to_string()])?;
        ip(&["addr", "add", "10.99.0.1/24", "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let t = tid.to_string();
        for args in [
            vec!["addr", "add", "10.99.0.2/24", "dev", peer.as_str()],
            vec!["link", "set", peer.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["nsenter", "-t", t.as_str(), "-n", "/bin/busybox", "ip"];
            full.extend(args);
            busybox(&full)?;
        }
        println!("network namespaces: consumer + outbound gateway 10.99.0.1 ({}) <-veth-> inbound gateway + producer 10.99.0.2 ({peer})", ns.host_if);
        Ok(ns)
    }
}

impl InboundNs {
    /// The namespace's kernel TLS counters, as its thread sees them.
    fn tls_stat(&self) -> String {
        format!("/proc/self/task/{}/net/tls_stat", self.tid)
    }
}

impl Drop for InboundNs {
    fn drop(&mut self) {
        // Deleting one end removes the pair now, not when the namespace is reaped.
        let _ = ip(&["link", "del", &self.host_if]);
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn busybox(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("/bin/busybox")
        .args(args)
        .output()
        .context("running busybox")?;
    ensure!(
        out.status.success(),
        "busybox {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    busybox(&full)
}

/// The name of the other end of veth `dev` (same namespace, just created).
fn veth_peer(dev: &str) -> Result<String> {
    let read = |p: String| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let iflink = read(format!("/sys/class/net/{dev}/iflink"))?;
    for e in std::fs::read_dir("/sys/class/net")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != dev
            && read(format!("/sys/class/net/{name}/ifindex"))
                .ok()
                .as_deref()
                == Some(iflink.as_str())
        {
            return Ok(name);
        }
    }
    bail!("no peer of veth {dev}")
}
const CHUNK: usize = 256 * 1024;
/// KeyUpdates the flooding peer sends (the gateway allows 32 in a row).
const FLOOD: usize = 200;

fn main() {
    let args = Args::parse();
    let filter = if args.measure.is_some() {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Some(ip) = &args.serve {
        let code = match rt.block_on(serve(ip, &args.state)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("s2cs on {ip}: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
    if let Some(what) = &args.measure {
        match rt.block_on(measure(what, args.size_mib << 20, args.netns)) {
            Ok((secs, cpu)) => println!("MEASURE {secs:.3} {cpu:.3}"),
            Err(e) => println!("MEASURE-FAIL {e:#}"),
        }
        std::process::exit(0);
    }
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
    println!(
        "kernel: {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let ulp = ulp_probe();
    println!(
        "TCP_ULP tls: {}",
        match &ulp {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("unavailable ({e})"),
        }
    );
    let tier = ktls::detect();
    println!("tier the gateways choose: {tier:?}");
    let rekey_every: Option<u64> = std::env::var(REKEY_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0);
    match args.expect.as_str() {
        "kernel" => {
            ulp.context("setsockopt(TCP_ULP, \"tls\")")?;
            ensure!(
                matches!(tier, Tier::Kernel { .. }),
                "expected kernel TLS, the gateways would use {tier:?}"
            );
        }
        "rustls" => ensure!(
            matches!(tier, Tier::Rustls { .. }),
            "expected rustls, the gateways would use {tier:?}"
        ),
        "any" => {}
        other => bail!("--expect {other}: kernel, rustls or any"),
    }

    let size = args.size_mib << 20;
    let net = Net::new(args.netns)?;
    let report = with_gateways(&net, None, || session(&net, size)).await?;
    // The comparison's children build their own namespaces.
    drop(net);
    let d = |name: &str| report.after.get(name) - report.before.get(name);
    println!(
        "streamed {} MiB each way in {:.1} s ({:.2} MB/s per direction), SHA-256 equal both ways",
        size >> 20,
        report.secs,
        size as f64 / report.secs / 1e6
    );
    println!(
        "tls_stat during the stream: TlsCurrTxSw up to {}, TlsCurrRxSw up to {}; over it: TlsTxSw +{}, TlsRxSw +{}, \
         TlsTxRekeyOk +{}, TlsRxRekeyOk +{}, TlsRxRekeyReceived +{}",
        report.max_curr_tx,
        report.max_curr_rx,
        d("TlsTxSw"),
        d("TlsRxSw"),
        d("TlsTxRekeyOk"),
        d("TlsRxRekeyOk"),
        d("TlsRxRekeyReceived")
    );
    println!(
        "KeyUpdate flood ({FLOOD} sent): the gateway hung up after {:.1} s; {} bytes reached the producer; \
         the session's failed connections {} -> {}; TlsRxRekeyReceived +{}",
        report.flood.secs,
        report.flood.producer_bytes,
        report.flood.failed_before,
        report.flood.failed_after,
        report.flood.after.get("TlsRxRekeyReceived") - report.after.get("TlsRxRekeyReceived"),
    );
    ensure!(
        report.flood.producer_bytes == 0,
        "the KeyUpdate flooder's connection delivered bytes to the producer"
    );
    ensure!(
        report.flood.failed_after > report.flood.failed_before,
        "the flooder's connection was not counted as failed"
    );

    match args.expect.as_str() {
        "kernel" => {
            // One tunnel connection: the outbound and the inbound end each hold a TX and an RX key.
            ensure!(
                report.max_curr_tx >= 2 && report.max_curr_rx >= 2,
                "kernel TLS was not in use during the stream (TlsCurrTxSw {}, TlsCurrRxSw {})",
                report.max_curr_tx,
                report.max_curr_rx
            );
            if let (Some(every), Tier::Kernel { rekey: true }) = (rekey_every, &tier) {
                // Each gateway's sending key may carry at most `every` bytes,
                // so each changes it at least (size - 1) / every times (any
                // change, its own or an answer to the peer's, restarts the
                // count); each change is installed for sending on one end and
                // for receiving on the other.
                let forced = 2 * ((size - 1) / every);
                let (tx, rx) = (d("TlsTxRekeyOk"), d("TlsRxRekeyOk"));
                ensure!(
                    tx >= forced && rx >= forced,
                    "expected at least {forced} re-keys each way, kernel counted TX {tx}, RX {rx}"
                );
                ensure!(tx == rx, "every key sent with must be a key received with: TX re-keys {tx}, RX re-keys {rx}");
                ensure!(
                    d("TlsTxRekeyError") == 0 && d("TlsRxRekeyError") == 0,
                    "the kernel refused a re-key"
                );
                println!("forced re-keys: {tx} sending keys and {rx} receiving keys installed mid-stream, data intact");
                let received = report.flood.after.get("TlsRxRekeyReceived")
                    - report.after.get("TlsRxRekeyReceived");
                ensure!(
                    received > 0,
                    "the flood's KeyUpdates never reached kernel TLS"
                );
            }
        }
        "rustls" => {
            ensure!(
                d("TlsTxSw") == 0 && d("TlsRxSw") == 0 && report.max_curr_tx == 0,
                "the tunnel used kernel TLS although the kernel cannot re-key (TlsTxSw +{})",
                d("TlsTxSw")
            );
            println!("fallback: the tunnel stayed in rustls (no kernel TLS session opened)");
        }
        _ => {}
    }

    if args.mixed_mib > 0 {
        let every = match (rekey_every, &tier, args.netns) {
            (Some(every), Tier::Kernel { rekey: true }, true) => every,
            _ => bail!(
                "--mixed-mib needs --netns, a kernel that re-keys TLS 1.3 and {REKEY_VAR}; here: tier {tier:?}, {REKEY_VAR} {rekey_every:?}"
            ),
        };
        for user_space in [Side::Outbound, Side::Inbound] {
            mixed(user_space, args.mixed_mib << 20, every).await?;
        }
    }
    if args.compare_mib > 0 {
        compare(args.compare_mib, &tier, args.netns).await?;
    }
    Ok(())
}

/// Times the same exchange over plain loopback, through kernel TLS and
/// through rustls, each in a fresh child process (so CPU time is its own).
async fn compare(mib: u64, tier: &Tier, netns: bool) -> Result<()> {
    let child = |what, mode| child(what, mib, mode, netns);
    let direct = child("direct", None)?;
    let rustls = child("tunnel", Some("off"))?;
    let kernel = if matches!(tier, Tier::Kernel { .. }) {
        Some(child("tunnel", Some("on"))?)
    } else {
        None
    };
    let gb = 2.0 * (mib << 20) as f64 / 1e9;
    // The producer and consumer (data generation, SHA-256) run in the same
    // process; the direct run's CPU is theirs, the rest is the gateways'.
    let row = |name: &str, (secs, cpu): (f64, f64)| {
        println!(
            "  {name:<22} {:>7.2} MB/s per direction  {:>6.1} s CPU per GB moved  (gateways: {:>6.1} s/GB)",
            (mib << 20) as f64 / secs / 1e6,
            cpu / gb,
            (cpu - direct.1).max(0.0) / gb
        )
    };
    let vendor = std::fs::read_to_string("/sys/class/dmi/id/sys_vendor").unwrap_or_default();
    let place = if vendor.contains("QEMU") {
        "under QEMU TCG (an emulated CPU: absolute numbers are meaningless, only the ratios within this run count)"
    } else {
        "on this machine (compare within this run only)"
    };
    println!("performance {place}, {mib} MiB each way:");
    row("no gateway", direct);
    row("rustls", rustls);
    if let Some(k) = kernel {
        row("kernel TLS + splice", k);
        let (gk, gr) = ((k.1 - direct.1).max(1e-3), (rustls.1 - direct.1).max(1e-3));
        println!(
            "  kernel TLS + splice vs rustls: {:.2}x the throughput, {:.2}x the gateway CPU per GB",
            rustls.0 / k.0,
            gk / gr
        );
    }
    Ok(())
}

/// One measurement in a child process: (seconds, CPU seconds).
fn child(what: &str, mib: u64, ktls_mode: Option<&str>, netns: bool) -> Result<(f64, f64)> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--measure", what, "--size-mib", &mib.to_string()])
        .args(netns.then_some("--netns"))
        .env_remove(REKEY_VAR);
    if let Some(m) = ktls_mode {
        cmd.env(ktls::MODE_VAR, m);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("MEASURE"))
        .with_context(|| format!("the {what} measurement printed nothing"))?;
    let mut it = line.split_whitespace().skip(1);
    match (
        it.next().map(str::parse::<f64>),
        it.next().map(str::parse::<f64>),
    ) {
        (Some(Ok(s)), Some(Ok(c))) => Ok((s, c)),
        _ => bail!("{what} measurement: {line}"),
    }
}

async fn measure(what: &str, size: u64, netns: bool) -> Result<(f64, f64)> {
    let net = Net::new(netns)?;
    match what {
        "direct" => {
            let producer = net.producer_listener().await?;
            let (secs, cpu) = timed_exchange(&producer, net.producer, size).await?;
            Ok((secs, cpu))
        }
        "tunnel" => {
            with_gateways(&net, None, || async {
                let producer = net.producer_listener().await?;
                let s = Session::open(&net, &uuid::Uuid::new_v4().to_string()).await?;
                let (secs, cpu) = timed_exchange(&producer, s.consumer_addr, size).await?;
                s.release().await?;
                Ok((secs, cpu))
            })
            .await
        }
        other => bail!("--measure {other}: direct or tunnel"),
    }
}

/// This process's user + system CPU seconds (/proc/self/stat, in USER_HZ = 100 ticks).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after ')' (state is 0).
    (ticks(11) + ticks(12)) as f64 / 100.0
}

#[derive(Default, Clone)]
struct TlsStat(Vec<(String, u64)>);

impl TlsStat {
    /// The counters of every namespace of `net`, summed: tls_stat is per
    /// network namespace, and each holds one end of the tunnel.
    fn read(net: &Net) -> Self {
        let mut paths = vec!["/proc/self/net/tls_stat".to_string()];
        paths.extend(net.ns.as_ref().map(InboundNs::tls_stat));
        Self::sum(paths)
    }

    /// One gateway's counters: its end of the tunnel is alone in its
    /// namespace (needs `--netns`).
    fn side(net: &Net, side: Side) -> Self {
        match (side, &net.ns) {
            (Side::Inbound, Some(ns)) => Self::sum([ns.tls_stat()]),
            _ => Self::sum(["/proc/self/net/tls_stat".to_string()]),
        }
    }

    fn sum(paths: impl IntoIterator<Item = String>) -> Self {
        let mut sum: Vec<(String, u64)> = Vec::new();
        for p in paths {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            for l in text.lines() {
                let mut it = l.split_whitespace();
                let (Some(name), Some(Ok(v))) = (it.next(), it.next().map(str::parse::<u64>))
                else {
                    continue;
                };
                match sum.iter_mut().find(|(n, _)| n == name) {
                    Some(e) => e.1 += v,
                    None => sum.push((name.to_string(), v)),
                }
            }
        }
        Self(sum)
    }
    fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|x| x.1)
            .unwrap_or(0)
    }
}

/// `setsockopt(TCP_ULP, "tls")` on a connected loopback socket.
fn ulp_probe() -> Result<()> {
    let l = StdListener::bind("127.0.0.1:0")?;
    let c = StdStream::connect(l.local_addr()?)?;
    let _s = l.accept()?;
    nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::TcpUlp::default(), b"tls")?;
    Ok(())
}

fn gateway(ip: &str, state: &str) -> ServerArgs {
    use clap::Parser as _;
    ServerArgs::parse_from([
        "s2cs",
        "--listener_ip",
        ip,
        "--control_ip",
        ip,
        "--port",
        "5000",
        "--port_range",
        "5100-5110",
        "--type",
        "tls",
        "--ssl",
        "false",
        "--guard",
        "false",
        "--state_dir",
        state,
    ])
}

/// Runs `body` with the two gateways up, then stops them. `user_space`: the
/// gateway on that side runs as a child process in the rustls tier, forcing
/// a re-key every so many bytes.
async fn with_gateways<T, F, Fut>(net: &Net, user_space: Option<(Side, u64)>, body: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let mut child = None;
    for (ip, state, side) in [
        (net.out_ip, "/tmp/s2cs-out", Side::Outbound),
        (net.in_ip, "/tmp/s2cs-in", Side::Inbound),
    ] {
        if let Some((user_side, every)) = user_space.filter(|u| u.0 == side) {
            child = Some(UserSpaceGateway::start(net, user_side, every)?);
            continue;
        }
        let mut rx = stop_rx.clone();
        let args = gateway(ip, state);
        let server = async move {
            scistream_ctl::control::server::run(args, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        };
        // The inbound gateway opens its sockets in the inbound namespace.
        servers.push(match (&net.ns, side) {
            (Some(ns), Side::Inbound) => ns.handle.spawn(server),
            _ => tokio::spawn(server),
        });
    }
    let result = tokio::time::timeout(Duration::from_secs(3600), body()).await;
    let _ = stop_tx.send(true);
    for s in servers {
        s.await.context("s2cs task")?.context("s2cs")?;
    }
    if let Some(c) = child {
        c.stop().await?;
    }
    result.context("timed out")?
}

/// A gateway in its own process with `SCISTREAM_KTLS=off`, so its tunnel
/// stays in rustls whatever the kernel offers; it stops when its stdin
/// closes, and is killed if dropped before [`Self::stop`].
struct UserSpaceGateway {
    child: tokio::process::Child,
}

impl UserSpaceGateway {
    fn start(net: &Net, side: Side, rekey_every: u64) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let (ip, state) = match side {
            Side::Outbound => (net.out_ip, "/tmp/s2cs-out-user"),
            Side::Inbound => (net.in_ip, "/tmp/s2cs-in-user"),
        };
        let mut cmd = match (side, &net.ns) {
            (Side::Inbound, Some(ns)) => {
                let mut c = tokio::process::Command::new("/bin/busybox");
                c.args(["nsenter", "-t", &ns.tid.to_string(), "-n"])
                    .arg(exe);
                c
            }
            _ => tokio::process::Command::new(exe),
        };
        let child = cmd
            .args(["--serve", ip, "--state", state])
            .env(ktls::MODE_VAR, "off")
            .env(REKEY_VAR, rekey_every.to_string())
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the user-space gateway")?;
        Ok(Self { child })
    }

    async fn stop(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("the user-space gateway did not stop within 30 s")??;
        ensure!(
            status.success(),
            "the user-space gateway exited with {status}"
        );
        Ok(())
    }
}

/// `--serve`: one gateway until stdin reaches EOF (the parent let go).
async fn serve(ip: &str, state: &str) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    scistream_ctl::control::server::run(gateway(ip, state), async move {
        let _ = rx.await;
    })
    .await
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

/// A session set up on both gateways, as s2uc would.
struct Session {
    uid: String,
    inbound: Connection,
    outbound: Connection,
    /// The inbound gateway's tunnel listener (what the outbound one dials).
    tunnel: SocketAddr,
    consumer_addr: SocketAddr,
}

impl Session {
    async fn open(net: &Net, uid: &str) -> Result<Self> {
        let producer = net.producer;
        let inbound = open(&format!("{}:5000", net.in_ip)).await?;
        let resp = inbound
            .req_with_hello(uid, "PROD", 1, 0, &[producer.to_string()], "PROD")
            .await?;
        inbound.update(uid, &resp.prod_listeners, "PROD").await?;
        // What s2uc prints as the inbound gateway's `listeners`: the tunnel's far end.
        let tunnels = resp.listeners;
        let outbound = open(&format!("{}:5000", net.out_ip)).await?;
        let resp = outbound
            .req_with_hello(uid, "CONS", 1, 0, &[], "CONS")
            .await?;
        outbound.update(uid, &tunnels, "CONS").await?;
        let consumer_addr = resp
            .listeners
            .first()
            .context("no outbound listener")?
            .parse()?;
        let tunnel = tunnels.first().context("no inbound listener")?.parse()?;
        println!("session {uid}: consumer -> {consumer_addr} -> {tunnel} -> {producer}");
        Ok(Self {
            uid: uid.to_string(),
            inbound,
            outbound,
            tunnel,
            consumer_addr,
        })
    }

    async fn release(&self) -> Result<()> {
        self.inbound.release(&self.uid).await?;
        self.outbound.release(&self.uid).await?;
        Ok(())
    }
}

struct Report {
    secs: f64,
    before: TlsStat,
    after: TlsStat,
    max_curr_tx: u64,
    max_curr_rx: u64,
    flood: Flood,
}

struct Flood {
    secs: f64,
    producer_bytes: u64,
    failed_before: u64,
    failed_after: u64,
    after: TlsStat,
}

/// The checked stream, then the KeyUpdate flood against the same session.
async fn session(net: &Net, size: u64) -> Result<Report> {
    let producer = net.producer_listener().await?;
    let s = Session::open(net, &uuid::Uuid::new_v4().to_string()).await?;
    let before = TlsStat::read(net);
    let (secs, [peak]) =
        sampled_exchange(&producer, s.consumer_addr, size, [&|| TlsStat::read(net)]).await?;
    let after = TlsStat::read(net);
    let flood = keyupdate_flood(net, &s, &producer).await?;
    s.release().await?;
    Ok(Report {
        secs,
        before,
        after,
        max_curr_tx: peak.tx,
        max_curr_rx: peak.rx,
        flood,
    })
}

/// The most kernel TLS sessions open at once, sending and receiving.
#[derive(Default, Clone, Copy)]
struct Peak {
    tx: u64,
    rx: u64,
}

/// [`timed_exchange`] while each of `readers` samples the kernel's live TLS
/// session counts every 500 ms; returns seconds and each reader's peak.
async fn sampled_exchange<const N: usize>(
    producer: &TcpListener,
    consumer_addr: SocketAddr,
    size: u64,
    readers: [&dyn Fn() -> TlsStat; N],
) -> Result<(f64, [Peak; N])> {
    let streaming = AtomicBool::new(true);
    let sampler = async {
        let mut peaks = [Peak::default(); N];
        while streaming.load(Ordering::Relaxed) {
            for (peak, read) in peaks.iter_mut().zip(readers) {
                let st = read();
                peak.tx = peak.tx.max(st.get("TlsCurrTxSw"));
                peak.rx = peak.rx.max(st.get("TlsCurrRxSw"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        peaks
    };
    let exchange = async {
        let r = timed_exchange(producer, consumer_addr, size).await;
        streaming.store(false, Ordering::Relaxed);
        r
    };
    let (result, peaks) = tokio::join!(exchange, sampler);
    Ok((result?.0, peaks))
}

/// One gateway in the rustls tier (its own process), the other in kernel
/// TLS, both forcing KeyUpdates that ask the peer to update too: `size`
/// bytes each way must arrive intact, the kernel side's tls_stat must show
/// its tunnel end in kernel TLS installing new keys both ways, and the
/// user-space side's namespace must show no kernel TLS at all. The
/// user-space side re-keys twice as often (every `every / 2` bytes) as the
/// kernel side, so the kernel's count of keys received proves that side's
/// own KeyUpdates, not only its answers to the kernel's.
async fn mixed(user_space: Side, size: u64, every: u64) -> Result<()> {
    let kernel = match user_space {
        Side::Outbound => Side::Inbound,
        Side::Inbound => Side::Outbound,
    };
    let name = |side| match side {
        Side::Outbound => "outbound",
        Side::Inbound => "inbound",
    };
    let user_every = (every / 2).max(1);
    let what = format!(
        "rustls {} <-> kernel TLS {}",
        name(user_space),
        name(kernel)
    );
    let net = Net::new(true)?;
    let (secs, k, u, peak_k, peak_u) =
        with_gateways(&net, Some((user_space, user_every)), || async {
            let producer = net.producer_listener().await?;
            let s = Session::open(&net, &uuid::Uuid::new_v4().to_string()).await?;
            let (k0, u0) = (TlsStat::side(&net, kernel), TlsStat::side(&net, user_space));
            let (secs, [peak_k, peak_u]) = sampled_exchange(
                &producer,
                s.consumer_addr,
                size,
                [&|| TlsStat::side(&net, kernel), &|| {
                    TlsStat::side(&net, user_space)
                }],
            )
            .await?;
            let (k1, u1) = (TlsStat::side(&net, kernel), TlsStat::side(&net, user_space));
            s.release().await?;
            let delta = |a: &TlsStat, b: &TlsStat| {
                TlsStat(
                    a.0.iter()
                        .map(|(n, v)| (n.clone(), v.saturating_sub(b.get(n))))
                        .collect(),
                )
            };
            Ok((secs, delta(&k1, &k0), delta(&u1, &u0), peak_k, peak_u))
        })
        .await
        .with_context(|| format!("mixed session {what}"))?;
    println!(
        "mixed {what} (re-keys forced every {} KiB by rustls, {} KiB by the kernel side): \
         {} MiB each way in {secs:.1} s ({:.2} MB/s per direction), SHA-256 equal both ways; \
         kernel side TlsCurrTxSw up to {}, TlsCurrRxSw up to {}, TlsTxRekeyOk +{}, TlsRxRekeyOk +{}, \
         TlsRxRekeyReceived +{}, rekey errors +{}/+{}; rustls side TlsCurrTxSw up to {}, TlsTxSw +{}, TlsRxSw +{}",
        user_every >> 10,
        every >> 10,
        size >> 20,
        size as f64 / secs / 1e6,
        peak_k.tx,
        peak_k.rx,
        k.get("TlsTxRekeyOk"),
        k.get("TlsRxRekeyOk"),
        k.get("TlsRxRekeyReceived"),
        k.get("TlsTxRekeyError"),
        k.get("TlsRxRekeyError"),
        peak_u.tx,
        u.get("TlsTxSw"),
        u.get("TlsRxSw"),
    );
    ensure!(
        peak_k.tx >= 1 && peak_k.rx >= 1,
        "{what}: the kernel side's tunnel end was not in kernel TLS during the stream"
    );
    ensure!(
        peak_u.tx == 0 && peak_u.rx == 0 && u.get("TlsTxSw") == 0 && u.get("TlsRxSw") == 0,
        "{what}: the rustls side opened kernel TLS sessions"
    );
    // A sending key carries at most `every` bytes on the kernel side and
    // `user_every` on the rustls side. Answers alone (one per request of the
    // kernel side, at most its own updates, about size / every) cannot reach
    // the RX bound: only the rustls side's own updates can.
    let (forced_tx, forced_rx) = ((size - 1) / every, (size - 1) / user_every);
    let (tx, rx) = (k.get("TlsTxRekeyOk"), k.get("TlsRxRekeyOk"));
    ensure!(
        tx >= forced_tx && rx >= forced_rx,
        "{what}: expected at least {forced_tx} sending and {forced_rx} receiving re-keys on the kernel side, \
         it counted TX {tx}, RX {rx}"
    );
    ensure!(
        k.get("TlsTxRekeyError") == 0 && k.get("TlsRxRekeyError") == 0,
        "{what}: the kernel refused a re-key"
    );
    Ok(())
}

/// A peer that knows the session secret (so passes the proof) and then sends
/// only KeyUpdates, each asking the gateway to update too.
async fn keyupdate_flood(net: &Net, s: &Session, producer: &TcpListener) -> Result<Flood> {
    let failed_before = s.inbound.status(&s.uid).await?.connections_failed;
    let start = Instant::now();
    let flooder = async {
        let connector =
            tokio_rustls::TlsConnector::from(scistream_ctl::tls::tunnel_client_config(None)?);
        let tcp = TcpStream::connect(s.tunnel).await?;
        let name = rustls::pki_types::ServerName::IpAddress(s.tunnel.ip().into());
        let mut tls = connector.connect(name, tcp).await?;
        session_auth::prove(&mut tls, &SessionSecret::derive(&s.uid, None), Role::Client).await?;
        for _ in 0..FLOOD {
            tls.get_mut().1.refresh_traffic_keys()?;
            if tls.flush().await.is_err() {
                break;
            }
        }
        // The gateway must hang up: EOF or an error, never data.
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await {
            Err(_) => bail!("the gateway kept a KeyUpdate flooder connected for 30 s"),
            Ok(Ok(0)) | Ok(Err(_)) => anyhow::Ok(()),
            Ok(Ok(_)) => bail!("the gateway sent data to a KeyUpdate flooder"),
        }
    };
    // The inbound gateway connects to the producer once the proof passed.
    let producer_side = async {
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(60), producer.accept())
            .await
            .context("no connection reached the producer")??;
        let mut n = 0u64;
        let mut buf = [0u8; 4096];
        while let Ok(k) = c.read(&mut buf).await {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        anyhow::Ok(n)
    };
    let (f, producer_bytes) = tokio::join!(flooder, producer_side);
    f.context("KeyUpdate flood")?;
    let secs = start.elapsed().as_secs_f64();
    // The relay counts the failure when its task ends.
    let mut failed_after = failed_before;
    for _ in 0..50 {
        failed_after = s.inbound.status(&s.uid).await?.connections_failed;
        if failed_after > failed_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Flood {
        secs,
        producer_bytes: producer_bytes?,
        failed_before,
        failed_after,
        after: TlsStat::read(net),
    })
}

/// Consumer at `consumer_addr` and producer on `producer` exchange `size`
/// bytes each way; fails unless SHA-256 matches both ways. Returns seconds
/// and this process's CPU seconds over the exchange.
async fn timed_exchange(
    producer: &TcpListener,
    consumer_addr: SocketAddr,
    size: u64,
) -> Result<(f64, f64)> {
    let (start, cpu0) = (Instant::now(), cpu_secs());
    let consumer = async {
        let s = TcpStream::connect(consumer_addr).await?;
        exchange(s, size, 1).await
    };
    let prod = async {
        let (s, _) = producer.accept().await?;
        exchange(s, size, 2).await
    };
    let ((c_sent, c_got), (p_sent, p_got)) = tokio::try_join!(consumer, prod)?;
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_secs() - cpu0);
    ensure!(
        c_sent == p_got,
        "consumer -> producer: bytes differ (sha256 {} vs {})",
        hex(&c_sent.0),
        hex(&p_got.0)
    );
    ensure!(
        p_sent == c_got,
        "producer -> consumer: bytes differ (sha256 {} vs {})",
        hex(&p_sent.0),
        hex(&c_got.0)
    );
    Ok((secs, cpu))
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
