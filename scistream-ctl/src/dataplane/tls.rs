//! `tls` backend: TLS 1.3 (AES-GCM) between the outbound and the inbound
//! gateway, in user space with rustls. The inbound gateway presents its server
//! certificate; the outbound one verifies it when given `--peer_ca`. Before a
//! byte is forwarded, both prove the session secret over the channel
//! ([`super::session_auth`]). The apps on either side speak plain TCP.

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

use super::relay::{connect, Pump};
use super::session_auth::{self, Role, SessionSecret};
use super::{DataPlaneError, SessionSpec, Side, Stats};
use crate::tls::{tunnel_client_config, tunnel_server_config, Identity};

/// Copy buffer per direction; with rustls' own 64 KiB plaintext limit this
/// bounds a connection's user-space memory to a few hundred KiB.
const COPY_BUF: usize = 64 * 1024;

pub struct TlsPump {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    /// Handshake plus session proof must finish within this.
    timeout: Duration,
}

impl TlsPump {
    pub fn new(identity: &Identity, peer_ca: Option<&Path>, timeout: Duration) -> Result<Self, DataPlaneError> {
        if peer_ca.is_none() {
            tracing::warn!(
                "tls backend without --peer_ca: outbound tunnels do not verify the inbound gateway's certificate \
                 (they still require the session proof)"
            );
        }
        Ok(Self {
            acceptor: TlsAcceptor::from(tunnel_server_config(identity)?),
            connector: TlsConnector::from(tunnel_client_config(peer_ca)?),
            timeout,
        })
    }

    /// TLS handshake and session proof as the inbound gateway.
    async fn admit(&self, accepted: TcpStream, secret: &SessionSecret) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let mut tls = self.acceptor.accept(accepted).await?;
        session_auth::prove(&mut tls, secret, Role::Server).await?;
        Ok(tls)
    }

    /// TLS handshake and session proof as the outbound gateway.
    async fn open(&self, target: SocketAddr, secret: &SessionSecret) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let upstream = connect(target).await?;
        let name = ServerName::IpAddress(target.ip().into());
        let mut tls = self.connector.connect(name, upstream).await?;
        session_auth::prove(&mut tls, secret, Role::Client).await?;
        Ok(tls)
    }
}

/// Bounds a tunnel set-up step and, when it fails, counts the refusal and
/// names it so the log line says why the peer was cut off.
async fn guarded<T>(limit: Duration, stats: &Stats, step: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let r = match tokio::time::timeout(limit, step).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("handshake and session proof took over {limit:?}"))),
    };
    r.map_err(|e| {
        let n = stats.auth_failures.fetch_add(1, Ordering::Relaxed) + 1;
        io::Error::new(e.kind(), format!("tunnel peer refused ({n} so far in this session): {e}"))
    })
}

impl Pump for TlsPump {
    const NAME: &'static str = "tls";

    async fn relay(self: Arc<Self>, session: Arc<SessionSpec>, accepted: TcpStream, target: SocketAddr, stats: Arc<Stats>) -> io::Result<()> {
        match session.side {
            Side::Inbound => {
                // Nothing is sent to the producer before the peer proved the secret.
                let tunnel = guarded(self.timeout, &stats, self.admit(accepted, &session.secret)).await?;
                let app = connect(target).await?;
                copy_counted(tunnel, app, &stats).await
            }
            Side::Outbound => {
                // Nor is anything of the consumer's sent before the inbound gateway proved it.
                let tunnel = guarded(self.timeout, &stats, self.open(target, &session.secret)).await?;
                copy_counted(accepted, tunnel, &stats).await
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
    let mut a = Counted { inner: a, counter: &stats.bytes_forward };
    let mut b = Counted { inner: b, counter: &stats.bytes_backward };
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF).await?;
    Ok(())
}

/// Counts bytes read from `inner`, so a session's stats move while it streams.
struct Counted<'a, S> {
    inner: S,
    counter: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
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
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
