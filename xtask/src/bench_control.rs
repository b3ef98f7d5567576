//! Control-plane figures of `cargo xtask bench`, on loopback in the host's
//! network namespace as a user meets them: `s2uc` set-up wall time through two
//! `s2cs` (process start, TLS handshake and gRPC calls included), and what an
//! idle session costs a gateway in memory with 1000 of them open.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::process::{bin, run_command, Daemon};

use crate::bench_report::Latency;
use crate::gateways::path_str;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Data ports of the loopback gateways; the idle measurement holds one per
/// session, so the inbound range has room for 1000 and a margin.
const INBOUND_RANGE: &str = "41000-42199";
const OUTBOUND_RANGE: &str = "42200-42399";
/// Where the inbound gateway's sessions point; nothing needs to listen there,
/// set-up never connects to it.
const PRODUCER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(LOOPBACK), 9);
const START: Duration = Duration::from_secs(20);
const RUN: Duration = Duration::from_secs(30);

/// Memory of one gateway before and after opening idle sessions.
pub struct IdleMemory {
    pub backend: String,
    pub sessions: u32,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub threads_before: u64,
    pub threads_after: u64,
}

impl IdleMemory {
    pub fn per_session_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64
            / f64::from(self.sessions.max(1))
    }
}

/// One `s2cs` on 127.0.0.1 with its own control port and state directory.
struct LoopbackGateway {
    daemon: Daemon,
    control: SocketAddr,
    cert: PathBuf,
}

impl LoopbackGateway {
    fn start(backend: &str, range: &str, state: &Path, peer_ca: Option<&Path>) -> Result<Self> {
        std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
        let port = free_port()?;
        let mut cmd = Command::new(bin("s2cs"));
        cmd.args([
            "--listener_ip",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--port_range",
            range,
            "--type",
            backend,
        ]);
        // Producers and the peer gateway are on loopback.
        cmd.args(["--allow_target_nets", "127.0.0.0/8"]);
        cmd.args(["--state_dir", &path_str(state)?]);
        if let Some(ca) = peer_ca {
            cmd.args(["--peer_ca", &path_str(ca)?]);
        }
        let mut daemon = Daemon::spawn(cmd)?;
        let control = SocketAddr::new(LOOPBACK.into(), port);
        wait_listening_host(&mut daemon, control)?;
        Ok(Self {
            daemon,
            control,
            cert: state.join("server.crt"),
        })
    }

    /// Runs `s2uc args... --json` against this gateway; returns its JSON answer.
    fn s2uc(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut cmd = Command::new(bin("s2uc"));
        cmd.args(args).args([
            "--s2cs",
            &self.control.to_string(),
            "--server_cert",
            &path_str(&self.cert)?,
            "--json",
        ]);
        let out = run_command(cmd, RUN)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "s2uc {} exited with {}: {}{}",
                args.join(" "),
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        stdout
            .lines()
            .rev()
            .find_map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .filter(serde_json::Value::is_object)
            })
            .with_context(|| format!("no JSON answer from s2uc {}: {stdout}", args.join(" ")))
    }

    fn inbound_request(&self) -> Result<(String, String)> {
        let port = PRODUCER.port().to_string();
        let v = self.s2uc(&[
            "inbound-request",
            "--remote_ip",
            "127.0.0.1",
            "--receiver_ports",
            &port,
            "--num_conn",
            "1",
        ])?;
        let uid = v["uid"]
            .as_str()
            .context("no uid in the answer")?
            .to_owned();
        let listeners = v["listeners"]
            .as_array()
            .context("no listeners in the answer")?;
        let listeners: Vec<&str> = listeners.iter().filter_map(|l| l.as_str()).collect();
        Ok((uid, listeners.join(",")))
    }

    fn release(&self, uid: &str) -> Result<()> {
        let mut cmd = Command::new(bin("s2uc"));
        cmd.args([
            "release",
            uid,
            "--s2cs",
            &self.control.to_string(),
            "--server_cert",
            &path_str(&self.cert)?,
        ]);
        let out = run_command(cmd, RUN)?;
        if !out.status.success() {
            bail!(
                "s2uc release {uid}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// `inbound-request` then `outbound-request` wall times over `n` sessions on
/// two loopback gateways of `backend`, each session released (untimed) before
/// the next.
pub fn setup_latency(backend: &str, n: u32, state: &Path) -> Result<Latency> {
    let gin = LoopbackGateway::start(backend, INBOUND_RANGE, &state.join("latency-gin"), None)?;
    let gout = LoopbackGateway::start(
        backend,
        OUTBOUND_RANGE,
        &state.join("latency-gout"),
        Some(&gin.cert),
    )?;
    let (mut inbound_ms, mut outbound_ms) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t0 = Instant::now();
        let (uid, listeners) = gin
            .inbound_request()
            .with_context(|| format!("session {} of {n}", i + 1))?;
        let t1 = Instant::now();
        gout.s2uc(&[
            "outbound-request",
            "--remote_ip",
            "127.0.0.1",
            "--receiver_ports",
            "9",
            "--num_conn",
            "1",
            &uid,
            &listeners,
        ])?;
        let t2 = Instant::now();
        inbound_ms.push((t1 - t0).as_secs_f64() * 1e3);
        outbound_ms.push((t2 - t1).as_secs_f64() * 1e3);
        gout.release(&uid)?;
        gin.release(&uid)?;
    }
    Ok(Latency::new(backend, inbound_ms, outbound_ms))
}

/// RSS and threads of one inbound gateway before and after `n` idle
/// sessions (requested, answered, never connected to). Warm-up sessions
/// created and released first keep one-time allocations out of the figure.
pub fn idle_memory(backend: &str, n: u32, state: &Path) -> Result<IdleMemory> {
    let gw = LoopbackGateway::start(backend, INBOUND_RANGE, &state.join("idle-gin"), None)?;
    for _ in 0..20 {
        let (uid, _) = gw.inbound_request()?;
        gw.release(&uid)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = gw.daemon.pid();
    let (rss_before_kib, threads_before) = rss_and_threads(pid)?;
    // Four clients at a time: 1000 sequential s2uc runs would take minutes
    // on a loaded machine.
    let per_worker = n.div_ceil(4);
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..4u32)
            .map(|w| {
                let gw = &gw;
                s.spawn(move || -> Result<()> {
                    for _ in (w * per_worker)..((w + 1) * per_worker).min(n) {
                        gw.inbound_request()?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        }
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let (rss_after_kib, threads_after) = rss_and_threads(pid)?;
    Ok(IdleMemory {
        backend: backend.to_owned(),
        sessions: n,
        rss_before_kib,
        rss_after_kib,
        threads_before,
        threads_after,
    })
}

fn rss_and_threads(pid: u32) -> Result<(u64, u64)> {
    Ok((status_field(pid, "VmRSS")?, status_field(pid, "Threads")?))
}

/// A numeric field of /proc/<pid>/status (kB for the memory ones).
pub fn status_field(pid: u32, name: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {name} in {path}"))
}

/// A port nothing listens on right now (the kernel's pick).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((LOOPBACK, 0))?.local_addr()?.port())
}

fn wait_listening_host(daemon: &mut Daemon, addr: SocketAddr) -> Result<()> {
    // In the host's own namespace, which `ip netns exec` has no name for.
    let deadline = Instant::now() + START;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !daemon.is_running() || Instant::now() > deadline {
            bail!("s2cs did not listen on {addr}:\n{}", daemon.log_contents());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
