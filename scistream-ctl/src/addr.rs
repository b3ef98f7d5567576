//! Parsing and printing of the `"ip:port"` strings the protocol carries.
//! IPv6 addresses are written `[::1]:5000`, as `SocketAddr` prints them.

use std::net::SocketAddr;

/// Parses one `ip:port` (or `[ipv6]:port`) string, with a message a user can act on.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    t.parse::<SocketAddr>().map_err(|_| {
        if t.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("address {s:?} has no port; write IPv6 as [addr]:port")
        } else {
            format!("address {s:?} is not ip:port (IPv6 as [addr]:port)")
        }
    })
}

/// Parses every entry; the first bad one names itself in the error.
pub fn parse_socket_addrs<S: AsRef<str>>(items: &[S]) -> Result<Vec<SocketAddr>, String> {
    items
        .iter()
        .map(|s| parse_socket_addr(s.as_ref()))
        .collect()
}

/// Splits a comma-separated list (as `s2uc outbound-request` takes it) into addresses.
pub fn parse_addr_list(s: &str) -> Result<Vec<SocketAddr>, String> {
    let parts: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        return Err("empty listener list".into());
    }
    parse_socket_addrs(&parts)
}

pub fn to_strings(addrs: &[SocketAddr]) -> Vec<String> {
    addrs.iter().map(ToString::to_string).collect()
}

/// `targets[i] = remote[i % len]` for `n` connections, as SciStream 1.2 expands them.
pub fn cycle_to(remote: &[SocketAddr], n: usize) -> Vec<SocketAddr> {
    if remote.is_empty() {
        return Vec::new();
    }
    (0..n).map(|i| remote[i % remote.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_bracketed_ipv6_parse() {
        assert_eq!(parse_socket_addr("10.0.0.1:80").unwrap().port(), 80);
        let v6 = parse_socket_addr("[::1]:5000").unwrap();
        assert!(v6.is_ipv6());
        assert_eq!(v6.to_string(), "[::1]:5000");
    }

    #[test]
    fn malformed_addresses_are_rejected_with_a_reason() {
        assert!(parse_socket_addr("10.0.0.1")
            .unwrap_err()
            .contains("not ip:port"));
        assert!(parse_socket_addr("::1")
            .unwrap_err()
            .contains("[addr]:port"));
        assert!(parse_socket_addr("host:99999").is_err());
        assert!(parse_addr_list(" , ").is_err());
    }

    #[test]
    fn targets_cycle_over_remote_listeners() {
        let r = parse_addr_list("1.1.1.1:1,2.2.2.2:2").unwrap();
        let t = cycle_to(&r, 5);
        assert_eq!(t.len(), 5);
        assert_eq!(t[2], r[0]);
        assert_eq!(t[3], r[1]);
    }
}
