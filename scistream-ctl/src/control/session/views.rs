//! What the registry reports without changing anything: `status` and
//! `list` (owner-filtered), counters for metrics and the lease, and the XDP
//! guard's bookkeeping per session.

use std::sync::Arc;

use super::{lock, parse_uid, session_ports, HelloState, Registry, Session, SessionView};
use crate::control::auth::Identity;
use crate::control::error::ControlError;
use crate::dataplane::StatsSnapshot;
use crate::ebpf::Counters;

impl Registry {
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
        crate::control::guard::expect_peers(self.guard.as_deref(), uid, peers)
    }

    /// What the XDP guard let through to the session's ports; `None` when
    /// the guard is not running.
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
