//! Finds the transport header the way the guard does (xdp-guard.rs has the
//! rules and their reasons): up to two VLAN tags, IPv4 and IPv6 with its
//! extension headers, the protocols that carry ports where TCP does (TCP,
//! UDP, UDP-Lite, SCTP, DCCP); non-first fragments carry no port and pass.

use scistream_common::nat::Event;

use crate::frame::Frame;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;

pub const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const MAX_IPV6_EXT_HEADERS: usize = 6;

/// A port-carrying transport header and where things are.
pub struct Transport {
    pub l3: usize,
    pub l4: usize,
    pub protocol: u8,
    /// Length of the protocol's fixed header (checked when it is guarded).
    pub header_len: usize,
    pub v6: bool,
    /// A VLAN tag in the bytes or beside them: translated, never redirected.
    pub tagged: bool,
}

/// `Ok(None)` when the frame carries no port to check: not IP, another
/// protocol, or a non-first fragment.
#[inline(always)]
pub fn transport<F: Frame>(f: &F) -> Result<Option<Transport>, Event> {
    let Some(eth) = f.read::<ETH_HLEN>(0) else {
        return Ok(None);
    };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut offset = ETH_HLEN;
    let mut tagged = f.tag_outside();
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = f.read::<4>(offset) else {
            return Ok(None);
        };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
        tagged = true;
    }
    let l3 = offset;
    let (v6, found) = match ethertype {
        ETH_P_IP => (false, ipv4(f, l3)?),
        ETH_P_IPV6 => (true, ipv6(f, l3)?),
        ETH_P_8021Q | ETH_P_8021AD => return Err(Event::Malformed),
        _ => return Ok(None),
    };
    let Some((protocol, l4)) = found else {
        return Ok(None);
    };
    let header_len = match protocol {
        IPPROTO_TCP => 20,
        IPPROTO_UDP | IPPROTO_UDPLITE => 8,
        IPPROTO_SCTP | IPPROTO_DCCP => 12,
        _ => return Ok(None),
    };
    Ok(Some(Transport {
        l3,
        l4,
        protocol,
        header_len,
        v6,
        tagged,
    }))
}

#[inline(always)]
fn ipv4<F: Frame>(f: &F, offset: usize) -> Result<Option<(u8, usize)>, Event> {
    let ip = f.read::<IPV4_HLEN>(offset).ok_or(Event::Malformed)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(Event::Malformed);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return Ok(None);
    }
    Ok(Some((ip[9], offset + ihl)))
}

#[inline(always)]
fn ipv6<F: Frame>(f: &F, offset: usize) -> Result<Option<(u8, usize)>, Event> {
    let ip = f.read::<IPV6_HLEN>(offset).ok_or(Event::Malformed)?;
    if ip[0] >> 4 != 6 {
        return Err(Event::Malformed);
    }
    let mut next = ip[6];
    let mut offset = offset + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = f.read::<2>(offset).ok_or(Event::Malformed)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext = f.read::<2>(offset).ok_or(Event::Malformed)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext = f.read::<8>(offset).ok_or(Event::Malformed)?;
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
            Err(Event::Malformed)
        }
        _ => Ok(Some((next, offset))),
    }
}
