//! `splice` backend: plaintext TCP moved socket -> pipe -> socket with
//! splice(2), so payload pages are never copied into user space. Each
//! direction owns one pipe; its size bounds the memory a connection can pin,
//! so a slow reader stalls the writer instead of growing buffers.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::libc;
use nix::sys::socket::{shutdown, Shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{connect, Pump};
use crate::dataplane::tls::ktls::ControlRecord;
use crate::dataplane::tls::rekey::Rekey;
use crate::dataplane::{DataPlaneError, SessionSpec, Stats};

/// Bytes one pipe may hold (per direction, per connection). 1 MiB is the
/// default unprivileged maximum (`/proc/sys/fs/pipe-max-size`) and enough to
/// keep a 25 Gbit/s path busy between wake-ups.
pub const PIPE_SIZE: usize = 1 << 20;

#[derive(Default)]
pub struct SplicePump;

impl Pump for SplicePump {
    const NAME: &'static str = "splice";

    async fn relay(
        self: Arc<Self>,
        _session: Arc<SessionSpec>,
        accepted: TcpStream,
        target: SocketAddr,
        stats: Arc<Stats>,
    ) -> io::Result<()> {
        let upstream = connect(target).await?;
        splice_bidirectional(
            &accepted,
            &upstream,
            &stats.bytes_forward,
            &stats.bytes_backward,
        )
        .await
    }
}

/// Fails early when the kernel lacks pipes or splice (e.g. seccomp), so
/// `s2cs --type splice` refuses to start instead of failing per connection.
pub fn probe() -> Result<(), DataPlaneError> {
    Pipe::new()
        .map(drop)
        .map_err(|e| DataPlaneError::Unsupported {
            backend: "splice",
            reason: format!("pipe2: {e}"),
        })
}

/// Moves bytes both ways until each direction has seen EOF; an EOF is passed
/// on as a half-close (shutdown of the write side), so the other direction
/// keeps flowing. Returns when both are done or on the first error.
pub async fn splice_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> io::Result<()> {
    let (p1, p2) = (Pipe::new()?, Pipe::new()?);
    tokio::try_join!(
        splice_one_way(a, b, &p1, a_to_b, Ktls::Neither),
        splice_one_way(b, a, &p2, b_to_a, Ktls::Neither)
    )?;
    Ok(())
}

/// As [`splice_bidirectional`], with `tunnel` a kernel TLS socket: records
/// other than data stop splice there and are read with recvmsg (a
/// close_notify ends that direction, a KeyUpdate moves to the peer's next
/// key), `rekey` switches the sending key between splices when due, and an
/// EOF from `plain` is passed on as close_notify before the FIN.
pub async fn splice_ktls(
    plain: &TcpStream,
    tunnel: &TcpStream,
    to_tunnel: &AtomicU64,
    from_tunnel: &AtomicU64,
    rekey: &Rekey<'_>,
) -> io::Result<()> {
    let (p1, p2) = (Pipe::new()?, Pipe::new()?);
    tokio::try_join!(
        splice_one_way(plain, tunnel, &p1, to_tunnel, Ktls::Dst(rekey)),
        splice_one_way(tunnel, plain, &p2, from_tunnel, Ktls::Src(rekey))
    )?;
    Ok(())
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe means fewer wake-ups per byte; keep the default when
        // the limit forbids it.
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as _)) {
            Ok(n) if n > 0 => n as usize,
            _ => 64 * 1024,
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Which end of one direction is a kernel TLS socket, with its re-keying state.
#[derive(Clone, Copy)]
enum Ktls<'a> {
    Neither,
    Src(&'a Rekey<'a>),
    Dst(&'a Rekey<'a>),
}

async fn splice_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    counter: &AtomicU64,
    ktls: Ktls<'_>,
) -> io::Result<()> {
    loop {
        // Fill: the pipe is empty here, so EAGAIN can only mean "socket not readable".
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, &pipe.write, None, pipe.capacity, flags())
                    .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => match (ktls, e.raw_os_error()) {
                    // kTLS refuses to splice a record that is not application
                    // data (EINVAL; EIO on some kernels) and leaves it queued.
                    (Ktls::Src(rekey), Some(libc::EINVAL | libc::EIO)) => {
                        match src.try_io(Interest::READABLE, || rekey.on_control_record(src)) {
                            Ok(ControlRecord::CloseNotify) => break 0,
                            Ok(ControlRecord::KeyUpdate { .. }) => continue,
                            Err(e2) if e2.kind() == io::ErrorKind::WouldBlock => continue,
                            Err(e2) => {
                                return Err(io::Error::new(
                                    e2.kind(),
                                    format!("kernel TLS record: {e2}"),
                                ))
                            }
                        }
                    }
                    _ => return Err(e),
                },
            }
        };
        if let (Ktls::Src(rekey), 1..) = (ktls, n) {
            rekey.received_data();
        }
        if n == 0 {
            if matches!(ktls, Ktls::Dst(_)) {
                // Best effort: the FIN below ends the direction either way.
                let _ = crate::dataplane::tls::ktls::send_close_notify(dst);
            }
            // Peer finished sending: pass the half-close on. ENOTCONN means
            // the other side is already fully closed, which is fine here.
            match shutdown(dst.as_raw_fd(), Shutdown::Write) {
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        // Drain everything we just took in before reading more: this is what
        // keeps memory per connection bounded by the pipe size.
        let mut left = n;
        while left > 0 {
            if let Ktls::Dst(rekey) = ktls {
                rekey.before_send(dst).await?;
            }
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst.as_fd(), None, left, flags()).map_err(io::Error::from)
            }) {
                Ok(m) => {
                    if let Ktls::Dst(rekey) = ktls {
                        rekey.sent(m);
                    }
                    left -= m;
                    counter.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::test_support::{half_close_exchange, pair};

    #[tokio::test]
    async fn splice_moves_bytes_both_ways_and_propagates_half_close() {
        // app_a <-> (a_in | a_out) spliced (b_in | b_out) <-> app_b
        let (app_a, relay_a) = pair().await;
        let (relay_b, app_b) = pair().await;
        let (fwd, back) = (AtomicU64::new(0), AtomicU64::new(0));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d2 = data.clone();
        let relay = async {
            splice_bidirectional(&relay_a, &relay_b, &fwd, &back)
                .await
                .unwrap()
        };
        let ends = half_close_exchange(app_a, app_b, d2);
        let (_, (reply, got)) = tokio::join!(relay, ends);
        assert_eq!(got, data);
        assert_eq!(reply, b"ack");
        assert_eq!(fwd.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(back.load(Ordering::Relaxed), 3);
    }
}
