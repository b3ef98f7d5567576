//! Maps of the XDP guard: the program that lets only live sessions' traffic
//! into the data port range. Ports are map keys in host byte order; the kernel
//! side converts from the wire before looking them up.

/// Name of the XDP program in the object (the function name in `scistream-ebpf`).
pub const PROGRAM: &str = "xdp_guard";

/// `Array<GuardConfig>`, one entry: the guarded range. All zero at load, so a
/// freshly loaded guard passes everything until user space sets a range.
pub const CONFIG_MAP: &str = "GUARD_CONFIG";
/// `HashMap<u16, u32>`: destination port -> session tag, the ports that may pass.
pub const ALLOWED_MAP: &str = "GUARD_ALLOWED";
/// `PerCpuHashMap<u16, Counters>`: traffic passed per allowed port. User space
/// creates and removes the entries; the kernel only updates existing ones, so
/// no packet can grow the map.
pub const PORT_STATS_MAP: &str = "GUARD_STATS";
/// `PerCpuArray<Counters>`, indexed by [`DropReason`]: everything dropped.
pub const DROPS_MAP: &str = "GUARD_DROPS";

/// Capacity of the allowed-port and per-port maps. Per-CPU maps are
/// preallocated for every possible CPU, so this stays modest: 4096 ports cost
/// 64 KiB per CPU.
pub const MAX_ALLOWED_PORTS: u32 = 4096;

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

/// Packets and bytes (whole frames as the driver saw them, L2 header included).
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
        self.packets = self.packets.wrapping_add(1);
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
    /// TCP or UDP to a port in the guarded range that no live session holds.
    NotAllowed = 0,
    /// An IP packet whose headers end before its destination port, or that
    /// cannot be parsed far enough to rule out TCP/UDP to the guarded range.
    Malformed = 1,
}

impl DropReason {
    pub const ALL: [Self; 2] = [Self::NotAllowed, Self::Malformed];
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

// Sound: both are repr(C), made only of integers, with no padding bytes
// (2 x u16 and 2 x u64), so any bit pattern the kernel hands back is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for GuardConfig {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}

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
    fn inverted_range_guards_nothing() {
        assert!(!GuardConfig::new(6000, 5000).guards(5500));
    }
}
