//! `xdp` backend: the gateway is a NAT at the driver, TCP is not terminated.
//! The XDP program (`ebpf::Nat`) on every data interface rewrites each
//! session's flows (consumer -> listener becomes gateway -> target, replies
//! the other way) and redirects them, so one TCP connection runs end to end
//! from the consumer through both gateways to the producer. The session's
//! listeners stay bound only to keep their ports reserved; no byte reaches them.
//!
//! What the host needs: root (BPF, XDP), IPv4 targets, and for frames the
//! program cannot redirect (no neighbour entry yet, an egress interface it is
//! not attached to) the kernel's forwarding: `net.ipv4.ip_forward=1`,
//! `accept_local=1` on the data interfaces (a translated frame carries this
//! host's address as its source; set here and restored at exit) and no strict
//! rp_filter. A veth only takes redirected frames when its peer has NAPI (GRO
//! on, or an XDP program attached).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use scistream_common::nat::{Event, Service, SessionCounters};
use tracing::{info, warn};

use super::{Backend, DataPlaneError, Forwarder, SessionSpec, StatsSnapshot};
use crate::config::{PortRange, ServerArgs};
use crate::ebpf::{AttachMode, EbpfError, Nat};
use crate::error_chain;

const NAME: &str = "xdp";

/// Source ports come from a run of free ports outside the ephemeral and data
/// ranges; one shorter than this is refused.
const MIN_NAT_PORTS: u32 = 1024;

pub struct XdpBackend {
    nat: Arc<Mutex<Nat>>,
    next_tag: AtomicU32,
    /// sysctl files changed at start, with their old values.
    accept_local: Vec<(String, String)>,
}

fn unsupported(reason: impl Into<String>) -> DataPlaneError {
    DataPlaneError::Unsupported {
        backend: NAME,
        reason: reason.into(),
    }
}

impl XdpBackend {
    /// Loads the NAT and attaches it to the data interfaces (`--data_iface`,
    /// else every interface that is up but loopback: replies come in on other
    /// interfaces than the listeners'). Refuses with the reason when this host
    /// cannot run it.
    pub fn new(args: &ServerArgs) -> Result<Self, DataPlaneError> {
        if args.enforce_rate {
            return Err(unsupported(
                "--enforce_rate paces sockets; xdp forwards frames and holds none to pace",
            ));
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(unsupported(
                "needs root (CAP_BPF and CAP_NET_ADMIN) to attach its XDP program",
            ));
        }
        let nat_range = nat_port_range(args.port_range, ephemeral_ports()).ok_or_else(|| {
            unsupported(format!(
                "no {MIN_NAT_PORTS} source ports left outside --port_range {} and the ephemeral ports",
                args.port_range
            ))
        })?;
        let ifaces = match &args.data_iface {
            Some(list) => list.clone(),
            None => crate::control::guard::interfaces_of(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
                .map_err(unsupported)?,
        };
        let mut nat = Nat::load().map_err(|e| unsupported(error_chain(&e)))?;
        nat.set_ranges((args.port_range.start, args.port_range.end), nat_range)
            .map_err(|e| unsupported(error_chain(&e)))?;
        for iface in &ifaces {
            attach(&mut nat, iface).map_err(unsupported)?;
        }
        let accept_local = allow_local_sources(&ifaces);
        if !ip_forwarding() {
            warn!("net.ipv4.ip_forward is 0: frames the XDP program cannot redirect itself (no neighbour entry yet) are dropped by the kernel");
        }
        info!(ifaces = ?ifaces, data_range = %args.port_range, nat_ports = ?nat_range, "xdp NAT attached; it also guards the data range");
        Ok(Self {
            nat: Arc::new(Mutex::new(nat)),
            next_tag: AtomicU32::new(1),
            accept_local,
        })
    }
}

impl Drop for XdpBackend {
    fn drop(&mut self) {
        for (path, old) in &self.accept_local {
            let _ = std::fs::write(path, old);
        }
    }
}

/// A translated frame the program hands to the kernel carries this host's
/// own address as its source, which the kernel drops as a martian unless the
/// interface has accept_local (strict rp_filter drops it too). Sets
/// accept_local=1 where it is off and returns what to restore at exit.
fn allow_local_sources(ifaces: &[String]) -> Vec<(String, String)> {
    let mut changed = Vec::new();
    for iface in ifaces {
        let conf = format!("/proc/sys/net/ipv4/conf/{iface}");
        let read = |knob: &str| {
            std::fs::read_to_string(format!("{conf}/{knob}")).map(|v| v.trim().to_owned())
        };
        let all_rp = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
            .map(|v| v.trim().to_owned());
        // The kernel applies the larger of `all` and the interface's value.
        if read("rp_filter").is_ok_and(|v| v == "1") || all_rp.is_ok_and(|v| v == "1") {
            warn!(iface, "rp_filter is strict (1): frames the XDP program hands to the kernel are dropped there; loose (2) works");
        }
        let path = format!("{conf}/accept_local");
        match read("accept_local") {
            Ok(old) if old == "0" => match std::fs::write(&path, "1") {
                Ok(()) => changed.push((path, old)),
                Err(e) => {
                    warn!(iface, error = %e, "cannot set accept_local=1: frames without a neighbour entry yet will be dropped")
                }
            },
            Ok(_) => {}
            Err(e) => warn!(iface, error = %e, "cannot read accept_local"),
        }
    }
    if !changed.is_empty() {
        info!(set = ?changed.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), "accept_local=1 for frames the XDP program hands to the kernel (restored at exit)");
    }
    changed
}

fn attach(nat: &mut Nat, iface: &str) -> Result<(), String> {
    match nat.attach(iface, AttachMode::Driver) {
        Ok(()) => Ok(()),
        Err(driver) => {
            nat.attach(iface, AttachMode::Skb).map_err(|skb| {
                format!(
                    "cannot attach XDP to {iface}: {}; {}",
                    error_chain(&driver),
                    error_chain(&skb)
                )
            })?;
            warn!(
                iface,
                "no driver-mode XDP on this interface; using generic XDP (slower)"
            );
            Ok(())
        }
    }
}

fn lock(nat: &Mutex<Nat>) -> std::sync::MutexGuard<'_, Nat> {
    nat.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backend for XdpBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(
        &self,
        spec: SessionSpec,
        listeners: Vec<TcpListener>,
        targets: Vec<SocketAddr>,
    ) -> Result<Box<dyn Forwarder>, DataPlaneError> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<u16>>>()?;
        let services = services(&ports, &targets, tag)?;
        let fwd = XdpForwarder {
            nat: self.nat.clone(),
            uid: spec.uid,
            ports,
            tag,
            listeners: Mutex::new(listeners),
            released: Mutex::new(None),
        };
        {
            let mut nat = lock(&self.nat);
            for (port, service) in fwd.ports.iter().zip(services) {
                // On error `fwd` drops and removes what was added.
                nat.add_service(*port, service).map_err(ebpf_io)?;
            }
        }
        info!(uid = %fwd.uid, side = ?spec.side, ports = ?fwd.ports, ?targets, "xdp session translating");
        Ok(Box::new(fwd))
    }
}

/// One service per listener; index `i` of the targets, or the last one
/// when there are fewer targets than listeners (as the relay backends do).
fn services(
    ports: &[u16],
    targets: &[SocketAddr],
    tag: u32,
) -> Result<Vec<Service>, DataPlaneError> {
    ports
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let target = targets
                .get(i)
                .or(targets.last())
                .ok_or_else(|| unsupported("a session without targets"))?;
            service_for(*target, tag)
        })
        .collect()
}

fn service_for(target: SocketAddr, tag: u32) -> Result<Service, DataPlaneError> {
    let SocketAddr::V4(v4) = target else {
        return Err(unsupported(format!(
            "target {target} is IPv6; xdp translates IPv4 only (use splice or tls)"
        )));
    };
    let snat = source_towards(target)?;
    Ok(Service {
        target_addr: v4.ip().octets(),
        snat_addr: snat.octets(),
        target_port: v4.port(),
        _pad: 0,
        tag,
    })
}

/// The address this host sends from towards `target` (the route's source),
/// which also becomes the NAT source. Sends one empty datagram to the
/// discard port so the neighbour is resolved before the first SYN: the
/// program redirects only to known neighbours.
fn source_towards(target: SocketAddr) -> Result<Ipv4Addr, DataPlaneError> {
    let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    probe.connect(SocketAddr::new(target.ip(), 9))?;
    let _ = probe.send(&[]);
    match probe.local_addr()?.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => Ok(ip),
        other => Err(unsupported(format!(
            "no IPv4 source address towards {target} (got {other})"
        ))),
    }
}

fn ebpf_io(e: EbpfError) -> DataPlaneError {
    DataPlaneError::Io(std::io::Error::other(error_chain(&e)))
}

struct XdpForwarder {
    nat: Arc<Mutex<Nat>>,
    uid: String,
    ports: Vec<u16>,
    tag: u32,
    /// Kept bound so no other session or program takes the ports.
    listeners: Mutex<Vec<TcpListener>>,
    /// Final counters once released.
    released: Mutex<Option<SessionCounters>>,
}

impl XdpForwarder {
    fn counters(&self) -> SessionCounters {
        if let Some(last) = *self.released.lock().unwrap_or_else(|p| p.into_inner()) {
            return last;
        }
        let nat = lock(&self.nat);
        self.ports
            .iter()
            .filter_map(|p| nat.session_counters(*p).ok().flatten())
            .sum()
    }

    /// The program's rare events since start (host-wide, all sessions), for
    /// the logs: aya-log would cost per packet, counters do not.
    fn log_host_events(&self) {
        let nat = lock(&self.nat);
        let count = |e: Event| nat.events(e).map(|c| c.packets).unwrap_or(0);
        info!(
            not_allowed = count(Event::NotAllowed),
            malformed = count(Event::Malformed),
            fragments = count(Event::Fragment),
            ports_exhausted = count(Event::PortsExhausted),
            passed_to_stack = count(Event::PassedToStack),
            stale_flows = count(Event::StaleFlow),
            redirected = count(Event::Redirected),
            "xdp NAT frames since start"
        );
    }

    fn remove(&self) -> SessionCounters {
        let mut nat = lock(&self.nat);
        self.ports
            .iter()
            .filter_map(|&p| match nat.remove_service(p) {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(uid = %self.uid, port = p, error = %error_chain(&e), "cannot remove an xdp service");
                    None
                }
            })
            .sum()
    }
}

impl Forwarder for XdpForwarder {
    fn set_targets(&self, targets: Vec<SocketAddr>) {
        let services = match services(&self.ports, &targets, self.tag) {
            Ok(s) => s,
            Err(e) => {
                warn!(uid = %self.uid, error = %error_chain(&e), "xdp cannot retarget; new connections keep the old targets");
                return;
            }
        };
        let mut nat = lock(&self.nat);
        for (port, service) in self.ports.iter().zip(services) {
            if let Err(e) = nat.retarget(*port, service) {
                warn!(uid = %self.uid, port, error = %error_chain(&e), "xdp cannot retarget a listener");
            }
        }
    }

    fn stats(&self) -> StatsSnapshot {
        let c = self.counters();
        StatsSnapshot {
            bytes_forward: c.forward_bytes,
            bytes_backward: c.backward_bytes,
            connections_total: c.flows,
            ..StatsSnapshot::default()
        }
    }

    fn release(&self) -> futures::future::BoxFuture<'_, ()> {
        async move {
            let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
            if released.is_none() {
                let last = self.remove();
                self.log_host_events();
                info!(uid = %self.uid, forward_bytes = last.forward_bytes, backward_bytes = last.backward_bytes, flows = last.flows, "xdp session released; its flows are no longer translated");
                *released = Some(last);
                self.listeners.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
        .boxed()
    }
}

impl Drop for XdpForwarder {
    fn drop(&mut self) {
        if self.released.get_mut().map(|r| r.is_none()).unwrap_or(true) {
            self.remove();
        }
    }
}

/// The highest run of at least [`MIN_NAT_PORTS`] ports in 1024-65535 outside
/// the ephemeral and data ranges: above the ephemeral ports by default
/// (61000-65535 on Linux), where no service of this host listens.
fn nat_port_range(data: PortRange, ephemeral: Option<(u16, u16)>) -> Option<(u16, u16)> {
    let mut taken = vec![(data.start, data.end)];
    taken.extend(ephemeral);
    taken.sort_unstable();
    let mut gaps = Vec::new();
    let mut start: u32 = 1024;
    for (lo, hi) in taken {
        let (lo, hi) = (u32::from(lo), u32::from(hi));
        if lo > start {
            gaps.push((start, lo - 1));
        }
        start = start.max(hi + 1);
    }
    if start <= 65535 {
        gaps.push((start, 65535));
    }
    gaps.into_iter()
        .rev()
        .find(|(lo, hi)| hi - lo + 1 >= MIN_NAT_PORTS)
        .map(|(lo, hi)| (lo as u16, hi as u16))
}

fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

fn ip_forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    #[test]
    fn nat_ports_come_from_the_highest_free_run_outside_ephemeral_and_data_ports() {
        // Linux's default ephemeral range leaves 61000-65535.
        assert_eq!(
            nat_port_range(range(5100, 5200), Some((32768, 60999))),
            Some((61000, 65535))
        );
        // Data range at the top: the gap below the ephemeral ports is larger.
        assert_eq!(
            nat_port_range(range(61000, 65535), Some((32768, 60999))),
            Some((1024, 32767))
        );
        assert_eq!(nat_port_range(range(5100, 5200), None), Some((5201, 65535)));
    }

    #[test]
    fn no_nat_ports_when_everything_is_taken() {
        assert_eq!(
            nat_port_range(range(1024, 30000), Some((30001, 65535))),
            None
        );
    }

    #[test]
    fn enforce_rate_is_refused_before_anything_is_attached() {
        use clap::Parser;
        let args = ServerArgs::try_parse_from(["s2cs", "--type", "xdp", "--enforce_rate"]).unwrap();
        let err = XdpBackend::new(&args).err().expect("refused");
        assert!(err.to_string().contains("--enforce_rate"), "{err}");
    }

    #[test]
    fn ipv6_targets_are_refused_with_a_reason() {
        let err = service_for("[::1]:7000".parse().unwrap(), 1).unwrap_err();
        assert!(err.to_string().contains("IPv4 only"), "{err}");
    }
}
