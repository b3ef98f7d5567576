//! Which `update` targets a gateway forwards to. A target that loops back
//! into the gateway (its own data ports or control port) chains connections
//! until descriptors run out; one on loopback or link-local hands anyone who
//! reaches a data port the services bound there (the metrics page among
//! them). Both are refused; `--allow_target_nets` lets listed networks through.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use super::error::ControlError;
use crate::config::{PortRange, ServerArgs};

/// An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`; a bare address
/// is a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .trim()
            .split_once('/')
            .map_or((s.trim(), None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.parse().map_err(|_| {
            format!("{s:?} is not a network: write it as address/prefix, e.g. 10.0.0.0/8")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Self {
            addr: canonical(addr),
            prefix,
        })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| -> (u128, u32) {
            match a {
                IpAddr::V4(v) => (u32::from(v) as u128, 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        };
        let (net, width) = bits(self.addr);
        let (host, host_width) = bits(canonical(ip));
        if width != host_width {
            return false;
        }
        let shift = width - self.prefix as u32;
        if shift >= width {
            return true;
        }
        (net >> shift) == (host >> shift)
    }
}

/// `::ffff:127.0.0.1` is 127.0.0.1: a mapped address must not slip past a v4 rule.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// What the gateway itself serves, and the operator's exceptions.
#[derive(Clone, Debug)]
pub struct TargetPolicy {
    /// Ports this s2cs listens on (control, metrics) besides the data range.
    own_ports: Vec<u16>,
    data_range: PortRange,
    allowed: Vec<IpNet>,
}

impl TargetPolicy {
    pub fn from_args(args: &ServerArgs) -> Self {
        let mut own_ports = vec![args.port];
        own_ports.extend(args.metrics_addr.map(|a| a.port()));
        Self {
            own_ports,
            data_range: args.port_range,
            allowed: args.allow_target_nets.clone().unwrap_or_default(),
        }
    }

    pub fn new(own_ports: Vec<u16>, data_range: PortRange, allowed: Vec<IpNet>) -> Self {
        Self {
            own_ports,
            data_range,
            allowed,
        }
    }

    /// Refuses a target with the reason, as INVALID_ARGUMENT.
    pub fn check(&self, target: SocketAddr) -> Result<(), ControlError> {
        let ip = canonical(target.ip());
        let refuse = |why: &str| {
            Err(ControlError::InvalidArgument(format!(
                "target {target} refused: {why}"
            )))
        };
        if ip.is_unspecified() {
            // Connecting to 0.0.0.0 or :: reaches this host's loopback.
            return refuse("an unspecified address reaches this gateway itself");
        }
        if target.port() == 0 {
            return refuse("port 0");
        }
        if ip.is_multicast() || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
            return refuse("multicast and broadcast addresses cannot take a TCP connection");
        }
        let local = is_local(ip);
        if local || ip.is_loopback() {
            let port = target.port();
            if (self.data_range.start..=self.data_range.end).contains(&port) {
                return refuse("it is one of this gateway's own data ports (a loop that would chain connections until descriptors run out)");
            }
            if self.own_ports.contains(&port) {
                return refuse("it is this gateway's own control or metrics port");
            }
        }
        if self.allowed.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        if ip.is_loopback() {
            return refuse("loopback addresses are not forwarded to (services bound there would be exposed); s2cs --allow_target_nets lets a network through");
        }
        if is_link_local(ip) {
            return refuse("link-local addresses are not forwarded to; s2cs --allow_target_nets lets a network through");
        }
        Ok(())
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Whether `ip` is an address of this host (in s2cs's network namespace):
/// binding it works only then. A target there on one of our ports is us.
fn is_local(ip: IpAddr) -> bool {
    use socket2::{Domain, Socket, Type};
    let addr = SocketAddr::new(ip, 0);
    let Ok(s) = Socket::new(Domain::for_address(addr), Type::STREAM, None) else {
        return false;
    };
    if ip.is_ipv6() {
        // Non-local v6 addresses would bind with IPV6_FREEBIND; not set here.
        let _ = s.set_only_v6(true);
    }
    s.bind(&addr.into()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> TargetPolicy {
        TargetPolicy::new(
            vec![5000, 9100],
            PortRange {
                start: 5100,
                end: 5200,
            },
            allowed.iter().map(|s| s.parse().unwrap()).collect(),
        )
    }

    fn refused(p: &TargetPolicy, t: &str) -> String {
        match p.check(t.parse().unwrap()) {
            Err(ControlError::InvalidArgument(m)) => m,
            other => panic!("{t} not refused: {other:?}"),
        }
    }

    #[test]
    fn networks_parse_and_contain_their_hosts_only() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.1.0.9".parse().unwrap()),
            "a mapped v4 address is the v4 address"
        );
        assert!("0.0.0.0/0"
            .parse::<IpNet>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!("fe80::/10"
            .parse::<IpNet>()
            .unwrap()
            .contains("fe80::1".parse().unwrap()));
        assert_eq!(
            "192.0.2.7".parse::<IpNet>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        for bad in ["10.0.0.0/33", "::/129", "host/8", "10.0.0.0/x"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn update_targets_that_loop_back_are_refused_with_the_reason() {
        let p = policy(&[]);
        assert!(refused(&p, "127.0.0.1:22").contains("loopback"));
        assert!(refused(&p, "127.9.9.9:8080").contains("loopback"));
        assert!(refused(&p, "[::1]:22").contains("loopback"));
        assert!(refused(&p, "[::ffff:127.0.0.1]:22").contains("loopback"));
        assert!(refused(&p, "169.254.169.254:80").contains("link-local"));
        assert!(refused(&p, "[fe80::1]:80").contains("link-local"));
        assert!(refused(&p, "0.0.0.0:80").contains("unspecified"));
        assert!(refused(&p, "[::]:80").contains("unspecified"));
        assert!(refused(&p, "127.0.0.1:5150").contains("data port"));
        assert!(refused(&p, "127.0.0.1:5000").contains("control"));
        assert!(refused(&p, "127.0.0.1:9100").contains("metrics"));
        assert!(refused(&p, "224.0.0.1:80").contains("multicast"));
        assert!(
            p.check("192.0.2.10:7000".parse().unwrap()).is_ok(),
            "a remote producer"
        );
        assert!(
            p.check("192.0.2.10:5150".parse().unwrap()).is_ok(),
            "another host's data port (the peer gateway)"
        );
    }

    #[test]
    fn allowed_networks_let_loopback_through_but_never_the_gateway_itself() {
        let p = policy(&["127.0.0.0/8"]);
        assert!(p.check("127.0.0.1:22".parse().unwrap()).is_ok());
        assert!(refused(&p, "127.0.0.1:5100").contains("data port"));
        assert!(refused(&p, "127.0.0.1:5000").contains("control"));
        assert!(
            refused(&p, "[::1]:22").contains("loopback"),
            "only the listed network"
        );
    }
}
