//! The sockmap redirect (`scistream-ebpf/src/bin/sk-redirect.rs`): an sk_skb
//! stream verdict program attached to one SockHash. Pairing two sockets makes
//! the kernel send whatever one receives out on the other.
//!
//! ```no_run
//! use scistream_ctl::ebpf::SockRedirect;
//! # fn f(a: &std::net::TcpStream, b: &std::net::TcpStream) -> Result<(), Box<dyn std::error::Error>> {
//! let mut redirect = SockRedirect::load()?;
//! let pair = redirect.pair(a, b)?; // a's bytes go out on b, b's on a
//! // ... until both directions are done:
//! redirect.unpair(&pair)?;
//! # Ok(()) }
//! ```

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{MapData, MapError, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use scistream_common::sockmap as layout;

use super::EbpfError;

const OBJECT: &str = "sk-redirect";
/// Built by build.rs; empty when the build skipped the eBPF programs.
static OBJECT_BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sk-redirect"));

/// `SO_COOKIE` (asm-generic/socket.h); not exported by every libc.
const SO_COOKIE: nix::libc::c_int = 57;

/// The loaded program with its map. Dropping it detaches the program; paired
/// sockets must be unpaired first.
pub struct SockRedirect {
    /// Owns the program and its attachment to the map.
    _ebpf: Ebpf,
    peers: SockHash<MapData, u64>,
}

impl std::fmt::Debug for SockRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockRedirect").finish_non_exhaustive()
    }
}

/// The two map entries of one paired connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    pub cookie_a: u64,
    pub cookie_b: u64,
}

impl SockRedirect {
    /// Loads the program and attaches it to its map.
    pub fn load() -> Result<Self, EbpfError> {
        if OBJECT_BYTES.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut ebpf = super::load_with(&mut EbpfLoader::new(), OBJECT_BYTES, OBJECT)?;
        let map = ebpf
            .take_map(layout::PEERS_MAP)
            .ok_or(missing("map", layout::PEERS_MAP))?;
        let peers: SockHash<MapData, u64> = SockHash::try_from(map).map_err(map_error)?;
        let program: &mut SkSkb = ebpf
            .program_mut(layout::PROGRAM)
            .ok_or(missing("program", layout::PROGRAM))?
            .try_into()
            .map_err(program_error)?;
        program.load().map_err(program_error)?;
        // The attachment lives as long as the program, i.e. as long as `ebpf`.
        program.attach(peers.fd()).map_err(program_error)?;
        Ok(Self { _ebpf: ebpf, peers })
    }

    /// Puts both sockets in the map, each keyed by the other's cookie. The
    /// program runs on a socket from the moment it is in the map, so bytes
    /// `b` receives before `a` is in are dropped: callers gate delivery (see
    /// the sockmap backend) and account for every byte.
    pub fn pair(&mut self, a: &impl AsFd, b: &impl AsFd) -> Result<Pair, EbpfError> {
        let pair = Pair {
            cookie_a: socket_cookie(a)?,
            cookie_b: socket_cookie(b)?,
        };
        self.peers
            .insert(pair.cookie_a, b.as_fd().as_raw_fd(), 0)
            .map_err(map_error)?;
        if let Err(e) = self.peers.insert(pair.cookie_b, a.as_fd().as_raw_fd(), 0) {
            let _ = self.peers.remove(&pair.cookie_a);
            return Err(map_error(e));
        }
        Ok(pair)
    }

    /// Takes both sockets out of the map; the kernel stops redirecting their
    /// bytes and drops whatever it had queued but not yet sent. Entries
    /// already gone (e.g. the kernel removed a closed socket) are fine.
    pub fn unpair(&mut self, pair: &Pair) -> Result<(), EbpfError> {
        for key in [pair.cookie_a, pair.cookie_b] {
            super::deleted(self.peers.remove(&key)).map_err(map_error)?;
        }
        Ok(())
    }
}

/// The kernel's unique, never reused id of a socket.
pub fn socket_cookie(sock: &impl AsFd) -> Result<u64, EbpfError> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is a
    // live u64 of exactly that size; the fd is borrowed for the call.
    let rc = unsafe {
        nix::libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            nix::libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(EbpfError::SocketCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

fn missing(kind: &'static str, name: &'static str) -> EbpfError {
    EbpfError::Missing {
        object: OBJECT,
        kind,
        name,
    }
}

fn program_error(source: aya::programs::ProgramError) -> EbpfError {
    EbpfError::Program {
        program: layout::PROGRAM,
        source,
    }
}

fn map_error(source: MapError) -> EbpfError {
    EbpfError::Map {
        map: layout::PEERS_MAP,
        source,
    }
}
