//! The last step, per hook: rewrite the headers with their checksums and
//! send the packet out of the egress interface the FIB names (TTL
//! decremented here, a router's duty), or hand it to the stack translated.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, bpf_redir_neigh, xdp_action::XDP_PASS,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_PSEUDO_HDR, TC_ACT_OK,
    },
    helpers::{
        bpf_fib_lookup, bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh,
    },
    programs::XdpContext,
};
use scistream_common::nat::Event;

use crate::frame::{Diff, Frame, Tc, Xdp};
use crate::headers::IPPROTO_TCP;
use crate::{count_event, Translation, NAT_TX_PORTS};

const AF_INET: u8 = 2;
/// In the IPv4 header: TTL, checksum, addresses; in TCP's: the checksum.
const IP_TTL: usize = 8;
const IP_CHECK: usize = 10;
const IP_SADDR: usize = 12;
const TCP_CHECK: usize = 16;

/// The checksum differences of a translation: the addresses (in both the IP
/// header and TCP's pseudo header) and the ports (TCP only).
#[inline(always)]
fn diffs(t: &Translation) -> (Diff, Diff) {
    let mut addrs = Diff::default();
    addrs.replace4([t.ip[12], t.ip[13], t.ip[14], t.ip[15]], t.rewrite.saddr);
    addrs.replace4([t.ip[16], t.ip[17], t.ip[18], t.ip[19]], t.rewrite.daddr);
    let mut ports = Diff::default();
    ports.replace2(u16::from_be_bytes([t.tcp[0], t.tcp[1]]), t.rewrite.sport);
    ports.replace2(u16::from_be_bytes([t.tcp[2], t.tcp[3]]), t.rewrite.dport);
    (addrs, ports)
}

#[inline(always)]
fn new_addrs(t: &Translation) -> [u8; 8] {
    let (s, d) = (t.rewrite.saddr, t.rewrite.daddr);
    [s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]]
}

#[inline(always)]
fn new_ports(t: &Translation) -> [u8; 4] {
    let (s, d) = (t.rewrite.sport.to_be_bytes(), t.rewrite.dport.to_be_bytes());
    [s[0], s[1], d[0], d[1]]
}

/// A FIB lookup for the translated packet, from the interface it came in on.
#[inline(always)]
fn fib_for(t: &Translation, ifindex: u32, tot_len: u16) -> FibLookup {
    // SAFETY: plain-old-data struct; all-zero is its documented initial state.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_TCP;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_2.tos = t.ip[1];
    let (s, d) = (t.rewrite.saddr, t.rewrite.daddr);
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(s);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(d);
    fib
}

/// XDP: checksums computed here; redirect through the devmap when the route
/// and neighbour are known and the egress interface holds the program.
#[inline(always)]
pub fn xdp(ctx: &XdpContext, f: &Xdp, t: &Translation) -> Result<u32, Event> {
    let (addrs, ports) = diffs(t);
    let ip_check = addrs.apply(u16::from_be_bytes([t.ip[10], t.ip[11]]));
    let tcp_check = addrs
        .and(ports)
        .apply(u16::from_be_bytes([t.tcp[16], t.tcp[17]]));
    let a = new_addrs(t);
    let c = ip_check.to_be_bytes();
    // Checksum and both addresses are one run of 10 bytes.
    let ip_run = [c[0], c[1], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]];
    if !f.write(t.l3 + IP_CHECK, &ip_run)
        || !f.write(t.l4, &new_ports(t))
        || !f.write(t.l4 + TCP_CHECK, &tcp_check.to_be_bytes())
    {
        return Err(Event::Malformed);
    }
    let ttl = t.ip[IP_TTL];
    if t.tagged || ttl <= 1 {
        // The stack sends the ICMP time exceeded, or knows the VLAN.
        count_event(Event::PassedToStack, f.len());
        return Ok(XDP_PASS);
    }
    let tot_len = u16::from_be_bytes([t.ip[2], t.ip[3]]);
    let mut fib = fib_for(t, ctx.ingress_ifindex() as u32, tot_len);
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
        count_event(Event::PassedToStack, f.len());
        return Ok(XDP_PASS);
    }
    // An egress interface missing from the devmap gives the fallback action
    // (the flags' low bits) instead of a redirect.
    let action = match NAT_TX_PORTS.redirect(fib.ifindex, u64::from(XDP_PASS)) {
        Ok(action) => action,
        Err(fallback) => {
            count_event(Event::PassedToStack, f.len());
            return Ok(fallback);
        }
    };
    let mut diff = Diff::default();
    let proto = t.ip[IP_TTL + 1];
    diff.replace2(
        u16::from_be_bytes([ttl, proto]),
        u16::from_be_bytes([ttl - 1, proto]),
    );
    let check = diff.apply(ip_check).to_be_bytes();
    let (d, s) = (fib.dmac, fib.smac);
    let macs = [
        d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5],
    ];
    if !f.write(t.l3 + IP_TTL, &[ttl - 1])
        || !f.write(t.l3 + IP_CHECK, &check)
        || !f.write(0, &macs)
    {
        return Err(Event::Malformed);
    }
    count_event(Event::Redirected, f.len());
    Ok(action)
}

/// tc: the kernel's csum helpers, which know the skb's checksum state: on a
/// CHECKSUM_PARTIAL packet TCP's field holds only the pseudo-header sum, so
/// only the address change (BPF_F_PSEUDO_HDR) may touch it.
#[inline(always)]
pub fn tc(f: &Tc, t: &Translation) -> Result<i32, Event> {
    let skb = f.skb();
    let (addrs, ports) = diffs(t);
    let ip_check = (t.l3 + IP_CHECK) as u32;
    let tcp_check = (t.l4 + TCP_CHECK) as u32;
    // SAFETY (the helper calls here and below): the program's own skb;
    // offsets inside the headers just read. A size of 0 makes `to` a
    // difference to fold in.
    let ok = f.write(t.l3 + IP_SADDR, &new_addrs(t))
        && f.write(t.l4, &new_ports(t))
        // SAFETY: as said above.
        && unsafe { bpf_l3_csum_replace(skb, ip_check, 0, addrs.as_wsum(), 0) } == 0
        // SAFETY: as said above.
        && unsafe {
            bpf_l4_csum_replace(
                skb,
                tcp_check,
                0,
                addrs.as_wsum(),
                u64::from(BPF_F_PSEUDO_HDR),
            )
        } == 0
        // SAFETY: as said above.
        && unsafe { bpf_l4_csum_replace(skb, tcp_check, 0, ports.as_wsum(), 0) } == 0;
    if !ok {
        return Err(Event::Malformed);
    }
    let ttl = t.ip[IP_TTL];
    if t.tagged || ttl <= 1 {
        count_event(Event::PassedToStack, f.len());
        return Ok(TC_ACT_OK);
    }
    // SAFETY: fields of the program's own context.
    let (ingress, gso_size) = unsafe { ((*skb).ingress_ifindex, (*skb).gso_size) };
    // A GSO packet leaves as segments: the MTU check is theirs.
    let headers = (t.l4 - t.l3) as u32 + u32::from(t.tcp[12] >> 4) * 4;
    let tot_len = if gso_size != 0 {
        (gso_size + headers) as u16
    } else {
        u16::from_be_bytes([t.ip[2], t.ip[3]])
    };
    let mut fib = fib_for(t, ingress, tot_len);
    // SAFETY: as in `xdp`.
    let found = unsafe {
        bpf_fib_lookup(
            skb.cast(),
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    let known = found == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    if !known && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // No route, or a packet too big for it: the stack's business.
        count_event(Event::PassedToStack, f.len());
        return Ok(TC_ACT_OK);
    }
    let proto = t.ip[IP_TTL + 1];
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    // SAFETY: as above; size 2, the words as they lie in memory.
    let ok = f.write(t.l3 + IP_TTL, &[ttl - 1])
        && unsafe { bpf_l3_csum_replace(skb, ip_check, u64::from(old), u64::from(new), 2) } == 0;
    if !ok {
        return Err(Event::Malformed);
    }
    count_event(Event::Redirected, f.len());
    if known {
        let (d, s) = (fib.dmac, fib.smac);
        let macs = [
            d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5],
        ];
        if !f.write(0, &macs) {
            return Err(Event::Malformed);
        }
        // SAFETY: plain helper; the action it returns is TC_ACT_REDIRECT.
        return Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32);
    }
    // The kernel resolves the neighbour (and queues the packet meanwhile).
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        // SAFETY: a union of integers; all zeros is a valid value of each.
        __bindgen_anon_1: unsafe { core::mem::zeroed() },
    };
    // SAFETY: the lookup wrote the next hop's IPv4 address (family AF_INET).
    nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
    // SAFETY: `nh` lives on the stack for the call, its size passed along.
    Ok(unsafe {
        bpf_redirect_neigh(
            fib.ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    } as i32)
}
