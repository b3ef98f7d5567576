//! `sockmap` backend: plaintext TCP terminated at each gateway, like `splice`,
//! but the kernel moves the bytes: after accept and connect both sockets go
//! into the sk-redirect SockHash and an sk_skb verdict program sends whatever
//! one receives out on the other. User space only watches the pair: it passes
//! each EOF on as a half-close once every byte before it is out, takes the
//! sockets out of the map before they close, and moves a connection to
//! splice(2) when the kernel path stalls (sockmap has a record of those).
//!
//! Every byte is accounted for from TCP's own counters: bytes received on one
//! socket against bytes written to the other. A gap that never closes is
//! either a stall (the bytes still sit in the receive queue: splice takes
//! over losslessly) or bytes the kernel dropped (the connection is reset, so
//! no one mistakes a truncated stream for a complete one).

use crate::error_chain;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::socket::{shutdown, Shutdown};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::splice::splice_bidirectional;
use super::{connect, Pump};
use crate::dataplane::{DataPlaneError, SessionSpec, Stats};
use crate::ebpf::{Pair, SockRedirect};

/// A direction with bytes pending, a writable destination and no byte moved
/// for this long is stuck, and the connection goes to splice. Not shorter:
/// bytes the program already redirected sit in the kernel's per-socket queue
/// until a worker thread sends them, and taking the sockets out of the map
/// throws that queue away (the loss check then resets the connection). On a
/// loaded 2-core machine that worker was seen idle for more than 500 ms with
/// 40 MiB queued, and every byte still arrived.
///
/// Two remedies that look obvious corrupt streams on Linux 6.18 and are not
/// used: re-running the verdict on a paired socket mid-stream (raising
/// SO_RCVLOWAT, which makes TCP re-announce its queue) and shrinking a
/// source's receive buffer to hold it back (backpressure). With either, the
/// kernel sent segments twice (1448 and 10136 extra bytes in 64 MiB streams).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watcher reads the counters and socket states.
const WATCH_TICK: Duration = Duration::from_millis(10);
/// How often it looks while an EOF waits for the bytes before it to go out.
const DRAIN_TICK: Duration = Duration::from_millis(1);
/// After unpairing, a send the kernel had already started may still finish;
/// the loss check waits this long for the counters to settle.
const SETTLE: Duration = Duration::from_millis(20);

pub struct SockmapPump {
    redirect: Mutex<SockRedirect>,
}

impl SockmapPump {
    /// Loads the redirect program; refuses with the reason when this host
    /// cannot run it (no root, no BPF, eBPF objects not built).
    pub fn new() -> Result<Self, DataPlaneError> {
        let unsupported = |reason: String| DataPlaneError::Unsupported {
            backend: "sockmap",
            reason,
        };
        if !nix::unistd::geteuid().is_root() {
            return Err(unsupported(
                "needs root (CAP_BPF and CAP_NET_ADMIN) to load its eBPF program".into(),
            ));
        }
        let redirect = SockRedirect::load().map_err(|e| unsupported(error_chain(&e)))?;
        Ok(Self {
            redirect: Mutex::new(redirect),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SockRedirect> {
        crate::lock(&self.redirect)
    }
}

impl Pump for SockmapPump {
    const NAME: &'static str = "sockmap";

    async fn relay(
        self: Arc<Self>,
        _session: Arc<SessionSpec>,
        accepted: TcpStream,
        target: SocketAddr,
        stats: Arc<Stats>,
    ) -> io::Result<()> {
        let upstream = connect(target).await?;
        relay_pair(&self, &accepted, &upstream, &stats, Watchdog::default()).await
    }
}

/// When the watcher acts on a connection whose bytes stopped moving.
#[derive(Clone, Copy, Debug)]
struct Watchdog {
    /// Hand the queues to the program once both sockets are in the map;
    /// false only in tests that need a stall.
    kick: bool,
    stall_timeout: Duration,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self {
            kick: true,
            stall_timeout: STALL_TIMEOUT,
        }
    }
}

/// Relays `a` <-> `b` in the kernel until both directions have ended.
async fn relay_pair(
    pump: &SockmapPump,
    a: &TcpStream,
    b: &TcpStream,
    stats: &Stats,
    dog: Watchdog,
) -> io::Result<()> {
    let kick = dog.kick;
    let base = (written_raw(a)?, written_raw(b)?);
    let mut dirs = (Direction::default(), Direction::default());
    let paired = match Paired::new(pump, a, b, kick) {
        Ok(p) => p,
        Err(e) => {
            // Map full, or the socket went away: this connection takes the
            // splice path instead, if no byte was lost on the way.
            warn!(error = %e, "cannot put the connection in the sockmap; using splice");
            return fall_back(a, b, base, &mut dirs, stats).await;
        }
    };
    match watch(a, b, base, &mut dirs, stats, dog).await {
        Ok(Watch::Done) => Ok(()),
        Ok(Watch::Stalled) => {
            drop(paired);
            warn!(
                timeout_ms = dog.stall_timeout.as_millis() as u64,
                "sockmap stalled with bytes pending; moving the connection to splice"
            );
            fall_back(a, b, base, &mut dirs, stats).await
        }
        Err(e) => Err(e),
    }
}

/// A connection's two map entries; dropping it takes them out, which must
/// happen before the sockets close (closing a socket still in a sockmap is
/// where the kernel's close races live). Declared after the sockets, so it
/// drops first, also when the session's release cancels the relay.
struct Paired<'a> {
    pump: &'a SockmapPump,
    pair: Pair,
}

impl<'a> Paired<'a> {
    fn new(pump: &'a SockmapPump, a: &TcpStream, b: &TcpStream, kick: bool) -> io::Result<Self> {
        // `pair` puts `b` in the map first; until `a` follows, bytes arriving
        // on `b` find no peer and are dropped. A high receive low-water mark
        // keeps the kernel from handing `b`'s bytes to the program meanwhile
        // (it holds them in the receive queue); the loss check catches the
        // rest.
        let gate = (socket2::SockRef::from(b).recv_buffer_size()? / 4).max(1);
        set_rcvlowat(b.as_fd(), gate)?;
        let pair = pump
            .lock()
            .pair(a, b)
            .map_err(|e| io::Error::other(error_chain(&e)));
        // Setting the mark also re-checks the receive queue, so bytes that
        // arrived before the sockets were in the map are handed over now
        // instead of waiting for the next segment.
        let reopened = set_rcvlowat(b.as_fd(), 1);
        let pair = pair?;
        let paired = Paired { pump, pair };
        reopened?;
        if kick {
            set_rcvlowat(a.as_fd(), 1)?;
        }
        Ok(paired)
    }
}

impl Drop for Paired<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.pump.lock().unpair(&self.pair) {
            warn!(error = %error_chain(&e), "cannot take a connection out of the sockmap");
        }
    }
}

enum Watch {
    Done,
    Stalled,
}

/// One direction: bytes its source received, bytes written to its sink.
#[derive(Default)]
struct Direction {
    /// Bytes already added to the session's counter.
    counted: u64,
    /// The sink's write side is shut down (the source's EOF was passed on).
    ended: bool,
    /// Most bytes seen in flight inside the kernel (received, not yet sent).
    peak_pending: u64,
}

impl Direction {
    /// Counts what moved and passes the source's EOF on once every byte
    /// before it has been written to the sink. Returns the bytes pending.
    fn step(
        &mut self,
        source_eof: bool,
        received: u64,
        written: u64,
        sink: &TcpStream,
        counter: &AtomicU64,
    ) -> io::Result<u64> {
        if self.ended {
            return Ok(0);
        }
        if written > received {
            // The redirect sent bytes twice: seen on Linux 6.18 when socket
            // options were changed mid-stream (see STALL_TIMEOUT), kept as a
            // guard. The stream is corrupt; the relay resets both ends so no
            // one takes it for a whole one.
            return Err(io::Error::other(format!(
                "the kernel sent {} bytes more than it received: sockmap duplicated data",
                written - received
            )));
        }
        let moved = written.min(received);
        counter.fetch_add(moved.saturating_sub(self.counted), Ordering::Relaxed);
        self.counted = self.counted.max(moved);
        if source_eof && written >= received {
            shut_write(sink)?;
            self.ended = true;
        }
        let pending = received.saturating_sub(written);
        self.peak_pending = self.peak_pending.max(pending);
        Ok(pending)
    }
}

async fn watch(
    a: &TcpStream,
    b: &TcpStream,
    base: (u64, u64),
    dirs: &mut (Direction, Direction),
    stats: &Stats,
    dog: Watchdog,
) -> io::Result<Watch> {
    let (ab, ba) = (&mut dirs.0, &mut dirs.1);
    let mut last_moved = u64::MAX;
    let mut still_since = Instant::now();
    loop {
        // Socket states before counters: a FIN counted by TCP is then surely
        // seen as an EOF here (see `Counts::read`).
        let (sa, sb) = (probe(a.as_fd())?, probe(b.as_fd())?);
        for (state, source) in [(&sa, b), (&sb, a)] {
            if let Some(e) = &state.error {
                // The kernel sends the source's FIN on as an empty skb, and
                // sending an empty skb reports EPIPE on the sink (Linux
                // 6.x); after an EOF on the source that error is benign.
                let benign = e.raw_os_error() == Some(libc::EPIPE) && probe(source.as_fd())?.eof;
                if !benign {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("socket error while in the sockmap: {e}"),
                    ));
                }
            }
        }
        // Each sink's count is read before its source's: bytes arriving
        // between the two reads then make `received` larger, never `written`,
        // so written > received can only mean bytes sent twice.
        let cb_first = Counts::read(b.as_fd(), base.1, sb.eof)?;
        let ca = Counts::read(a.as_fd(), base.0, sa.eof)?;
        let cb = Counts::read(b.as_fd(), base.1, sb.eof)?;
        let pending_ab = ab.step(
            sa.eof,
            ca.received,
            cb_first.written,
            b,
            &stats.bytes_forward,
        )?;
        let pending_ba = ba.step(sb.eof, cb.received, ca.written, a, &stats.bytes_backward)?;
        if ab.ended && ba.ended {
            debug!(
                forward = ab.counted,
                backward = ba.counted,
                peak_pending_forward = ab.peak_pending,
                peak_pending_backward = ba.peak_pending,
                "both directions ended"
            );
            return Ok(Watch::Done);
        }

        // Bytes that should move and could (the sink has room) but do not:
        // the kernel path stalled. A full sink is a slow reader, not a stall.
        let moved = ca.written + cb.written;
        let stuck = (pending_ab > 0 && sb.writable) || (pending_ba > 0 && sa.writable);
        if moved != last_moved || !stuck {
            last_moved = moved;
            still_since = Instant::now();
        } else if still_since.elapsed() >= dog.stall_timeout {
            return Ok(Watch::Stalled);
        }

        // The watcher polls instead of waiting on the reactor: while the
        // sockets are in the map the kernel, not the reactor, consumes their
        // wake-ups, and the EOF state tokio keeps is sticky. A short tick
        // while an EOF waits for the bytes ahead of it keeps half-closes quick.
        let draining = (sa.eof && !ab.ended) || (sb.eof && !ba.ended);
        tokio::time::sleep(if draining { DRAIN_TICK } else { WATCH_TICK }).await;
    }
}

/// The pair is out of the map (or never got in): checks no byte was lost and
/// hands the connection to splice, or resets both sides.
async fn fall_back(
    a: &TcpStream,
    b: &TcpStream,
    base: (u64, u64),
    dirs: &mut (Direction, Direction),
    stats: &Stats,
) -> io::Result<()> {
    tokio::time::sleep(SETTLE).await;
    let (sa, sb) = (probe(a.as_fd())?, probe(b.as_fd())?);
    let (ca, cb) = (
        Counts::read(a.as_fd(), base.0, sa.eof)?,
        Counts::read(b.as_fd(), base.1, sb.eof)?,
    );
    // Count what the kernel moved since the watcher last looked; an ended
    // direction was fully counted when its EOF was passed on.
    for (dir, written, counter) in [
        (&dirs.0, cb.written, &stats.bytes_forward),
        (&dirs.1, ca.written, &stats.bytes_backward),
    ] {
        if !dir.ended {
            counter.fetch_add(written.saturating_sub(dir.counted), Ordering::Relaxed);
        }
    }
    // Everything received and not yet written must still be in the source's
    // receive queue, where splice will find it.
    let lost_ab = ca
        .received
        .saturating_sub(cb.written)
        .saturating_sub(inq(a.as_fd())?);
    let lost_ba = cb
        .received
        .saturating_sub(ca.written)
        .saturating_sub(inq(b.as_fd())?);
    stats.fallbacks.fetch_add(1, Ordering::Relaxed);
    if lost_ab > 0 || lost_ba > 0 {
        for s in [a, b] {
            // Linger 0: close sends RST, so neither end takes the cut stream for a whole one.
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
        return Err(io::Error::other(format!(
            "the sockmap path lost {lost_ab} bytes forward and {lost_ba} backward; connection reset"
        )));
    }
    // Out of the map, the sockets' wake-ups are the usual ones again, but
    // bytes (or an EOF) that came while they were in it never woke anyone:
    // re-setting the low-water mark re-checks the queue and wakes the
    // reactor, so splice does not wait for a segment that is not coming.
    set_rcvlowat(a.as_fd(), 1)?;
    set_rcvlowat(b.as_fd(), 1)?;
    // Splice counts what it moves on top of what the kernel moved.
    splice_bidirectional(a, b, &stats.bytes_forward, &stats.bytes_backward).await
}

/// What poll(2) says about a socket, without consuming anything.
struct SockState {
    /// The peer finished sending (FIN received).
    eof: bool,
    writable: bool,
    error: Option<io::Error>,
}

fn probe(fd: BorrowedFd<'_>) -> io::Result<SockState> {
    let revents = poll_now(fd, libc::POLLRDHUP | libc::POLLOUT)?;
    let error = if revents & libc::POLLERR != 0 {
        // Reading SO_ERROR also clears it.
        let errno = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SocketError)?;
        Some(io::Error::from_raw_os_error(if errno == 0 {
            libc::EIO
        } else {
            errno
        }))
    } else {
        None
    };
    Ok(SockState {
        // POLLHUP: both directions shut (our own half-close plus the peer's FIN).
        eof: revents & (libc::POLLRDHUP | libc::POLLHUP) != 0,
        writable: revents & libc::POLLOUT != 0,
        error,
    })
}

/// A socket's TCP counters, in payload bytes.
struct Counts {
    /// Bytes it received from its peer.
    received: u64,
    /// Bytes written into it since it was paired (acked or still queued).
    written: u64,
}

impl Counts {
    /// `write_base` is [`written_raw`] at pairing (the SYN counts as one
    /// acked byte on the connecting side); `eof` whether its FIN arrived,
    /// which TCP counts as one received byte.
    fn read(fd: BorrowedFd<'_>, write_base: u64, eof: bool) -> io::Result<Counts> {
        let info = tcp_info(fd)?;
        Ok(Counts {
            received: info.tcpi_bytes_received.saturating_sub(u64::from(eof)),
            written: (info.tcpi_bytes_acked + outq(fd)?).saturating_sub(write_base),
        })
    }
}

/// Bytes acked plus bytes still in the send queue: everything ever written.
fn written_raw(s: &TcpStream) -> io::Result<u64> {
    Ok(tcp_info(s.as_fd())?.tcpi_bytes_acked + outq(s.as_fd())?)
}

fn shut_write(s: &TcpStream) -> io::Result<()> {
    // ENOTCONN: the socket is already fully closed, nothing left to pass on.
    match shutdown(s.as_raw_fd(), Shutdown::Write) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// --- Syscall wrappers (TCP_INFO, SIOCINQ/SIOCOUTQ, SO_RCVLOWAT); nix has none of them.

/// poll(2) on one socket without waiting; nix's wrapper drops POLLRDHUP.
fn poll_now(fd: BorrowedFd<'_>, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1, timeout 0: the kernel only writes revents.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents)
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, so all-zero is a valid value; the
    // kernel writes at most `len` bytes into it (fewer on older kernels,
    // leaving newer fields zero).
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info)
    }
}

fn queue_ioctl(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCINQ and SIOCOUTQ write one int through the pointer, which
    // points to a live c_int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Bytes written but not yet acked by the peer (SIOCOUTQ).
fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    queue_ioctl(fd, libc::TIOCOUTQ)
}

/// Bytes received but not yet read (SIOCINQ); meaningful once the socket is
/// out of the sockmap.
fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    queue_ioctl(fd, libc::FIONREAD)
}

fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: SO_RCVLOWAT reads one int from the pointer, a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[path = "sockmap_tests.rs"]
mod tests;
