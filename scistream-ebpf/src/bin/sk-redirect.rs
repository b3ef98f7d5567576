//! `sockmap` backend, kernel side: an sk_skb stream verdict program that
//! sends every byte a relayed socket receives out on its peer socket, so a
//! gateway's TCP-to-TCP relay never copies payload into user space.
//!
//! The map is keyed by the cookie of the *receiving* socket and holds the
//! socket to send on (see `scistream_common::sockmap`). No stream parser: in
//! verdict-only mode the kernel hands over each received skb as it is.
//!
//! A socket whose peer is not (or no longer) in the map gets `SK_DROP` from
//! the redirect helper. User space never lets that happen silently: it counts
//! bytes received on one socket against bytes written to the other and resets
//! a connection that lost any.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::SockHash,
    programs::SkBuffContext,
};
use scistream_common::sockmap::MAX_SOCKETS;

// The static's name is the map name user space looks up: keep it equal to
// scistream_common::sockmap::PEERS_MAP.
#[map]
static SOCKMAP_PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[stream_verdict]
pub fn sk_redirect(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the socket the skb belongs to; the
    // context pointer is the one the kernel passed to this program.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // Flags 0: egress, i.e. transmit on the peer socket (BPF_F_INGRESS would
    // queue the bytes for the peer's own reader instead).
    SOCKMAP_PEERS.redirect_skb(&ctx, &mut cookie, 0) as u32
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panicking paths the verifier would accept; this only satisfies no_std.
    loop {}
}

/// Built for the host only as part of the workspace; the real program is the
/// bpfel-unknown-none object.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
