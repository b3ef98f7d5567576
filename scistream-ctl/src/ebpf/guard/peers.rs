//! A session's allowed peer networks (`allowed_peers`), as the guard's
//! map keys them.

use aya::maps::lpm_trie::Key;
use scistream_common::guard::PeerKey;
use std::net::IpAddr;

/// A source network a session accepts: an address and a prefix length,
/// host bits cleared. Parses `192.0.2.7`, `192.0.2.0/24`, `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerNet {
    addr: IpAddr,
    prefix: u8,
}

impl PeerNet {
    /// `None` when `prefix` is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let (addr, max) = match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                (IpAddr::V4((bits & mask).into()), 32)
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                (IpAddr::V6((bits & mask).into()), 128)
            }
        };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.prefix).is_some_and(|n| n.addr == self.addr)
    }

    pub(super) fn key(&self, session_tag: u32) -> Key<PeerKey> {
        match self.addr {
            IpAddr::V4(a) => Key::new(
                PeerKey::bits(true, self.prefix),
                PeerKey::v4(session_tag, a.octets()),
            ),
            IpAddr::V6(a) => Key::new(
                PeerKey::bits(false, self.prefix),
                PeerKey::v6(session_tag, a.octets()),
            ),
        }
    }
}

impl std::fmt::Display for PeerNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for PeerNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = ip.trim().parse().map_err(|_| {
            format!("peer {s:?} is not an IP address or network (a.b.c.d[/len], ipv6[/len])")
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("peer {s:?}: prefix length must be 0..={max}"))?,
        };
        Self::new(ip, prefix).ok_or_else(|| format!("peer {s:?}: prefix length must be 0..={max}"))
    }
}
