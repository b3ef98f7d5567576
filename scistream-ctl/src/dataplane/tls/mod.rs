//! `tls` backend: TLS 1.3 (AES-GCM) between the outbound and the inbound
//! gateway, in user space with rustls. The inbound gateway presents its server
//! certificate; the outbound one verifies it when given `--peer_ca`. Before a
//! byte is forwarded, both prove the session secret over the channel
//! ([`session_auth`]). The apps on either side speak plain TCP.
//! Where the kernel has TLS offload ([`ktls`]), the keys then move to
//! the kernel and the bytes go by splice(2); otherwise rustls carries them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::dataplane::relay::{connect, splice, Pump};
use crate::dataplane::{DataPlaneError, SessionSpec, Side, Stats, TunnelKeying};
use ktls::{RecordBounded, Tier};
use records::RecordKey;
use rekey::{KeySchedule, KeyUpdates, Rekey, SecretLog};
use session_auth::{Role, SessionSecret};

pub mod ktls;
pub mod records;
pub mod rekey;
pub mod session_auth;
use crate::tls::{tunnel_client_config, tunnel_server_config, Identity};

/// Copy buffer per direction; with rustls' own 64 KiB plaintext limit this
/// bounds a connection's user-space memory to a few hundred KiB.
const COPY_BUF: usize = 64 * 1024;

pub struct TlsPump {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    /// Handshake plus session proof must finish within this.
    timeout: Duration,
    tier: Tier,
    /// Forced re-key interval in bytes sent ([`REKEY_VAR`]); None: rustls
    /// re-keys on its own before a key's record limit.
    rekey_every: Option<u64>,
    /// KeyUpdates this gateway initiated through `rekey_every`.
    rekeys: AtomicU64,
    /// Without kernel TLS: records sealed and opened by [`records`] after
    /// the proof (the default), or left to rustls' buffered stream
    /// ([`RECORDS_VAR`]`=rustls`).
    user_records: bool,
}

/// `SCISTREAM_TLS_RECORDS=rustls` keeps a tunnel in rustls' buffered stream
/// after the proof instead of the user-space record layer (`records`, the
/// default); for comparison and as a way out should the layer misbehave.
pub const RECORDS_VAR: &str = "SCISTREAM_TLS_RECORDS";

/// `SCISTREAM_REKEY_BYTES=N`: a test knob; each tunnel connection sends a
/// TLS 1.3 KeyUpdate (asking the peer to update too) after every N bytes, so
/// tests can force many re-keys in a short stream. AES-GCM's real limit is
/// 2^24 records (about 256 GiB), which rustls enforces by itself.
pub const REKEY_VAR: &str = "SCISTREAM_REKEY_BYTES";

/// The tunnel socket as rustls sees it until the session is proven.
type Tunnel = tokio_rustls::TlsStream<RecordBounded<TcpStream>>;

impl TlsPump {
    pub fn new(
        identity: &Identity,
        peer_ca: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, DataPlaneError> {
        if peer_ca.is_none() {
            tracing::warn!(
                "tls backend without --peer_ca: outbound tunnels do not verify the inbound gateway's certificate \
                 (they still require the session proof)"
            );
        }
        let tier = ktls::detect();
        match &tier {
            Tier::Kernel { rekey: true } => tracing::info!("tls backend: kernel TLS offload + splice (the kernel can re-key TLS 1.3)"),
            Tier::Kernel { rekey: false } => tracing::warn!(
                "tls backend: kernel TLS offload + splice, forced by {}=on on a kernel that cannot re-key TLS 1.3",
                ktls::MODE_VAR
            ),
            Tier::Rustls { reason } => tracing::info!("tls backend: TLS records in user space, not kernel TLS: {reason}"),
        }
        let user_records = match std::env::var(RECORDS_VAR)
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str()
        {
            "" | "records" => true,
            "rustls" => {
                tracing::warn!("{RECORDS_VAR}=rustls: tunnels stay in rustls' buffered stream after the handshake (slower)");
                false
            }
            other => {
                return Err(DataPlaneError::Unsupported {
                    backend: "tls",
                    reason: format!("{RECORDS_VAR}={other}: expected `records` or `rustls`"),
                })
            }
        };
        let rekey_every = std::env::var(REKEY_VAR)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n > 0);
        if let Some(n) = rekey_every {
            tracing::warn!(
                "{REKEY_VAR}={n}: tunnels re-key after every {n} bytes (a test setting)"
            );
        }
        Ok(Self {
            acceptor: TlsAcceptor::from(tunnel_server_config(identity)?),
            connector: TlsConnector::from(tunnel_client_config(peer_ca)?),
            timeout,
            tier,
            rekey_every,
            rekeys: AtomicU64::new(0),
            user_records,
        })
    }

    /// Where the tunnel leaves rustls after the proof (kernel TLS, or the
    /// user-space record layer), each connection gets its own config whose
    /// key log keeps the traffic secrets, for re-keying after the hand-over.
    fn secret_log(&self) -> Option<Arc<SecretLog>> {
        (matches!(self.tier, Tier::Kernel { .. }) || self.user_records)
            .then(|| Arc::new(SecretLog::default()))
    }

    /// TLS handshake and session proof as the inbound gateway.
    async fn admit(
        &self,
        accepted: TcpStream,
        secret: &SessionSecret,
    ) -> io::Result<(Tunnel, Option<Arc<SecretLog>>)> {
        let log = self.secret_log();
        let acceptor = match &log {
            Some(log) => {
                let mut cfg = (**self.acceptor.config()).clone();
                cfg.key_log = log.clone();
                TlsAcceptor::from(Arc::new(cfg))
            }
            None => self.acceptor.clone(),
        };
        let mut tls = acceptor.accept(RecordBounded::new(accepted)).await?;
        session_auth::prove(&mut tls, secret, Role::Server).await?;
        Ok((tls.into(), log))
    }

    /// TLS handshake and session proof as the outbound gateway.
    async fn open(
        &self,
        target: SocketAddr,
        secret: &SessionSecret,
    ) -> io::Result<(Tunnel, Option<Arc<SecretLog>>)> {
        let upstream = connect(target).await?;
        let name = ServerName::IpAddress(target.ip().into());
        let log = self.secret_log();
        let connector = match &log {
            Some(log) => {
                let mut cfg = (**self.connector.config()).clone();
                cfg.key_log = log.clone();
                TlsConnector::from(Arc::new(cfg))
            }
            None => self.connector.clone(),
        };
        let mut tls = connector
            .connect(name, RecordBounded::new(upstream))
            .await
            .map_err(|e| {
                // The operator reads this in the log: say why the peer was refused in words.
                match crate::trust::explain(&e) {
                    Some(why) => {
                        io::Error::new(e.kind(), format!("inbound gateway {target} refused: {why}"))
                    }
                    None => e,
                }
            })?;
        session_auth::prove(&mut tls, secret, Role::Client).await?;
        Ok((tls.into(), log))
    }

    /// Moves a proven tunnel's bytes to and from `plain`: through kernel TLS
    /// when this host can and the hand-over point is clean, else in rustls.
    /// `tunnel_first`: the tunnel is the accepting side (inbound gateway), for
    /// the direction of the counters.
    async fn carry(
        &self,
        (mut tunnel, log): (Tunnel, Option<Arc<SecretLog>>),
        plain: TcpStream,
        tunnel_first: bool,
        stats: &Stats,
    ) -> io::Result<()> {
        let (to_tunnel, from_tunnel) = if tunnel_first {
            (&stats.bytes_backward, &stats.bytes_forward)
        } else {
            (&stats.bytes_forward, &stats.bytes_backward)
        };
        if let Some(log) = log {
            match ktls_ready(&tunnel) {
                Ok(()) => {
                    let handed = hand_over(tunnel, &log)?;
                    let kernel = matches!(self.tier, Tier::Kernel { .. });
                    return carry_handed(
                        handed,
                        kernel,
                        plain,
                        to_tunnel,
                        from_tunnel,
                        self.rekey_every,
                        &self.rekeys,
                    )
                    .await;
                }
                Err(why) => tracing::warn!("staying in rustls for this connection: {why}"),
            }
        }
        tunnel.get_mut().0.unbound();
        let tunnel = Rekeying {
            inner: tunnel,
            every: self.rekey_every.unwrap_or(u64::MAX),
            since: 0,
            rekeys: &self.rekeys,
        };
        if tunnel_first {
            copy_counted(tunnel, plain, stats).await
        } else {
            copy_counted(plain, tunnel, stats).await
        }
    }
}

/// Whether the keys can leave rustls now without losing a byte: nothing
/// unread below rustls, nothing unsent in it, a suite the kernel knows.
fn ktls_ready(tunnel: &Tunnel) -> Result<(), String> {
    let (io, state) = tunnel.get_ref();
    if !io.at_boundary() {
        return Err("the socket is inside a TLS record".into());
    }
    if state.wants_write() {
        return Err("rustls has records left to send".into());
    }
    match state.negotiated_cipher_suite().map(|s| s.suite()) {
        Some(
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
            | rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ) => Ok(()),
        other => Err(format!("cipher suite {other:?} has no kernel TLS support")),
    }
}

/// A proven tunnel taken out of rustls at a record boundary: the socket,
/// the keys of both directions with their sequence numbers, the schedule of
/// their next generations, and plaintext rustls had already decrypted.
struct HandedOver {
    sock: TcpStream,
    secrets: rustls::ExtractedSecrets,
    keys: KeySchedule,
    early: Vec<u8>,
}

fn hand_over(mut tunnel: Tunnel, log: &SecretLog) -> io::Result<HandedOver> {
    use std::io::Read;
    let mut early = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let r = match &mut tunnel {
            tokio_rustls::TlsStream::Client(c) => c.get_mut().1.reader().read(&mut chunk),
            tokio_rustls::TlsStream::Server(s) => s.get_mut().1.reader().read(&mut chunk),
        };
        match r {
            Ok(0) => break,
            Ok(n) => early.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    let suite = tunnel
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .ok_or_else(|| io::Error::other("no cipher suite after the handshake"))?;
    let is_client = matches!(tunnel, tokio_rustls::TlsStream::Client(_));
    let (io, secrets) = match tunnel {
        tokio_rustls::TlsStream::Client(c) => {
            let (io, conn) = c.into_inner();
            (io, conn.dangerous_extract_secrets())
        }
        tokio_rustls::TlsStream::Server(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.dangerous_extract_secrets())
        }
    };
    let secrets = secrets.map_err(|e| io::Error::other(format!("extracting the TLS keys: {e}")))?;
    let keys = KeySchedule::new(log, is_client, suite, &secrets)?;
    Ok(HandedOver {
        sock: io.into_inner(),
        secrets,
        keys,
        early,
    })
}

/// Carries a handed-over tunnel: in kernel TLS with splice, re-keying in
/// the kernel (see [`ktls::rekey`]), or in the user-space record layer
/// ([`records`]). Plaintext rustls decrypted before the hand-over goes out
/// first, so the order of bytes is kept.
async fn carry_handed(
    handed: HandedOver,
    kernel: bool,
    mut plain: TcpStream,
    to_tunnel: &AtomicU64,
    from_tunnel: &AtomicU64,
    rekey_every: Option<u64>,
    rekeys: &AtomicU64,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let HandedOver {
        sock,
        secrets,
        keys,
        early,
    } = handed;
    let user_keys = if kernel {
        ktls::install(&sock, &secrets)
            .map_err(|e| io::Error::new(e.kind(), format!("installing kernel TLS keys: {e}")))?;
        None
    } else {
        Some((
            RecordKey::from_extracted(&secrets.tx)?,
            RecordKey::from_extracted(&secrets.rx)?,
        ))
    };
    drop(secrets);
    if !early.is_empty() {
        plain.write_all(&early).await?;
        from_tunnel.fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    match user_keys {
        None => {
            tracing::debug!("tunnel offloaded to kernel TLS");
            let rekey = Rekey::new(keys, rekey_every, rekeys);
            splice::splice_ktls(&plain, &sock, to_tunnel, from_tunnel, &rekey).await
        }
        Some((tx, rx)) => {
            let updates = KeyUpdates::new(keys, rekey_every, rekeys);
            records::carry(&plain, &sock, tx, rx, &updates, to_tunnel, from_tunnel).await
        }
    }
}

/// Bounds a tunnel set-up step and, when it fails, counts the refusal and
/// names it so the log line says why the peer was cut off.
async fn guarded<T>(
    limit: Duration,
    stats: &Stats,
    step: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let r = match tokio::time::timeout(limit, step).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("handshake and session proof took over {limit:?}"),
        )),
    };
    r.map_err(|e| {
        let n = stats.auth_failures.fetch_add(1, Ordering::Relaxed) + 1;
        io::Error::new(
            e.kind(),
            format!("tunnel peer refused ({n} so far in this session): {e}"),
        )
    })
}

impl Pump for TlsPump {
    const NAME: &'static str = "tls";
    const KEYING: TunnelKeying = TunnelKeying::SessionKey;

    async fn relay(
        self: Arc<Self>,
        session: Arc<SessionSpec>,
        accepted: TcpStream,
        target: SocketAddr,
        stats: Arc<Stats>,
    ) -> io::Result<()> {
        match session.side {
            Side::Inbound => {
                // Nothing is sent to the producer before the peer proved the secret.
                let tunnel =
                    guarded(self.timeout, &stats, self.admit(accepted, &session.secret)).await?;
                let app = connect(target).await?;
                self.carry(tunnel, app, true, &stats).await
            }
            Side::Outbound => {
                // Nor is anything of the consumer's sent before the inbound gateway proved it.
                let tunnel =
                    guarded(self.timeout, &stats, self.open(target, &session.secret)).await?;
                self.carry(tunnel, accepted, false, &stats).await
            }
        }
    }
}

/// Copies both ways with half-close (an EOF on one side shuts down the write
/// half of the other; for TLS that is a close_notify, which TLS 1.3 allows
/// while the other direction goes on).
async fn copy_counted<A, B>(a: A, b: B, stats: &Stats) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Counted {
        inner: a,
        counter: &stats.bytes_forward,
    };
    let mut b = Counted {
        inner: b,
        counter: &stats.bytes_backward,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF).await?;
    Ok(())
}

/// A tunnel in rustls that starts a KeyUpdate after every `every` bytes it
/// sends (see [`REKEY_VAR`]).
struct Rekeying<'a> {
    inner: Tunnel,
    every: u64,
    since: u64,
    rekeys: &'a AtomicU64,
}

impl AsyncRead for Rekeying<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rekeying<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.since += n as u64;
        if this.since >= this.every {
            this.since = 0;
            // Queued now, sent with the next write or flush.
            let r = match &mut this.inner {
                tokio_rustls::TlsStream::Client(c) => c.get_mut().1.refresh_traffic_keys(),
                tokio_rustls::TlsStream::Server(s) => s.get_mut().1.refresh_traffic_keys(),
            };
            r.map_err(|e| io::Error::other(format!("starting a TLS key update: {e}")))?;
            this.rekeys.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts bytes read from `inner`, so a session's stats move while it streams.
struct Counted<'a, S> {
    inner: S,
    counter: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
