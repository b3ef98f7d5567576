//! XDP guard: on the data port range, only TCP/UDP to ports that a live
//! session holds passes; everything else aimed at the range is dropped at the
//! driver. Traffic outside the range is none of its business and passes.
//! A session may also name the peers it accepts: then a frame to its port
//! from any other source is dropped and counted on that port, so a session's
//! own drops are told apart from scans of ports nobody holds.
//!
//! Rules where the headers leave doubt (conservative: nothing that might be
//! TCP/UDP to the range gets through unchecked):
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
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use scistream_common::guard::{
    AllowedPort, Counters, DropReason, GuardConfig, PeerKey, PortCounters, MAX_ALLOWED_PORTS,
    MAX_PEER_NETS,
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

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// DCCP's generic header without extended sequence numbers; SCTP's common header.
const DCCP_HLEN: usize = 12;
const SCTP_HLEN: usize = 12;

const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Enough for hop-by-hop, routing, fragment, destination options and AH, in
/// the order RFC 8200 recommends; a longer chain is treated as malformed.
const MAX_IPV6_EXT_HEADERS: usize = 6;

#[xdp]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    let config = match GUARD_CONFIG.get(0) {
        Some(c) => *c,
        None => return XDP_PASS,
    };
    if !config.is_enabled() {
        return XDP_PASS;
    }
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    match verdict(&ctx, &config) {
        Outcome::Pass => XDP_PASS,
        Outcome::PassTo(port) => {
            if let Some(c) = GUARD_STATS.get_ptr_mut(port) {
                // SAFETY: see `count`.
                count(unsafe { &mut (*c).passed }, frame_len);
            }
            XDP_PASS
        }
        Outcome::Drop(reason) => {
            count_drop(reason, frame_len);
            XDP_DROP
        }
        Outcome::DropAt(port) => {
            count_drop(DropReason::PeerNotAllowed, frame_len);
            if let Some(c) = GUARD_STATS.get_ptr_mut(port) {
                // SAFETY: see `count`.
                count(unsafe { &mut (*c).dropped }, frame_len);
            }
            XDP_DROP
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
fn verdict(ctx: &XdpContext, config: &GuardConfig) -> Outcome {
    let l4 = match transport(ctx) {
        Ok(Some(l4)) => l4,
        Ok(None) => return Outcome::Pass,
        Err(reason) => return Outcome::Drop(reason),
    };
    let Some(ports) = bytes::<4>(ctx, l4.offset) else {
        return Outcome::Drop(DropReason::Malformed);
    };
    let port = u16::from_be_bytes([ports[2], ports[3]]);
    if !config.guards(port) {
        return Outcome::Pass;
    }
    if !has(ctx, l4.offset, l4.header_len) {
        return Outcome::Drop(DropReason::Malformed);
    }
    let Some(allowed) = GUARD_ALLOWED.get_ptr(port) else {
        return Outcome::Drop(DropReason::NotAllowed);
    };
    // SAFETY: a hash map value stays valid memory for the whole program run
    // (RCU), even if user space deletes the entry meanwhile.
    let allowed = unsafe { *allowed };
    if allowed.peers_restricted() && !peer_allowed(ctx, allowed.tag, &l4.source) {
        return Outcome::DropAt(port);
    }
    Outcome::PassTo(port)
}

/// Whether the frame's source lies in one of the networks session `tag` allows.
#[inline(always)]
fn peer_allowed(ctx: &XdpContext, tag: u32, source: &Source) -> bool {
    let key = if source.v6 {
        match bytes::<16>(ctx, source.offset) {
            Some(a) => PeerKey::v6(tag, *a),
            None => return false,
        }
    } else {
        match bytes::<4>(ctx, source.offset) {
            Some(a) => PeerKey::v4(tag, *a),
            None => return false,
        }
    };
    GUARD_PEERS
        .get(Key::new(PeerKey::EXACT_BITS, key))
        .is_some()
}

/// Where a transport header starts, how long its fixed part is, and where
/// the IP source address sits.
struct Transport {
    offset: usize,
    header_len: usize,
    source: Source,
}

struct Source {
    offset: usize,
    v6: bool,
}

/// `Ok(None)` when the frame carries no port to check: not IP, not TCP/UDP,
/// or a non-first fragment.
#[inline(always)]
fn transport(ctx: &XdpContext) -> Result<Option<Transport>, DropReason> {
    let Some(eth) = bytes::<ETH_HLEN>(ctx, 0) else {
        return Ok(None);
    };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // Too short for the tag means too short for any IP packet behind it.
        let Some(tag) = bytes::<4>(ctx, offset) else {
            return Ok(None);
        };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
    }
    let (l3, source) = match ethertype {
        // Source address: 12 bytes into IPv4, 8 into IPv6.
        ETH_P_IP => (
            ipv4(ctx, offset)?,
            Source {
                offset: offset + 12,
                v6: false,
            },
        ),
        ETH_P_IPV6 => (
            ipv6(ctx, offset)?,
            Source {
                offset: offset + 8,
                v6: true,
            },
        ),
        ETH_P_8021Q | ETH_P_8021AD => return Err(DropReason::Malformed),
        _ => return Ok(None),
    };
    let Some((protocol, offset)) = l3 else {
        return Ok(None);
    };
    let header_len = match protocol {
        IPPROTO_TCP => TCP_HLEN,
        IPPROTO_UDP | IPPROTO_UDPLITE => UDP_HLEN,
        IPPROTO_SCTP => SCTP_HLEN,
        IPPROTO_DCCP => DCCP_HLEN,
        _ => return Ok(None),
    };
    Ok(Some(Transport {
        offset,
        header_len,
        source,
    }))
}

/// `(protocol, offset of the L4 header)`, or `None` for a non-first fragment.
#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Result<Option<(u8, usize)>, DropReason> {
    let ip = bytes::<20>(ctx, offset).ok_or(DropReason::Malformed)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(DropReason::Malformed);
    }
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return Ok(None);
    }
    Ok(Some((ip[9], offset + ihl)))
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize) -> Result<Option<(u8, usize)>, DropReason> {
    let ip = bytes::<IPV6_HLEN>(ctx, offset).ok_or(DropReason::Malformed)?;
    if ip[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let mut next = ip[6];
    let mut offset = offset + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = bytes::<2>(ctx, offset).ok_or(DropReason::Malformed)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext = bytes::<2>(ctx, offset).ok_or(DropReason::Malformed)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext = bytes::<8>(ctx, offset).ok_or(DropReason::Malformed)?;
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Ok(None);
                }
                next = ext[0];
                offset += 8;
            }
            _ => return Ok(Some((next, offset))),
        }
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
            Err(DropReason::Malformed)
        }
        _ => Ok(Some((next, offset))),
    }
}

#[inline(always)]
fn has(ctx: &XdpContext, offset: usize, len: usize) -> bool {
    ctx.data() + offset + len <= ctx.data_end()
}

/// The `N` bytes at `offset` into the frame, if the frame is that long.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: [start, start + N) was just checked to lie inside the frame,
    // which stays mapped for the whole program run; [u8; N] has alignment 1.
    // The verifier re-checks this bound and rejects the program otherwise.
    Some(unsafe { &*(start as *const [u8; N]) })
}

// The counters handed to `count` come from map lookups of this CPU's slot
// (per-CPU maps), so nothing else writes them while this program runs. User
// space may delete a per-port entry meanwhile: preallocated elements stay
// valid memory, so the worst case is one frame counted in a deleted entry,
// or in the next port that reuses the element.
#[inline(always)]
fn count(counters: &mut Counters, frame_len: u64) {
    counters.count_frame(frame_len);
}

#[inline(always)]
fn count_drop(reason: DropReason, frame_len: u64) {
    if let Some(c) = GUARD_DROPS.get_ptr_mut(reason.index()) {
        // SAFETY: see `count`.
        count(unsafe { &mut *c }, frame_len);
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
