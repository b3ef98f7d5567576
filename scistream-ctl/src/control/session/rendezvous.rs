//! `req` and `hello`, which may come in either order: a `req` reserves the
//! ports and waits for its hello; a hello that comes first waits a bounded
//! time for its `req`; a session whose hello never comes is released.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::{
    check_num_conn, lock, parse_uid, session_ports, Granted, HelloState, Inner, Registry, Role,
    Session, EARLY_HELLO_WAIT, MAX_EARLY_HELLOS,
};
use crate::addr;
use crate::control::auth::Identity;
use crate::control::error::ControlError;
use crate::control::tunnel_key::{KeyRequest, SessionKeying};

impl Registry {
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
