//! Maps of the guard: the program that lets only live sessions' traffic
//! into the data port range, at XDP or at tc (one object, both entry points
//! share these maps). Ports are map keys in host byte order; the kernel side
//! converts from the wire before looking them up.

/// Name of the XDP program in the object (the function name in `scistream-ebpf`).
pub const PROGRAM: &str = "xdp_guard";
/// Name of the tc (clsact ingress) program in the same object.
pub const TC_PROGRAM: &str = "tc_guard";

/// `Array<GuardConfig>`, one entry: the guarded range. All zero at load, so a
/// freshly loaded guard passes everything until user space sets a range.
pub const CONFIG_MAP: &str = "GUARD_CONFIG";
/// `HashMap<u16, AllowedPort>`: destination port -> owning session, the ports
/// that may pass.
pub const ALLOWED_MAP: &str = "GUARD_ALLOWED";
/// `PerCpuHashMap<u16, PortCounters>`: traffic passed to, and dropped at, each
/// allowed port. User space creates and removes the entries; the kernel only
/// updates existing ones, so no packet can grow the map.
pub const PORT_STATS_MAP: &str = "GUARD_STATS";
/// `PerCpuArray<Counters>`, indexed by [`DropReason`]: everything dropped,
/// host-wide (drops at a session's port are also in its [`PortCounters`]).
pub const DROPS_MAP: &str = "GUARD_DROPS";
/// `LpmTrie<PeerKey, u8>`: the source networks a peer-restricted session
/// accepts. The session tag leads the key, so one prefix lookup answers "does
/// this session allow this source"; the value is unused.
pub const PEERS_MAP: &str = "GUARD_PEERS";

/// Capacity of the allowed-port and per-port maps. Per-CPU maps are
/// preallocated for every possible CPU, so this stays modest: 4096 ports cost
/// 64 KiB per CPU.
pub const MAX_ALLOWED_PORTS: u32 = 4096;

/// Capacity of the peer map: allowed networks over all sessions.
pub const MAX_PEER_NETS: u32 = 4096;

/// [`AllowedPort::flags`]: only sources in the session's [`PEERS_MAP`] entries pass.
pub const PEERS_RESTRICTED: u32 = 1;

/// What the guard knows of an allowed port: the session holding it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedPort {
    pub tag: u32,
    pub flags: u32,
}

impl AllowedPort {
    pub const fn peers_restricted(&self) -> bool {
        self.flags & PEERS_RESTRICTED != 0
    }
}

/// Key data of [`PEERS_MAP`]: session tag, then the source address, IPv4 as
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so both families share one trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    pub tag: u32,
    pub addr: [u8; 16],
}

impl PeerKey {
    /// Prefix length (in bits, as the LPM trie counts them) that covers the
    /// tag and a whole address: what the kernel looks up for a frame.
    pub const EXACT_BITS: u32 = 32 + 128;

    pub const fn v4(tag: u32, a: [u8; 4]) -> Self {
        Self {
            tag,
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ],
        }
    }

    pub const fn v6(tag: u32, addr: [u8; 16]) -> Self {
        Self { tag, addr }
    }

    /// Trie prefix length for a network of `prefix` bits (IPv4: 0..=32,
    /// IPv6: 0..=128); the tag always matches whole.
    pub const fn bits(v4: bool, prefix: u8) -> u32 {
        32 + if v4 { 96 } else { 0 } + prefix as u32
    }
}

/// Per allowed port: frames passed, and frames dropped because their source
/// is not among the session's peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub passed: Counters,
    pub dropped: Counters,
}

impl PortCounters {
    pub const ZERO: Self = Self {
        passed: Counters::ZERO,
        dropped: Counters::ZERO,
    };
}

impl core::ops::Add for PortCounters {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            passed: self.passed + other.passed,
            dropped: self.dropped + other.dropped,
        }
    }
}

impl core::iter::Sum for PortCounters {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, |a, b| a + b)
    }
}

/// The guarded destination port range, inclusive, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    pub port_lo: u16,
    pub port_hi: u16,
}

impl GuardConfig {
    /// `0-0`: the guard passes everything.
    pub const DISABLED: Self = Self {
        port_lo: 0,
        port_hi: 0,
    };

    pub const fn new(port_lo: u16, port_hi: u16) -> Self {
        Self { port_lo, port_hi }
    }

    pub const fn is_enabled(&self) -> bool {
        self.port_hi != 0 && self.port_lo <= self.port_hi
    }

    /// Whether traffic to `port` must belong to an allowed port to pass.
    pub const fn guards(&self, port: u16) -> bool {
        self.is_enabled() && self.port_lo <= port && port <= self.port_hi
    }
}

/// Packets and bytes (whole frames as the driver saw them, L2 header included;
/// at tc a GSO/GRO packet counts as its segments, its bytes as its length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

impl Counters {
    pub const ZERO: Self = Self {
        packets: 0,
        bytes: 0,
    };

    /// Wrapping, because a panic path is not an option in the kernel program
    /// and a u64 of bytes does not wrap in practice.
    pub const fn count_frame(&mut self, len: u64) {
        self.count_frames(1, len);
    }

    /// `frames` wire frames of `len` bytes in all: a GSO/GRO packet at tc
    /// stands for several.
    pub const fn count_frames(&mut self, frames: u64, len: u64) {
        self.packets = self.packets.wrapping_add(frames);
        self.bytes = self.bytes.wrapping_add(len);
    }
}

impl core::ops::Add for Counters {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

impl core::iter::Sum for Counters {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, |a, b| a + b)
    }
}

/// Why the guard dropped a frame; the index into [`DROPS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// TCP or UDP to a port in the guarded range that no live session holds
    /// (a port scan, or traffic for a session already gone).
    NotAllowed = 0,
    /// An IP packet whose headers end before its destination port, or that
    /// cannot be parsed far enough to rule out TCP/UDP to the guarded range.
    Malformed = 1,
    /// To a live session's port, from a source the session does not allow;
    /// also counted on that port.
    PeerNotAllowed = 2,
}

impl DropReason {
    pub const ALL: [Self; 3] = [Self::NotAllowed, Self::Malformed, Self::PeerNotAllowed];
    /// Length of [`DROPS_MAP`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn index(self) -> u32 {
        self as u32
    }
}

// The kernel and user space copy these as raw bytes: a hidden padding byte
// would be uninitialised memory on one side.
const _: () = assert!(core::mem::size_of::<GuardConfig>() == 4);
const _: () = assert!(core::mem::size_of::<Counters>() == 16);
const _: () = assert!(core::mem::size_of::<AllowedPort>() == 8);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 20);
const _: () = assert!(core::mem::size_of::<PortCounters>() == 32);

// Sound: all are repr(C), made only of integers, with no padding bytes (the
// sizes above are the sums of their fields), so any bit pattern the kernel
// hands back is valid.
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for GuardConfig {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for Counters {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for AllowedPort {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for PeerKey {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for PortCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_range_disables_the_guard() {
        assert!(!GuardConfig::DISABLED.guards(0));
        assert!(!GuardConfig::DISABLED.guards(5000));
    }

    #[test]
    fn range_is_inclusive() {
        let c = GuardConfig::new(5000, 5010);
        assert!(!c.guards(4999));
        assert!(c.guards(5000));
        assert!(c.guards(5010));
        assert!(!c.guards(5011));
    }

    #[test]
    fn ipv4_peers_share_the_trie_as_mapped_addresses() {
        let k = PeerKey::v4(9, [192, 0, 2, 7]);
        assert_eq!(k.addr[10..], [0xff, 0xff, 192, 0, 2, 7]);
        assert_eq!(k.addr[..10], [0; 10]);
        // A /24 covers tag, the ::ffff:0:0/96 mapping and 24 address bits.
        assert_eq!(PeerKey::bits(true, 24), 32 + 96 + 24);
        assert_eq!(PeerKey::bits(true, 32), PeerKey::EXACT_BITS);
        assert_eq!(PeerKey::bits(false, 128), PeerKey::EXACT_BITS);
    }

    #[test]
    fn inverted_range_guards_nothing() {
        assert!(!GuardConfig::new(6000, 5000).guards(5500));
    }
}
