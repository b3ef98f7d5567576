//! The data plane: one [`Backend`] trait and one folder per way of moving
//! bytes. The control plane hands a backend the session's reserved listeners
//! and its targets and gets back a [`Forwarder`] it can retarget, query and
//! release, never knowing how bytes move. Nothing here imports the control
//! plane: what a backend needs from it (stored sessions at start) comes in
//! through [`from_args`], what it reports (host metrics) goes out through
//! the trait.
//!
//! - [`relay`]: accept loops and connection tasks shared by every backend
//!   that terminates TCP, with the plaintext pumps (`splice`, `sockmap`)
//!   and socket pacing.
//! - [`tls`]: the encrypted tunnel: handshake and session proof, kernel TLS
//!   and its re-keying, the user-space record layer.
//! - [`compat`]: SciStream 1.2's stunnel and HAProxy, run as supervised
//!   programs.
//! - [`xdp`]: the eBPF NAT; the kernel forwards, no TCP is terminated.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{BackendKind, ServerArgs};

pub mod compat;
pub mod relay;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod xdp;

pub use relay::{sockmap, splice, TcpRelay};
use tls::session_auth;

/// Which end of the tunnel a session's listeners are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// PROD role, inbound gateway: accepts tunnel connections from the peer
    /// gateway and forwards them to the producer app.
    Inbound,
    /// CONS role, outbound gateway: accepts the consumer app and forwards its
    /// connections into the tunnel towards the inbound gateway.
    Outbound,
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("backend {backend} cannot run here: {reason}")]
    Unsupported {
        backend: &'static str,
        reason: String,
    },
    #[error("data plane set-up failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What a backend keys the tunnel between the two gateways with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelKeying {
    /// Nothing: the bytes cross in plaintext (or untouched, `xdp`).
    Plaintext,
    /// The uid itself, as SciStream 1.2 does (stunnel's PSK): a per-session
    /// key from the inbound gateway could not reach a 1.2 peer.
    Uid,
    /// The uid mixed with the session key the inbound gateway made, when the
    /// client carried it (`Request.tunnel_key`); the uid alone otherwise.
    SessionKey,
}

/// What a session is, as far as a backend needs to know.
#[derive(Clone, Debug)]
pub struct SessionSpec {
    pub uid: String,
    /// What logs name the session by: its uid, or a stand-in when the uid is
    /// what the tunnel is keyed with (it must then stay out of logs).
    pub log_id: String,
    pub side: Side,
    /// Derived from the uid and, when the session has one, its random key;
    /// the `tls` tunnel proves it.
    pub secret: session_auth::SessionSecret,
    /// The request's `rate` in kbit/s (0: none); enforced only with `--enforce_rate`.
    pub rate_kbps: u64,
}

impl SessionSpec {
    pub fn new(uid: &str, side: Side) -> Self {
        Self {
            uid: uid.to_string(),
            log_id: uid.to_string(),
            side,
            secret: session_auth::SessionSecret::derive(uid, None),
            rate_kbps: 0,
        }
    }

    /// Mixes the session's random key (from the inbound gateway) into the secret.
    pub fn with_key(mut self, key: Option<&[u8]>) -> Self {
        self.secret = session_auth::SessionSecret::derive(&self.uid, key);
        self
    }

    pub fn with_log_id(mut self, log_id: &str) -> Self {
        self.log_id = log_id.to_string();
        self
    }

    pub fn with_rate(mut self, rate_kbps: i32) -> Self {
        self.rate_kbps = rate_kbps.max(0) as u64;
        self
    }
}

/// A session the state directory holds from an earlier run, as far as a
/// backend needs it at start (the `xdp` backend adopts the kernel state of
/// its own sessions and removes the rest).
#[derive(Clone, Debug)]
pub struct StoredForwarding {
    pub uid: String,
    /// The backend the session forwarded with.
    pub backend: String,
    pub listener_ports: Vec<u16>,
    /// False until the session's `update` gave it targets.
    pub forwarding: bool,
}

/// What a backend reports about the host beyond its sessions, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct HostMetrics {
    /// Interfaces its kernel program runs on, with the hook.
    pub hooks: Vec<(String, crate::ebpf::Hook)>,
    /// Host-wide counters of frames its kernel program dropped, by reason.
    pub drops: Vec<(&'static str, scistream_common::guard::Counters)>,
}

/// A data-plane implementation (`s2cs --type`).
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// What the tunnel between the gateways is keyed with.
    fn keying(&self) -> TunnelKeying {
        TunnelKeying::Plaintext
    }

    /// Starts forwarding: connections accepted on `listeners[i]` go to
    /// `targets[i]`. Must be called within a tokio runtime.
    fn start(
        &self,
        spec: SessionSpec,
        listeners: Vec<TcpListener>,
        targets: Vec<SocketAddr>,
    ) -> Result<Box<dyn Forwarder>, DataPlaneError>;

    /// True when the backend closes the listeners it is given and its
    /// program binds their ports itself; otherwise it may be given
    /// duplicates, and the session keeps its own until a start succeeds.
    fn binds_ports_itself(&self) -> bool {
        false
    }

    /// Host-wide facts of a backend with a kernel program; `None` otherwise.
    fn host_metrics(&self) -> Option<HostMetrics> {
        None
    }
}

/// A session's running data plane.
pub trait Forwarder: Send + Sync {
    /// New connections use the new targets; live ones keep theirs.
    fn set_targets(&self, targets: Vec<SocketAddr>);
    fn stats(&self) -> StatsSnapshot;
    /// False when the bytes move where s2cs cannot count them (stunnel),
    /// so [`Forwarder::stats`]' zeros mean "unknown", not "idle".
    fn counters_observable(&self) -> bool {
        true
    }
    /// Closes the listeners and every live connection; resolves once they are
    /// closed, so their ports can be reused at once. Idempotent.
    fn release(&self) -> futures::future::BoxFuture<'_, ()>;
}

/// Counters of one session, shared by its connection tasks.
#[derive(Default, Debug)]
pub struct Stats {
    /// Bytes from the accepting side towards the target.
    pub bytes_forward: AtomicU64,
    /// Bytes from the target back to the accepting side.
    pub bytes_backward: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_failed: AtomicU64,
    /// Tunnel connections refused: failed handshake or session proof.
    pub auth_failures: AtomicU64,
    /// Connections moved mid-stream to a slower, surer path (a stalled
    /// sockmap pair handed to splice).
    pub fallbacks: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub bytes_forward: u64,
    pub bytes_backward: u64,
    pub connections_total: u64,
    pub connections_active: u64,
    pub connections_failed: u64,
    pub auth_failures: u64,
    pub fallbacks: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            bytes_forward: self.bytes_forward.load(Ordering::Relaxed),
            bytes_backward: self.bytes_backward.load(Ordering::Relaxed),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_failed: self.connections_failed.load(Ordering::Relaxed),
            auth_failures: self.auth_failures.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// Builds the backend `s2cs` was asked for, checking up front that it can
/// run; `stored`: the sessions the state directory holds, loaded first.
pub fn from_args(
    args: &ServerArgs,
    identity: &crate::tls::Identity,
    stored: &[StoredForwarding],
) -> Result<Arc<dyn Backend>, DataPlaneError> {
    let limits = (args.max_conn_per_listener as usize, args.tcp_keepalive());
    Ok(match args.backend {
        BackendKind::Tls => Arc::new(
            TcpRelay::new(tls::TlsPump::new(
                identity,
                args.peer_ca.as_deref(),
                args.tunnel_timeout(),
            )?)
            .enforce_rate(args.enforce_rate)
            .connection_limits(limits.0, limits.1),
        ),
        BackendKind::Splice => {
            splice::probe()?;
            Arc::new(
                TcpRelay::new(splice::SplicePump)
                    .enforce_rate(args.enforce_rate)
                    .connection_limits(limits.0, limits.1),
            )
        }
        BackendKind::Sockmap => {
            if !args.experimental {
                return Err(DataPlaneError::Unsupported {
                    backend: "sockmap",
                    reason: "experimental: on Linux 6.18 the kernel's redirect was seen sending bytes twice under load (detected, the connection is reset) and it has no backpressure; pass --experimental to use it anyway".into(),
                });
            }
            // Falling back to splice mid-stream needs splice too.
            splice::probe()?;
            Arc::new(
                TcpRelay::new(sockmap::SockmapPump::new()?)
                    .enforce_rate(args.enforce_rate)
                    .connection_limits(limits.0, limits.1),
            )
        }
        BackendKind::StunnelSubprocess | BackendKind::HaproxySubprocess if args.enforce_rate => {
            return Err(DataPlaneError::Unsupported {
                backend: args.backend.name(),
                reason: "--enforce_rate paces sockets inside s2cs; this backend's bytes move in another program".into(),
            });
        }
        BackendKind::StunnelSubprocess => Arc::new(compat::SubprocessBackend::new(
            compat::stunnel::Stunnel,
            &args.state_dir(),
        )?),
        BackendKind::HaproxySubprocess => Arc::new(compat::SubprocessBackend::new(
            compat::haproxy::Haproxy,
            &args.state_dir(),
        )?),
        BackendKind::Xdp => Arc::new(xdp::XdpBackend::new(args, stored)?),
    })
}
