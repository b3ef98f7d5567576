//! The flow table's life cycle: a flow is created by an opening SYN to a
//! session port (a random free source port, one entry per direction), its
//! entries note FIN, RST, the reply and the last second seen, and a flow
//! that ended (see `NatConfig::expired`) gives its source port back to the
//! next SYN that draws it; user space sweeps the rest away.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use scistream_common::nat::{FlowKey, NatConfig, Rewrite, Service, PORT_TRIES};

use crate::headers::IPPROTO_TCP;
use crate::{Event, NAT_BUCKETS, NAT_FLOWS, NAT_SERVICES, NAT_STATS};

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// The flow's service, if its session still holds the listener port (same tag).
#[inline(always)]
pub fn live(rewrite: &Rewrite) -> Option<Service> {
    // SAFETY: a hash map value stays valid memory for the program run (RCU);
    // services are plain values written whole.
    let service = unsafe { *NAT_SERVICES.get_ptr(rewrite.listener_port)? };
    (service.tag == rewrite.tag).then_some(service)
}

/// Records this direction's FIN/RST, the reply, and the second it was last
/// seen; writes only on a change, so a busy flow's entry is mostly just read.
///
/// # Safety
/// `flow` is a live pointer into the flow map.
#[inline(always)]
pub unsafe fn note_frame(flow: *mut Rewrite, tcp_flags: u8, now_s: u32) {
    let old = (*flow).flags;
    let mut flags = old;
    if tcp_flags & TCP_FLAG_FIN != 0 {
        flags |= Rewrite::FIN_SEEN;
    }
    if tcp_flags & TCP_FLAG_RST != 0 {
        flags |= Rewrite::RST_SEEN;
    } else {
        flags &= !Rewrite::RST_SEEN;
    }
    if (*flow).direction == Rewrite::BACKWARD {
        flags |= Rewrite::ANSWERED;
    }
    if flags != old {
        (*flow).flags = flags;
    }
    if (*flow).seen_s != now_s {
        (*flow).seen_s = now_s;
    }
}

/// Whether the flow that `rewrite` belongs to (one direction of it) is over:
/// a SYN meeting it opens a new connection on the same ports.
#[inline(always)]
pub fn closed(rewrite: &Rewrite) -> bool {
    let other = match NAT_FLOWS.get_ptr(rewrite.reverse_key()) {
        // SAFETY: see `live`; a copy of the other direction's entry.
        Some(o) => unsafe { *o },
        None => return true,
    };
    rewrite.closed_with(&other)
}

/// Removes both entries of the flow `key` belongs to.
#[inline(always)]
pub fn forget(key: &FlowKey, rewrite: &Rewrite) {
    let _ = NAT_FLOWS.remove(rewrite.reverse_key());
    let _ = NAT_FLOWS.remove(key);
}

/// Frees the flow holding `reply` (a reply key, so a source port) if it has
/// ended; true if the key is free now.
#[inline(always)]
fn reclaim(reply: &FlowKey, config: &NatConfig, now_s: u32) -> bool {
    // SAFETY: see `live`; copies.
    let Some(held) = NAT_FLOWS.get_ptr(reply).map(|p| unsafe { *p }) else {
        return true;
    };
    let other_key = held.reverse_key();
    let ended = match NAT_FLOWS.get_ptr(other_key) {
        // SAFETY: see `live`; read in place for this call only.
        Some(o) => config.expired(&held, unsafe { &*o }, now_s),
        // Half a flow (the other entry evicted) translates nothing useful.
        None => true,
    };
    if ended {
        let _ = NAT_FLOWS.remove(other_key);
        let _ = NAT_FLOWS.remove(reply);
    }
    ended
}

/// Picks a free source port and records both directions of the flow.
#[inline(always)]
pub fn new_flow(
    key: &FlowKey,
    service: &Service,
    config: &NatConfig,
    now_s: u32,
) -> Result<Rewrite, Event> {
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
        seen_s: now_s,
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
        // live flow to the same target holding it makes this fail.
        if NAT_FLOWS
            .insert(reply, backward, u64::from(BPF_NOEXIST))
            .is_err()
            && !(reclaim(&reply, config, now_s)
                && NAT_FLOWS
                    .insert(reply, backward, u64::from(BPF_NOEXIST))
                    .is_ok())
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
            seen_s: now_s,
        };
        if NAT_FLOWS.insert(key, forward, 0).is_err() {
            let _ = NAT_FLOWS.remove(reply);
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

/// Whether a segment with `payload` bytes conforms to the session's rate in
/// its direction; takes its cost from the bucket when it does. Lost races
/// retry a few times, then let the segment pass (a contended bucket is one
/// many CPUs are filling at once, not one running dry).
#[inline(always)]
pub fn police(service: &Service, direction: u8, payload: u64, now: u64) -> bool {
    if service.flags & Service::POLICED == 0 || payload == 0 {
        return true;
    }
    let Some(bucket) = NAT_BUCKETS.get_ptr_mut(service.tag) else {
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
