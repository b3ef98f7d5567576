//! The end of a session: `release`, lease expiry, shutdown, and `remove`,
//! the one path that frees what a session holds, in an order that never
//! hands a port back while something still listens on it.

use std::time::Duration;

use tracing::{error, info, warn};

use super::{lock, parse_uid, session_ports, HelloState, Registry};
use crate::control::auth::Identity;
use crate::control::error::ControlError;

impl Registry {
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
    pub(super) async fn remove(&self, uid: &str, why: HelloState, forget: bool) -> bool {
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

    /// Releases a session whose lease ran out.
    pub async fn expire(&self, uid: &str, idle: Duration) -> bool {
        let shown = self
            .get(uid)
            .map(|s| s.keying.log_id.clone())
            .unwrap_or_default();
        warn!(uid = %shown, idle_secs = idle.as_secs(), "session idle past --session_ttl; releasing it");
        self.remove(uid, HelloState::Released, true).await
    }
}
