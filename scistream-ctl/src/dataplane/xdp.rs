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

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;
use scistream_common::guard::Counters;
use scistream_common::nat::{Event, RateBucket, Service, SessionCounters, LAYOUT_VERSION};
use tracing::{info, warn};

use super::{Backend, DataPlaneError, Forwarder, SessionSpec, StatsSnapshot};
use crate::config::{PortRange, ServerArgs};
use crate::ebpf::{ensure_bpffs, EbpfError, Hook, Nat};
use crate::error_chain;

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

/// The NAT of the running backend, for the host-wide metrics.
static METRICS_NAT: Mutex<Weak<Mutex<Nat>>> = Mutex::new(Weak::new());

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
    pub fn new(args: &ServerArgs) -> Result<Self, DataPlaneError> {
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
        let state_dir = args.state_dir();
        // Before the pin directory's name: it opens (creates) the state dir.
        let stored = stored_sessions(&state_dir);
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
        if !ip_forwarding() {
            warn!("net.ipv4.ip_forward is 0: frames the XDP program cannot redirect itself (no neighbour entry yet) are dropped by the kernel");
        }
        info!(ifaces = ?ifaces, %hooks, policy = ?args.ebpf_attach, data_range = %args.port_range, nat_ports = ?nat_range, pins = %dir.display(), "xdp NAT attached; it also guards the data range");
        let nat = Arc::new(Mutex::new(nat));
        *METRICS_NAT.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&nat);
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

/// The pin directory of the state directory `state_dir`: two s2cs on one
/// host never adopt each other's NAT, and a program of another map layout
/// is never adopted.
fn pin_dir(state_dir: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let hash = fnv1a(canonical.as_os_str().as_bytes());
    bpffs()
        .join("scistream")
        .join(format!("nat-v{LAYOUT_VERSION}-{hash:016x}"))
}

/// FNV-1a, 64 bits: stable across builds and runs, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Session tags. A tag tells a session's flows from those of an earlier
/// holder of the same port, and keys its rate bucket, so two live sessions
/// never share one: new ones come from a counter (random start, so a restart
/// does not replay the last run's) skipping the tags in use.
struct Tags {
    next: u32,
    live: HashSet<u32>,
    /// Tags of adopted services, by the uid of the stored session.
    adopted: HashMap<String, u32>,
}

impl Tags {
    fn new() -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
            .unwrap_or(1);
        Self {
            next: start,
            live: HashSet::new(),
            adopted: HashMap::new(),
        }
    }

    /// The tag of session `uid`: its adopted one, else a fresh one.
    fn take(&mut self, uid: &str) -> u32 {
        if let Some(tag) = self.adopted.remove(uid) {
            self.live.insert(tag);
            return tag;
        }
        let in_use = |t: &u32| self.live.contains(t) || self.adopted.values().any(|a| a == t);
        loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && !in_use(&self.next) {
                self.live.insert(self.next);
                return self.next;
            }
        }
    }

    fn release(&mut self, tag: u32) {
        self.live.remove(&tag);
    }
}

/// The xdp sessions with targets stored in `state_dir`: their uids by
/// listener port. The store is closed again before the server opens it.
fn stored_sessions(state_dir: &Path) -> HashMap<u16, String> {
    let records = crate::control::store::Store::open(state_dir).and_then(|s| s.load_raw());
    let records = match records {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read the stored sessions; the xdp NAT starts afresh");
            return HashMap::new();
        }
    };
    records
        .into_iter()
        .filter_map(|(_, r)| r)
        .filter(|r| r.backend == NAME && !r.targets.is_empty())
        .flat_map(|r| {
            let uid = r.uid;
            r.listeners
                .into_iter()
                .map(move |l| (l.port(), uid.clone()))
        })
        .collect()
}

/// Keeps the adopted services of stored sessions (`stored`: port -> uid;
/// every port of one session must carry one tag) and removes the others with
/// their flows; returns the kept ports, which the restored sessions are
/// expected to claim, and the tag of each uid.
fn adopt(
    nat: &mut Nat,
    stored: &HashMap<u16, String>,
) -> Result<(HashSet<u16>, HashMap<String, u32>), EbpfError> {
    let services = nat.services()?;
    let mut tag_of: HashMap<String, Option<u32>> = HashMap::new();
    for (port, service) in &services {
        if let Some(uid) = stored.get(port) {
            let seen = tag_of.entry(uid.clone()).or_insert(Some(service.tag));
            if *seen != Some(service.tag) {
                *seen = None;
            }
        }
    }
    let tags: HashMap<String, u32> = tag_of
        .into_iter()
        .filter_map(|(u, t)| Some((u, t?)))
        .collect();
    let mut kept = HashSet::new();
    let mut dropped = Vec::new();
    for (port, service) in services {
        let same = stored.get(&port).and_then(|uid| tags.get(uid)) == Some(&service.tag);
        if same {
            kept.insert(port);
        } else {
            nat.remove_service(port)?;
            dropped.push(port);
        }
    }
    let live: HashSet<u32> = tags.values().copied().collect();
    for tag in nat.bucket_tags()? {
        if !live.contains(&tag) {
            nat.remove_bucket(tag)?;
        }
    }
    info!(kept_ports = ?kept, dropped_ports = ?dropped, "adopted the pinned xdp NAT of an earlier run: its flows keep being translated");
    Ok((kept, tags))
}

/// Frees, every `every`, the entries of flows that ended, until the NAT goes.
fn sweep_ended_flows(every: Duration, nat: Weak<Mutex<Nat>>) {
    let spawned = std::thread::Builder::new()
        .name("xdp-flow-sweep".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(nat) = nat.upgrade() else { return };
            let swept = lock(&nat).sweep_ended(uptime_s());
            if let Err(e) = swept {
                warn!(error = %error_chain(&e), "cannot sweep the xdp NAT's ended flows");
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the sweeper of ended xdp flows: finished flows keep their entries until a SYN reuses their port");
    }
}

/// `iface:hook` for every interface the NAT holds, for the logs.
fn hooks_text(nat: &Nat) -> String {
    nat.hooks()
        .map(|(i, h)| format!("{i}:{h}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the running NAT is attached, for `/metrics`; `None` when no xdp
/// backend runs in this process.
pub fn nat_hooks() -> Option<Vec<(String, Hook)>> {
    let nat = METRICS_NAT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .upgrade()?;
    let nat = lock(&nat);
    Some(nat.hooks().map(|(i, h)| (i.to_owned(), h)).collect())
}

/// Removes, after `grace`, the adopted services no restored session claimed
/// (a stored session that failed to come back): nothing may keep
/// forwarding for a session that no longer exists.
fn sweep_unclaimed_after(
    grace: Duration,
    nat: Weak<Mutex<Nat>>,
    unclaimed: Arc<Mutex<HashSet<u16>>>,
) {
    if unclaimed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
    {
        return;
    }
    let spawned = std::thread::Builder::new().name("xdp-adoption".into()).spawn(move || {
        std::thread::sleep(grace);
        let Some(nat) = nat.upgrade() else { return };
        let ports: Vec<u16> = unclaimed.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        let mut nat = lock(&nat);
        for port in ports {
            match nat.remove_service(port) {
                Ok(_) => warn!(port, "adopted xdp service not claimed by a restored session; removed with its flows"),
                Err(e) => warn!(port, error = %error_chain(&e), "cannot remove an unclaimed xdp service"),
            }
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the sweep of unclaimed xdp services");
    }
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

/// Open connections per listener port, read from the flow map at most once
/// a second (one pass over the map serves every session's stats).
#[derive(Default)]
struct OpenFlows {
    cache: Mutex<Option<(Instant, HashMap<u16, u64>)>>,
}

impl OpenFlows {
    fn of(&self, nat: &Mutex<Nat>, ports: &[u16]) -> u64 {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cache
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
        if !fresh {
            let now_s = uptime_s();
            let counted = lock(nat).open_connections(now_s, OPEN_IDLE_S);
            *cache = Some((Instant::now(), counted.unwrap_or_default()));
        }
        let by_port = cache.as_ref().map(|(_, m)| m);
        ports
            .iter()
            .filter_map(|p| by_port.and_then(|m| m.get(p)))
            .sum()
    }
}

/// Seconds since boot, the clock of the program's `seen_s` (CLOCK_BOOTTIME).
fn uptime_s() -> u32 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split('.').next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// The host-wide drop counters of the running xdp NAT, by event, for the
/// metrics endpoint; `None` when no xdp backend runs in this process.
pub fn nat_drops() -> Option<Vec<(&'static str, Counters)>> {
    let nat = METRICS_NAT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .upgrade()?;
    let nat = lock(&nat);
    Some(
        Event::ALL
            .into_iter()
            .filter(|e| e.is_drop())
            .map(|e| (e.name(), nat.events(e).unwrap_or_default()))
            .collect(),
    )
}

/// A translated frame the program hands to the kernel carries this host's
/// own address as its source, which the kernel drops as a martian unless the
/// interface has accept_local (strict rp_filter drops it too). Sets
/// accept_local=1 where it is off and returns what to restore at exit, also
/// saved in `saved`: values a killed run set are restored to what they were
/// before it, not to its 1.
fn allow_local_sources(ifaces: &[String], saved: &Path) -> Vec<(String, String)> {
    let earlier: HashMap<String, String> = std::fs::read_to_string(saved)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(p, v)| (p.to_owned(), v.to_owned())))
        .collect();
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
        if let Some(old) = earlier.get(&path) {
            changed.push((path, old.clone()));
            continue;
        }
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
    let record: String = changed.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
    if let Err(e) = std::fs::write(saved, record) {
        warn!(file = %saved.display(), error = %e, "cannot save the accept_local values to restore");
    }
    if !changed.is_empty() {
        info!(set = ?changed.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), "accept_local=1 for frames the XDP program hands to the kernel (restored at exit)");
    }
    changed
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
        let tag = self
            .tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&spec.uid);
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<u16>>>()?;
        let policed = self.enforce_rate && spec.rate_kbps > 0;
        let flags = if policed { Service::POLICED } else { 0 };
        let services = match services(&ports, &targets, tag, flags) {
            Ok(s) => s,
            Err(e) => {
                self.tags
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(tag);
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
            let mut unclaimed = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
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
            over_rate = count(Event::OverRate),
            "xdp NAT frames since the program was loaded"
        );
    }

    fn remove(&self) -> SessionCounters {
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(self.tag);
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
        let released = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
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
            let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
            if released.is_none() {
                let last = self.remove();
                self.log_host_events();
                info!(uid = %self.uid, forward_bytes = last.forward_bytes, backward_bytes = last.backward_bytes, flows = last.flows, over_rate_packets = last.over_rate_packets, "xdp session released; its flows are no longer translated");
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
    fn bucket_holds_250_ms_at_the_rate_and_never_less_than_64_kib() {
        assert_eq!(bucket_depth(80_000), 2_500_000);
        assert_eq!(bucket_depth(1_000), 64 * 1024);
        assert_eq!(bucket_depth(10_000_000), 312_500_000);
    }

    #[test]
    fn session_tags_are_allocated_unique_among_live_sessions_and_adopted_ones_come_back() {
        let mut tags = Tags::new();
        tags.next = u32::MAX - 1;
        tags.adopted.insert("restored".into(), 7);
        let a = tags.take("a");
        let b = tags.take("b");
        assert_eq!(a, u32::MAX);
        assert_eq!(b, 1, "0 is never a tag");
        assert_eq!(tags.take("restored"), 7, "an adopted session keeps its tag");
        // Wrapped round to a tag still live: skipped.
        tags.next = 0;
        assert_eq!(tags.take("c"), 2);
        tags.release(1);
        tags.next = 0;
        assert_eq!(tags.take("d"), 1, "a released tag may be handed out again");
        tags.next = 6;
        assert_eq!(tags.take("e"), 8, "a live adopted tag is skipped");
    }

    #[test]
    fn pin_directories_differ_per_state_directory_and_name_the_layout() {
        let a = pin_dir(Path::new("/nonexistent/a"));
        let b = pin_dir(Path::new("/nonexistent/b"));
        assert_ne!(a, b);
        assert!(a.starts_with(bpffs().join("scistream")), "{}", a.display());
        assert!(a
            .to_string_lossy()
            .contains(&format!("nat-v{LAYOUT_VERSION}-")));
    }

    #[test]
    fn ipv6_targets_are_refused_with_a_reason() {
        let err = service_for("[::1]:7000".parse().unwrap(), 1).unwrap_err();
        assert!(err.to_string().contains("IPv4 only"), "{err}");
    }
}
