//! The control port's connections before tonic sees them: at most
//! `--max_control_connections` open (more are closed before their TLS
//! handshake), the TLS handshake and the HTTP/2 preface due within
//! `--control_timeout` of connecting, and connections with no call in flight
//! closed after `--control_idle_timeout`. tonic and hyper have no preface or
//! idle timeout of their own: an HTTP/2 connection that never sends its
//! preface, or never a request, would be held for ever.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// The client's first bytes on an HTTP/2 connection (RFC 9113 §3.4), which
/// a SETTINGS frame must follow.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
/// At most one "over the cap" warning per this long, with the count since.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// From TCP accept to the end of the HTTP/2 preface's SETTINGS frame.
    pub preface: Duration,
    /// With no call in flight.
    pub idle: Duration,
}

/// One open control connection; holding it counts against the cap.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the service layer sees of a connection (tonic puts it in each
/// request's extensions): calls in flight and since when it is idle.
#[derive(Clone, Debug)]
pub struct ConnInfo(Arc<ConnState>);

#[derive(Debug)]
struct ConnState {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Bytes of request messages not yet whole (see preauth.rs).
    partial_bytes: AtomicUsize,
    /// `req` calls in flight.
    reqs: AtomicUsize,
    peer: SocketAddr,
}

/// Marks a `req` in flight on its connection until dropped.
pub struct ReqGuard(Arc<ConnState>);

impl Drop for ReqGuard {
    fn drop(&mut self) {
        self.0.reqs.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks a call in flight on its connection until dropped.
pub struct CallGuard(Arc<ConnState>);

impl ConnInfo {
    pub fn begin_call(&self) -> CallGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.0.clone())
    }

    /// A `req` in flight, unless `limit` of them already are.
    pub fn begin_req(&self, limit: usize) -> Option<ReqGuard> {
        self.0
            .reqs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ReqGuard(self.0.clone()))
    }

    /// Charges `n` bytes of partial messages, unless that passes `limit`.
    pub fn charge(&self, n: usize, limit: usize) -> bool {
        self.0
            .partial_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b + n <= limit).then_some(b + n)
            })
            .is_ok()
    }

    pub fn peer(&self) -> SocketAddr {
        self.0.peer
    }

    pub fn refund(&self, n: usize) {
        self.0.partial_bytes.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        *crate::lock(&self.0.idle_since) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Watches the first bytes for the preface and the SETTINGS frame after it.
/// It does not judge them: hyper refuses a wrong preface itself; this only
/// says when enough has arrived.
#[derive(Default)]
struct PrefaceWatch {
    head: Vec<u8>,
    /// Total bytes read so far, and how many the preface with its SETTINGS
    /// frame needs (known once the frame header is in).
    read: usize,
    needed: Option<usize>,
}

impl PrefaceWatch {
    /// Returns true once the preface and a whole first frame have been read.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let header_end = PREFACE.len() + FRAME_HEADER;
        if self.head.len() < header_end {
            let take = (header_end - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            if self.head.len() == header_end {
                let h = &self.head[PREFACE.len()..];
                let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                if &self.head[..PREFACE.len()] == PREFACE && h[3] == SETTINGS {
                    self.needed = Some(header_end + len);
                }
            }
        }
        self.read += bytes.len();
        self.needed.is_some_and(|n| self.read >= n)
    }
}

/// An accepted control connection, TLS or plaintext, with its deadlines.
pub struct ControlIo {
    io: Io,
    info: ConnInfo,
    peer: SocketAddr,
    limits: Limits,
    preface: Option<PrefaceWatch>,
    timer: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl tonic::transport::server::Connected for ControlIo {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl ControlIo {
    fn new(io: Io, peer: SocketAddr, accepted: Instant, limits: Limits, slot: Slot) -> Self {
        let info = ConnInfo(Arc::new(ConnState {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(accepted),
            partial_bytes: AtomicUsize::new(0),
            reqs: AtomicUsize::new(0),
            peer,
        }));
        Self {
            io,
            info,
            peer,
            limits,
            preface: Some(PrefaceWatch::default()),
            timer: Box::pin(tokio::time::sleep_until(accepted + limits.preface)),
            _slot: slot,
        }
    }

    /// Polls the deadline; `Ready` ends the connection (as an error while
    /// the preface is missing, as end-of-stream when idle).
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.preface.is_some() {
                debug!(peer = %self.peer, secs = self.limits.preface.as_secs_f64(), "no HTTP/2 preface in time; closing the control connection");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface in time",
                )));
            }
            let state = &self.info.0;
            let now = Instant::now();
            let next = if state.in_flight.load(Ordering::Acquire) > 0 {
                now + self.limits.idle
            } else {
                let since = *crate::lock(&state.idle_since);
                if now.duration_since(since) >= self.limits.idle {
                    debug!(peer = %self.peer, secs = self.limits.idle.as_secs(), "control connection idle; closing it");
                    return Poll::Ready(Ok(()));
                }
                since + self.limits.idle
            };
            self.timer.as_mut().reset(next);
        }
    }
}

impl AsyncRead for ControlIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match r {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if let Some(w) = &mut this.preface {
                    if w.feed(fresh) {
                        this.preface = None;
                        let since = *crate::lock(&this.info.0.idle_since);
                        this.timer
                            .as_mut()
                            .reset(since.max(Instant::now()) + this.limits.idle);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // hyper keeps a read pending on every live connection, so the
            // deadline is polled (and its waker kept) from here.
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl AsyncWrite for ControlIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, data),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts on `listener` for as long as the returned stream is polled:
/// connections over the cap are closed at once, the others go through their
/// TLS handshake (with `tls`) on their own task and come out ready for tonic.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
) -> impl futures::Stream<Item = io::Result<ControlIo>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let accept = tokio::spawn(accept_loop(listener, tls, limits, tx));
    // Ends the accept loop (closing the port) when tonic drops the stream.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let guard = AbortOnDrop(accept);
    futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|io| (Ok(io), (rx, guard)))
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    tx: mpsc::UnboundedSender<ControlIo>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut refused_since_warn = 0u64;
    let mut last_warn: Option<Instant> = None;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors (or a connection reset before accept):
                // back off a little instead of spinning.
                debug!(error = %e, "control port accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted = Instant::now();
        // Only this loop adds to `open`, so the check cannot race another add.
        if open.load(Ordering::Acquire) >= limits.max_connections {
            drop(tcp);
            refused_since_warn += 1;
            if last_warn.is_none_or(|t| accepted.duration_since(t) >= REFUSAL_WARN_EVERY) {
                warn!(
                    peer = %peer,
                    limit = limits.max_connections,
                    refused = refused_since_warn,
                    "control connections at --max_control_connections; refusing new ones (count since the last warning)"
                );
                refused_since_warn = 0;
                last_warn = Some(accepted);
            }
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(open.clone());
        let _ = tcp.set_nodelay(true);
        let (tls, tx) = (tls.clone(), tx.clone());
        tokio::spawn(async move {
            let io = match tls {
                None => Io::Plain(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout_at(accepted + limits.preface, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(s)) => Io::Tls(Box::new(s)),
                        Ok(Err(e)) => {
                            debug!(peer = %peer, error = %e, "control TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(peer = %peer, "control TLS handshake not done in time; closing");
                            return;
                        }
                    }
                }
            };
            let _ = tx.send(ControlIo::new(io, peer, accepted, limits, slot));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            SETTINGS,
            0,
            0,
            0,
            0,
            0,
        ];
        f.extend(std::iter::repeat_n(0u8, payload));
        f
    }

    #[test]
    fn preface_is_complete_only_with_its_whole_settings_frame_in_any_split() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings_frame(12));
        for split in 1..bytes.len() {
            let mut w = PrefaceWatch::default();
            assert!(
                !w.feed(&bytes[..split]),
                "complete after {split} of {} bytes",
                bytes.len()
            );
            assert!(
                w.feed(&bytes[split..]),
                "not complete with all {} bytes (split {split})",
                bytes.len()
            );
        }
    }

    #[test]
    fn bytes_that_are_not_a_preface_never_complete_it() {
        let mut w = PrefaceWatch::default();
        assert!(!w.feed(b"GET / HTTP/1.1\r\nHost: s2cs\r\n\r\n"));
        assert!(!w.feed(&[0u8; 4096]));
        // The right preface followed by a frame that is not SETTINGS.
        let mut bytes = PREFACE.to_vec();
        bytes.extend([0, 0, 0, 0x8, 0, 0, 0, 0, 0]);
        let mut w = PrefaceWatch::default();
        assert!(!w.feed(&bytes) && !w.feed(&[0u8; 64]));
    }
}
