//! `tls` backend: TLS 1.3 (AES-GCM) between the outbound and the inbound
//! gateway, in user space with rustls. The inbound gateway presents its server
//! certificate; the outbound one verifies it when given `--peer_ca`. The apps
//! on either side speak plain TCP.

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
use super::{DataPlaneError, Side, Stats};
use crate::tls::{tunnel_client_config, tunnel_server_config, Identity};

/// A peer that does not finish the handshake in this time is cut off, so a
/// silent client cannot hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Copy buffer per direction; with rustls' own 64 KiB plaintext limit this
/// bounds a connection's user-space memory to a few hundred KiB.
const COPY_BUF: usize = 64 * 1024;

pub struct TlsPump {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl TlsPump {
    pub fn new(identity: &Identity, peer_ca: Option<&Path>) -> Result<Self, DataPlaneError> {
        if peer_ca.is_none() {
            tracing::warn!(
                "tls backend without --peer_ca: tunnels are encrypted but the inbound gateway's certificate is not verified"
            );
        }
        Ok(Self {
            acceptor: TlsAcceptor::from(tunnel_server_config(identity)?),
            connector: TlsConnector::from(tunnel_client_config(peer_ca)?),
        })
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} did not finish within {HANDSHAKE_TIMEOUT:?}"))
}

impl Pump for TlsPump {
    const NAME: &'static str = "tls";

    async fn relay(self: Arc<Self>, side: Side, accepted: TcpStream, target: SocketAddr, stats: Arc<Stats>) -> io::Result<()> {
        match side {
            Side::Inbound => {
                let tunnel = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(accepted))
                    .await
                    .map_err(|_| timed_out("TLS handshake with the peer gateway"))?
                    .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with the peer gateway: {e}")))?;
                let app = connect(target).await?;
                copy_counted(tunnel, app, &stats).await
            }
            Side::Outbound => {
                let upstream = connect(target).await?;
                let name = ServerName::IpAddress(target.ip().into());
                let tunnel = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, upstream))
                    .await
                    .map_err(|_| timed_out("TLS handshake with the inbound gateway"))?
                    .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {target}: {e}")))?;
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
