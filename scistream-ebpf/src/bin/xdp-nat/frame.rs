//! What the NAT's shared logic needs of a packet, for both hooks: its length
//! and copies of header bytes. Headers are read straight from the first
//! buffer (XDP) or the linear head (tc) when they lie there, and through the
//! kernel's load helper otherwise (a multi-buffer XDP frame, a paged skb).

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    helpers::{
        bpf_skb_load_bytes, bpf_skb_store_bytes, bpf_xdp_get_buff_len, bpf_xdp_load_bytes,
        bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
};

pub trait Frame {
    /// Bytes in the whole packet, every buffer included.
    fn len(&self) -> usize;
    /// A copy of the `N` bytes at `offset`, if the packet is that long.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
    /// Writes `bytes` at `offset`; false if the packet is shorter (or the
    /// kernel could not make it writable).
    fn write<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> bool;
    /// A VLAN tag travels beside the bytes (tc: the skb's accelerated tag).
    fn tag_outside(&self) -> bool;
}

/// `[start + offset, + N)` inside `[start, end)`, as a pointer.
#[inline(always)]
fn direct<const N: usize>(start: usize, end: usize, offset: usize) -> Option<*mut [u8; N]> {
    let at = start + offset;
    // The verifier re-checks this bound on every access through the pointer.
    (at + N <= end).then_some(at as *mut [u8; N])
}

pub struct Xdp<'a>(pub &'a XdpContext);

impl Xdp<'_> {
    fn md(&self) -> *mut xdp_md {
        self.0.ctx
    }
}

impl Frame for Xdp<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        // SAFETY: the program's own context.
        unsafe { bpf_xdp_get_buff_len(self.md()) as usize }
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if let Some(p) = direct::<N>(self.0.data(), self.0.data_end(), offset) {
            // SAFETY: checked to lie in the first buffer, which stays mapped
            // for the program run; [u8; N] has alignment 1.
            return Some(unsafe { *p });
        }
        let mut buf = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `buf`.
        let r = unsafe {
            bpf_xdp_load_bytes(self.md(), offset as u32, buf.as_mut_ptr().cast(), N as u32)
        };
        (r == 0).then_some(buf)
    }

    #[inline(always)]
    fn write<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> bool {
        if let Some(p) = direct::<N>(self.0.data(), self.0.data_end(), offset) {
            // SAFETY: as in `read`; the frame is this program's alone.
            unsafe { *p = *bytes };
            return true;
        }
        // SAFETY: the helper reads N bytes from `bytes`.
        let r = unsafe {
            bpf_xdp_store_bytes(self.md(), offset as u32, bytes.as_ptr() as *mut _, N as u32)
        };
        r == 0
    }

    fn tag_outside(&self) -> bool {
        false
    }
}

pub struct Tc<'a>(pub &'a TcContext);

impl Tc<'_> {
    pub fn skb(&self) -> *mut __sk_buff {
        self.0.skb.skb
    }
}

impl Frame for Tc<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if let Some(p) = direct::<N>(self.0.data(), self.0.data_end(), offset) {
            // SAFETY: checked to lie in the skb's linear head.
            return Some(unsafe { *p });
        }
        let mut buf = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `buf`.
        let r = unsafe {
            bpf_skb_load_bytes(
                self.skb() as *const _,
                offset as u32,
                buf.as_mut_ptr().cast(),
                N as u32,
            )
        };
        (r == 0).then_some(buf)
    }

    #[inline(always)]
    fn write<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> bool {
        // Always the helper: it unclones the head first (a direct write would
        // change a clone's shared data), and keeps no stale packet pointer.
        // SAFETY: the helper reads N bytes from `bytes`.
        let r = unsafe {
            bpf_skb_store_bytes(
                self.skb(),
                offset as u32,
                bytes.as_ptr().cast(),
                N as u32,
                0,
            )
        };
        r == 0
    }

    #[inline(always)]
    fn tag_outside(&self) -> bool {
        // SAFETY: a field of the program's own context.
        unsafe { (*self.skb()).vlan_present != 0 }
    }
}

/// A checksum update in progress: the one's complement sum of the old words
/// negated and the new words added (RFC 1624, eqn. 3), in the big-endian
/// reading of the words.
#[derive(Clone, Copy, Default)]
pub struct Diff {
    sum: u32,
}

impl Diff {
    #[inline(always)]
    pub fn replace2(&mut self, old: u16, new: u16) {
        self.sum += u32::from(!old) + u32::from(new);
    }

    #[inline(always)]
    pub fn replace4(&mut self, old: [u8; 4], new: [u8; 4]) {
        self.replace2(
            u16::from_be_bytes([old[0], old[1]]),
            u16::from_be_bytes([new[0], new[1]]),
        );
        self.replace2(
            u16::from_be_bytes([old[2], old[3]]),
            u16::from_be_bytes([new[2], new[3]]),
        );
    }

    /// Both differences at once.
    #[inline(always)]
    pub fn and(self, other: Diff) -> Diff {
        Diff {
            sum: u32::from(self.folded()) + u32::from(other.folded()),
        }
    }

    /// The difference folded to 16 bits.
    #[inline(always)]
    pub fn folded(self) -> u16 {
        let mut sum = self.sum;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }

    /// The new checksum, from the one in the header.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let mut sum = u32::from(self.folded()) + u32::from(!check);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    /// The difference as the kernel's csum helpers take it (`__wsum`): the
    /// words as they lie in memory, read in the CPU's order.
    #[inline(always)]
    pub fn as_wsum(self) -> u64 {
        u64::from(u16::from_ne_bytes(self.folded().to_be_bytes()))
    }
}
