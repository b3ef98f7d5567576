//! The session store from the registry's side: each answered session is
//! written before its answer, and an earlier run's sessions come back with
//! their exact ports, hello and targets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, error, info};

use super::{lock, parse_uid, session_ports, HelloState, Inner, Registry, Role, Session};
use crate::control::error::ControlError;
use crate::control::store::{StoredSession, RECORD_VERSION};
use crate::control::tunnel_key::{self, SessionKeying};

impl Registry {
    /// Writes the session's record (an fsynced commit, on the blocking pool
    /// with no lock of the registry held).
    pub(super) async fn persist(&self, s: &Session) -> Result<(), ControlError> {
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
    /// counted; the others and the server carry on. `records`: the store's
    /// contents ([`Store::load_raw`]), read once at start by the server.
    ///
    /// [`Store::load_raw`]: crate::control::store::Store::load_raw
    pub fn restore(
        self: &Arc<Self>,
        records: Vec<(String, Option<StoredSession>)>,
    ) -> (usize, usize) {
        let Some(store) = &self.store else {
            return (0, 0);
        };
        let (mut restored, mut failed) = (0, 0);
        for (uid, record) in records {
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
        (restored, failed)
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
}
