//! The guard (`scistream-ebpf/src/bin/xdp-guard.rs`): on the data port
//! range only the ports of live sessions pass, the rest is dropped; it counts
//! what passes per port and what it drops, by reason. A port may also be
//! restricted to its session's peer networks: frames from other sources are
//! dropped and counted on that port. One object with two entry points that
//! share the maps: XDP in driver mode (physical NICs) and tc ingress (virtual
//! interfaces, or where driver mode is refused); each interface gets one.
//!
//! ```no_run
//! use scistream_ctl::ebpf::{AttachPolicy, Guard};
//!
//! let mut guard = Guard::load()?;
//! guard.set_port_range(5100, 5200)?;
//! guard.allow_port(5101, 7)?; // session tag 7, any source
//! guard.allow_peer(8, &"192.0.2.0/24".parse().unwrap())?;
//! guard.allow_port_from_peers(5102, 8)?; // session tag 8, 192.0.2.0/24 only
//! let attached = guard.attach("eth0", AttachPolicy::Auto)?;
//! println!("guard on eth0 at {}", attached.hook);
//! // ... later, when the session is released:
//! let final_counts = guard.deny_port(5101)?;
//! # Ok::<(), scistream_ctl::ebpf::EbpfError>(())
//! ```

use aya::{
    maps::{
        lpm_trie::LpmTrie, Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
        PerCpuValues,
    },
    programs::{tc::SchedClassifierLinkId, xdp::XdpLinkId, TcAttachType},
    Ebpf,
};
use scistream_common::guard::{
    self as layout, AllowedPort, Counters, DropReason, GuardConfig, PeerKey, PortCounters,
    PEERS_RESTRICTED,
};

use super::attach::{self, AttachPolicy, Hook};
use super::{map_error, EbpfError};

const OBJECT: &str = "xdp-guard";
/// Built by build.rs; empty when the build skipped the eBPF programs.
static OBJECT_BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-guard"));

/// Return values of an XDP program (uapi `enum xdp_action`).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// Return values of the tc program: TC_ACT_UNSPEC (tcx "next"), TC_ACT_SHOT.
const TC_NEXT: u32 = -1i32 as u32;
const TC_SHOT: u32 = 2;

/// What the program decided for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Any other return value; the guard never returns one.
    Other(u32),
}

/// Where [`Guard::attach`] put the guard on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub hook: Hook,
    /// Why XDP in driver mode, which the policy preferred, was refused
    /// (then the hook is tc); for the operator's warning.
    pub xdp_refused: Option<String>,
}

enum Link {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// The loaded guard. Dropping it detaches it from every interface and
/// unloads it.
pub struct Guard {
    /// Owns the programs and their links (attachments).
    ebpf: Ebpf,
    config: Array<MapData, GuardConfig>,
    allowed: HashMap<MapData, u16, AllowedPort>,
    stats: PerCpuHashMap<MapData, u16, PortCounters>,
    drops: PerCpuArray<MapData, Counters>,
    peers: LpmTrie<MapData, PeerKey, u8>,
    attached: Vec<(String, Link)>,
    possible_cpus: usize,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ifaces: Vec<String> = self
            .attached()
            .into_iter()
            .map(|(i, h)| format!("{i}:{h}"))
            .collect();
        f.debug_struct("Guard")
            .field("attached", &ifaces)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// Loads both entry points into the kernel, not yet attached anywhere.
    /// Its range starts disabled (0-0): it passes everything until
    /// [`set_port_range`](Self::set_port_range).
    pub fn load() -> Result<Self, EbpfError> {
        let (mut ebpf, possible_cpus) = super::load_object(OBJECT_BYTES, OBJECT)?;
        super::load_xdp(&mut ebpf, OBJECT, layout::PROGRAM)?;
        attach::classifier_mut(&mut ebpf, OBJECT, layout::TC_PROGRAM)?
            .load()
            .map_err(|source| EbpfError::Program {
                program: layout::TC_PROGRAM,
                source,
            })?;
        Ok(Self {
            config: take_map(&mut ebpf, layout::CONFIG_MAP)?,
            allowed: take_map(&mut ebpf, layout::ALLOWED_MAP)?,
            stats: take_map(&mut ebpf, layout::PORT_STATS_MAP)?,
            drops: take_map(&mut ebpf, layout::DROPS_MAP)?,
            peers: take_map(&mut ebpf, layout::PEERS_MAP)?,
            ebpf,
            attached: Vec::new(),
            possible_cpus,
        })
    }

    /// Attaches to `iface` where `policy` asks ([`attach::preferred_hook`]:
    /// tc on virtual interfaces, XDP in driver mode on the others). When
    /// driver mode is refused, the guard goes to tc instead and the answer
    /// says why. Generic (skb) XDP is never used. May be called for several
    /// interfaces.
    pub fn attach(&mut self, iface: &str, policy: AttachPolicy) -> Result<Attached, EbpfError> {
        match attach::preferred_hook(iface, policy) {
            Hook::Tc => {
                self.attach_at(iface, Hook::Tc)?;
                Ok(Attached {
                    hook: Hook::Tc,
                    xdp_refused: None,
                })
            }
            Hook::XdpDriver => match self.attach_at(iface, Hook::XdpDriver) {
                Ok(()) => Ok(Attached {
                    hook: Hook::XdpDriver,
                    xdp_refused: None,
                }),
                Err(refused) => {
                    let reason = crate::error_chain(&refused);
                    self.attach_at(iface, Hook::Tc)?;
                    Ok(Attached {
                        hook: Hook::Tc,
                        xdp_refused: Some(reason),
                    })
                }
            },
        }
    }

    /// Attaches to `iface` at exactly `hook`, with no fallback.
    pub fn attach_at(&mut self, iface: &str, hook: Hook) -> Result<(), EbpfError> {
        let link = match hook {
            Hook::XdpDriver => Link::Xdp(super::attach_xdp(
                &mut self.ebpf,
                OBJECT,
                layout::PROGRAM,
                iface,
            )?),
            Hook::Tc => Link::Tc(attach::attach_tc(
                &mut self.ebpf,
                OBJECT,
                layout::TC_PROGRAM,
                iface,
                TcAttachType::Ingress,
            )?),
        };
        self.attached.push((iface.to_owned(), link));
        Ok(())
    }

    /// Every interface the guard is on, with its hook, in attach order.
    pub fn attached(&self) -> Vec<(String, Hook)> {
        self.attached
            .iter()
            .map(|(iface, link)| {
                let hook = match link {
                    Link::Xdp(_) => Hook::XdpDriver,
                    Link::Tc(_) => Hook::Tc,
                };
                (iface.clone(), hook)
            })
            .collect()
    }

    pub fn detach(&mut self, iface: &str) -> Result<(), EbpfError> {
        let position = self
            .attached
            .iter()
            .position(|(i, _)| i == iface)
            .ok_or_else(|| EbpfError::NotAttached {
                program: layout::PROGRAM,
                iface: iface.to_owned(),
            })?;
        match self.attached.swap_remove(position).1 {
            Link::Xdp(link) => super::detach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, link),
            Link::Tc(link) => attach::classifier_mut(&mut self.ebpf, OBJECT, layout::TC_PROGRAM)?
                .detach(link)
                .map_err(|source| EbpfError::Program {
                    program: layout::TC_PROGRAM,
                    source,
                }),
        }
    }

    /// Guards destination ports `lo..=hi`; `0, 0` disables the guard.
    ///
    /// The range must not overlap the ephemeral ports
    /// (`net.ipv4.ip_local_port_range`): the guard checks destination ports
    /// only, so replies to this host's own outgoing connections would be
    /// dropped. An overlap is logged as a warning.
    pub fn set_port_range(&mut self, lo: u16, hi: u16) -> Result<(), EbpfError> {
        let config = match (lo, hi) {
            (0, 0) => GuardConfig::DISABLED,
            _ if lo == 0 || lo > hi => return Err(EbpfError::InvalidPortRange { lo, hi }),
            _ => GuardConfig::new(lo, hi),
        };
        if let Some((eph_lo, eph_hi)) = crate::host::ephemeral_ports() {
            if config.is_enabled() && lo <= eph_hi && eph_lo <= hi {
                tracing::warn!(lo, hi, eph_lo, eph_hi, "data port range overlaps the ephemeral port range; the XDP guard may drop replies to outgoing connections");
            }
        }
        self.config
            .set(0, config, 0)
            .map_err(map_error(layout::CONFIG_MAP))
    }

    /// The guarded range, `None` when disabled.
    pub fn port_range(&self) -> Result<Option<(u16, u16)>, EbpfError> {
        let config = self
            .config
            .get(&0, 0)
            .map_err(map_error(layout::CONFIG_MAP))?;
        Ok(config
            .is_enabled()
            .then_some((config.port_lo, config.port_hi)))
    }

    /// Lets traffic to `port` through from any source, counted under `port`.
    /// Allowing a port again with the same tag keeps its counters; with
    /// another tag (the port now belongs to a new session) they restart from
    /// zero.
    pub fn allow_port(&mut self, port: u16, session_tag: u32) -> Result<(), EbpfError> {
        self.allow(
            port,
            AllowedPort {
                tag: session_tag,
                flags: 0,
            },
        )
    }

    /// Like [`allow_port`](Self::allow_port), but only frames from the
    /// networks [`allow_peer`](Self::allow_peer) gave `session_tag` pass; the
    /// others are dropped and counted on the port
    /// ([`port_counters`](Self::port_counters)). With no network given yet,
    /// nothing passes: allow the peers first.
    pub fn allow_port_from_peers(&mut self, port: u16, session_tag: u32) -> Result<(), EbpfError> {
        self.allow(
            port,
            AllowedPort {
                tag: session_tag,
                flags: PEERS_RESTRICTED,
            },
        )
    }

    fn allow(&mut self, port: u16, entry: AllowedPort) -> Result<(), EbpfError> {
        match self.allowed.get(&port, 0) {
            Ok(old) if old == entry => return Ok(()),
            // Same session, other peer rule: the counters carry on.
            Ok(old) if old.tag == entry.tag => {
                return self
                    .allowed
                    .insert(port, entry, 0)
                    .map_err(map_error(layout::ALLOWED_MAP));
            }
            Ok(_) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_error(layout::ALLOWED_MAP)(e)),
        }
        // Counters first, so the first frame that passes finds its entry.
        let zero = PerCpuValues::try_from(vec![PortCounters::ZERO; self.possible_cpus]).map_err(
            |source| EbpfError::Cpus {
                path: "/sys/devices/system/cpu/possible",
                source,
            },
        )?;
        self.stats
            .insert(port, zero, 0)
            .map_err(map_error(layout::PORT_STATS_MAP))?;
        if let Err(e) = self.allowed.insert(port, entry, 0) {
            let _ = self.stats.remove(&port); // keep the two maps in step
            return Err(map_error(layout::ALLOWED_MAP)(e));
        }
        Ok(())
    }

    /// Lets sources in `net` reach the ports that
    /// [`allow_port_from_peers`](Self::allow_port_from_peers) gave
    /// `session_tag`. Idempotent.
    pub fn allow_peer(&mut self, session_tag: u32, net: &PeerNet) -> Result<(), EbpfError> {
        self.peers
            .insert(&net.key(session_tag), 1, 0)
            .map_err(map_error(layout::PEERS_MAP))
    }

    /// Takes `net` back from `session_tag`; absent networks are not an error.
    pub fn deny_peer(&mut self, session_tag: u32, net: &PeerNet) -> Result<(), EbpfError> {
        super::deleted(self.peers.remove(&net.key(session_tag)))
            .map_err(map_error(layout::PEERS_MAP))
    }

    /// Drops traffic to `port` again and forgets its counters, returning their
    /// final values (zero if the port was not allowed).
    pub fn deny_port(&mut self, port: u16) -> Result<Counters, EbpfError> {
        super::deleted(self.allowed.remove(&port)).map_err(map_error(layout::ALLOWED_MAP))?;
        let last = self.port_stats(port)?;
        super::deleted(self.stats.remove(&port)).map_err(map_error(layout::PORT_STATS_MAP))?;
        Ok(last.unwrap_or_default())
    }

    /// Traffic passed to `port`, summed over CPUs; `None` if it is not allowed.
    pub fn port_stats(&self, port: u16) -> Result<Option<Counters>, EbpfError> {
        Ok(self.port_counters(port)?.map(|c| c.passed))
    }

    /// Traffic passed to `port` and dropped there for its source, summed over
    /// CPUs; `None` if it is not allowed.
    pub fn port_counters(&self, port: u16) -> Result<Option<PortCounters>, EbpfError> {
        match self.stats.get(&port, 0) {
            Ok(per_cpu) => Ok(Some(per_cpu.iter().copied().sum())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(layout::PORT_STATS_MAP)(e)),
        }
    }

    /// Everything dropped, summed over reasons and CPUs.
    pub fn dropped(&self) -> Result<Counters, EbpfError> {
        DropReason::ALL
            .into_iter()
            .map(|r| self.dropped_for(r))
            .sum()
    }

    pub fn dropped_for(&self, reason: DropReason) -> Result<Counters, EbpfError> {
        let per_cpu = self
            .drops
            .get(&reason.index(), 0)
            .map_err(map_error(layout::DROPS_MAP))?;
        Ok(per_cpu.iter().copied().sum())
    }
}

/// Names of the programs on `iface`'s tc ingress (tcx links, kernel 6.6+),
/// in the order they run: what the kernel reports, for tests and diagnostics.
pub fn tc_ingress_programs(iface: &str) -> Result<Vec<String>, EbpfError> {
    let program = "tcx query";
    let (_, programs) = aya::programs::SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
        .map_err(|source| EbpfError::Program { program, source })?;
    Ok(programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
        .collect())
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<Map, Error = MapError>,
{
    super::take_map(ebpf, OBJECT, name)
}

mod peers;
mod test_run;

pub use peers::PeerNet;
