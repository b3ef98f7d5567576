//! Shared by the integration tests: real `s2cs` daemons in the test bed's
//! namespaces, `s2uc` runs with parsed `--json` output, and a gRPC client
//! written only from docs/protocol.md's field numbers (no code shared with s2cs).
#![allow(dead_code)]

pub mod loopback;
pub mod raw;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use testbed::{bin, run_in, spawn_in, wait_for_tcp, Daemon};

pub const CONTROL_PORT: u16 = 5000;
pub const MIB: u64 = 1 << 20;

/// One running `s2cs` and what clients need to reach it.
pub struct Gateway {
    pub daemon: Daemon,
    pub ns: String,
    pub control: SocketAddr,
    pub listener_ip: IpAddr,
    pub cert: PathBuf,
    pub state_dir: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

static DIRS: AtomicU32 = AtomicU32::new(0);

fn state_dir() -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("ss-test-{}-{n}", std::process::id()))
}

impl Gateway {
    /// Starts `s2cs --listener_ip ip --port 5000 --port_range range --type backend
    /// --state_dir <fresh dir> extra...` inside `ns` and waits until it listens.
    pub fn start(
        ns: &str,
        listener_ip: IpAddr,
        range: &str,
        backend: &str,
        extra: &[&str],
    ) -> Gateway {
        let dir = state_dir();
        let daemon = spawn_s2cs(ns, listener_ip, range, backend, &dir, extra);
        let control = SocketAddr::new(listener_ip, CONTROL_PORT);
        Gateway {
            daemon,
            ns: ns.to_string(),
            control,
            listener_ip,
            cert: dir.join("server.crt"),
            state_dir: dir,
        }
    }

    /// Starts a new `s2cs` on this gateway's state directory, once the old
    /// one has exited (a restart as an operator would do it).
    pub fn respawn(&mut self, range: &str, backend: &str, extra: &[&str]) {
        assert!(!self.daemon.is_running(), "the old s2cs still runs");
        self.daemon = spawn_s2cs(
            &self.ns,
            self.listener_ip,
            range,
            backend,
            &self.state_dir,
            extra,
        );
    }

    pub fn cert_str(&self) -> &str {
        self.cert.to_str().expect("utf-8 path")
    }

    /// Runs `s2uc <cmd> --s2cs <this> --server_cert <cert> args...` in `client_ns`.
    pub fn s2uc(&self, client_ns: &str, cmd: &str, args: &[&str]) -> Output {
        let control = self.control.to_string();
        let mut all = vec![cmd, "--s2cs", &control, "--server_cert", self.cert_str()];
        all.extend_from_slice(args);
        run_in(client_ns, bin("s2uc"), &all).expect("running s2uc")
    }

    /// Like [`Gateway::s2uc`] with `--json`, panicking with s2uc's stderr on failure.
    pub fn s2uc_json(&self, client_ns: &str, cmd: &str, args: &[&str]) -> Outcome {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.s2uc(client_ns, cmd, &all);
        assert!(
            out.status.success(),
            "s2uc {cmd} failed: {}\ns2cs log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log_contents()
        );
        Outcome::parse(&out.stdout)
    }

    /// `inbound-request` towards a producer at `producer` with `num_conn` listeners.
    pub fn inbound(&self, client_ns: &str, producer: SocketAddr, num_conn: usize) -> Outcome {
        let (ip, port, n) = (
            producer.ip().to_string(),
            producer.port().to_string(),
            num_conn.to_string(),
        );
        self.s2uc_json(
            client_ns,
            "inbound-request",
            &[
                "--remote_ip",
                &ip,
                "--receiver_ports",
                &port,
                "--num_conn",
                &n,
            ],
        )
    }

    /// `outbound-request UID LISTENERS` with `num_conn` listeners.
    pub fn outbound(&self, client_ns: &str, inbound: &Outcome, num_conn: usize) -> Outcome {
        let n = num_conn.to_string();
        let joined = inbound
            .listeners
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.s2uc_json(
            client_ns,
            "outbound-request",
            &["--num_conn", &n, &inbound.uid, &joined],
        )
    }
}

fn spawn_s2cs(
    ns: &str,
    listener_ip: IpAddr,
    range: &str,
    backend: &str,
    dir: &std::path::Path,
    extra: &[&str],
) -> Daemon {
    let ip = listener_ip.to_string();
    let port = CONTROL_PORT.to_string();
    let mut args: Vec<&str> = vec![
        "--listener_ip",
        &ip,
        "--port",
        &port,
        "--port_range",
        range,
        "--type",
        backend,
        "--state_dir",
        dir.to_str().expect("utf-8 temp dir"),
    ];
    args.extend_from_slice(extra);
    let daemon = spawn_in(ns, bin("s2cs"), &args).expect("starting s2cs");
    if let Err(e) = wait_for_tcp(
        ns,
        SocketAddr::new(listener_ip, CONTROL_PORT),
        Duration::from_secs(20),
    ) {
        panic!(
            "s2cs did not come up: {e:#}\nlog:\n{}",
            daemon.log_contents()
        );
    }
    daemon
}

/// What `s2uc ... --json` printed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub uid: String,
    pub listeners: Vec<SocketAddr>,
    pub prod_listeners: Vec<SocketAddr>,
    /// The session's tunnel key (hex), when the inbound gateway made one.
    pub tunnel_key: Option<String>,
}

impl Outcome {
    fn parse(stdout: &[u8]) -> Outcome {
        let text = String::from_utf8_lossy(stdout);
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("s2uc --json printed {text:?}: {e}"));
        let addrs = |k: &str| -> Vec<SocketAddr> {
            v[k].as_array()
                .unwrap_or_else(|| panic!("no {k} in {text}"))
                .iter()
                .map(|s| {
                    s.as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("bad address in {text}"))
                })
                .collect()
        };
        Outcome {
            uid: v["uid"]
                .as_str()
                .unwrap_or_else(|| panic!("no uid in {text}"))
                .to_string(),
            listeners: addrs("listeners"),
            prod_listeners: addrs("prod_listeners"),
            tunnel_key: v["tunnel_key"].as_str().map(str::to_string),
        }
    }
}

/// How long after this call the stream's connection was closed under it
/// (polled every 5 ms), or `None` if it still ran after `within`.
pub fn closed_within(stream: &testbed::Stream, within: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    while stream.error().is_none() {
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(start.elapsed())
}

/// How long after `since` the peer closed `s` (an EOF, or the error a reset
/// gives), reading and discarding what it still sends; `None` if it held the
/// connection open until `since + within`. A close already queued at the
/// deadline still counts.
pub fn closed_by_peer(
    s: &std::net::TcpStream,
    since: Instant,
    within: Duration,
) -> Option<Duration> {
    use std::io::{ErrorKind, Read};
    let deadline = since + within;
    let mut buf = vec![0u8; 64 * 1024];
    let mut r = s;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // std refuses a zero timeout, so the read at the deadline waits 1 ms.
        r.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        match r.read(&mut buf) {
            Ok(0) => return Some(since.elapsed()),
            // Still sending at the deadline: still open.
            Ok(_) if left.is_zero() => return None,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(_) => return Some(since.elapsed()),
        }
    }
}

/// The ports of some listener addresses.
pub fn ports(addrs: &[SocketAddr]) -> Vec<u16> {
    addrs.iter().map(SocketAddr::port).collect()
}

/// Plain HTTP/1.1 GET from inside a namespace (the `/metrics` page).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    testbed::in_netns(ns, || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP port");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    })
}
