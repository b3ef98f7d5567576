//! Facts about this host that both planes read: its interfaces, the kernel's
//! ephemeral port range and IP forwarding. One place, so the guard, the
//! port allocator and the xdp backend never disagree on them.

use std::net::IpAddr;

/// The interfaces holding `ip`; for an unspecified address, every interface
/// but loopback that is up (data may come in on any of them).
pub fn interfaces_of(ip: IpAddr) -> Result<Vec<String>, String> {
    use nix::net::if_::InterfaceFlags;
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    for a in addrs {
        let has_ip = a.address.as_ref().is_some_and(|s| {
            s.as_sockaddr_in().map(|v4| IpAddr::from(v4.ip())) == Some(ip)
                || s.as_sockaddr_in6().map(|v6| IpAddr::from(v6.ip())) == Some(ip)
        });
        let wanted = if ip.is_unspecified() {
            a.flags.contains(InterfaceFlags::IFF_UP)
                && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
        } else {
            has_ip
        };
        if wanted && !names.contains(&a.interface_name) {
            names.push(a.interface_name);
        }
    }
    if names.is_empty() {
        return Err(format!(
            "no interface holds --listener_ip {ip}; name one with --data_iface"
        ));
    }
    if names.iter().any(|n| n == "lo") {
        return Err(
            "--listener_ip is on loopback; the guard is for data interfaces (see --data_iface)"
                .into(),
        );
    }
    Ok(names)
}

/// The kernel's ephemeral ports (`net.ipv4.ip_local_port_range`): where
/// outgoing connections get their source port, so no listener or NAT range
/// may overlap them.
pub fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

/// Whether the kernel routes IPv4 between interfaces (`net.ipv4.ip_forward`).
pub fn ip_forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
}
