//! eBPF NAT of the `ebpf` backend (also spelled `xdp`): each session's TCP
//! flows are translated in the kernel (DNAT to the session's target, SNAT to
//! this gateway; reversed on the way back) and sent straight out of the
//! egress interface, so TCP runs end to end and never enters this host's TCP
//! stack. It also does the guard's job on the interfaces it holds: traffic
//! to the data port range passes only for a live session's port.
//!
//! Two entry points share everything but the last step:
//! - `xdp_nat` (XDP, fragment-capable): for NICs with native XDP. Headers
//!   come from the first buffer (the load helper where they are not there),
//!   checksums are updated incrementally (RFC 1624; frames off a wire carry
//!   complete ones) and the frame is redirected through a devmap after a
//!   `bpf_fib_lookup`.
//! - `tc_nat` (clsact ingress): for virtual interfaces (veth, bridge, ...),
//!   where XDP would strip GSO from the peer. It sees whole GSO packets,
//!   updates checksums with the kernel's helpers (so a CHECKSUM_PARTIAL
//!   packet stays right: only its pseudo-header part changes) and forwards
//!   with `bpf_redirect` (`bpf_redirect_neigh` while the neighbour is unknown).
//!
//! - A SYN to a session port creates the flow (flows.rs); a frame of a known
//!   flow is rewritten; a flow whose session was released is forgotten.
//! - A frame the program cannot send itself (no route, TTL 1, a VLAN tag)
//!   goes up the stack already translated (the backend's docs say what the
//!   kernel then needs).
//! - `--enforce_rate`: a token bucket per session and direction (flows.rs).
//! - IPv4 only. IPv6 is guarded but never translated; the backend refuses
//!   IPv6 sessions. A first fragment to a session port is dropped (TCP sets DF).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target declares no compare-and-swap (atomic-cas: false) although
// the kernel has BPF_CMPXCHG (5.12+): the intrinsic reaches it. See `cas`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod flows;
mod forward;
mod frame;
mod headers;

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::bpf_ktime_get_boot_ns,
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{TcContext, XdpContext},
};
use scistream_common::{
    guard::Counters,
    nat::{
        Event, FlowKey, NatConfig, RateBucket, Rewrite, Service, SessionCounters, MAX_FLOW_ENTRIES,
        MAX_SERVICES,
    },
};

use flows::{TCP_FLAG_ACK, TCP_FLAG_SYN};
use frame::Frame;
use headers::IPPROTO_TCP;

// Static names are the map names user space looks up: keep them equal to
// scistream_common::nat::*_MAP.
#[map]
static NAT_CONFIG: Array<NatConfig> = Array::with_max_entries(1, 0);
#[map]
static NAT_SERVICES: HashMap<u16, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static NAT_FLOWS: LruHashMap<FlowKey, Rewrite> = LruHashMap::with_max_entries(MAX_FLOW_ENTRIES, 0);
#[map]
static NAT_STATS: PerCpuHashMap<u16, SessionCounters> =
    PerCpuHashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static NAT_EVENTS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(Event::COUNT, 0);
#[map]
static NAT_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);
#[map]
static NAT_BUCKETS: HashMap<u32, RateBucket> = HashMap::with_max_entries(MAX_SERVICES, 0);

const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const IP_MF: u16 = 0x2000;

/// What to do with a frame the program translates.
pub struct Translation {
    pub l3: usize,
    pub l4: usize,
    /// The fixed IPv4 header and the TCP header as they arrived.
    pub ip: [u8; IPV4_HLEN],
    pub tcp: [u8; TCP_HLEN],
    pub rewrite: Rewrite,
    pub tagged: bool,
}

pub enum Verdict {
    Pass,
    Translate(Translation),
}

#[xdp(frags)]
pub fn xdp_nat(ctx: XdpContext) -> u32 {
    let Some(config) = config() else {
        return XDP_PASS;
    };
    let f = frame::Xdp(&ctx);
    match decide(&f, &config) {
        Ok(Verdict::Pass) => XDP_PASS,
        Ok(Verdict::Translate(t)) => match forward::xdp(&ctx, &f, &t) {
            Ok(action) => action,
            Err(event) => {
                count_event(event, f.len());
                XDP_DROP
            }
        },
        Err(event) => {
            count_event(event, f.len());
            XDP_DROP
        }
    }
}

#[classifier]
pub fn tc_nat(ctx: TcContext) -> i32 {
    let Some(config) = config() else {
        return TC_ACT_OK;
    };
    let f = frame::Tc(&ctx);
    let result = match decide(&f, &config) {
        Ok(Verdict::Pass) => return TC_ACT_OK,
        Ok(Verdict::Translate(t)) => forward::tc(&f, &t),
        Err(event) => Err(event),
    };
    result.unwrap_or_else(|event| {
        count_event(event, f.len());
        TC_ACT_SHOT
    })
}

#[inline(always)]
fn config() -> Option<NatConfig> {
    let config = *NAT_CONFIG.get(0)?;
    config.is_enabled().then_some(config)
}

/// The part both hooks share: the guard's decision, the flow lookup or
/// creation, the policer, the counters.
#[inline(always)]
fn decide<F: Frame>(f: &F, config: &NatConfig) -> Result<Verdict, Event> {
    let Some(t) = headers::transport(f)? else {
        return Ok(Verdict::Pass);
    };
    let ports = f.read::<4>(t.l4).ok_or(Event::Malformed)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let guarded = config.guards(dport);
    if t.v6 || t.protocol != IPPROTO_TCP {
        // Never translated; only guarded.
        if !guarded {
            return Ok(Verdict::Pass);
        }
        if f.len() < t.l4 + t.header_len {
            return Err(Event::Malformed);
        }
        if NAT_SERVICES.get_ptr(dport).is_none() {
            return Err(Event::NotAllowed);
        }
        return Ok(Verdict::Pass);
    }
    // Every flow's key has a session port (data range) or a NAT source port
    // as its destination: anything else is not ours, without a lookup.
    if !guarded && !config.is_nat_port(dport) {
        return Ok(Verdict::Pass);
    }
    let Some(tcp) = f.read::<TCP_HLEN>(t.l4) else {
        return if guarded {
            Err(Event::Malformed)
        } else {
            Ok(Verdict::Pass)
        };
    };
    let ip = f.read::<IPV4_HLEN>(t.l3).ok_or(Event::Malformed)?;
    let more_fragments = u16::from_be_bytes([ip[6], ip[7]]) & IP_MF != 0;
    let key = FlowKey {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport,
        dport,
        protocol: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let tcp_flags = tcp[13];
    let opening = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let headers = (t.l4 - t.l3) as u16 + u16::from(tcp[12] >> 4) * 4;
    let payload = u64::from(u16::from_be_bytes([ip[2], ip[3]]).saturating_sub(headers));
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let now_s = (now / 1_000_000_000) as u32;
    let translation = |rewrite| Translation {
        l3: t.l3,
        l4: t.l4,
        ip,
        tcp,
        rewrite,
        tagged: t.tagged,
    };

    if let Some(flow) = NAT_FLOWS.get_ptr_mut(key) {
        // SAFETY: a pointer from a map lookup stays valid for this run (LRU
        // elements are preallocated); a concurrent update can at worst give a
        // mix of old and new fields of the same flow.
        let rewrite = unsafe { *flow };
        match live(&rewrite) {
            // A new connection reusing a finished one's ports gets a fresh
            // flow (and source port), not the old one's end of life.
            Some(_)
                if opening && rewrite.direction == Rewrite::FORWARD && flows::closed(&rewrite) =>
            {
                flows::forget(&key, &rewrite);
            }
            Some(service) => {
                if more_fragments {
                    return Err(Event::Fragment);
                }
                // SAFETY: as above; only this direction's bookkeeping fields.
                unsafe { flows::note_frame(flow, tcp_flags, now_s) };
                if !flows::police(&service, rewrite.direction, payload, now) {
                    count_over_rate(&rewrite, payload);
                    return Err(Event::OverRate);
                }
                count_session(&rewrite, payload);
                return Ok(Verdict::Translate(translation(rewrite)));
            }
            None => {
                let _ = NAT_FLOWS.remove(key);
                count_event(Event::StaleFlow, f.len());
            }
        }
    }

    if !guarded {
        return Ok(Verdict::Pass);
    }
    let service = match NAT_SERVICES.get_ptr(dport) {
        // SAFETY: see `flows::live`.
        Some(s) => unsafe { *s },
        None => return Err(Event::NotAllowed),
    };
    if more_fragments {
        return Err(Event::Fragment);
    }
    if !opening {
        // No flow and not an opening SYN (the flow was evicted, or the
        // segment is stray): the listener's socket answers with a reset.
        return Ok(Verdict::Pass);
    }
    let rewrite = flows::new_flow(&key, &service, config, now_s)?;
    count_session(&rewrite, payload);
    Ok(Verdict::Translate(translation(rewrite)))
}

#[inline(always)]
fn live(rewrite: &Rewrite) -> Option<Service> {
    flows::live(rewrite)
}

#[inline(always)]
pub fn count_event(event: Event, len: usize) {
    if let Some(c) = NAT_EVENTS.get_ptr_mut(event.index()) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { (*c).count_frame(len as u64) };
    }
}

#[inline(always)]
fn count_session(rewrite: &Rewrite, payload: u64) {
    if let Some(c) = NAT_STATS.get_ptr_mut(rewrite.listener_port) {
        // SAFETY: this CPU's slot of a per-CPU map; an entry user space
        // deletes meanwhile stays valid memory (preallocated).
        unsafe {
            if rewrite.direction == Rewrite::FORWARD {
                (*c).forward_packets = (*c).forward_packets.wrapping_add(1);
                (*c).forward_bytes = (*c).forward_bytes.wrapping_add(payload);
            } else {
                (*c).backward_packets = (*c).backward_packets.wrapping_add(1);
                (*c).backward_bytes = (*c).backward_bytes.wrapping_add(payload);
            }
        }
    }
}

#[inline(always)]
fn count_over_rate(rewrite: &Rewrite, payload: u64) {
    if let Some(c) = NAT_STATS.get_ptr_mut(rewrite.listener_port) {
        // SAFETY: as in `count_session`.
        unsafe {
            (*c).over_rate_packets = (*c).over_rate_packets.wrapping_add(1);
            (*c).over_rate_bytes = (*c).over_rate_bytes.wrapping_add(payload);
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panicking path survives the verifier; this only satisfies no_std.
    loop {}
}

/// Built for the host only as part of the workspace; the real program is the
/// bpfel-unknown-none object.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
