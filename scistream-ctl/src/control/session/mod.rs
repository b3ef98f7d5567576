//! The session registry: one entry per uid, each with its own ports,
//! listeners, data plane and counters (nothing is shared between sessions),
//! from its `req` to its release.
//!
//! This file holds the types (a session, its hello state, what `status`
//! shows) and the registry itself: construction, lookup and the owner rule.
//! The rest is split by what a call does to a session:
//!
//! - `rendezvous`: `req` and `hello` meeting in either order, the early
//!   hello's bounded wait and the hello timeout;
//! - `forwarding`: `update`, starting or retargeting the data plane, all or
//!   nothing;
//! - `persistence`: writing answered sessions to the store and bringing them
//!   back after a restart;
//! - `release`: `release`, lease expiry, shutdown, and the one path that
//!   frees what a session holds;
//! - `views`: what `status`, `list`, metrics and the lease read (counters,
//!   guard bookkeeping);
//! - `tests`: all of the above in-process, on a fake backend and loopback
//!   ports, without root.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::warn;

use super::auth::Identity;
use super::error::ControlError;
use super::guard::PortGuard;
use super::offload::Offload;
use super::ports::{PortAllocator, Reservation};
use super::store::Store;
use super::targets::TargetPolicy;
use super::tunnel_key::{self, SessionKeying};
use crate::config::MAX_NUM_CONN;
use crate::dataplane::{Backend, Forwarder, Side, StatsSnapshot};

mod forwarding;
mod persistence;
mod release;
mod rendezvous;
mod views;

#[cfg(test)]
mod tests;

/// How long a `hello` that arrives before its `req` waits for it (capped by
/// the hello timeout). SciStream clients send both within a second and give
/// up after 5 s.
pub const EARLY_HELLO_WAIT: Duration = Duration::from_secs(5);

/// Most uids an early `hello` may wait for at once: each is a map entry
/// held up to [`EARLY_HELLO_WAIT`], and uids cost a client nothing.
pub const MAX_EARLY_HELLOS: usize = 1024;

/// Threads for the data plane's blocking calls (see control/offload.rs).
const OFFLOAD_THREADS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Inbound gateway, in front of the producer.
    Prod,
    /// Outbound gateway, used by the consumer.
    Cons,
}

impl Role {
    pub fn parse(s: &str) -> Result<Self, ControlError> {
        match s.trim().to_ascii_uppercase().as_str() {
            "PROD" => Ok(Self::Prod),
            "CONS" => Ok(Self::Cons),
            _ => Err(ControlError::InvalidArgument(format!(
                "role {s:?} is neither PROD nor CONS"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prod => "PROD",
            Self::Cons => "CONS",
        }
    }
    fn side(self) -> Side {
        match self {
            Self::Prod => Side::Inbound,
            Self::Cons => Side::Outbound,
        }
    }
}

/// uids are UUIDs (SciStream's uuid1, our v4); normalised to lower-case
/// hyphenated form so one session cannot be named two ways.
pub fn parse_uid(uid: &str) -> Result<String, ControlError> {
    uuid::Uuid::try_parse(uid.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ControlError::InvalidArgument(format!("uid {uid:?} is not a UUID")))
}

fn session_ports(s: &Session) -> Vec<u16> {
    s.listeners.iter().map(SocketAddr::port).collect()
}

pub fn check_num_conn(n: i32) -> Result<usize, ControlError> {
    if (1..=MAX_NUM_CONN).contains(&n) {
        Ok(n as usize)
    } else {
        Err(ControlError::InvalidArgument(format!(
            "num_conn {n} out of range 1..={MAX_NUM_CONN}"
        )))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HelloState {
    Pending,
    Received(Vec<SocketAddr>),
    TimedOut,
    Released,
}

pub struct Session {
    pub uid: String,
    pub role: Role,
    pub num_conn: usize,
    pub rate: i32,
    pub listeners: Vec<SocketAddr>,
    /// The identity that created the session; `None` with authentication off.
    pub owner: Option<String>,
    pub created: std::time::Instant,
    /// The tunnel key and the name logs use for the session.
    pub keying: SessionKeying,
    hello: watch::Sender<HelloState>,
    inner: Mutex<Inner>,
    /// Set once the warning that this owned session is managed without
    /// authentication has been logged.
    unowned_use_warned: std::sync::atomic::AtomicBool,
    /// One `update` at a time per session, held across its data-plane call
    /// and its store write (never `inner`, which status and metrics read).
    updating: tokio::sync::Mutex<()>,
}

struct Inner {
    /// Ports stay reserved (and return to the pool) with this; `None` once
    /// the session is removed.
    reservation: Option<Reservation>,
    forwarder: Option<Arc<dyn Forwarder>>,
    targets: Vec<SocketAddr>,
}

/// What `status` and `list` report of a session.
#[derive(Clone, Debug)]
pub struct SessionView {
    pub uid: String,
    pub role: Role,
    pub backend: &'static str,
    pub listeners: Vec<SocketAddr>,
    pub targets: Vec<SocketAddr>,
    pub hello_received: bool,
    pub rate: i32,
    pub num_conn: usize,
    pub stats: StatsSnapshot,
    /// False when the backend's program moves the bytes where they cannot
    /// be counted (stunnel): `stats` is then unknown, not zero.
    pub counters_observable: bool,
    pub age: Duration,
    pub owner: Option<String>,
    pub secret: tunnel_key::SecretKind,
    /// The uid, or a stand-in when it is the secret (see [`SessionKeying`]).
    pub log_id: String,
}

/// A completed `req`: the session's listeners and, for PROD, the producer
/// addresses its hello carried.
pub struct Granted {
    pub listeners: Vec<SocketAddr>,
    pub prod_listeners: Vec<SocketAddr>,
    /// The key a PROD request asked for (`Request.want_tunnel_key`).
    pub tunnel_key: Option<[u8; tunnel_key::KEY_LEN]>,
}

pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    early_hellos: Mutex<HashMap<String, Arc<Notify>>>,
    ports: PortAllocator,
    backend: Arc<dyn Backend>,
    listener_ip: IpAddr,
    hello_timeout: Duration,
    /// Lets each session's ports through the XDP guard while it lives.
    guard: Option<Arc<PortGuard>>,
    /// Answered sessions, kept across restarts; `None` keeps them in memory only.
    store: Option<Arc<Store>>,
    /// Store writes in order, each on the blocking pool with this held, so
    /// a record written for a session cannot land after its deletion.
    store_order: Arc<tokio::sync::Mutex<()>>,
    /// `update` targets refused (loops into the gateway, loopback); unset
    /// in unit tests of the registry alone.
    target_policy: OnceLock<TargetPolicy>,
    /// Made on first use, inside the runtime.
    offload: OnceLock<Offload>,
}

use crate::lock;

impl Registry {
    pub fn new(
        ports: PortAllocator,
        backend: Arc<dyn Backend>,
        listener_ip: IpAddr,
        hello_timeout: Duration,
    ) -> Arc<Self> {
        Self::with_guard(ports, backend, listener_ip, hello_timeout, None)
    }

    pub fn with_guard(
        ports: PortAllocator,
        backend: Arc<dyn Backend>,
        listener_ip: IpAddr,
        hello_timeout: Duration,
        guard: Option<Arc<PortGuard>>,
    ) -> Arc<Self> {
        Self::with_store(ports, backend, listener_ip, hello_timeout, guard, None)
    }

    pub fn with_store(
        ports: PortAllocator,
        backend: Arc<dyn Backend>,
        listener_ip: IpAddr,
        hello_timeout: Duration,
        guard: Option<Arc<PortGuard>>,
        store: Option<Arc<Store>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sessions: Mutex::new(HashMap::new()),
            early_hellos: Mutex::new(HashMap::new()),
            ports,
            backend,
            listener_ip,
            hello_timeout,
            guard,
            store,
            store_order: Arc::default(),
            target_policy: OnceLock::new(),
            offload: OnceLock::new(),
        })
    }

    /// Sets which `update` targets are refused; once, before serving.
    pub fn set_target_policy(&self, policy: TargetPolicy) {
        let _ = self.target_policy.set(policy);
    }

    /// uids an early hello waits for now.
    pub fn early_hellos_waiting(&self) -> usize {
        lock(&self.early_hellos).len()
    }

    /// Runs a blocking data-plane call off the runtime's workers.
    async fn offload<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let off = self
            .offload
            .get_or_init(|| Offload::new(OFFLOAD_THREADS, tokio::runtime::Handle::current()));
        off.run(f).await.ok_or_else(|| {
            ControlError::DataPlane(crate::dataplane::DataPlaneError::Io(std::io::Error::other(
                "the data plane's call failed unexpectedly (see the log)",
            )))
        })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ports_in_use(&self) -> usize {
        self.ports.in_use()
    }

    fn get(&self, uid: &str) -> Result<Arc<Session>, ControlError> {
        lock(&self.sessions)
            .get(uid)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(uid.to_string()))
    }

    /// Only the creator (or an identity linked to it) may touch a session
    /// that has an owner; sessions made with authentication off have none.
    /// `caller` is `None` only with authentication off (with it on, a call
    /// without a valid token never gets here). Then nobody can prove who
    /// they are, so an owner (a session stored while authentication was on)
    /// cannot be enforced: the call is accepted and that is logged once per
    /// session, instead of the session being stuck until its lease ends.
    fn check_owner(session: &Session, caller: Option<&Identity>) -> Result<(), ControlError> {
        match (&session.owner, caller) {
            (None, _) => Ok(()),
            (Some(owner), Some(who)) if who.is(owner) => Ok(()),
            (Some(owner), None) => {
                if !session
                    .unowned_use_warned
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!(uid = %session.keying.log_id, owner = %owner, "session owned by another identity is managed without authentication (s2cs runs without --client_secret); its owner is not enforced");
                }
                Ok(())
            }
            (Some(owner), Some(who)) => {
                warn!(uid = %session.keying.log_id, owner = %owner, caller = %who.id, "call from another identity refused");
                Err(ControlError::NotOwner {
                    uid: session.uid.clone(),
                })
            }
        }
    }
}
