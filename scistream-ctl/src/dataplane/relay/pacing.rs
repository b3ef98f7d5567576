//! Rate enforcement for the TCP-terminating backends (`--enforce_rate`): the
//! kernel paces every socket s2cs writes to at SO_MAX_PACING_RATE, so a
//! session's bytes leave no faster than its `rate`, without a user-space
//! timer. TCP paces internally when the qdisc does not (Linux >= 4.13), so
//! neither `fq` nor `tc` is needed.
//!
//! The rate reaches [`super::connect`] through a task-local
//! set around each connection's task, so every backend's outgoing socket is
//! paced without each backend having to pass it along.

use std::io;
use std::os::fd::AsRawFd;

use nix::libc;

tokio::task_local! {
    /// Bytes per second for the sockets of the connection task this runs in.
    pub static CONNECTION_PACING: Option<u64>;
}

/// kbit/s (SciStream's `rate`) to the bytes per second the kernel takes.
pub fn bytes_per_sec(rate_kbps: u64) -> u64 {
    rate_kbps.saturating_mul(125)
}

/// Each connection's share of a session's rate: the session may open
/// `connections` at once, and together they must stay under `rate_kbps`.
pub fn per_connection(rate_kbps: u64, connections: usize) -> Option<u64> {
    if rate_kbps == 0 || connections == 0 {
        return None;
    }
    Some((bytes_per_sec(rate_kbps) / connections as u64).max(1))
}

/// Caps how fast the kernel sends on `sock`, in bytes per second.
pub fn set_max_pacing_rate(sock: &impl AsRawFd, bytes_per_sec: u64) -> io::Result<()> {
    let v: u64 = bytes_per_sec;
    // SAFETY: setsockopt reads `size_of::<u64>()` bytes from a live u64 on
    // our stack; the kernel takes a u64 here when optlen says so (>= 4.13).
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&v as *const u64).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Paces `sock` at the rate of the connection task this runs in, if any.
pub fn apply_task_pacing(sock: &impl AsRawFd) -> io::Result<()> {
    match CONNECTION_PACING.try_with(|p| *p) {
        Ok(Some(rate)) => set_max_pacing_rate(sock, rate),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_rate_is_split_across_its_connections() {
        assert_eq!(bytes_per_sec(80_000), 10_000_000);
        assert_eq!(per_connection(80_000, 4), Some(2_500_000));
        assert_eq!(per_connection(0, 4), None, "rate 0 means no cap");
    }

    #[test]
    fn kernel_takes_the_pacing_rate() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_max_pacing_rate(&s, 1_250_000).unwrap();
        let mut got: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `got`.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MAX_PACING_RATE,
                (&mut got as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(got, 1_250_000);
    }
}
