//! Finds the transport header of a packet and the IP source in front of it,
//! for every hook (see [`Frame`]): Ethernet, up to two VLAN tags, IPv4 or
//! IPv6 with its extension headers, then TCP, UDP, UDP-Lite, SCTP or DCCP.
//! Where the headers leave doubt the walk says "malformed", so a caller that
//! guards ports never lets an unreadable packet through unchecked; the rules
//! are in the guard's documentation (src/bin/xdp-guard.rs).

use scistream_common::guard::DropReason;

use crate::frame::Frame;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// DCCP's generic header without extended sequence numbers; SCTP's common header.
const DCCP_HLEN: usize = 12;
const SCTP_HLEN: usize = 12;

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Enough for hop-by-hop, routing, fragment, destination options and AH, in
/// the order RFC 8200 recommends; a longer chain is treated as malformed.
const MAX_IPV6_EXT_HEADERS: usize = 6;

/// Where a port-carrying transport header starts, how long its fixed part
/// is, and where the IP source address sits.
pub struct Transport {
    pub protocol: u8,
    pub offset: usize,
    pub header_len: usize,
    pub source: Source,
}

pub struct Source {
    pub offset: usize,
    pub v6: bool,
}

/// `Ok(None)` when the packet carries no port to check: not IP, not a
/// port-carrying protocol, or a non-first fragment.
#[inline(always)]
pub fn transport<F: Frame>(frame: &F) -> Result<Option<Transport>, DropReason> {
    let Some(eth) = frame.load::<ETH_HLEN>(0) else {
        return Ok(None);
    };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // Too short for the tag means too short for any IP packet behind it.
        let Some(tag) = frame.load::<4>(offset) else {
            return Ok(None);
        };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
    }
    let (l3, source) = match ethertype {
        // Source address: 12 bytes into IPv4, 8 into IPv6.
        ETH_P_IP => (
            ipv4(frame, offset)?,
            Source {
                offset: offset + 12,
                v6: false,
            },
        ),
        ETH_P_IPV6 => (
            ipv6(frame, offset)?,
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
        protocol,
        offset,
        header_len,
        source,
    }))
}

/// `(protocol, offset of the L4 header)`, or `None` for a non-first fragment.
#[inline(always)]
fn ipv4<F: Frame>(frame: &F, offset: usize) -> Result<Option<(u8, usize)>, DropReason> {
    // The whole fixed header must be there, even though only the first ten
    // bytes are read: a shorter one is no IPv4 packet.
    if !frame.has(offset, IPV4_HLEN) {
        return Err(DropReason::Malformed);
    }
    let ip = frame.load::<10>(offset).ok_or(DropReason::Malformed)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(DropReason::Malformed);
    }
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return Ok(None);
    }
    Ok(Some((ip[9], offset + ihl)))
}

#[inline(always)]
fn ipv6<F: Frame>(frame: &F, offset: usize) -> Result<Option<(u8, usize)>, DropReason> {
    if !frame.has(offset, IPV6_HLEN) {
        return Err(DropReason::Malformed);
    }
    let ip = frame.load::<8>(offset).ok_or(DropReason::Malformed)?;
    if ip[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let mut next = ip[6];
    let mut offset = offset + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = frame.load::<2>(offset).ok_or(DropReason::Malformed)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext = frame.load::<2>(offset).ok_or(DropReason::Malformed)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext = frame.load::<8>(offset).ok_or(DropReason::Malformed)?;
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
