//! The part every TCP-terminating backend shares: accept loops on the reserved
//! listeners, one task per connection, and release that closes them all. A
//! backend only supplies the [`Pump`] that moves one connection's bytes.

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::dataplane::{
    Backend, DataPlaneError, Forwarder, SessionSpec, Stats, StatsSnapshot, TunnelKeying,
};

pub mod pacing;
pub mod sockmap;
pub mod splice;

/// How long connecting to a target may take before the accepted client is dropped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Defaults of `--max_conn_per_listener` and `--tcp_keepalive`.
pub const DEFAULT_CONN_PER_LISTENER: usize = 8;
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// Keepalive probes after the idle time, and their spacing: a vanished peer
/// is noticed about a minute after the first probe.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;
/// At most one "over the cap" warning per session per this long.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// Moves the bytes of one accepted connection to its target until both
/// directions have ended.
pub trait Pump: Send + Sync + 'static {
    const NAME: &'static str;
    /// What the tunnel is keyed with (see [`Backend::keying`]).
    const KEYING: TunnelKeying = TunnelKeying::Plaintext;
    fn relay(
        self: Arc<Self>,
        session: Arc<SessionSpec>,
        accepted: TcpStream,
        target: SocketAddr,
        stats: Arc<Stats>,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

pub struct TcpRelay<P> {
    pump: Arc<P>,
    /// `--enforce_rate`: pace each session's sockets at its `rate`.
    enforce_rate: bool,
    /// `--max_conn_per_listener`: a session holds at most this many
    /// connections per listener, handshaking ones included.
    conn_per_listener: usize,
    /// `--tcp_keepalive` on both legs; `None` off.
    keepalive: Option<Duration>,
}

impl<P: Pump> TcpRelay<P> {
    pub fn new(pump: P) -> Self {
        Self {
            pump: Arc::new(pump),
            enforce_rate: false,
            conn_per_listener: DEFAULT_CONN_PER_LISTENER,
            keepalive: Some(DEFAULT_KEEPALIVE),
        }
    }

    pub fn enforce_rate(mut self, on: bool) -> Self {
        self.enforce_rate = on;
        self
    }

    pub fn connection_limits(mut self, per_listener: usize, keepalive: Option<Duration>) -> Self {
        self.conn_per_listener = per_listener.max(1);
        self.keepalive = keepalive;
        self
    }
}

/// What every accept loop of one session shares.
#[derive(Clone)]
struct Admission {
    open: Arc<std::sync::atomic::AtomicUsize>,
    cap: usize,
    keepalive: Option<Duration>,
    last_warn: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// One admitted connection; dropping it frees its place under the cap.
struct Admitted(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    fn admit(&self) -> Option<Admitted> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Admitted(self.open.clone()))
    }

    fn warn_refused(&self, peer: SocketAddr) {
        let now = std::time::Instant::now();
        let mut last = crate::lock(&self.last_warn);
        if last.is_none_or(|t| now.duration_since(t) >= REFUSAL_WARN_EVERY) {
            *last = Some(now);
            warn!(%peer, cap = self.cap, "session at its connection cap (--max_conn_per_listener x num_conn); closing new connections");
        }
    }
}

fn set_keepalive(sock: &impl std::os::fd::AsFd, idle: Option<Duration>) {
    if let Some(idle) = idle {
        let ka = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        if let Err(e) = socket2::SockRef::from(sock).set_tcp_keepalive(&ka) {
            debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

impl<P: Pump> Backend for TcpRelay<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn keying(&self) -> TunnelKeying {
        P::KEYING
    }

    fn start(
        &self,
        spec: SessionSpec,
        listeners: Vec<StdListener>,
        targets: Vec<SocketAddr>,
    ) -> Result<Box<dyn Forwarder>, DataPlaneError> {
        let fwd = RelayForwarder {
            targets: Arc::new(RwLock::new(targets)),
            stats: Arc::new(Stats::default()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let pacing = if self.enforce_rate {
            pacing::per_connection(spec.rate_kbps, listeners.len())
        } else {
            None
        };
        let admission = Admission {
            open: Arc::default(),
            cap: self
                .conn_per_listener
                .saturating_mul(listeners.len().max(1)),
            keepalive: self.keepalive,
            last_warn: Arc::default(),
        };
        let spec = Arc::new(spec);
        for (index, l) in listeners.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            let listener = TcpListener::from_std(l)?;
            let span = info_span!("listener", uid = %spec.log_id, side = ?spec.side, index);
            fwd.tasks.spawn(
                accept_loop(
                    self.pump.clone(),
                    spec.clone(),
                    listener,
                    index,
                    fwd.targets.clone(),
                    fwd.stats.clone(),
                    fwd.cancel.clone(),
                    fwd.tasks.clone(),
                    pacing,
                    admission.clone(),
                )
                .instrument(span),
            );
        }
        Ok(Box::new(fwd))
    }
}

struct RelayForwarder {
    targets: Arc<RwLock<Vec<SocketAddr>>>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Forwarder for RelayForwarder {
    fn set_targets(&self, targets: Vec<SocketAddr>) {
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = targets;
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn release(&self) -> futures::future::BoxFuture<'_, ()> {
        // Every accept loop and connection task selects on this token; dropping
        // their sockets closes listeners and live connections at once.
        self.cancel.cancel();
        self.tasks.close();
        Box::pin(self.tasks.wait())
    }
}

impl Drop for RelayForwarder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop<P: Pump>(
    pump: Arc<P>,
    session: Arc<SessionSpec>,
    listener: TcpListener,
    index: usize,
    targets: Arc<RwLock<Vec<SocketAddr>>>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    pacing: Option<u64>,
    admission: Admission,
) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the
                    // listener stays open for later connections.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = admission.admit() else {
            // Closed with RST at once: a flood holds no descriptor and no
            // handshake state here.
            let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
            drop(sock);
            admission.warn_refused(peer);
            continue;
        };
        let target = {
            let t = targets.read().unwrap_or_else(|p| p.into_inner());
            if t.is_empty() {
                None
            } else {
                Some(t[index % t.len()])
            }
        };
        let Some(target) = target else {
            warn!(%peer, "connection before targets were set; closing it");
            continue;
        };
        let _ = sock.set_nodelay(true);
        if let Some(rate) = pacing {
            if let Err(e) = pacing::set_max_pacing_rate(&sock, rate) {
                warn!(error = %e, "cannot pace the connection; closing it rather than exceed the session's rate");
                continue;
            }
        }
        stats.connections_total.fetch_add(1, Ordering::Relaxed);
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        let (pump, stats, cancel, session) =
            (pump.clone(), stats.clone(), cancel.clone(), session.clone());
        let span = info_span!("conn", %peer, %target);
        let sockets = ConnSockets {
            keepalive: admission.keepalive,
            ..Default::default()
        };
        sockets.hold(&sock);
        tasks.spawn(
            pacing::CONNECTION_PACING.scope(pacing, CONN_SOCKETS.scope(sockets.clone(), async move {
                let _admitted = admitted;
                debug!("accepted");
                let result = tokio::select! {
                    _ = cancel.cancelled() => Ok(()),
                    r = pump.relay(session, sock, target, stats.clone()) => r,
                };
                stats.connections_active.fetch_sub(1, Ordering::Relaxed);
                match result {
                    Ok(()) => debug!("closed"),
                    Err(e) => {
                        stats.connections_failed.fetch_add(1, Ordering::Relaxed);
                        sockets.abort();
                        warn!(error = %e, "connection ended with an error; both ends reset");
                    }
                }
            }))
            .instrument(span),
        );
    }
}

/// Connects to a target with a bound on the wait.
pub async fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {target} timed out"),
            )
        })?
        .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {target}: {e}")))?;
    let _ = s.set_nodelay(true);
    pacing::apply_task_pacing(&s).map_err(|e| {
        std::io::Error::new(e.kind(), format!("pacing the connection to {target}: {e}"))
    })?;
    if let Ok(held) = CONN_SOCKETS.try_with(Clone::clone) {
        held.hold(&s);
    }
    Ok(s)
}

tokio::task_local! {
    /// The sockets of the connection task running now (see [`ConnSockets`]).
    static CONN_SOCKETS: ConnSockets;
}

/// Both ends of one relayed connection, held past the pump so a failure can
/// reset them. A pump that fails mid-stream drops its sockets, and a plain
/// close sends FIN: the consumer or producer would take a cut stream for a
/// complete one. After an error every end is closed with RST instead. The
/// duplicates only keep the sockets alive until the task ends.
/// Both legs get the session's TCP keepalive here, so a peer that vanished
/// without a FIN does not hold a plaintext connection for ever.
#[derive(Clone, Default)]
struct ConnSockets {
    fds: Arc<std::sync::Mutex<Vec<std::os::fd::OwnedFd>>>,
    keepalive: Option<Duration>,
}

impl ConnSockets {
    fn hold(&self, s: &TcpStream) {
        use std::os::fd::AsFd;
        set_keepalive(s, self.keepalive);
        if let Ok(fd) = s.as_fd().try_clone_to_owned() {
            crate::lock(&self.fds).push(fd);
        }
    }

    /// Linger 0 on every end: their last close, when this task drops the
    /// duplicates, sends RST.
    fn abort(&self) {
        for fd in crate::lock(&self.fds).iter() {
            let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::splice::SplicePump;
    use super::*;
    use crate::dataplane::{SessionSpec, Side};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A target that sends part of a stream and then dies (RST): the client
    /// of the gateway must see an error, never a clean EOF after the part.
    #[tokio::test]
    async fn a_target_reset_mid_stream_reaches_the_client_as_a_reset() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_addr = target.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = target.accept().await.unwrap();
            s.write_all(&vec![7u8; 1 << 20]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        });
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = TcpRelay::new(SplicePump);
        let uid = "5b0c2d5e-6a43-4f0e-9d55-0b1c7c1e2a10";
        let fwd = backend
            .start(
                SessionSpec::new(uid, Side::Inbound),
                vec![listener],
                vec![target_addr],
            )
            .unwrap();

        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match client.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => got += n,
                    Err(e) => break Err(e),
                }
            }
        })
        .await
        .expect("the client learns the stream's fate");
        server.await.unwrap();
        let e = end.expect_err("a clean EOF after a cut stream");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        assert!(got <= 1 << 20);
        assert_eq!(fwd.stats().connections_failed, 1);
        fwd.release().await;
    }
}
