//! Maps of the XDP NAT (`xdp` backend): the program that translates each
//! session's TCP flows at the driver (DNAT to the target, SNAT to the
//! gateway, reversed on the way back) and guards the data port range like the
//! XDP guard. Addresses are kept as the four bytes on the wire; ports are in
//! host byte order (the kernel side converts).

/// Name of the XDP program in the object (the function name in `scistream-ebpf`).
pub const PROGRAM: &str = "xdp_nat";

/// `Array<NatConfig>`, one entry. All zero at load: the program passes
/// everything untouched until user space sets the ranges.
pub const CONFIG_MAP: &str = "NAT_CONFIG";
/// `HashMap<u16, Service>`: listener port of a live session -> where its
/// flows go. The only entries that let traffic into the data range.
pub const SERVICES_MAP: &str = "NAT_SERVICES";
/// `LruHashMap<FlowKey, Rewrite>`: both directions of every translated flow,
/// keyed by the 5-tuple as it arrives. Created by the kernel on a SYN.
pub const FLOWS_MAP: &str = "NAT_FLOWS";
/// `PerCpuHashMap<u16, SessionCounters>`, by listener port; user space creates
/// and removes the entries, the kernel only updates them.
pub const STATS_MAP: &str = "NAT_STATS";
/// `PerCpuArray<guard::Counters>`, indexed by [`Event`].
pub const EVENTS_MAP: &str = "NAT_EVENTS";
/// `DevMapHash`, keyed by ifindex: the interfaces a translated frame may be
/// redirected to. A frame routed anywhere else is handed to the kernel's
/// forwarding (XDP_PASS) instead.
pub const TX_PORTS_MAP: &str = "NAT_TX_PORTS";

/// Capacity of the services and per-session counter maps (per-CPU maps are
/// preallocated for every CPU: 4096 x 40 bytes per CPU).
pub const MAX_SERVICES: u32 = 4096;
/// Capacity of the flow map: two entries per TCP connection. Least recently
/// used entries are evicted when it is full, which breaks those connections
/// (their next segment gets a reset from the listener), never others.
pub const MAX_FLOW_ENTRIES: u32 = 131_072;
/// Random source ports tried for a new flow before giving up on it.
pub const PORT_TRIES: u32 = 8;

/// The guarded data range and the source ports the NAT may use, inclusive,
/// host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatConfig {
    pub data_lo: u16,
    pub data_hi: u16,
    pub nat_lo: u16,
    pub nat_hi: u16,
}

impl NatConfig {
    pub const fn is_enabled(&self) -> bool {
        self.data_hi != 0
            && self.data_lo <= self.data_hi
            && self.nat_hi != 0
            && self.nat_lo <= self.nat_hi
    }

    /// Whether TCP/UDP to `port` must belong to a live session to pass.
    pub const fn guards(&self, port: u16) -> bool {
        self.is_enabled() && self.data_lo <= port && port <= self.data_hi
    }

    /// Whether `port` is one the NAT hands out as a source port.
    pub const fn is_nat_port(&self, port: u16) -> bool {
        self.is_enabled() && self.nat_lo <= port && port <= self.nat_hi
    }

    /// Number of source ports the NAT may hand out (0 when disabled).
    pub const fn nat_span(&self) -> u32 {
        if self.is_enabled() {
            (self.nat_hi - self.nat_lo) as u32 + 1
        } else {
            0
        }
    }
}

/// Where the flows of one listener go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// The target's address (wire order).
    pub target_addr: [u8; 4],
    /// This gateway's address on the way to the target (the SNAT source).
    pub snat_addr: [u8; 4],
    pub target_port: u16,
    pub _pad: u16,
    /// Changes whenever a port is handed to another session, so flows of the
    /// earlier one never come back to life.
    pub tag: u32,
}

/// A TCP flow as it arrives on an interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// The addresses and ports a flow's frames leave with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// The session listener this flow belongs to (key of [`SERVICES_MAP`]).
    pub listener_port: u16,
    /// [`Rewrite::FORWARD`] (towards the target) or [`Rewrite::BACKWARD`].
    pub direction: u8,
    pub _pad: u8,
    /// The service's tag when the flow was created.
    pub tag: u32,
}

impl Rewrite {
    pub const FORWARD: u8 = 0;
    pub const BACKWARD: u8 = 1;
}

/// Traffic of one session listener; bytes are TCP payload, so they compare
/// with what the other backends count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCounters {
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub backward_packets: u64,
    pub backward_bytes: u64,
    /// Flows created (TCP connections seen opening).
    pub flows: u64,
}

impl SessionCounters {
    pub const ZERO: Self = Self {
        forward_packets: 0,
        forward_bytes: 0,
        backward_packets: 0,
        backward_bytes: 0,
        flows: 0,
    };
}

impl core::ops::Add for SessionCounters {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            forward_packets: self.forward_packets.wrapping_add(o.forward_packets),
            forward_bytes: self.forward_bytes.wrapping_add(o.forward_bytes),
            backward_packets: self.backward_packets.wrapping_add(o.backward_packets),
            backward_bytes: self.backward_bytes.wrapping_add(o.backward_bytes),
            flows: self.flows.wrapping_add(o.flows),
        }
    }
}

impl core::iter::Sum for SessionCounters {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, |a, b| a + b)
    }
}

/// Rare things the program counts (frames and bytes) instead of logging
/// per packet; the index into [`EVENTS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// Dropped: TCP/UDP to a data port no live session holds.
    NotAllowed = 0,
    /// Dropped: headers too short or invalid to rule out the data range.
    Malformed = 1,
    /// Dropped: the first fragment of a fragmented packet to a session port
    /// (a fragmented flow cannot be translated).
    Fragment = 2,
    /// Dropped: a SYN for which no free source port was found.
    PortsExhausted = 3,
    /// Translated, then handed to the kernel's forwarding: no route or
    /// neighbour yet, or the egress interface is not redirect-capable.
    PassedToStack = 4,
    /// A flow of a released session was seen and forgotten.
    StaleFlow = 5,
    /// Translated and redirected at the driver.
    Redirected = 6,
}

impl Event {
    pub const ALL: [Self; 7] = [
        Self::NotAllowed,
        Self::Malformed,
        Self::Fragment,
        Self::PortsExhausted,
        Self::PassedToStack,
        Self::StaleFlow,
        Self::Redirected,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn index(self) -> u32 {
        self as u32
    }
}

// Both sides copy these as raw bytes: no hidden padding allowed.
const _: () = assert!(core::mem::size_of::<NatConfig>() == 8);
const _: () = assert!(core::mem::size_of::<Service>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<Rewrite>() == 20);
const _: () = assert!(core::mem::size_of::<SessionCounters>() == 40);

// Sound: repr(C), integers and byte arrays only, padding made explicit above,
// so every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NatConfig {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Service {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Rewrite {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SessionCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_config_translates_and_guards_nothing() {
        let c = NatConfig::default();
        assert!(!c.guards(5100));
        assert_eq!(c.nat_span(), 0);
    }

    #[test]
    fn data_range_is_inclusive_and_needs_a_nat_range() {
        let c = NatConfig {
            data_lo: 5100,
            data_hi: 5200,
            nat_lo: 61000,
            nat_hi: 61009,
        };
        assert!(c.guards(5100) && c.guards(5200));
        assert!(!c.guards(5099) && !c.guards(5201));
        assert_eq!(c.nat_span(), 10);
        let no_nat = NatConfig {
            nat_lo: 0,
            nat_hi: 0,
            ..c
        };
        assert!(!no_nat.guards(5100));
    }
}
