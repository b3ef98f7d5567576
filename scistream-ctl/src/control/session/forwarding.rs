//! `update`: starting a session's data plane or retargeting it, all or
//! nothing, and starting a restored session's data plane at start-up.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::{lock, parse_uid, HelloState, Registry, Session};
use crate::addr;
use crate::control::auth::Identity;
use crate::control::error::ControlError;
use crate::control::ports::Reservation;
use crate::dataplane::{Forwarder, SessionSpec};

/// What an `update` changed, so a failure after it can undo it.
enum Before {
    /// The data plane was started by this update.
    NotStarted,
    /// It ran with these targets.
    Targets(Vec<SocketAddr>),
}

impl Registry {
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
        // A session starts forwarding (and is stored) only once its req was
        // answered: one restored from the store must have had its hello.
        if matches!(*session.hello.borrow(), HelloState::Pending) {
            return Err(ControlError::FailedPrecondition(format!(
                "session {uid} has had no hello yet; update it once its req has been answered"
            )));
        }
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
                warn!(uid = %session.keying.log_id, error = %e, "update failed; the session is as it was");
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
                error!(uid = %session.keying.log_id, error = %e, "session's listeners could not be bound again");
            }
        }
    }

    /// Starts the data plane of a restored session, on the calling thread
    /// (at start, before the control port opens).
    pub(super) fn forward_now(
        &self,
        session: &Session,
        targets: Vec<SocketAddr>,
    ) -> Result<(), ControlError> {
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
}
