//! Maps of the eBPF NAT (`ebpf` backend, also spelled `xdp`): the program
//! that translates each session's TCP flows in the kernel (DNAT to the
//! target, SNAT to the gateway, reversed on the way back) and guards the data
//! port range like the guard. One object holds it twice, as an XDP program
//! (physical NICs) and a tc classifier (virtual interfaces); both share these
//! maps. Addresses are kept as the four bytes on the wire; ports are in host
//! byte order (the kernel side converts).

/// Name of the XDP program in the object (the function name in `scistream-ebpf`).
pub const PROGRAM: &str = "xdp_nat";
/// Name of the tc (clsact ingress) form of the same NAT.
pub const TC_PROGRAM: &str = "tc_nat";

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
/// `HashMap<u32, RateBucket>`, by session tag: the token bucket of a session
/// whose services carry [`Service::POLICED`]; user space creates the entry,
/// the kernel moves its clocks.
pub const BUCKETS_MAP: &str = "NAT_BUCKETS";

/// Every map, in the order user space pins them.
pub const MAPS: [&str; 7] = [
    CONFIG_MAP,
    SERVICES_MAP,
    FLOWS_MAP,
    STATS_MAP,
    EVENTS_MAP,
    TX_PORTS_MAP,
    BUCKETS_MAP,
];
/// Changes whenever a map's key or value layout does: pinned maps of another
/// layout are never adopted (the pin directory is named with it).
pub const LAYOUT_VERSION: u32 = 3;

/// Capacity of the services and per-session counter maps (per-CPU maps are
/// preallocated for every CPU: 4096 x 40 bytes per CPU).
pub const MAX_SERVICES: u32 = 4096;
/// Capacity of the flow map: two entries per TCP connection. Least recently
/// used entries are evicted when it is full, which breaks those connections
/// (their next segment gets a reset from the listener), never others.
pub const MAX_FLOW_ENTRIES: u32 = 131_072;
/// Random source ports tried for a new flow before giving up on it.
pub const PORT_TRIES: u32 = 8;

/// Seconds a flow may stay silent before its entries are freed (RFC 5382,
/// REQ-5: an established connection's idle timeout must be at least 2 h 4 min).
pub const IDLE_S: u32 = 7440;
/// Seconds a closed flow (FIN each way, or a reset) keeps its entries after
/// its last frame: the last ACK and retransmitted FINs still get translated.
pub const LINGER_S: u16 = 2;
/// Seconds a flow whose reply direction never carried a frame (a SYN nobody
/// answered) keeps its entries (conntrack's SYN_SENT timeout is 120).
pub const UNANSWERED_S: u16 = 30;

/// The guarded data range and the source ports the NAT may use, inclusive,
/// host byte order; and how long flows live (see [`NatConfig::expired`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatConfig {
    pub data_lo: u16,
    pub data_hi: u16,
    pub nat_lo: u16,
    pub nat_hi: u16,
    pub idle_s: u32,
    pub linger_s: u16,
    pub unanswered_s: u16,
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

    /// Whether the flow with entries `a` and `b` (its two directions) has
    /// ended at `now_s` (seconds, the clock of [`Rewrite::seen_s`]): closed
    /// and quiet for `linger_s`, never answered for `unanswered_s`, or
    /// silent for `idle_s`. Its entries may then be freed and its source
    /// port handed out again.
    pub const fn expired(&self, a: &Rewrite, b: &Rewrite, now_s: u32) -> bool {
        let seen = if a.seen_s > b.seen_s {
            a.seen_s
        } else {
            b.seen_s
        };
        let quiet = now_s.saturating_sub(seen);
        let answered = (a.flags | b.flags) & Rewrite::ANSWERED != 0;
        (a.closed_with(b) && quiet >= self.linger_s as u32)
            || (!answered && quiet >= self.unanswered_s as u32)
            || quiet >= self.idle_s
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
    /// [`Service::POLICED`] or 0.
    pub flags: u16,
    /// Changes whenever a port is handed to another session, so flows of the
    /// earlier one never come back to life; also the key of the session's
    /// [`RateBucket`].
    pub tag: u32,
}

impl Service {
    /// The session's payload is policed by its [`RateBucket`] (same tag).
    pub const POLICED: u16 = 1;
}

/// A session's rate policer: one token bucket per direction, kept as the
/// "theoretical arrival time" of GCRA (RFC 2697's single-rate bucket in
/// virtual-time form), so one atomic compare-and-swap updates it from any
/// CPU. A segment conforms when the clock is within `tolerance_ns` of the
/// direction's `tat`; it then pushes `tat` on by its payload's cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateBucket {
    /// Cost of one payload byte at the session's rate, in picoseconds.
    pub ps_per_byte: u64,
    /// The bucket depth as time: how far ahead of now `tat` may run.
    pub tolerance_ns: u64,
    /// Per direction ([`Rewrite::FORWARD`], [`Rewrite::BACKWARD`]): when the
    /// bucket would be full again, in bpf_ktime_get_boot_ns time.
    pub tat: [u64; 2],
}

impl RateBucket {
    /// A bucket for `rate_kbps` (kbit/s of TCP payload) holding `depth_bytes`.
    pub const fn new(rate_kbps: u64, depth_bytes: u64) -> Self {
        let rate = if rate_kbps == 0 { 1 } else { rate_kbps };
        // 1 kbit/s = 125 bytes/s: 8e9 ps per byte, divided by the rate.
        let ps_per_byte = 8_000_000_000 / rate;
        Self {
            ps_per_byte,
            tolerance_ns: depth_bytes.saturating_mul(ps_per_byte) / 1000,
            tat: [0; 2],
        }
    }

    /// Nanoseconds `payload` bytes take at the bucket's rate. A payload is
    /// under 64 KiB and a byte costs at most 8e9 ps, so this cannot overflow.
    pub const fn cost_ns(&self, payload: u64) -> u64 {
        payload.wrapping_mul(self.ps_per_byte) / 1000
    }

    /// GCRA: the new `tat` if a segment of `cost_ns` arriving at `now`
    /// conforms to a direction whose state is `tat`, else `None` (drop it).
    /// A direction never used (`tat` 0) starts with an empty bucket: a full
    /// one would let a short transfer through at line rate.
    pub const fn admit(&self, tat: u64, now: u64, cost_ns: u64) -> Option<u64> {
        let tat = if tat == 0 {
            now.saturating_add(self.tolerance_ns)
        } else {
            tat
        };
        if tat > now.saturating_add(self.tolerance_ns) {
            return None;
        }
        let start = if tat > now { tat } else { now };
        Some(start.saturating_add(cost_ns))
    }
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
    /// [`Rewrite::FIN_SEEN`] and [`Rewrite::RST_SEEN`]: this direction's end
    /// of the connection, as far as the program saw it; [`Rewrite::ANSWERED`]
    /// once the reply direction carried a frame.
    pub flags: u8,
    /// The service's tag when the flow was created.
    pub tag: u32,
    /// Last frame of this direction, in whole seconds since boot
    /// (bpf_ktime_get_boot_ns, CLOCK_BOOTTIME, as /proc/uptime counts);
    /// written at most once a second.
    pub seen_s: u32,
}

impl Rewrite {
    pub const FORWARD: u8 = 0;
    pub const BACKWARD: u8 = 1;
    pub const FIN_SEEN: u8 = 1;
    /// Cleared again by the next frame of the same direction without one:
    /// a reset whose sender goes on was forged or refused, not an end.
    pub const RST_SEEN: u8 = 2;
    /// Set on the backward entry by its first frame (the SYN-ACK).
    pub const ANSWERED: u8 = 4;

    /// The key of the other direction's entry of the same flow: what its
    /// frames carry after this direction's rewrite is undone.
    pub const fn reverse_key(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            protocol: 6,
            _pad: [0; 3],
        }
    }

    /// Whether the connection is over, judging by both directions' flags: a
    /// reset either way, or a FIN each way.
    pub const fn closed_with(&self, other: &Rewrite) -> bool {
        (self.flags | other.flags) & Self::RST_SEEN != 0
            || (self.flags & other.flags) & Self::FIN_SEEN != 0
    }
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
    /// Segments (and their payload bytes) the rate policer dropped.
    pub over_rate_packets: u64,
    pub over_rate_bytes: u64,
}

impl SessionCounters {
    pub const ZERO: Self = Self {
        forward_packets: 0,
        forward_bytes: 0,
        backward_packets: 0,
        backward_bytes: 0,
        flows: 0,
        over_rate_packets: 0,
        over_rate_bytes: 0,
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
            over_rate_packets: self.over_rate_packets.wrapping_add(o.over_rate_packets),
            over_rate_bytes: self.over_rate_bytes.wrapping_add(o.over_rate_bytes),
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
    /// Dropped: a segment over its session's rate (`--enforce_rate`).
    OverRate = 7,
}

impl Event {
    pub const ALL: [Self; 8] = [
        Self::NotAllowed,
        Self::Malformed,
        Self::Fragment,
        Self::PortsExhausted,
        Self::PassedToStack,
        Self::StaleFlow,
        Self::Redirected,
        Self::OverRate,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Whether the program dropped the frame.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::NotAllowed
                | Self::Malformed
                | Self::Fragment
                | Self::PortsExhausted
                | Self::OverRate
        )
    }

    /// Stable snake_case name, for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::Malformed => "malformed",
            Self::Fragment => "fragment",
            Self::PortsExhausted => "ports_exhausted",
            Self::PassedToStack => "passed_to_stack",
            Self::StaleFlow => "stale_flow",
            Self::Redirected => "redirected",
            Self::OverRate => "over_rate",
        }
    }
}

// Both sides copy these as raw bytes: no hidden padding allowed.
const _: () = assert!(core::mem::size_of::<NatConfig>() == 16);
const _: () = assert!(core::mem::size_of::<Service>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<Rewrite>() == 24);
const _: () = assert!(core::mem::size_of::<SessionCounters>() == 56);
const _: () = assert!(core::mem::size_of::<RateBucket>() == 32);

// Sound: repr(C), integers and byte arrays only, padding made explicit above,
// so every bit pattern is a valid value.
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for NatConfig {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for Service {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for Rewrite {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for SessionCounters {}
#[cfg(feature = "user")]
// SAFETY: as said above for all of them.
unsafe impl aya::Pod for RateBucket {}

#[cfg(test)]
#[path = "nat_tests.rs"]
mod tests;
