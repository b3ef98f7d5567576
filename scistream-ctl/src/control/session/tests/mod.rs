//! The registry in-process, without root: a fake backend that records what
//! the registry asks of the data plane (and can be told to fail a start),
//! real loopback listeners for the reserved ports, and a store in a temp
//! directory where persistence is the point.
//!
//! Ports: `real_sockets` uses 27340-27359; the other files 27600-27699, five
//! ports per test, since tests run in parallel and a port is proven free by
//! binding it. All below the ephemeral range (32768-60999 by default), so no
//! outgoing connection elsewhere can hold one.

use std::net::{Ipv4Addr, TcpListener as StdListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use tokio::task::JoinHandle;

use super::*;
use crate::config::PortRange;
use crate::control::store::Store;
use crate::control::tunnel_key::KeyRequest;
use crate::dataplane::{DataPlaneError, SessionSpec, TunnelKeying};

mod lifecycle;
mod real_sockets;
mod rendezvous;

/// What a PROD hello names as the producer in these tests.
const PRODUCER: &str = "127.0.0.1:9000";

fn lo(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

/// One `Backend::start` as the fake saw it.
#[derive(Clone, Debug)]
struct Start {
    uid: String,
    side: Side,
    rate_kbps: u64,
    /// The addresses of the listeners it was handed.
    listeners: Vec<SocketAddr>,
    targets: Vec<SocketAddr>,
    ok: bool,
}

#[derive(Default)]
struct Calls {
    starts: Vec<Start>,
    /// (uid, targets) of each `Forwarder::set_targets`.
    retargets: Vec<(String, Vec<SocketAddr>)>,
    /// uid of each `Forwarder::release`.
    releases: Vec<String>,
}

/// A backend that moves no bytes: it holds the listeners it is given (so
/// the ports stay taken while it "runs") and records every call.
struct Fake {
    calls: Arc<Mutex<Calls>>,
    fail_start: AtomicBool,
    /// Behaves like stunnel/HAProxy: closes the listeners it is handed and
    /// binds the ports again itself.
    binds_itself: bool,
    keying: TunnelKeying,
}

impl Fake {
    fn with(binds_itself: bool, keying: TunnelKeying) -> Arc<Self> {
        Arc::new(Self {
            calls: Arc::default(),
            fail_start: AtomicBool::new(false),
            binds_itself,
            keying,
        })
    }
    fn new() -> Arc<Self> {
        Self::with(false, TunnelKeying::Plaintext)
    }
    fn fail_starts(&self, fail: bool) {
        self.fail_start.store(fail, Ordering::SeqCst);
    }
    fn starts(&self) -> Vec<Start> {
        self.calls.lock().unwrap().starts.clone()
    }
    fn retargets(&self) -> Vec<(String, Vec<SocketAddr>)> {
        self.calls.lock().unwrap().retargets.clone()
    }
    fn releases(&self) -> Vec<String> {
        self.calls.lock().unwrap().releases.clone()
    }
}

impl Backend for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn keying(&self) -> TunnelKeying {
        self.keying
    }
    fn binds_ports_itself(&self) -> bool {
        self.binds_itself
    }
    fn start(
        &self,
        spec: SessionSpec,
        listeners: Vec<StdListener>,
        targets: Vec<SocketAddr>,
    ) -> Result<Box<dyn Forwarder>, DataPlaneError> {
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let fail = self.fail_start.load(Ordering::SeqCst);
        self.calls.lock().unwrap().starts.push(Start {
            uid: spec.uid.clone(),
            side: spec.side,
            rate_kbps: spec.rate_kbps,
            listeners: addrs.clone(),
            targets: targets.clone(),
            ok: !fail,
        });
        let listeners = if self.binds_itself {
            // What a supervised program does: the handed sockets close, and
            // (when it comes up) it binds the same ports on its own.
            drop(listeners);
            if fail {
                Vec::new()
            } else {
                addrs
                    .iter()
                    .map(|a| StdListener::bind(a).unwrap())
                    .collect()
            }
        } else {
            listeners
        };
        if fail {
            return Err(DataPlaneError::Io(std::io::Error::other(
                "the fake backend was told to fail",
            )));
        }
        Ok(Box::new(FakeForwarder {
            uid: spec.uid,
            calls: self.calls.clone(),
            listeners: Mutex::new(listeners),
        }))
    }
}

struct FakeForwarder {
    uid: String,
    calls: Arc<Mutex<Calls>>,
    listeners: Mutex<Vec<StdListener>>,
}

impl Forwarder for FakeForwarder {
    fn set_targets(&self, targets: Vec<SocketAddr>) {
        self.calls
            .lock()
            .unwrap()
            .retargets
            .push((self.uid.clone(), targets));
    }
    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }
    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.listeners.lock().unwrap().clear();
            self.calls.lock().unwrap().releases.push(self.uid.clone());
        })
    }
}

fn registry_with(
    range: (u16, u16),
    fake: &Arc<Fake>,
    hello_timeout: Duration,
    store: Option<Arc<Store>>,
) -> Arc<Registry> {
    let ip: IpAddr = Ipv4Addr::LOCALHOST.into();
    let ports = PortAllocator::new(
        PortRange {
            start: range.0,
            end: range.1,
        },
        ip,
    );
    let backend: Arc<dyn Backend> = fake.clone();
    Registry::with_store(ports, backend, ip, hello_timeout, None, store)
}

fn registry(range: (u16, u16), fake: &Arc<Fake>) -> Arc<Registry> {
    registry_with(range, fake, Duration::from_secs(30), None)
}

fn who(id: &str) -> Identity {
    Identity {
        id: id.to_string(),
        username: None,
        linked: Vec::new(),
    }
}

fn spawn_request(
    reg: &Arc<Registry>,
    uid: &str,
    role: &str,
    num_conn: i32,
    owner: Option<&Identity>,
) -> JoinHandle<Result<Granted, ControlError>> {
    let (reg, uid, role, owner) = (
        reg.clone(),
        uid.to_string(),
        role.to_string(),
        owner.cloned(),
    );
    tokio::spawn(async move {
        reg.request(&uid, &role, num_conn, 0, owner.as_ref(), KeyRequest::None)
            .await
    })
}

fn spawn_hello(
    reg: &Arc<Registry>,
    uid: &str,
    prod_listeners: &[&str],
    caller: Option<&Identity>,
) -> JoinHandle<Result<(Role, Vec<SocketAddr>), ControlError>> {
    let (reg, uid, caller) = (reg.clone(), uid.to_string(), caller.cloned());
    let prod: Vec<String> = prod_listeners.iter().map(|s| s.to_string()).collect();
    tokio::spawn(async move { reg.hello(&uid, &prod, caller.as_ref()).await })
}

/// A session through `req` and `hello`, as a client makes it.
async fn open(
    reg: &Arc<Registry>,
    uid: &str,
    role: &str,
    num_conn: i32,
    owner: Option<&Identity>,
) -> Granted {
    let req = spawn_request(reg, uid, role, num_conn, owner);
    let prod: &[&str] = if role == "PROD" { &[PRODUCER] } else { &[] };
    reg.hello(
        uid,
        &prod.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        owner,
    )
    .await
    .expect("hello");
    req.await.expect("req task").expect("req")
}

/// The error of a call that must fail (`Granted` has no `Debug` for `expect_err`).
fn failure<T>(r: Result<T, ControlError>, what: &str) -> ControlError {
    match r {
        Ok(_) => panic!("{what} succeeded"),
        Err(e) => e,
    }
}

/// Polls `cond` until it holds; fails the test after 5 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether someone other than the registry could listen on `addr` now.
fn free(addr: SocketAddr) -> bool {
    StdListener::bind(addr).is_ok()
}

/// A state directory of its own, removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("ss-session-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Self(d)
    }
    fn open_store(&self) -> Arc<Store> {
        Arc::new(Store::open(&self.0).expect("open the store"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
