//! `xdp` backend: the gateway is a NAT in the kernel, TCP is not terminated.
//! The eBPF NAT (`ebpf::Nat`) on every data interface rewrites each
//! session's flows (consumer -> listener becomes gateway -> target, replies
//! the other way) and sends them on, so one TCP connection runs end to end
//! from the consumer through both gateways to the producer. The session's
//! listeners stay bound only to keep their ports reserved; no byte reaches them.
//! Per interface (`--ebpf_attach`, default auto): XDP in driver mode on NICs,
//! tc on virtual interfaces (veth...), where XDP would strip GSO from the peer.
//!
//! What the host needs: root (BPF), IPv4 targets, and for packets the
//! program cannot send itself (no route, an XDP egress it is not attached to)
//! the kernel's forwarding: `net.ipv4.ip_forward=1`,
//! `accept_local=1` on the data interfaces (a translated frame carries this
//! host's address as its source; set here and restored at exit) and no strict
//! rp_filter. On XDP interfaces: a veth only takes XDP-redirected frames when
//! its peer has NAPI (GRO on, or an XDP program attached), and XDP sees a
//! CHECKSUM_PARTIAL packet's unfinished checksum (tc has neither limit).
//!
//! Flows end: the program frees a finished flow's source port for the next
//! SYN that draws it, and a sweeper here frees the entries of flows that
//! ended (FIN each way or a reset, then 2 s quiet; unanswered 30 s; idle
//! 2 h 4 min), so a session takes connections for its whole life.
//!
//! Restart without loss: the program's links and maps are pinned under
//! `/sys/fs/bpf/scistream/` (one directory per state directory), so flows
//! keep being translated while s2cs is down. The next start adopts them when
//! the state directory holds xdp sessions to restore (a restored session gets
//! back the tag its adopted services carry, so they find their flows again;
//! new sessions get a tag no live one holds), and removes them otherwise. A clean exit detaches and unpins everything, unless
//! `--keep_sessions`, which leaves the program guarding the data range.
//!
//! `--enforce_rate`: each session's TCP payload is policed per direction at
//! its `rate` by a token bucket in the program (see `RateBucket`).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use scistream_common::nat::{Event, RateBucket, Service, SessionCounters};
use tracing::{info, warn};

mod adopt;
mod sysctl;
mod upkeep;

use adopt::{adopt, pin_dir, stored_sessions, sweep_unclaimed_after, Tags};
use sysctl::allow_local_sources;
use upkeep::{sweep_ended_flows, OpenFlows};

use super::{
    Backend, DataPlaneError, Forwarder, HostMetrics, SessionSpec, StatsSnapshot, StoredForwarding,
};
use crate::config::{PortRange, ServerArgs};
use crate::ebpf::{ensure_bpffs, EbpfError, Nat};
use crate::{error_chain, host, lock};

const NAME: &str = "xdp";

/// Source ports come from a run of free ports outside the ephemeral and data
/// ranges; one shorter than this is refused.
const MIN_NAT_PORTS: u32 = 1024;

/// Where bpffs is (mounted there if missing).
const BPFFS: &str = "/sys/fs/bpf";
/// Overrides [`BPFFS`]: for an s2cs run in its own mount namespace (`ip
/// netns exec` mounts a fresh /sys, whose bpffs would die with the process),
/// name a bpffs mounted in the host's namespace before it started.
const BPFFS_VAR: &str = "SCISTREAM_BPFFS";

fn bpffs() -> PathBuf {
    std::env::var_os(BPFFS_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BPFFS))
}

/// A flow neither closed nor seen for this long no longer counts as an open
/// connection (the program cannot know whether its ends still exist).
const OPEN_IDLE_S: u32 = 120;

/// How long restored sessions have to claim the services adopted for them;
/// restore runs right after start, before the control port opens.
const ADOPTION_GRACE: Duration = Duration::from_secs(10);

/// How often the sweeper frees the entries of ended flows.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct XdpBackend {
    nat: Arc<Mutex<Nat>>,
    open: Arc<OpenFlows>,
    /// Adopted services whose session has not come back yet.
    unclaimed: Arc<Mutex<HashSet<u16>>>,
    /// Session tags: adopted ones by uid, and the allocator of new ones.
    tags: Arc<Mutex<Tags>>,
    enforce_rate: bool,
    /// --keep_sessions: the pins stay at a clean exit.
    keep_pins: bool,
    /// sysctl files changed at start, with their old values.
    accept_local: Vec<(String, String)>,
    /// Where those are saved while s2cs runs (a killed s2cs cannot restore them).
    accept_local_saved: PathBuf,
}

/// In the state directory: the accept_local values to restore at exit.
const ACCEPT_LOCAL_FILE: &str = "xdp-accept-local";

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
    pub fn new(args: &ServerArgs, stored: &[StoredForwarding]) -> Result<Self, DataPlaneError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(unsupported(
                "needs root (CAP_BPF and CAP_NET_ADMIN) to attach its XDP program",
            ));
        }
        let nat_range = nat_port_range(args.port_range, host::ephemeral_ports()).ok_or_else(|| {
            unsupported(format!(
                "no {MIN_NAT_PORTS} source ports left outside --port_range {} and the ephemeral ports",
                args.port_range
            ))
        })?;
        let ifaces = match &args.data_iface {
            Some(list) => list.clone(),
            None => host::interfaces_of(IpAddr::V4(Ipv4Addr::UNSPECIFIED)).map_err(unsupported)?,
        };
        let state_dir = args.state_dir();
        let stored = stored_sessions(stored);
        let dir = pin_dir(&state_dir);
        let ebpf = |e: EbpfError| unsupported(error_chain(&e));
        ensure_bpffs(&bpffs()).map_err(ebpf)?;
        if stored.is_empty() && Nat::has_pins(&dir) {
            Nat::remove_pins(&dir).map_err(ebpf)?;
            info!(pins = %dir.display(), "removed the xdp NAT pinned by an earlier run: no xdp session to restore");
        }
        let mut nat = Nat::load_pinned(&dir).map_err(ebpf)?;
        let mut unclaimed = HashSet::new();
        let mut tags = Tags::new();
        if nat.adopted() {
            (unclaimed, tags.adopted) = adopt(&mut nat, &stored).map_err(ebpf)?;
        }
        nat.set_ranges((args.port_range.start, args.port_range.end), nat_range)
            .map_err(ebpf)?;
        for iface in &ifaces {
            nat.attach_with(iface, args.ebpf_attach).map_err(|e| {
                unsupported(format!(
                    "cannot attach the NAT to {iface}: {}",
                    error_chain(&e)
                ))
            })?;
        }
        let hooks = hooks_text(&nat);
        let gone = nat.unpin_other_links().map_err(ebpf)?;
        if !gone.is_empty() {
            info!(ifaces = ?gone, "detached the xdp NAT from interfaces no longer in use");
        }
        let saved = state_dir.join(ACCEPT_LOCAL_FILE);
        let accept_local = allow_local_sources(&ifaces, &saved);
        if !host::ip_forwarding() {
            warn!("net.ipv4.ip_forward is 0: frames the XDP program cannot redirect itself (no neighbour entry yet) are dropped by the kernel");
        }
        info!(ifaces = ?ifaces, %hooks, policy = ?args.ebpf_attach, data_range = %args.port_range, nat_ports = ?nat_range, pins = %dir.display(), "xdp NAT attached; it also guards the data range");
        let nat = Arc::new(Mutex::new(nat));
        let unclaimed = Arc::new(Mutex::new(unclaimed));
        sweep_unclaimed_after(ADOPTION_GRACE, Arc::downgrade(&nat), unclaimed.clone());
        sweep_ended_flows(SWEEP_EVERY, Arc::downgrade(&nat));
        Ok(Self {
            nat,
            open: Arc::default(),
            unclaimed,
            tags: Arc::new(Mutex::new(tags)),
            enforce_rate: args.enforce_rate,
            keep_pins: args.keep_sessions,
            accept_local,
            accept_local_saved: saved,
        })
    }
}

impl Drop for XdpBackend {
    fn drop(&mut self) {
        for (path, old) in &self.accept_local {
            let _ = std::fs::write(path, old);
        }
        let _ = std::fs::remove_file(&self.accept_local_saved);
        let mut nat = lock(&self.nat);
        let dir = nat
            .pin_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        if self.keep_pins {
            info!(pins = %dir, "--keep_sessions: the xdp NAT stays attached and pinned (guarding the data range); the next start takes it over");
        } else {
            match nat.unpin() {
                Ok(()) => info!(pins = %dir, "xdp NAT detached and unpinned"),
                Err(e) => {
                    warn!(pins = %dir, error = %error_chain(&e), "cannot remove the xdp NAT's pins")
                }
            }
        }
    }
}

/// `iface:hook` for every interface the NAT holds, for the logs.
fn hooks_text(nat: &Nat) -> String {
    nat.hooks()
        .map(|(i, h)| format!("{i}:{h}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Bucket depth for `rate_kbps`: 250 ms at the rate, at least 64 KiB. TCP
/// over a policer recovers from a burst of drops by a retransmission
/// timeout (200 ms at least on Linux), and on a short path its smallest
/// window already outruns most rates, so it keeps meeting an empty bucket:
/// a bucket that refills for longer than that timeout lets the stalled
/// sender catch up. Measured on the test path at 80 Mbit/s: 10 ms gave
/// 4.6 Mbit/s, 100 ms 44 Mbit/s (see the README).
pub fn bucket_depth(rate_kbps: u64) -> u64 {
    (rate_kbps.saturating_mul(125) / 4).max(64 * 1024)
}

impl Backend for XdpBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn host_metrics(&self) -> Option<HostMetrics> {
        let nat = lock(&self.nat);
        Some(HostMetrics {
            hooks: nat.hooks().map(|(i, h)| (i.to_owned(), h)).collect(),
            drops: Event::ALL
                .into_iter()
                .filter(|e| e.is_drop())
                .map(|e| (e.name(), nat.events(e).unwrap_or_default()))
                .collect(),
        })
    }

    fn start(
        &self,
        spec: SessionSpec,
        listeners: Vec<TcpListener>,
        targets: Vec<SocketAddr>,
    ) -> Result<Box<dyn Forwarder>, DataPlaneError> {
        let tag = crate::lock(&self.tags).take(&spec.uid);
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<u16>>>()?;
        let policed = self.enforce_rate && spec.rate_kbps > 0;
        let flags = if policed { Service::POLICED } else { 0 };
        let services = match services(&ports, &targets, tag, flags) {
            Ok(s) => s,
            Err(e) => {
                crate::lock(&self.tags).release(tag);
                return Err(e);
            }
        };
        let fwd = XdpForwarder {
            nat: self.nat.clone(),
            tags: self.tags.clone(),
            open: self.open.clone(),
            uid: spec.uid,
            ports,
            tag,
            flags,
            listeners: Mutex::new(listeners),
            released: Mutex::new(None),
        };
        {
            let mut nat = lock(&self.nat);
            if policed {
                let bucket = RateBucket::new(spec.rate_kbps, bucket_depth(spec.rate_kbps));
                nat.set_bucket(tag, bucket).map_err(ebpf_io)?;
            }
            let mut unclaimed = crate::lock(&self.unclaimed);
            for (port, service) in fwd.ports.iter().zip(services) {
                // On error `fwd` drops and removes what was added.
                nat.add_service(*port, service).map_err(ebpf_io)?;
                unclaimed.remove(port);
            }
        }
        let rate_kbps = if policed { spec.rate_kbps } else { 0 };
        info!(uid = %fwd.uid, side = ?spec.side, ports = ?fwd.ports, ?targets, policed_kbps = rate_kbps, "xdp session translating");
        Ok(Box::new(fwd))
    }
}

/// One service per listener; index `i` of the targets, or the last one
/// when there are fewer targets than listeners (as the relay backends do).
fn services(
    ports: &[u16],
    targets: &[SocketAddr],
    tag: u32,
    flags: u16,
) -> Result<Vec<Service>, DataPlaneError> {
    ports
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let target = targets
                .get(i)
                .or(targets.last())
                .ok_or_else(|| unsupported("a session without targets"))?;
            service_for(*target, tag).map(|s| Service { flags, ..s })
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
        flags: 0,
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
    tags: Arc<Mutex<Tags>>,
    open: Arc<OpenFlows>,
    uid: String,
    ports: Vec<u16>,
    tag: u32,
    flags: u16,
    /// Kept bound so no other session or program takes the ports.
    listeners: Mutex<Vec<TcpListener>>,
    /// Final counters once released.
    released: Mutex<Option<SessionCounters>>,
}

impl XdpForwarder {
    fn counters(&self) -> SessionCounters {
        if let Some(last) = *crate::lock(&self.released) {
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
            over_rate = count(Event::OverRate),
            "xdp NAT frames since the program was loaded"
        );
    }

    fn remove(&self) -> SessionCounters {
        crate::lock(&self.tags).release(self.tag);
        let mut nat = lock(&self.nat);
        if let Err(e) = nat.remove_bucket(self.tag) {
            warn!(uid = %self.uid, error = %error_chain(&e), "cannot remove an xdp rate bucket");
        }
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
        let services = match services(&self.ports, &targets, self.tag, self.flags) {
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
        let released = crate::lock(&self.released).is_some();
        StatsSnapshot {
            bytes_forward: c.forward_bytes,
            bytes_backward: c.backward_bytes,
            connections_total: c.flows,
            connections_active: if released {
                0
            } else {
                self.open.of(&self.nat, &self.ports)
            },
            ..StatsSnapshot::default()
        }
    }

    fn release(&self) -> futures::future::BoxFuture<'_, ()> {
        async move {
            let mut released = crate::lock(&self.released);
            if released.is_none() {
                let last = self.remove();
                self.log_host_events();
                info!(uid = %self.uid, forward_bytes = last.forward_bytes, backward_bytes = last.backward_bytes, flows = last.flows, over_rate_packets = last.over_rate_packets, "xdp session released; its flows are no longer translated");
                *released = Some(last);
                crate::lock(&self.listeners).clear();
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

#[cfg(test)]
mod tests;
