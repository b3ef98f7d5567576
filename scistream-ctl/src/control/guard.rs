//! The guard as the session registry sees it: a port is let through when
//! a session reserves it and dropped again when the session goes. Set-up
//! (which interfaces, which hook on each, whether the host can) happens once
//! at start; a host that cannot run the guard gets a one-line warning naming
//! the interface and the reason, and runs unguarded.
//! A session may name the peers it accepts (`Request.allowed_peers`); frames
//! to its ports from anyone else are dropped and counted on that session.

use crate::error_chain;
use crate::host::{ephemeral_ports, interfaces_of};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use tracing::{info, warn};

use super::error::ControlError;
use crate::config::{BackendKind, ServerArgs};
use crate::ebpf::{Counters, Guard, Hook, PeerNet};
use scistream_common::guard::{MAX_ALLOWED_PORTS, MAX_PEER_NETS};

/// Networks one session may name; keeps one caller from filling the
/// host-wide peer map.
pub const MAX_PEERS_PER_SESSION: usize = 64;

/// In the state directory: each live peer-restricted session's networks, so
/// a session restored after a restart (kill -9 included) keeps its restriction.
const PEERS_FILE: &str = "guard-peers.json";

/// The running guard of one `s2cs`.
pub struct PortGuard {
    state: Mutex<State>,
    /// Each data interface with the hook the guard runs at there.
    hooks: Vec<(String, Hook)>,
    next_tag: AtomicU32,
    peers_file: PathBuf,
    /// `--keep_sessions`: a clean exit keeps the sessions, so their peers too.
    keep_sessions: bool,
}

struct State {
    guard: Guard,
    /// Live sessions by uid.
    sessions: HashMap<String, Allowed>,
    /// Peers named by a `req` whose session is not allowed yet.
    pending_peers: HashMap<String, Vec<PeerNet>>,
    /// Peers of the sessions of the previous run, for the sessions the
    /// registry restores; dropped once requests are served (restoring is over).
    restored_peers: HashMap<String, Vec<PeerNet>>,
}

/// What the guard holds for one session.
struct Allowed {
    tag: u32,
    ports: Vec<u16>,
    /// Empty: any source.
    peers: Vec<PeerNet>,
}

impl State {
    fn peer_nets_in_use(&self) -> usize {
        self.sessions.values().map(|s| s.peers.len()).sum::<usize>()
            + self.pending_peers.values().map(Vec::len).sum::<usize>()
    }
}

impl PortGuard {
    /// Loads and attaches the guard as `args` ask, or says in one warning why
    /// it does not run (then `None`).
    pub fn start(args: &ServerArgs) -> Option<Self> {
        if !args.guard {
            info!("guard off (--guard false)");
            return None;
        }
        if args.backend == BackendKind::Xdp {
            // An interface holds one XDP program: the xdp backend's NAT guards the range itself.
            info!("XDP guard not attached: the xdp backend's program guards the data range");
            return None;
        }
        match Self::try_start(args) {
            Ok(g) => {
                let at = hooks_text(&g.hooks);
                info!(attach = %at, policy = ?args.ebpf_attach, range = %args.port_range, "guard attached ({at}): only live sessions' ports in the data range get through");
                Some(g)
            }
            Err(reason) => {
                warn!("guard not running, data ports are unguarded: {reason}");
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
            return Err(format!(
                "--port_range {range} has more than {MAX_ALLOWED_PORTS} ports"
            ));
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
        guard
            .set_port_range(range.start, range.end)
            .map_err(|e| error_chain(&e))?;
        for iface in &ifaces {
            // Generic XDP is never tried: it copies every non-linear packet.
            let attached = guard
                .attach(iface, args.ebpf_attach)
                .map_err(|e| format!("on {iface}: {}", error_chain(&e)))?;
            if let Some(refused) = attached.xdp_refused {
                warn!(iface, hook = %attached.hook, "guard on {iface} at tc: XDP in driver mode was refused ({refused})");
            }
        }
        let hooks = guard.attached();
        let peers_file = args.state_dir().join(PEERS_FILE);
        let restored_peers = load_peers(&peers_file);
        let state = State {
            guard,
            sessions: HashMap::new(),
            pending_peers: HashMap::new(),
            restored_peers,
        };
        Ok(Self {
            state: Mutex::new(state),
            hooks,
            next_tag: AtomicU32::new(1),
            peers_file,
            keep_sessions: args.keep_sessions,
        })
    }

    /// Writes the live sessions' peers (replacing the file whole, so a crash
    /// leaves the old or the new list, never half of one).
    fn save_peers(&self, state: &State) {
        let live: BTreeMap<&str, Vec<String>> = state
            .sessions
            .iter()
            .filter(|(_, s)| !s.peers.is_empty())
            .map(|(uid, s)| {
                (
                    uid.as_str(),
                    s.peers.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        // Its keys are uids, which key some sessions' tunnels: 0600.
        let written = serde_json::to_vec_pretty(&live)
            .map_err(std::io::Error::other)
            .and_then(|text| crate::state_dir::write_private(&self.peers_file, &text));
        if let Err(e) = written {
            warn!(file = %self.peers_file.display(), error = %e, "cannot store the sessions' allowed peers; after a restart they would accept any source");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// Records the peers the session `uid` will accept, before its `req`
    /// reserves ports; [`allow`](Self::allow) applies them. An empty list
    /// forgets what was recorded (a `req` that failed).
    pub fn expect_peers(&self, uid: &str, peers: Vec<PeerNet>) -> Result<(), ControlError> {
        let mut state = self.lock();
        // Requests are served only once the stored sessions are back.
        state.restored_peers.clear();
        state.pending_peers.remove(uid);
        if peers.is_empty() {
            return Ok(());
        }
        if state.peer_nets_in_use() + peers.len() > MAX_PEER_NETS as usize {
            return Err(ControlError::FailedPrecondition(format!(
                "the guard holds its maximum of {MAX_PEER_NETS} peer networks; release sessions or name fewer peers"
            )));
        }
        state.pending_peers.insert(uid.to_owned(), peers);
        Ok(())
    }

    /// Lets a new session's ports through: from any source, or only from
    /// the peers [`expect_peers`](Self::expect_peers) recorded for it.
    pub fn allow(&self, uid: &str, ports: &[u16]) {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        let peers = match state.pending_peers.remove(uid) {
            Some(peers) => peers,
            None => state.restored_peers.remove(uid).unwrap_or_default(),
        };
        let restricted = !peers.is_empty();
        let State {
            guard, sessions, ..
        } = &mut *state;
        // Peers before ports: a restricted port never passes a source early.
        let mut failed = peers
            .iter()
            .find_map(|net| guard.allow_peer(tag, net).err());
        for &port in ports {
            if failed.is_some() {
                break;
            }
            let allowed = if peers.is_empty() {
                guard.allow_port(port, tag)
            } else {
                guard.allow_port_from_peers(port, tag)
            };
            failed = allowed.err();
        }
        if let Some(e) = failed {
            // The session must stay reachable: rather open the range than
            // drop a live session's traffic.
            warn!(?ports, error = %error_chain(&e), "cannot allow a session in the guard; guard disabled");
            let _ = guard.set_port_range(0, 0);
        }
        if !peers.is_empty() {
            info!(?ports, peers = ?peers.iter().map(ToString::to_string).collect::<Vec<_>>(), "guard: session ports accept these peers only");
        }
        sessions.insert(
            uid.to_owned(),
            Allowed {
                tag,
                ports: ports.to_vec(),
                peers,
            },
        );
        // A release does not rewrite the file (a --keep_sessions exit releases
        // every session and must keep them); its entry goes at the next write,
        // and the registry never restores a released session anyway.
        if restricted {
            self.save_peers(&state);
        }
    }

    /// Drops a released session's ports again; returns what passed to them.
    pub fn deny(&self, ports: &[u16]) -> Counters {
        let mut state = self.lock();
        let State {
            guard, sessions, ..
        } = &mut *state;
        let uid = sessions
            .iter()
            .find(|(_, s)| s.ports.iter().any(|p| ports.contains(p)))
            .map(|(uid, _)| uid.clone());
        if let Some(session) = uid.and_then(|uid| sessions.remove(&uid).map(|s| (uid, s))) {
            let (_, s) = session;
            let dropped: Counters = s
                .ports
                .iter()
                .filter_map(|&p| guard.port_counters(p).ok().flatten())
                .map(|c| c.dropped)
                .sum();
            if !s.peers.is_empty() {
                info!(ports = ?s.ports, peer_dropped_packets = dropped.packets, peer_dropped_bytes = dropped.bytes, "guard: frames from peers the session did not allow");
            }
            // Ports before peers: no frame meets a restricted port whose peer
            // list is already gone.
            let passed = ports.iter().filter_map(|&p| guard.deny_port(p).ok()).sum();
            for net in &s.peers {
                let _ = guard.deny_peer(s.tag, net);
            }
            return passed;
        }
        ports.iter().filter_map(|&p| guard.deny_port(p).ok()).sum()
    }

    /// Traffic passed to these ports so far.
    pub fn passed(&self, ports: &[u16]) -> Counters {
        let state = self.lock();
        ports
            .iter()
            .filter_map(|&p| state.guard.port_stats(p).ok().flatten())
            .sum()
    }

    /// Frames dropped at the session's ports because their source is not
    /// among its peers (zero for a session that accepts any source); `None`
    /// for a session the guard does not know.
    pub fn session_dropped(&self, uid: &str) -> Option<Counters> {
        let state = self.lock();
        let s = state.sessions.get(uid)?;
        Some(
            s.ports
                .iter()
                .filter_map(|&p| state.guard.port_counters(p).ok().flatten())
                .map(|c| c.dropped)
                .sum(),
        )
    }

    /// Everything dropped on the data range since start: port scans,
    /// malformed frames and the sessions' own peer drops.
    pub fn dropped(&self) -> Counters {
        self.lock().guard.dropped().unwrap_or_default()
    }

    /// Each data interface with the hook the guard runs at there.
    pub fn hooks(&self) -> &[(String, Hook)] {
        &self.hooks
    }

    /// Detaches from every interface (dropping the guard would too; this
    /// does it now, even while other tasks still hold the registry).
    pub fn detach(&self) {
        let mut state = self.lock();
        for (iface, _) in &self.hooks {
            let _ = state.guard.detach(iface);
        }
        let dropped = state.guard.dropped().unwrap_or_default();
        info!(attach = %hooks_text(&self.hooks), dropped_packets = dropped.packets, dropped_bytes = dropped.bytes, "guard detached");
        if !self.keep_sessions {
            // Every session is gone and forgotten: so are their peers.
            let _ = std::fs::remove_file(&self.peers_file);
        }
    }
}

/// `eth0: xdp, veth1: tc`, for logs.
fn hooks_text(hooks: &[(String, Hook)]) -> String {
    hooks
        .iter()
        .map(|(iface, hook)| format!("{iface}: {hook}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The peers a previous run stored; a missing file is no peers, an unreadable
/// one is logged (its sessions then accept any source).
fn load_peers(path: &Path) -> HashMap<String, Vec<PeerNet>> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the stored allowed peers; restored sessions accept any source");
            return HashMap::new();
        }
    };
    let stored: HashMap<String, Vec<String>> = match serde_json::from_slice(&text) {
        Ok(stored) => stored,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "stored allowed peers are not valid; restored sessions accept any source");
            return HashMap::new();
        }
    };
    stored
        .into_iter()
        .map(|(uid, nets)| {
            let nets = nets
                .iter()
                .filter_map(|n| {
                    n.parse()
                        .map_err(|e| warn!(error = %e, "stored peer skipped"))
                        .ok()
                })
                .collect();
            (uid, nets)
        })
        .collect()
}

/// `Request.allowed_peers` checked and handed to the guard ahead of the
/// session's `req`. Peers need the guard: without it they would be silently
/// ignored, so the request is refused instead.
pub fn expect_peers(
    guard: Option<&PortGuard>,
    uid: &str,
    peers: &[String],
) -> Result<(), ControlError> {
    let Some(guard) = guard else {
        if peers.is_empty() {
            return Ok(());
        }
        return Err(ControlError::FailedPrecondition(
            "allowed_peers needs the guard, which does not run on this gateway (s2cs --guard, root, not --type xdp)".into(),
        ));
    };
    let nets = parse_peers(peers)?;
    // Keyed as the registry keys sessions; a uid that does not parse fails
    // the `req` itself.
    match super::session::parse_uid(uid) {
        Ok(uid) => guard.expect_peers(&uid, nets),
        Err(_) => Ok(()),
    }
}

/// Parses `allowed_peers` entries (`ip` or `ip/len`), deduplicated.
pub fn parse_peers(peers: &[String]) -> Result<Vec<PeerNet>, ControlError> {
    if peers.len() > MAX_PEERS_PER_SESSION {
        return Err(ControlError::InvalidArgument(format!(
            "{} allowed_peers given; at most {MAX_PEERS_PER_SESSION} per session",
            peers.len()
        )));
    }
    let mut nets: Vec<PeerNet> = Vec::with_capacity(peers.len());
    for p in peers {
        let net: PeerNet = p.parse().map_err(ControlError::InvalidArgument)?;
        if !nets.contains(&net) {
            nets.push(net);
        }
    }
    Ok(nets)
}

#[cfg(test)]
#[path = "guard_tests.rs"]
mod tests;
