//! `s2cs` on 127.0.0.1 without namespaces, for the hardening tests: a
//! gateway on fixed ports, a sink that times the gaps in what it receives,
//! and a feeder that streams into a session at a steady rate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::{bin, Daemon};

use super::raw::{new_uid, RawClient};

/// Producers in these tests listen here; s2cs is told to allow it.
pub const SINK_IP: &str = "127.0.0.2";

pub struct LoopGw {
    pub daemon: Daemon,
    pub control: SocketAddr,
    pub dir: PathBuf,
}

impl Drop for LoopGw {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A state directory on the disk (not tmpfs), so store commits really sync.
pub fn state_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ss-harden-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl LoopGw {
    /// Control port `base`, data ports `base+1..=base+ports`, plaintext
    /// control channel, the guard off, targets on 127.0.0.2 allowed.
    pub fn start(tag: &str, base: u16, ports: u16, backend: &str, extra: &[&str]) -> LoopGw {
        let dir = state_dir(tag);
        let mut cmd = Command::new(bin("s2cs"));
        cmd.args([
            "--listener_ip",
            "127.0.0.1",
            "--control_ip",
            "127.0.0.1",
            "--ssl",
            "false",
            "--guard",
            "false",
        ])
        .args(["--type", backend, "--port", &base.to_string()])
        .args(["--port_range", &format!("{}-{}", base + 1, base + ports)])
        .args(["--allow_target_nets", &format!("{SINK_IP}/32")])
        .arg("--state_dir")
        .arg(&dir)
        .args(extra)
        .env_remove("S2CS_CLIENT_SECRET");
        let mut daemon = Daemon::spawn(cmd).expect("starting s2cs");
        if let Err(e) = daemon.wait_for_log("serving scistream.Control", Duration::from_secs(20)) {
            panic!("s2cs did not come up: {e:#}");
        }
        LoopGw {
            daemon,
            control: SocketAddr::from(([127, 0, 0, 1], base)),
            dir,
        }
    }

    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.daemon.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.daemon.pid()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// req + hello + update of a PROD session towards `target`; its listener.
pub async fn open_session(
    c: &RawClient,
    target: SocketAddr,
    num_conn: i32,
) -> (String, Vec<SocketAddr>) {
    let uid = new_uid();
    let t = target.to_string();
    let pending = tokio::spawn({
        let (c, uid) = (c.clone(), uid.clone());
        async move { c.req(&uid, "PROD", num_conn, 0).await }
    });
    c.hello(&uid, &[&t], "PROD").await.expect("hello");
    let r = pending.await.expect("join").expect("req");
    c.update(&uid, &[&t], "PROD").await.expect("update");
    let listeners = r
        .listeners
        .iter()
        .map(|l| l.parse().expect("listener address"))
        .collect();
    (uid, listeners)
}

/// Accepts on 127.0.0.2 and reads everything, noting the longest pause
/// between two reads of any connection since the last [`Sink::reset`].
pub struct Sink {
    pub addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    max_gap: Arc<Mutex<Duration>>,
    measuring: Arc<AtomicBool>,
}

impl Sink {
    pub fn start() -> Sink {
        let l = TcpListener::bind((SINK_IP, 0)).expect("sink bind");
        let addr = l.local_addr().expect("sink addr");
        let (bytes, max_gap, measuring) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(Duration::ZERO)),
            Arc::new(AtomicBool::new(false)),
        );
        let (b, g, m) = (bytes.clone(), max_gap.clone(), measuring.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let (b, g, m) = (b.clone(), g.clone(), m.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut last = Instant::now();
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let now = Instant::now();
                        if m.load(Ordering::Acquire) {
                            let mut gap = g.lock().unwrap();
                            *gap = (*gap).max(now - last);
                        }
                        last = now;
                        b.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Sink {
            addr,
            bytes,
            max_gap,
            measuring,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Starts (again) timing the pauses.
    pub fn reset(&self) {
        *self.max_gap.lock().unwrap() = Duration::ZERO;
        self.measuring.store(true, Ordering::Release);
    }

    pub fn max_gap(&self) -> Duration {
        *self.max_gap.lock().unwrap()
    }

    /// Waits until `more` bytes beyond now have arrived, or panics.
    pub fn assert_progress(&self, more: u64, within: Duration) {
        let start = self.bytes();
        let deadline = Instant::now() + within;
        while self.bytes() < start + more {
            assert!(
                Instant::now() < deadline,
                "stream stalled: {} of {more} bytes in {within:?}",
                self.bytes() - start
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Writes 16 KiB every 2 ms (8 MB/s) into `to` until dropped.
pub struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    pub fn start(to: SocketAddr) -> Feeder {
        let mut s = TcpStream::connect(to).expect("feeder connect");
        let _ = s.set_nodelay(true);
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let chunk = vec![0x5au8; 16 * 1024];
            while !st.load(Ordering::Acquire) {
                if s.write_all(&chunk).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Feeder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Raises this process's soft descriptor limit to the hard one.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
