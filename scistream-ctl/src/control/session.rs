//! The session registry: one entry per uid with its own state (nothing shared
//! between sessions), the req/hello rendezvous in either order, the hello
//! timeout, and release.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

use super::auth::Identity;
use super::error::ControlError;
use super::guard::PortGuard;
use super::offload::Offload;
use super::ports::{PortAllocator, Reservation};
use super::store::{Store, StoredSession, RECORD_VERSION};
use super::targets::TargetPolicy;
use super::tunnel_key::{self, KeyRequest, SessionKeying};
use crate::addr;
use crate::config::MAX_NUM_CONN;
use crate::dataplane::{Backend, Forwarder, SessionSpec, Side, StatsSnapshot};
use crate::ebpf::Counters;

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

/// What an `update` changed, so a failure after it can undo it.
enum Before {
    /// The data plane was started by this update.
    NotStarted,
    /// It ran with these targets.
    Targets(Vec<SocketAddr>),
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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

    /// `req`: reserves the ports, then waits for the hello (which may already
    /// have arrived and be waiting for us).
    pub async fn request(
        self: &Arc<Self>,
        uid: &str,
        role: &str,
        num_conn: i32,
        rate: i32,
        owner: Option<&Identity>,
        key: KeyRequest,
    ) -> Result<Granted, ControlError> {
        let uid = parse_uid(uid)?;
        let role = Role::parse(role)?;
        let num_conn = check_num_conn(num_conn)?;
        if rate < 0 {
            return Err(ControlError::InvalidArgument(format!(
                "rate {rate} is negative"
            )));
        }
        let keying = SessionKeying::for_request(&uid, role, self.backend.keying(), key)?;
        let session = {
            let mut sessions = lock(&self.sessions);
            if sessions.contains_key(&uid) {
                return Err(ControlError::AlreadyExists(uid));
            }
            let reservation = self.ports.allocate(num_conn)?;
            let listeners = reservation
                .ports
                .iter()
                .map(|p| SocketAddr::new(self.listener_ip, *p))
                .collect();
            let session = Arc::new(Session {
                uid: uid.clone(),
                role,
                num_conn,
                rate,
                listeners,
                owner: owner.map(|o| o.id.clone()),
                created: std::time::Instant::now(),
                keying,
                hello: watch::Sender::new(HelloState::Pending),
                inner: Mutex::new(Inner {
                    reservation: Some(reservation),
                    forwarder: None,
                    targets: Vec::new(),
                }),
                unowned_use_warned: Default::default(),
                updating: Default::default(),
            });
            sessions.insert(uid.clone(), session.clone());
            session
        };
        if let Some(g) = &self.guard {
            g.allow(&uid, &session_ports(&session));
        }
        let log_id = &session.keying.log_id;
        if *log_id != uid {
            debug!(uid = %uid, session = %log_id, "the tunnel is keyed by this uid alone: it goes by a stand-in name below debug level");
        }
        info!(uid = %log_id, role = role.as_str(), num_conn, rate, listeners = ?session.listeners, owner = ?session.owner, tunnel_secret = session.keying.kind.as_str(), "session requested");
        if crate::dataplane::tls::session_auth::is_time_based_uid(&uid) {
            warn!(uid = %log_id, "time-based (v1) uid: the tunnel's session secret derives from it and is guessable; use random (v4) uids");
        }
        if let Some(n) = lock(&self.early_hellos).remove(&uid) {
            n.notify_waiters();
        }
        self.spawn_hello_timeout(&session);

        let mut rx = session.hello.subscribe();
        let state = rx
            .wait_for(|s| *s != HelloState::Pending)
            .await
            .map(|s| s.clone())
            .unwrap_or(HelloState::Released);
        match state {
            HelloState::Received(prod) => {
                // Stored before the answer: a client told these listeners
                // finds them again after a restart. A session never answered
                // is never stored; its client saw the call fail.
                if let Err(e) = self.persist(&session).await {
                    self.remove(&uid, HelloState::Released, true).await;
                    return Err(e);
                }
                Ok(Granted {
                    listeners: session.listeners.clone(),
                    prod_listeners: if role == Role::Prod { prod } else { Vec::new() },
                    tunnel_key: if role == Role::Prod {
                        session.keying.key
                    } else {
                        None
                    },
                })
            }
            HelloState::TimedOut => Err(ControlError::HelloTimeout {
                uid,
                secs: self.hello_timeout.as_secs(),
            }),
            HelloState::Pending | HelloState::Released => Err(ControlError::Released(uid)),
        }
    }

    /// Releases the session if no hello came in time. Runs on its own so a
    /// client that hangs up does not leave the session behind.
    fn spawn_hello_timeout(self: &Arc<Self>, session: &Arc<Session>) {
        let (reg, uid, timeout) = (
            Arc::downgrade(self),
            session.uid.clone(),
            self.hello_timeout,
        );
        let log_id = session.keying.log_id.clone();
        let mut rx = session.hello.subscribe();
        tokio::spawn(async move {
            let timed_out =
                tokio::time::timeout(timeout, rx.wait_for(|s| *s != HelloState::Pending))
                    .await
                    .is_err();
            if timed_out {
                if let Some(reg) = reg.upgrade() {
                    warn!(uid = %log_id, secs = timeout.as_secs(), "no hello in time; releasing the session");
                    reg.remove(&uid, HelloState::TimedOut, true).await;
                }
            }
        });
    }

    /// `hello`: records the producer's addresses (PROD sessions) and completes
    /// the pending `req`. Arriving first, it waits for the `req`.
    pub async fn hello(
        &self,
        uid: &str,
        prod_listeners: &[String],
        caller: Option<&Identity>,
    ) -> Result<(Role, Vec<SocketAddr>), ControlError> {
        let uid = parse_uid(uid)?;
        let session = self.get_or_wait(&uid).await?;
        // The producer side says hello with the same user's token in
        // SciStream's flow, so the owner rule holds for hello too.
        Self::check_owner(&session, caller)?;
        // The role from `req` counts: SciStream 1.2's outbound-request sends
        // its hello as "PROD" for a CONS session.
        let received = match session.role {
            Role::Prod => {
                let addrs = addr::parse_socket_addrs(prod_listeners)
                    .map_err(ControlError::InvalidArgument)?;
                if addrs.is_empty() {
                    return Err(ControlError::InvalidArgument(
                        "hello for a PROD session needs prod_listeners".into(),
                    ));
                }
                addrs
            }
            Role::Cons => Vec::new(),
        };
        let mut accepted = false;
        session.hello.send_if_modified(|s| match s {
            HelloState::Pending | HelloState::Received(_) => {
                *s = HelloState::Received(received.clone());
                accepted = true;
                true
            }
            _ => false,
        });
        if !accepted {
            return Err(ControlError::NotFound(uid));
        }
        info!(uid = %session.keying.log_id, role = session.role.as_str(), prod_listeners = ?received, "hello");
        Ok((session.role, session.listeners.clone()))
    }

    async fn get_or_wait(&self, uid: &str) -> Result<Arc<Session>, ControlError> {
        let notified = {
            let sessions = lock(&self.sessions);
            if let Some(s) = sessions.get(uid) {
                return Ok(s.clone());
            }
            // Registered while the session map is locked, so a `req` that
            // inserts right after us is sure to wake us.
            let mut early = lock(&self.early_hellos);
            if early.len() >= MAX_EARLY_HELLOS && !early.contains_key(uid) {
                return Err(ControlError::Busy(format!(
                    "{MAX_EARLY_HELLOS} hellos already wait for their req; send the req first or retry"
                )));
            }
            early.entry(uid.to_string()).or_default().clone()
        };
        // Whether the wait ends, times out or is cancelled (its client hung
        // up), the entry goes with its last waiter.
        let entry = EarlyHello {
            registry: self,
            uid,
            notified,
        };
        let wait = EARLY_HELLO_WAIT.min(self.hello_timeout);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let fut = entry.notified.notified();
            tokio::pin!(fut);
            fut.as_mut().enable();
            if let Ok(s) = self.get(uid) {
                return Ok(s);
            }
            if tokio::time::timeout_at(deadline, fut).await.is_err() {
                return self.get(uid);
            }
        }
    }

    /// `update`: sets the session's targets (cycled to `num_conn`) and starts
    /// forwarding, or retargets a running session. All or nothing: a failed
    /// update leaves the session exactly as it was (listeners, data plane,
    /// targets, stored record), so it can be repeated. Run it to its end
    /// even if the caller goes away ([`Registry::update_detached`]).
    pub async fn update(
        &self,
        uid: &str,
        remote_listeners: &[String],
        caller: Option<&Identity>,
    ) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>), ControlError> {
        let uid = parse_uid(uid)?;
        let remote =
            addr::parse_socket_addrs(remote_listeners).map_err(ControlError::InvalidArgument)?;
        if remote.is_empty() {
            return Err(ControlError::InvalidArgument(
                "update needs at least one remote listener".into(),
            ));
        }
        if let Some(policy) = self.target_policy.get() {
            for t in &remote {
                policy.check(*t)?;
            }
        }
        let session = self.get(&uid)?;
        Self::check_owner(&session, caller)?;
        let targets = addr::cycle_to(&remote, session.num_conn);
        let _one_at_a_time = session.updating.lock().await;
        let before = self.forward(&session, targets.clone()).await?;
        // Stored before the answer; a store that fails undoes the update.
        if let Err(e) = self.persist(&session).await {
            self.undo(&session, before).await;
            return Err(e);
        }
        if matches!(before, Before::NotStarted) && !self.backend.binds_ports_itself() {
            // The data plane holds its own duplicates now.
            if let Some(r) = lock(&session.inner).reservation.as_mut() {
                drop(r.take_listeners());
            }
        }
        info!(uid = %session.keying.log_id, role = session.role.as_str(), targets = ?targets, backend = self.backend.name(), "forwarding");
        Ok((session.listeners.clone(), targets))
    }

    /// [`Registry::update`] on a task of its own: a client that hangs up
    /// mid-update cannot leave it half done.
    pub async fn update_detached(
        self: &Arc<Self>,
        uid: String,
        remote_listeners: Vec<String>,
        caller: Option<Identity>,
    ) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>), ControlError> {
        let reg = self.clone();
        tokio::spawn(async move { reg.update(&uid, &remote_listeners, caller.as_ref()).await })
            .await
            .unwrap_or_else(|e| {
                Err(ControlError::FailedPrecondition(format!(
                    "update failed unexpectedly: {e}"
                )))
            })
    }

    /// Starts the session's data plane towards `targets`, or retargets it,
    /// with no lock held across the backend's call. On error nothing changed.
    async fn forward(
        &self,
        session: &Arc<Session>,
        targets: Vec<SocketAddr>,
    ) -> Result<Before, ControlError> {
        let keeps_listeners = !self.backend.binds_ports_itself();
        let (running, listeners) = {
            let mut inner = lock(&session.inner);
            let running = inner.forwarder.clone();
            let Some(r) = inner.reservation.as_mut() else {
                return Err(ControlError::Released(session.uid.clone()));
            };
            let listeners = match (&running, keeps_listeners) {
                (Some(_), _) => Vec::new(),
                // Duplicates: if the start fails, the session's own stay open.
                (None, true) => r
                    .listeners
                    .iter()
                    .map(std::net::TcpListener::try_clone)
                    .collect::<std::io::Result<Vec<_>>>()
                    .map_err(|e| ControlError::DataPlane(e.into()))?,
                (None, false) => r.take_listeners(),
            };
            (running, listeners)
        };
        if let Some(f) = running {
            let old = lock(&session.inner).targets.clone();
            let t = targets.clone();
            self.offload(move || f.set_targets(t)).await?;
            lock(&session.inner).targets = targets;
            return Ok(Before::Targets(old));
        }
        let spec = SessionSpec::new(&session.uid, session.role.side())
            .with_rate(session.rate)
            .with_key(session.keying.key.as_ref().map(|k| &k[..]))
            .with_log_id(&session.keying.log_id);
        let (backend, t) = (self.backend.clone(), targets.clone());
        let started = self
            .offload(move || backend.start(spec, listeners, t))
            .await
            .and_then(|r| r.map_err(Into::into));
        let forwarder: Arc<dyn Forwarder> = match started {
            Ok(f) => Arc::from(f),
            Err(e) => {
                if !keeps_listeners {
                    self.rebind(session);
                }
                warn!(uid = %session.uid, error = %e, "update failed; the session is as it was");
                return Err(e);
            }
        };
        let orphan = {
            let mut inner = lock(&session.inner);
            if inner.reservation.is_none() {
                Some(forwarder)
            } else {
                inner.forwarder = Some(forwarder);
                inner.targets = targets;
                None
            }
        };
        if let Some(f) = orphan {
            // Released while it started: nothing may outlive the session.
            f.release().await;
            return Err(ControlError::Released(session.uid.clone()));
        }
        Ok(Before::NotStarted)
    }

    /// Puts the session back as it was before [`Registry::forward`].
    async fn undo(&self, session: &Arc<Session>, before: Before) {
        match before {
            Before::Targets(old) => {
                let f = lock(&session.inner).forwarder.clone();
                if let Some(f) = f {
                    let t = old.clone();
                    let _ = self.offload(move || f.set_targets(t)).await;
                }
                lock(&session.inner).targets = old;
            }
            Before::NotStarted => {
                let f = {
                    let mut inner = lock(&session.inner);
                    inner.targets.clear();
                    inner.forwarder.take()
                };
                if let Some(f) = f {
                    f.release().await;
                }
                if self.backend.binds_ports_itself() {
                    self.rebind(session);
                }
            }
        }
    }

    /// Binds the session's ports again after a backend that binds them
    /// itself closed the listeners and then failed.
    fn rebind(&self, session: &Session) {
        let mut inner = lock(&session.inner);
        if let Some(r) = inner.reservation.as_mut() {
            if let Err(e) = self.ports.rebind(r) {
                error!(uid = %session.uid, error = %e, "session's listeners could not be bound again");
            }
        }
    }

    /// Starts the data plane of a restored session, on the calling thread
    /// (at start, before the control port opens).
    fn forward_now(&self, session: &Session, targets: Vec<SocketAddr>) -> Result<(), ControlError> {
        let uid = &session.uid;
        let mut inner = lock(&session.inner);
        match &inner.forwarder {
            Some(f) => f.set_targets(targets.clone()),
            None => {
                let listeners = inner
                    .reservation
                    .as_mut()
                    .map(Reservation::take_listeners)
                    .unwrap_or_default();
                let spec = SessionSpec::new(uid, session.role.side())
                    .with_rate(session.rate)
                    .with_key(session.keying.key.as_ref().map(|k| &k[..]))
                    .with_log_id(&session.keying.log_id);
                inner.forwarder = Some(Arc::from(self.backend.start(
                    spec,
                    listeners,
                    targets.clone(),
                )?));
            }
        }
        inner.targets = targets;
        Ok(())
    }

    /// Writes the session's record (an fsynced commit, on the blocking pool
    /// with no lock of the registry held).
    async fn persist(&self, s: &Session) -> Result<(), ControlError> {
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let prod_listeners = match &*s.hello.borrow() {
            HelloState::Received(p) => p.clone(),
            _ => Vec::new(),
        };
        let created = std::time::SystemTime::now()
            .checked_sub(s.created.elapsed())
            .unwrap_or(std::time::UNIX_EPOCH);
        let record = StoredSession {
            version: RECORD_VERSION,
            uid: s.uid.clone(),
            role: s.role.as_str().into(),
            num_conn: s.num_conn,
            rate: s.rate,
            listeners: s.listeners.clone(),
            prod_listeners,
            targets: lock(&s.inner).targets.clone(),
            owner: s.owner.clone(),
            created_unix_ms: created
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            backend: self.backend.name().into(),
            tunnel_key: s.keying.key.map(|k| tunnel_key::hex(&k)),
        };
        // In store order: a concurrent release has either taken the session
        // out of the map already (nothing is written, no record outlives it)
        // or deletes the record after this write.
        let turn = self.store_order.clone().lock_owned().await;
        if !lock(&self.sessions)
            .get(&s.uid)
            .is_some_and(|cur| std::ptr::eq(&**cur, s))
        {
            return Err(ControlError::Released(s.uid.clone()));
        }
        let uid = s.keying.log_id.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            store.put(&record)
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                error!(uid = %uid, error = %e, "could not store the session");
                Err(e.into())
            }
            Err(e) => Err(ControlError::FailedPrecondition(format!(
                "storing the session failed unexpectedly: {e}"
            ))),
        }
    }

    /// Brings back the sessions an earlier run stored, with their exact
    /// ports, hello and targets. A session that cannot come back (port
    /// taken, backend or --listener_ip changed) is logged, forgotten and
    /// counted; the others and the server carry on.
    pub fn restore(self: &Arc<Self>) -> Result<(usize, usize), ControlError> {
        let Some(store) = &self.store else {
            return Ok((0, 0));
        };
        let (mut restored, mut failed) = (0, 0);
        for (uid, record) in store.load_raw()? {
            // Below debug level the uid shows only where it keys nothing.
            let public = record.as_ref().is_some_and(|r| {
                r.tunnel_key.is_some()
                    || (r.backend == self.backend.name()
                        && self.backend.keying() == crate::dataplane::TunnelKeying::Plaintext)
            });
            let shown = if public {
                uid.clone()
            } else {
                "(hidden; at debug level)".to_string()
            };
            debug!(uid = %uid, "restoring a stored session");
            let result = match record {
                Some(r) => self.restore_one(r),
                None => Err(ControlError::FailedPrecondition("unreadable record".into())),
            };
            match result {
                Ok(()) => restored += 1,
                Err(e) => {
                    error!(uid = %shown, error = %e, "stored session could not be restored; it is dropped");
                    failed += 1;
                    if let Err(e) = store.delete(&uid) {
                        error!(uid = %shown, error = %e, "could not forget the dropped session");
                    }
                }
            }
        }
        Ok((restored, failed))
    }

    fn restore_one(self: &Arc<Self>, r: StoredSession) -> Result<(), ControlError> {
        let role = Role::parse(&r.role)?;
        let uid = parse_uid(&r.uid)?;
        if r.backend != self.backend.name() {
            return Err(ControlError::FailedPrecondition(format!(
                "stored with backend {} but s2cs now runs {}",
                r.backend,
                self.backend.name()
            )));
        }
        if let Some(l) = r.listeners.iter().find(|l| l.ip() != self.listener_ip) {
            return Err(ControlError::FailedPrecondition(format!(
                "listener {l} is not on --listener_ip {}",
                self.listener_ip
            )));
        }
        if r.listeners.len() != r.num_conn
            || !(r.targets.is_empty() || r.targets.len() == r.num_conn)
        {
            return Err(ControlError::FailedPrecondition(
                "record inconsistent: listeners, targets and num_conn differ".into(),
            ));
        }
        let ports: Vec<u16> = r.listeners.iter().map(SocketAddr::port).collect();
        let key = match r.tunnel_key.as_deref().map(tunnel_key::parse_hex_key) {
            Some(None) => {
                return Err(ControlError::FailedPrecondition(
                    "record inconsistent: tunnel key is not 32 bytes of hex".into(),
                ))
            }
            Some(key) => key,
            None => None,
        };
        let reservation = self.ports.reserve(&ports)?;
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|now| now.saturating_sub(Duration::from_millis(r.created_unix_ms)))
            .unwrap_or_default();
        let session = Arc::new(Session {
            uid: uid.clone(),
            role,
            num_conn: r.num_conn,
            rate: r.rate,
            listeners: r.listeners,
            owner: r.owner,
            created: std::time::Instant::now()
                .checked_sub(age)
                .unwrap_or_else(std::time::Instant::now),
            keying: SessionKeying::new(&uid, self.backend.keying(), key),
            hello: watch::Sender::new(HelloState::Received(r.prod_listeners)),
            inner: Mutex::new(Inner {
                reservation: Some(reservation),
                forwarder: None,
                targets: Vec::new(),
            }),
            unowned_use_warned: Default::default(),
            updating: Default::default(),
        });
        if !r.targets.is_empty() {
            self.forward_now(&session, r.targets)?;
        }
        lock(&self.sessions).insert(uid.clone(), session.clone());
        if let Some(g) = &self.guard {
            g.allow(&uid, &session_ports(&session));
        }
        let targets = lock(&session.inner).targets.clone();
        info!(uid = %session.keying.log_id, role = role.as_str(), listeners = ?session.listeners, targets = ?targets, "session restored");
        Ok(())
    }

    /// `release`: stops forwarding, closes live connections, frees the ports.
    pub async fn release(&self, uid: &str, caller: Option<&Identity>) -> Result<(), ControlError> {
        let uid = parse_uid(uid)?;
        Self::check_owner(&*self.get(&uid)?, caller)?;
        if self.remove(&uid, HelloState::Released, true).await {
            Ok(())
        } else {
            Err(ControlError::NotFound(uid))
        }
    }

    /// Takes the session out and frees all it holds; `forget` also deletes
    /// its stored record (kept only by a `--keep_sessions` shutdown).
    async fn remove(&self, uid: &str, why: HelloState, forget: bool) -> bool {
        let Some(session) = lock(&self.sessions).remove(uid) else {
            return false;
        };
        if let (true, Some(store)) = (forget, self.store.clone()) {
            // Before the answer to `release`. A failure here is logged, not
            // returned: the session is gone from this run either way.
            let turn = self.store_order.clone().lock_owned().await;
            let id = uid.to_string();
            let deleted = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                store.delete(&id)
            })
            .await;
            if let Ok(Err(e)) = deleted {
                error!(uid = %session.keying.log_id, error = %e, "could not delete the stored session; it would come back after a restart");
            }
        }
        session.hello.send_if_modified(|s| {
            if *s == HelloState::Pending {
                *s = why;
                true
            } else {
                false
            }
        });
        let (forwarder, reservation) = {
            let mut inner = lock(&session.inner);
            (inner.forwarder.take(), inner.reservation.take())
        };
        if let Some(f) = forwarder {
            f.release().await;
        }
        if let Some(g) = &self.guard {
            // Before the ports return to the pool, where a new session may
            // allow them again.
            let passed = g.deny(&session_ports(&session));
            let dropped = g.dropped();
            info!(uid = %session.keying.log_id, passed_packets = passed.packets, passed_bytes = passed.bytes, guard_dropped_packets = dropped.packets, "guard counters at release");
        }
        // Every listener is closed now, so the ports can go back to the pool.
        drop(reservation);
        info!(uid = %session.keying.log_id, role = session.role.as_str(), "session released");
        true
    }

    pub async fn release_all(&self) {
        self.shutdown(false).await
    }

    /// Stops every session's data plane; with `keep_stored` their records
    /// stay, so the next start brings them back.
    pub async fn shutdown(&self, keep_stored: bool) {
        let uids: Vec<String> = lock(&self.sessions).keys().cloned().collect();
        for uid in uids {
            self.remove(&uid, HelloState::Released, !keep_stored).await;
        }
    }

    /// Releases the sessions still waiting for their hello, so their `req`
    /// calls answer now: a graceful shutdown waits for calls in flight, and
    /// these would hold it up to --hello_timeout.
    pub async fn release_pending(&self) {
        let pending: Vec<String> = lock(&self.sessions)
            .values()
            .filter(|s| *s.hello.borrow() == HelloState::Pending)
            .map(|s| s.uid.clone())
            .collect();
        for uid in pending {
            self.remove(&uid, HelloState::Released, true).await;
        }
    }

    /// Each session's traffic so far (bytes both ways plus connections
    /// accepted), for the lease: a count that moved means the session is used.
    /// Sessions whose traffic cannot be seen are left out: silence there
    /// says nothing about use, so the lease never takes them.
    pub fn activity(&self) -> Vec<(String, u64)> {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        sessions
            .iter()
            .filter_map(|s| {
                let forwarder = lock(&s.inner).forwarder.clone();
                let st = match forwarder.as_ref() {
                    Some(f) if !f.counters_observable() => return None,
                    Some(f) => f.stats(),
                    None => StatsSnapshot::default(),
                };
                Some((
                    s.uid.clone(),
                    st.bytes_forward + st.bytes_backward + st.connections_total,
                ))
            })
            .collect()
    }

    /// Releases a session whose lease ran out.
    pub async fn expire(&self, uid: &str, idle: Duration) -> bool {
        let shown = self
            .get(uid)
            .map(|s| s.keying.log_id.clone())
            .unwrap_or_default();
        warn!(uid = %shown, idle_secs = idle.as_secs(), "session idle past --session_ttl; releasing it");
        self.remove(uid, HelloState::Released, true).await
    }

    /// What the XDP guard let through to the session's ports; `None` when
    /// the guard is not running.
    /// Packets the XDP guard dropped (host-wide), when it runs.
    pub fn guard_dropped(&self) -> Option<Counters> {
        self.guard.as_ref().map(|g| g.dropped())
    }

    /// Where the guard runs: each data interface with its hook (`xdp`/`tc`);
    /// empty when it does not run.
    pub fn guard_hooks(&self) -> Vec<(String, crate::ebpf::Hook)> {
        self.guard
            .as_ref()
            .map(|g| g.hooks().to_vec())
            .unwrap_or_default()
    }

    /// Frames the XDP guard dropped at a session's ports for their source
    /// (see `Request.allowed_peers`); `None` when the guard is not running.
    pub fn guard_session_dropped(&self, uid: &str) -> Option<Counters> {
        self.guard.as_ref().and_then(|g| g.session_dropped(uid))
    }

    /// Hands `Request.allowed_peers` to the guard ahead of [`request`](Self::request).
    pub fn expect_peers(&self, uid: &str, peers: &[String]) -> Result<(), ControlError> {
        super::guard::expect_peers(self.guard.as_deref(), uid, peers)
    }

    pub fn guard_stats(&self, uid: &str) -> Result<Option<Counters>, ControlError> {
        let s = self.get(uid)?;
        Ok(self.guard.as_ref().map(|g| g.passed(&session_ports(&s))))
    }

    /// One session as `status` shows it; only its owner may look.
    pub fn view(&self, uid: &str, caller: Option<&Identity>) -> Result<SessionView, ControlError> {
        let uid = parse_uid(uid)?;
        let session = self.get(&uid)?;
        Self::check_owner(&session, caller)?;
        Ok(self.view_of(&session))
    }

    /// Every session the caller may see (all of them with authentication
    /// off, owned ones included: see [`Registry::check_owner`]).
    pub fn list(&self, caller: Option<&Identity>) -> Vec<SessionView> {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        let mut views: Vec<SessionView> = sessions
            .iter()
            .filter(|s| match (&s.owner, caller) {
                (None, _) | (Some(_), None) => true,
                (Some(owner), Some(who)) => who.is(owner),
            })
            .map(|s| self.view_of(s))
            .collect();
        views.sort_by_key(|v| std::cmp::Reverse(v.age));
        views
    }

    fn view_of(&self, s: &Session) -> SessionView {
        let hello_received = matches!(*s.hello.borrow(), HelloState::Received(_));
        let (targets, forwarder) = {
            let inner = lock(&s.inner);
            (inner.targets.clone(), inner.forwarder.clone())
        };
        SessionView {
            uid: s.uid.clone(),
            role: s.role,
            backend: self.backend.name(),
            listeners: s.listeners.clone(),
            targets,
            hello_received,
            rate: s.rate,
            num_conn: s.num_conn,
            stats: forwarder.as_ref().map(|f| f.stats()).unwrap_or_default(),
            counters_observable: forwarder.as_ref().is_none_or(|f| f.counters_observable()),
            age: s.created.elapsed(),
            owner: s.owner.clone(),
            secret: s.keying.kind,
            log_id: s.keying.log_id.clone(),
        }
    }

    pub fn stats(&self, uid: &str) -> Result<StatsSnapshot, ControlError> {
        let s = self.get(uid)?;
        let forwarder = lock(&s.inner).forwarder.clone();
        Ok(forwarder.map(|f| f.stats()).unwrap_or_default())
    }
}

/// An early hello's entry in `early_hellos`, removed with its last waiter.
struct EarlyHello<'a> {
    registry: &'a Registry,
    uid: &'a str,
    notified: Arc<Notify>,
}

impl Drop for EarlyHello<'_> {
    fn drop(&mut self) {
        let mut early = lock(&self.registry.early_hellos);
        // Two references: the map's and ours. More: another hello still waits.
        if early
            .get(self.uid)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notified))
            && Arc::strong_count(&self.notified) <= 2
        {
            early.remove(self.uid);
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
