//! One view of a packet for programs with two entry points (XDP and tc):
//! header bytes at an offset, read straight from the first buffer when they
//! lie there, through the kernel's load helper otherwise (an XDP frame in
//! several buffers, a non-linear skb), so parsing code is written once.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_skb_load_bytes, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

/// A packet starting at its Ethernet header.
pub trait Frame {
    /// The `N` bytes at `offset`, `None` when the packet is shorter.
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    /// Whether the packet holds `len` bytes from `offset` on.
    fn has(&self, offset: usize, len: usize) -> bool;

    /// Length in bytes, every buffer included, L2 header included.
    fn len(&self) -> u64;

    /// Never true for a packet a hook hands over; here for the `len` convention.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wire frames this packet stands for: 1, or the segment count of a
    /// GSO/GRO packet that tc sees whole.
    fn segments(&self) -> u64;
}

/// An XDP frame; with a fragment-capable program it may span several buffers,
/// of which `data..data_end` is the first.
pub struct XdpFrame<'a>(pub &'a XdpContext);

impl Frame for XdpFrame<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.0.data() + offset;
        if start + N <= self.0.data_end() {
            // SAFETY: [start, start + N) lies in the first buffer, which stays
            // mapped for the whole program run; [u8; N] has alignment 1. The
            // verifier re-checks this bound and rejects the program otherwise.
            return Some(unsafe { *(start as *const [u8; N]) });
        }
        let mut buf = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `buf` and fails
        // (non-zero) when the frame ends before offset + N.
        let ret = unsafe {
            bpf_xdp_load_bytes(self.0.ctx, offset as u32, buf.as_mut_ptr().cast(), N as u32)
        };
        (ret == 0).then_some(buf)
    }

    #[inline(always)]
    fn has(&self, offset: usize, len: usize) -> bool {
        self.0.data() + offset + len <= self.0.data_end() || (offset + len) as u64 <= self.len()
    }

    #[inline(always)]
    fn len(&self) -> u64 {
        // SAFETY: a plain helper call on this program's own context.
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) }
    }

    #[inline(always)]
    fn segments(&self) -> u64 {
        1
    }
}

/// A socket buffer at tc; `data..data_end` is its linear part, which holds
/// the headers of nearly every packet (the helper covers the others).
pub struct SkbFrame<'a>(pub &'a TcContext);

impl Frame for SkbFrame<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.0.data() + offset;
        if start + N <= self.0.data_end() {
            // SAFETY: as for XdpFrame: checked to lie in the linear part.
            return Some(unsafe { *(start as *const [u8; N]) });
        }
        let mut buf = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `buf` and fails
        // when the skb ends before offset + N.
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const _,
                offset as u32,
                buf.as_mut_ptr().cast(),
                N as u32,
            )
        };
        (ret == 0).then_some(buf)
    }

    #[inline(always)]
    fn has(&self, offset: usize, len: usize) -> bool {
        (offset + len) as u64 <= self.len()
    }

    #[inline(always)]
    fn len(&self) -> u64 {
        u64::from(self.0.len())
    }

    #[inline(always)]
    fn segments(&self) -> u64 {
        // SAFETY: gso_segs is a readable field of this program's __sk_buff.
        let segs = unsafe { (*(self.0.skb.skb as *const __sk_buff)).gso_segs };
        u64::from(segs.max(1))
    }
}
