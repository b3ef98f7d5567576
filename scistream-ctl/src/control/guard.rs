//! The XDP guard as the session registry sees it: a port is let through when
//! a session reserves it and dropped again when the session goes. Set-up
//! (which interfaces, whether the host can) happens once at start; a host
//! that cannot run the guard gets a one-line warning and runs unguarded.

use crate::error_chain;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use tracing::{info, warn};

use crate::config::{BackendKind, ServerArgs};
use crate::ebpf::{AttachMode, Counters, Guard};
use scistream_common::guard::MAX_ALLOWED_PORTS;

/// The running guard of one `s2cs`.
pub struct PortGuard {
    guard: Mutex<Guard>,
    ifaces: Vec<String>,
    next_tag: AtomicU32,
}

impl PortGuard {
    /// Loads and attaches the guard as `args` ask, or says in one warning why
    /// it does not run (then `None`).
    pub fn start(args: &ServerArgs) -> Option<Self> {
        if !args.guard {
            info!("XDP guard off (--guard false)");
            return None;
        }
        if args.backend == BackendKind::Xdp {
            // An interface holds one XDP program: the xdp backend's NAT guards the range itself.
            info!("XDP guard not attached: the xdp backend's program guards the data range");
            return None;
        }
        match Self::try_start(args) {
            Ok(g) => {
                info!(ifaces = ?g.ifaces, range = %args.port_range, "XDP guard attached: only live sessions' ports in the data range get through");
                Some(g)
            }
            Err(reason) => {
                warn!("XDP guard not running, data ports are unguarded: {reason}");
                None
            }
        }
    }

    fn try_start(args: &ServerArgs) -> Result<Self, String> {
        let range = args.port_range;
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (CAP_BPF and CAP_NET_ADMIN)".into());
        }
        if u32::from(range.end - range.start) + 1 > MAX_ALLOWED_PORTS {
            return Err(format!("--port_range {range} has more than {MAX_ALLOWED_PORTS} ports"));
        }
        // The guard checks destination ports only: inside the ephemeral
        // range it would drop replies to this host's own connections.
        if let Some((lo, hi)) = ephemeral_ports() {
            if range.start <= hi && lo <= range.end {
                return Err(format!(
                    "--port_range {range} overlaps the ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range)"
                ));
            }
        }
        let ifaces = match &args.data_iface {
            Some(list) => list.clone(),
            None => interfaces_of(args.listener_ip)?,
        };
        let mut guard = Guard::load().map_err(|e| error_chain(&e))?;
        guard.set_port_range(range.start, range.end).map_err(|e| error_chain(&e))?;
        for iface in &ifaces {
            // Driver mode where the NIC has it; generic XDP works everywhere.
            if let Err(driver) = guard.attach(iface, AttachMode::Driver) {
                guard.attach(iface, AttachMode::Skb).map_err(|skb| {
                    format!("{}; {}", error_chain(&driver), error_chain(&skb))
                })?;
            }
        }
        Ok(Self { guard: Mutex::new(guard), ifaces, next_tag: AtomicU32::new(1) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Guard> {
        self.guard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a new session's ports through.
    pub fn allow(&self, uid: &str, ports: &[u16]) {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.lock();
        for &port in ports {
            if let Err(e) = guard.allow_port(port, tag) {
                // The session must stay reachable: rather open the range than
                // drop a live session's traffic.
                warn!(uid, port, error = %error_chain(&e), "cannot allow a port in the XDP guard; guard disabled");
                let _ = guard.set_port_range(0, 0);
            }
        }
    }

    /// Drops a released session's ports again; returns what passed to them.
    pub fn deny(&self, ports: &[u16]) -> Counters {
        let mut guard = self.lock();
        ports.iter().filter_map(|&p| guard.deny_port(p).ok()).sum()
    }

    /// Traffic passed to these ports so far.
    pub fn passed(&self, ports: &[u16]) -> Counters {
        let guard = self.lock();
        ports.iter().filter_map(|&p| guard.port_stats(p).ok().flatten()).sum()
    }

    /// Everything dropped on the data range since start.
    pub fn dropped(&self) -> Counters {
        self.lock().dropped().unwrap_or_default()
    }

    /// Detaches from every interface (dropping the guard would too; this
    /// does it now, even while other tasks still hold the registry).
    pub fn detach(&self) {
        let mut guard = self.lock();
        for iface in &self.ifaces {
            let _ = guard.detach(iface);
        }
        let dropped = guard.dropped().unwrap_or_default();
        info!(ifaces = ?self.ifaces, dropped_packets = dropped.packets, dropped_bytes = dropped.bytes, "XDP guard detached");
    }
}

/// The interfaces holding `ip`; for an unspecified address, every interface
/// but loopback that is up (data may come in on any of them).
pub(crate) fn interfaces_of(ip: IpAddr) -> Result<Vec<String>, String> {
    use nix::net::if_::InterfaceFlags;
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    for a in addrs {
        let has_ip = a.address.as_ref().is_some_and(|s| {
            s.as_sockaddr_in().map(|v4| IpAddr::from(v4.ip())) == Some(ip)
                || s.as_sockaddr_in6().map(|v6| IpAddr::from(v6.ip())) == Some(ip)
        });
        let wanted = if ip.is_unspecified() {
            a.flags.contains(InterfaceFlags::IFF_UP) && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
        } else {
            has_ip
        };
        if wanted && !names.contains(&a.interface_name) {
            names.push(a.interface_name);
        }
    }
    if names.is_empty() {
        return Err(format!("no interface holds --listener_ip {ip}; name one with --data_iface"));
    }
    if names.iter().any(|n| n == "lo") {
        return Err("--listener_ip is on loopback; the guard is for data interfaces (see --data_iface)".into());
    }
    Ok(names)
}

fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

