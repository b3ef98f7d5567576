//! The guard: on the data port range, only TCP/UDP to ports that a live
//! session holds passes; everything else aimed at the range is dropped.
//! Traffic outside the range is none of its business and passes.
//! One object, one logic, two entry points sharing the maps: `xdp_guard`
//! (XDP in the driver, fragment-capable so it attaches at any MTU) for
//! physical NICs, `tc_guard` (clsact ingress) for virtual interfaces, where
//! XDP would strip GSO from the peer and tc sees whole GSO packets. At tc a
//! GSO/GRO packet counts as its segments; bytes are its whole length.
//! A session may also name the peers it accepts: then a frame to its port
//! from any other source is dropped and counted on that port, so a session's
//! own drops are told apart from scans of ports nobody holds.
//!
//! Rules where the headers leave doubt (conservative: nothing that might be
//! TCP/UDP to the range gets through unchecked):
//! - Headers are read from the first buffer when they lie there, through
//!   the load helpers otherwise (multi-buffer XDP frames, non-linear skbs).
//! - A frame too short for an Ethernet header, or whose EtherType is not IPv4
//!   or IPv6 (after at most two VLAN tags), carries no IP packet: it passes.
//!   More than two VLAN tags: we cannot see the payload, so it is dropped.
//! - An IP header that is truncated or invalid (wrong version, IHL < 5), an
//!   IPv6 extension header chain that is truncated or longer than we walk, or
//!   TCP/UDP whose port fields are cut off: dropped as malformed, since we
//!   cannot rule out the range.
//! - TCP/UDP to the range with a truncated fixed header (TCP < 20 bytes,
//!   UDP < 8) is dropped as malformed even when the port is allowed.
//! - Non-first IPv4/IPv6 fragments carry no ports and pass: the first fragment
//!   holds the ports and is checked, and without it the kernel cannot
//!   reassemble the datagram, so a tail alone never reaches a socket (Linux
//!   also discards overlapping fragments, which could otherwise rewrite the
//!   ports). Per-port byte counts therefore exclude non-first fragments.
//!   The same holds for the peer check: a tail's source is not checked.
//! - SCTP, DCCP and UDP-Lite carry their ports where TCP and UDP do and reach
//!   sockets the same way, so they are guarded like TCP/UDP.
//! - IPv6 extension headers (hop-by-hop, routing, destination options,
//!   fragment, AH) are walked to the transport header; any other next header
//!   is the transport (Linux treats ESP, mobility, HIP and unknown numbers as
//!   final, so a TCP header behind them never reaches a TCP socket).
//! - Traffic that a tunnel or IPsec terminated on this host unwraps (GRE,
//!   IP-in-IP, ESP) is not looked into.
//!
//! Only the destination port is checked, so the data range must not overlap
//! the host's ephemeral ports (`net.ipv4.ip_local_port_range`), or replies to
//! the gateway's own outgoing connections would be dropped.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::{TcContext, XdpContext},
};
use scistream_common::guard::{
    AllowedPort, Counters, DropReason, GuardConfig, PeerKey, PortCounters, MAX_ALLOWED_PORTS,
    MAX_PEER_NETS,
};
use scistream_ebpf::{
    frame::{Frame, SkbFrame, XdpFrame},
    headers::{transport, Source},
};

// Static names are the map names user space looks up: keep them equal to
// scistream_common::guard::*_MAP.
#[map]
static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);
#[map]
static GUARD_ALLOWED: HashMap<u16, AllowedPort> = HashMap::with_max_entries(MAX_ALLOWED_PORTS, 0);
#[map]
static GUARD_STATS: PerCpuHashMap<u16, PortCounters> =
    PerCpuHashMap::with_max_entries(MAX_ALLOWED_PORTS, 0);
#[map]
static GUARD_DROPS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);
#[map]
static GUARD_PEERS: LpmTrie<PeerKey, u8> = LpmTrie::with_max_entries(MAX_PEER_NETS, 0);

/// Physical NICs: in the driver, before any socket buffer exists.
#[xdp(frags)]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    if guard(&XdpFrame(&ctx)) {
        XDP_PASS
    } else {
        XDP_DROP
    }
}

/// Virtual interfaces (and NICs that refuse driver-mode XDP): tc ingress.
/// A packet that passes goes on to the next program or the stack
/// (TC_ACT_UNSPEC is tcx's "next"), so other classifiers still see it.
#[classifier]
pub fn tc_guard(ctx: TcContext) -> i32 {
    if guard(&SkbFrame(&ctx)) {
        TC_ACT_UNSPEC
    } else {
        TC_ACT_SHOT
    }
}

/// The one decision both hooks make, counted in the same maps: true to pass.
#[inline(always)]
fn guard<F: Frame>(frame: &F) -> bool {
    let config = match GUARD_CONFIG.get(0) {
        Some(c) => *c,
        None => return true,
    };
    if !config.is_enabled() {
        return true;
    }
    match verdict(frame, &config) {
        Outcome::Pass => true,
        Outcome::PassTo(port) => {
            if let Some(c) = GUARD_STATS.get_ptr_mut(port) {
                // SAFETY: see `count`.
                count(unsafe { &mut (*c).passed }, frame);
            }
            true
        }
        Outcome::Drop(reason) => {
            count_drop(reason, frame);
            false
        }
        Outcome::DropAt(port) => {
            count_drop(DropReason::PeerNotAllowed, frame);
            if let Some(c) = GUARD_STATS.get_ptr_mut(port) {
                // SAFETY: see `count`.
                count(unsafe { &mut (*c).dropped }, frame);
            }
            false
        }
    }
}

enum Outcome {
    /// Not ours to check or count.
    Pass,
    /// To a live session's port: passes, counted on the port.
    PassTo(u16),
    /// Dropped, counted host-wide only.
    Drop(DropReason),
    /// To a live session's port from a source it does not allow: dropped,
    /// counted host-wide and on the port.
    DropAt(u16),
}

#[inline(always)]
fn verdict<F: Frame>(frame: &F, config: &GuardConfig) -> Outcome {
    let l4 = match transport(frame) {
        Ok(Some(l4)) => l4,
        Ok(None) => return Outcome::Pass,
        Err(reason) => return Outcome::Drop(reason),
    };
    let Some(ports) = frame.load::<4>(l4.offset) else {
        return Outcome::Drop(DropReason::Malformed);
    };
    let port = u16::from_be_bytes([ports[2], ports[3]]);
    if !config.guards(port) {
        return Outcome::Pass;
    }
    if !frame.has(l4.offset, l4.header_len) {
        return Outcome::Drop(DropReason::Malformed);
    }
    let Some(allowed) = GUARD_ALLOWED.get_ptr(port) else {
        return Outcome::Drop(DropReason::NotAllowed);
    };
    // SAFETY: a hash map value stays valid memory for the whole program run
    // (RCU), even if user space deletes the entry meanwhile.
    let allowed = unsafe { *allowed };
    if allowed.peers_restricted() && !peer_allowed(frame, allowed.tag, &l4.source) {
        return Outcome::DropAt(port);
    }
    Outcome::PassTo(port)
}

/// Whether the packet's source lies in one of the networks session `tag` allows.
#[inline(always)]
fn peer_allowed<F: Frame>(frame: &F, tag: u32, source: &Source) -> bool {
    let key = if source.v6 {
        match frame.load::<16>(source.offset) {
            Some(a) => PeerKey::v6(tag, a),
            None => return false,
        }
    } else {
        match frame.load::<4>(source.offset) {
            Some(a) => PeerKey::v4(tag, a),
            None => return false,
        }
    };
    GUARD_PEERS
        .get(Key::new(PeerKey::EXACT_BITS, key))
        .is_some()
}

// The counters handed to `count` come from map lookups of this CPU's slot
// (per-CPU maps), so nothing else writes them while this program runs. User
// space may delete a per-port entry meanwhile: preallocated elements stay
// valid memory, so the worst case is one packet counted in a deleted entry,
// or in the next port that reuses the element.
#[inline(always)]
fn count<F: Frame>(counters: &mut Counters, frame: &F) {
    counters.count_frames(frame.segments(), frame.len());
}

#[inline(always)]
fn count_drop<F: Frame>(reason: DropReason, frame: &F) {
    if let Some(c) = GUARD_DROPS.get_ptr_mut(reason.index()) {
        // SAFETY: see `count`.
        count(unsafe { &mut *c }, frame);
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The program has no panicking paths the verifier would accept; this only
    // satisfies no_std.
    loop {}
}

/// Built for the host only as part of the workspace; the real program is the
/// bpfel-unknown-none object.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
