//! The `sockmap` backend's kernel program: one SockHash that pairs the two
//! sockets of each relayed connection. Keys are socket cookies (`SO_COOKIE`,
//! unique per socket for the kernel's lifetime, never reused).

/// Name of the sk_skb stream verdict program (the function name in `scistream-ebpf`).
pub const PROGRAM: &str = "sk_redirect";

/// `SockHash<u64>`: entry `cookie(A) -> socket B` means "bytes received on
/// socket A are sent out on socket B". Each relayed connection has two
/// entries, one per direction.
pub const PEERS_MAP: &str = "SOCKMAP_PEERS";

/// Capacity of [`PEERS_MAP`]: two entries per relayed connection.
pub const MAX_SOCKETS: u32 = 65_536;
