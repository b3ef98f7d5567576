//! XDP NAT of the `xdp` backend: each session's TCP flows are translated at
//! the driver (DNAT to the session's target, SNAT to this gateway; reversed
//! on the way back) and sent on with `bpf_fib_lookup` + a devmap redirect, so
//! TCP runs end to end and never enters this host's TCP stack. It also does
//! the XDP guard's job, since an interface holds one XDP program: TCP/UDP to
//! the data port range passes only for a live session's port.
//!
//! - A SYN to a session port creates the flow: a random free source port from
//!   the NAT range, and two LRU entries (this direction and the reply's).
//! - A frame of a known flow is rewritten with incremental checksum updates
//!   (RFC 1624); a flow whose session was released (its service gone, or the
//!   port now another session's) is forgotten and its frames no longer
//!   translated.
//! - After the rewrite, a route with a resolved neighbour out of an interface
//!   in NAT_TX_PORTS means a redirect (TTL decremented here); anything else
//!   goes up as XDP_PASS, already translated, to the kernel's forwarding
//!   (which then needs ip_forward and accept_local, see the backend's docs).
//! - A session with a rate (`--enforce_rate`) has a token bucket per
//!   direction (GCRA, updated with one compare-and-swap from any CPU): a
//!   segment whose payload finds the bucket empty is dropped and counted;
//!   segments without payload (ACKs) always pass, so TCP's feedback survives.
//! - Each flow entry records the FIN/RST its direction carried and when it was
//!   last seen (to the second), for the count of live connections.
//! - IPv4 only. IPv6 is guarded (TCP/UDP to the range dropped) but never
//!   translated; the backend refuses IPv6 sessions. Non-first fragments carry
//!   no ports and pass; a first fragment to a session port is dropped (TCP
//!   sets DF, so this is rare). VLAN-tagged frames pass untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target declares no compare-and-swap (atomic-cas: false) although
// the kernel has BPF_CMPXCHG (5.12+): the intrinsic reaches it. See `cas`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup,
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use scistream_common::{
    guard::Counters,
    nat::{
        Event, FlowKey, NatConfig, RateBucket, Rewrite, Service, SessionCounters, MAX_FLOW_ENTRIES,
        MAX_SERVICES, PORT_TRIES,
    },
};

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

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[xdp]
pub fn xdp_nat(ctx: XdpContext) -> u32 {
    let config = match NAT_CONFIG.get(0) {
        Some(c) => *c,
        None => return XDP_PASS,
    };
    if !config.is_enabled() {
        return XDP_PASS;
    }
    match handle(&ctx, &config) {
        Ok(action) => action,
        Err(event) => {
            count_event(&ctx, event);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn handle(ctx: &XdpContext, config: &NatConfig) -> Result<u32, Event> {
    let Some(eth) = bytes::<ETH_HLEN>(ctx, 0) else {
        return Ok(XDP_PASS);
    };
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => ipv4(ctx, config),
        ETH_P_IPV6 => ipv6_guard(ctx, config),
        _ => Ok(XDP_PASS),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, config: &NatConfig) -> Result<u32, Event> {
    let ip = bytes::<IPV4_HLEN>(ctx, ETH_HLEN).ok_or(Event::Malformed)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(Event::Malformed);
    }
    let protocol = ip[9];
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(XDP_PASS);
    }
    let fragment = u16::from_be_bytes([ip[6], ip[7]]);
    if fragment & IP_OFFSET != 0 {
        // No ports in it; without its first fragment it never reaches a socket.
        return Ok(XDP_PASS);
    }
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    let l4 = ETH_HLEN + ihl;
    let ports = bytes::<4>(ctx, l4).ok_or(Event::Malformed)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);

    if protocol == IPPROTO_UDP {
        // Sessions are TCP; UDP only meets the guard.
        if config.guards(dport) && NAT_SERVICES.get_ptr(dport).is_none() {
            return Err(Event::NotAllowed);
        }
        return Ok(XDP_PASS);
    }

    // Every flow's key has a session port (data range) or a NAT source port
    // as its destination: anything else is not ours, without a lookup.
    if !config.guards(dport) && !config.is_nat_port(dport) {
        return Ok(XDP_PASS);
    }
    let key = FlowKey {
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        _pad: [0; 3],
    };
    let tcp = bytes::<TCP_HLEN>(ctx, l4).ok_or(Event::Malformed)?;
    let tcp_flags = tcp[13];
    let total_len = u16::from_be_bytes([ip[2], ip[3]]);
    let headers = ihl as u16 + u16::from(tcp[12] >> 4) * 4;
    let payload = u64::from(total_len.saturating_sub(headers));
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(flow) = NAT_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a pointer from a map lookup stays valid for this run (LRU
        // elements are preallocated); a concurrent update can at worst give a
        // mix of old and new fields of the same flow.
        let rewrite = unsafe { *flow };
        if let Some(service) = live(&rewrite) {
            if fragment & IP_MF != 0 {
                return Err(Event::Fragment);
            }
            // SAFETY: as above; only this direction's bookkeeping fields.
            unsafe { note_frame(flow, tcp_flags, now) };
            if !police(&service, rewrite.direction, payload, now) {
                count_over_rate(&rewrite, payload);
                return Err(Event::OverRate);
            }
            return translate(ctx, l4, &rewrite, payload);
        }
        let _ = NAT_FLOWS.remove(&key);
        count_event(ctx, Event::StaleFlow);
    }

    if !config.guards(dport) {
        return Ok(XDP_PASS);
    }
    let service = match NAT_SERVICES.get_ptr(dport) {
        // SAFETY: as above; services are plain values written whole.
        Some(s) => unsafe { *s },
        None => return Err(Event::NotAllowed),
    };
    if fragment & IP_MF != 0 {
        return Err(Event::Fragment);
    }
    if tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        // No flow and not an opening SYN (the flow was evicted, or the
        // segment is stray): the listener's socket answers with a reset.
        return Ok(XDP_PASS);
    }
    let rewrite = new_flow(&key, &service, config, now)?;
    translate(ctx, l4, &rewrite, payload)
}

/// The flow's service, if its session still holds the listener port (same tag).
#[inline(always)]
fn live(rewrite: &Rewrite) -> Option<Service> {
    // SAFETY: see `ipv4`.
    let service = unsafe { *NAT_SERVICES.get_ptr(rewrite.listener_port)? };
    (service.tag == rewrite.tag).then_some(service)
}

/// Records this direction's FIN/RST and the second it was last seen; writes
/// only on a change, so a busy flow's entry is mostly just read.
///
/// # Safety
/// `flow` is a live pointer into the flow map.
#[inline(always)]
unsafe fn note_frame(flow: *mut Rewrite, tcp_flags: u8, now: u64) {
    let mut flags = 0;
    if tcp_flags & TCP_FLAG_FIN != 0 {
        flags |= Rewrite::FIN_SEEN;
    }
    if tcp_flags & TCP_FLAG_RST != 0 {
        flags |= Rewrite::RST_SEEN;
    }
    if flags & !(*flow).flags != 0 {
        (*flow).flags |= flags;
    }
    let second = (now / 1_000_000_000) as u32;
    if (*flow).seen_s != second {
        (*flow).seen_s = second;
    }
}

/// Whether a segment with `payload` bytes conforms to the session's rate in
/// its direction; takes its cost from the bucket when it does. Lost races
/// retry a few times, then let the segment pass (a contended bucket is one
/// many CPUs are filling at once, not one running dry).
#[inline(always)]
fn police(service: &Service, direction: u8, payload: u64, now: u64) -> bool {
    if service.flags & Service::POLICED == 0 || payload == 0 {
        return true;
    }
    let Some(bucket) = NAT_BUCKETS.get_ptr_mut(&service.tag) else {
        return true;
    };
    // SAFETY: a live map value for this run; the two rate fields are only
    // written by user space when it creates the entry.
    let (limits, tat) = unsafe {
        (
            *bucket,
            &mut (*bucket).tat[usize::from(direction & 1)] as *mut u64,
        )
    };
    let cost = limits.cost_ns(payload);
    for _ in 0..4 {
        // SAFETY: an aligned u64 inside the map value; a torn read is
        // impossible (64-bit loads are single instructions) and the swap
        // below rejects a stale one.
        let current = unsafe { core::ptr::read_volatile(tat) };
        match limits.admit(current, now, cost) {
            None => return false,
            // SAFETY: as above.
            Some(next) if unsafe { cas(tat, current, next) } => return true,
            Some(_) => {}
        }
    }
    true
}

/// Atomically replaces `*at` with `new` if it still holds `old`.
///
/// # Safety
/// `at` points to a live, aligned u64 (here: inside a map value).
#[cfg(target_arch = "bpf")]
#[inline(always)]
unsafe fn cas(at: *mut u64, old: u64, new: u64) -> bool {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering};
    atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(at, old, new).1
}

/// The host build of this file only type-checks it; same meaning.
#[cfg(not(target_arch = "bpf"))]
unsafe fn cas(at: *mut u64, old: u64, new: u64) -> bool {
    use core::sync::atomic::{AtomicU64, Ordering};
    AtomicU64::from_ptr(at)
        .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// Picks a free source port and records both directions of the flow.
#[inline(always)]
fn new_flow(
    key: &FlowKey,
    service: &Service,
    config: &NatConfig,
    now: u64,
) -> Result<Rewrite, Event> {
    let seen_s = (now / 1_000_000_000) as u32;
    let span = config.nat_span();
    if span == 0 {
        return Err(Event::PortsExhausted);
    }
    let backward = Rewrite {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        listener_port: key.dport,
        direction: Rewrite::BACKWARD,
        flags: 0,
        tag: service.tag,
        seen_s,
    };
    for _ in 0..PORT_TRIES {
        // SAFETY: helper without arguments.
        let random = unsafe { bpf_get_prandom_u32() };
        let port = config.nat_lo.wrapping_add((random % span) as u16);
        let reply = FlowKey {
            saddr: service.target_addr,
            daddr: service.snat_addr,
            sport: service.target_port,
            dport: port,
            protocol: IPPROTO_TCP,
            _pad: [0; 3],
        };
        // NOEXIST makes the reply key the reservation of the port: another
        // flow to the same target holding it makes this fail.
        if NAT_FLOWS
            .insert(&reply, &backward, u64::from(BPF_NOEXIST))
            .is_err()
        {
            continue;
        }
        let forward = Rewrite {
            saddr: service.snat_addr,
            daddr: service.target_addr,
            sport: port,
            dport: service.target_port,
            listener_port: key.dport,
            direction: Rewrite::FORWARD,
            flags: 0,
            tag: service.tag,
            seen_s,
        };
        if NAT_FLOWS.insert(key, &forward, 0).is_err() {
            let _ = NAT_FLOWS.remove(&reply);
            return Err(Event::PortsExhausted);
        }
        if let Some(c) = NAT_STATS.get_ptr_mut(key.dport) {
            // SAFETY: this CPU's slot of a per-CPU map.
            unsafe { (*c).flows = (*c).flows.wrapping_add(1) };
        }
        return Ok(forward);
    }
    Err(Event::PortsExhausted)
}

/// Rewrites addresses and ports with their checksums, counts the payload
/// and sends the frame on.
#[inline(always)]
fn translate(ctx: &XdpContext, l4: usize, rewrite: &Rewrite, payload: u64) -> Result<u32, Event> {
    let ip = bytes_mut::<IPV4_HLEN>(ctx, ETH_HLEN).ok_or(Event::Malformed)?;
    let tcp = bytes_mut::<TCP_HLEN>(ctx, l4).ok_or(Event::Malformed)?;

    let old_saddr = [ip[12], ip[13], ip[14], ip[15]];
    let old_daddr = [ip[16], ip[17], ip[18], ip[19]];
    let old_sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let old_dport = u16::from_be_bytes([tcp[2], tcp[3]]);

    // The addresses are in both the IP header and TCP's pseudo header.
    let mut addr_diff = Diff::default();
    addr_diff.replace4(old_saddr, rewrite.saddr);
    addr_diff.replace4(old_daddr, rewrite.daddr);
    let mut tcp_diff = addr_diff;
    tcp_diff.replace2(old_sport, rewrite.sport);
    tcp_diff.replace2(old_dport, rewrite.dport);

    ip[12..16].copy_from_slice(&rewrite.saddr);
    ip[16..20].copy_from_slice(&rewrite.daddr);
    let ip_check = addr_diff.apply(u16::from_be_bytes([ip[10], ip[11]]));
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    tcp[0..2].copy_from_slice(&rewrite.sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&rewrite.dport.to_be_bytes());
    let tcp_check = tcp_diff.apply(u16::from_be_bytes([tcp[16], tcp[17]]));
    tcp[16..18].copy_from_slice(&tcp_check.to_be_bytes());

    let total_len = u16::from_be_bytes([ip[2], ip[3]]);
    count_session(rewrite, payload);
    Ok(forward(ctx, ip, total_len))
}

/// Redirects the translated frame when the route and neighbour are known
/// and the egress interface takes redirects; otherwise the kernel forwards it.
#[inline(always)]
fn forward(ctx: &XdpContext, ip: &mut [u8; IPV4_HLEN], total_len: u16) -> u32 {
    let ttl = ip[8];
    if ttl <= 1 {
        // The kernel sends the ICMP time exceeded.
        count_event(ctx, Event::PassedToStack);
        return XDP_PASS;
    }
    // SAFETY: plain-old-data struct; all-zero is its documented initial state.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_TCP;
    fib.__bindgen_anon_1.tot_len = total_len;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_2.tos = ip[1];
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // SAFETY: ctx is this program's context; `fib` lives on the stack for the
    // call and its size is passed along.
    let found = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        count_event(ctx, Event::PassedToStack);
        return XDP_PASS;
    }
    // An egress interface missing from the devmap gives the fallback action
    // (the flags' low bits) instead of a redirect.
    let action = match NAT_TX_PORTS.redirect(fib.ifindex, u64::from(XDP_PASS)) {
        Ok(action) => action,
        Err(fallback) => {
            count_event(ctx, Event::PassedToStack);
            return fallback;
        }
    };
    // A router's duty on the fast path; RFC 1624 again for the checksum.
    let mut diff = Diff::default();
    diff.replace2(
        u16::from_be_bytes([ttl, ip[9]]),
        u16::from_be_bytes([ttl - 1, ip[9]]),
    );
    ip[8] = ttl - 1;
    let check = diff.apply(u16::from_be_bytes([ip[10], ip[11]]));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    if let Some(eth) = bytes_mut::<ETH_HLEN>(ctx, 0) {
        eth[0..6].copy_from_slice(&fib.dmac);
        eth[6..12].copy_from_slice(&fib.smac);
    }
    count_event(ctx, Event::Redirected);
    action
}

/// A checksum update in progress: the one's complement sum of the old words
/// negated and the new words added (RFC 1624, eqn. 3).
#[derive(Clone, Copy, Default)]
struct Diff {
    sum: u32,
}

impl Diff {
    #[inline(always)]
    fn replace2(&mut self, old: u16, new: u16) {
        self.sum += u32::from(!old) + u32::from(new);
    }

    #[inline(always)]
    fn replace4(&mut self, old: [u8; 4], new: [u8; 4]) {
        self.replace2(
            u16::from_be_bytes([old[0], old[1]]),
            u16::from_be_bytes([new[0], new[1]]),
        );
        self.replace2(
            u16::from_be_bytes([old[2], old[3]]),
            u16::from_be_bytes([new[2], new[3]]),
        );
    }

    /// The new checksum, from the one in the header.
    #[inline(always)]
    fn apply(self, check: u16) -> u16 {
        let mut sum = self.sum + u32::from(!check);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// IPv6 is never translated; TCP/UDP to the data range is dropped unless a
/// session holds the port (the session then gets the kernel's answer).
#[inline(always)]
fn ipv6_guard(ctx: &XdpContext, config: &NatConfig) -> Result<u32, Event> {
    let ip = bytes::<IPV6_HLEN>(ctx, ETH_HLEN).ok_or(Event::Malformed)?;
    if ip[0] >> 4 != 6 {
        return Err(Event::Malformed);
    }
    let next = ip[6];
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        // Extension headers are not walked here: such frames go to the stack
        // untranslated (no session can be IPv6).
        return Ok(XDP_PASS);
    }
    let ports = bytes::<4>(ctx, ETH_HLEN + IPV6_HLEN).ok_or(Event::Malformed)?;
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    if config.guards(dport) && NAT_SERVICES.get_ptr(dport).is_none() {
        return Err(Event::NotAllowed);
    }
    Ok(XDP_PASS)
}

/// The `N` bytes at `offset` into the frame, if the frame is that long.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    bytes_mut(ctx, offset).map(|b| &*b)
}

#[inline(always)]
#[allow(clippy::mut_from_ref)] // the frame is the kernel's buffer, not ctx's
fn bytes_mut<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&mut [u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: [start, start + N) was just checked to lie inside the frame,
    // which stays mapped and is this program's alone while it runs; [u8; N]
    // has alignment 1. The verifier re-checks the bound.
    Some(unsafe { &mut *(start as *mut [u8; N]) })
}

#[inline(always)]
fn count_event(ctx: &XdpContext, event: Event) {
    if let Some(c) = NAT_EVENTS.get_ptr_mut(event.index()) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { (*c).count_frame((ctx.data_end() - ctx.data()) as u64) };
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
