//! The eBPF NAT (`scistream-ebpf/src/bin/xdp-nat/`) of the `ebpf` backend:
//! translates the TCP flows of each session listener to its target in the
//! kernel and guards the data port range (the guard yields the interfaces to
//! it). One object, two hooks sharing the maps: XDP in driver mode on NICs,
//! tc (clsact ingress) on virtual interfaces. User space declares services
//! (listener port -> target), the kernel creates the flows; user space
//! sweeps the flows that ended ([`Nat::sweep_ended`]).
//!
//! ```no_run
//! use scistream_ctl::ebpf::{AttachPolicy, Nat};
//! use scistream_common::nat::Service;
//!
//! let mut nat = Nat::load()?;
//! nat.set_ranges((5100, 5200), (61000, 65535))?;
//! let hook = nat.attach_with("eth0", AttachPolicy::Auto)?;
//! let service = Service { target_addr: [10, 0, 0, 7], snat_addr: [10, 0, 0, 1], target_port: 7000, tag: 1, ..Default::default() };
//! nat.add_service(5101, service)?;
//! // ... later, when the session is released (its flows go with it):
//! let final_counts = nat.remove_service(5101)?;
//! # Ok::<(), scistream_ctl::ebpf::EbpfError>(())
//! ```
//!
//! [`Nat::load_pinned`] pins the maps and the links under a bpffs directory,
//! so the translation outlives the process: a later `load_pinned` on the same
//! directory adopts the maps (live flows go on) and swaps its program into
//! the pinned links in place; [`Nat::unpin`] detaches and removes all of it.

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{links::FdLink, tc::SchedClassifierLinkId, xdp::XdpLinkId},
    Ebpf, EbpfLoader,
};
use scistream_common::guard::Counters;
use scistream_common::nat::{
    self as layout, FlowKey, NatConfig, RateBucket, Rewrite, Service, SessionCounters,
};

use super::attach::{classifier_mut, Hook};
use super::{map_error, take_map, EbpfError};

const OBJECT: &str = "xdp-nat";
/// Built by build.rs; empty when the build skipped the eBPF programs.
static OBJECT_BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-nat"));

/// Return values of a tc classifier (uapi `TC_ACT_*`).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// Return values of an XDP program (uapi `enum xdp_action`).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// What the program did with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Up the stack (translated or not).
    Pass,
    Drop,
    /// Sent out (redirect or XDP_TX) after translation.
    Forward,
    Other(u32),
}

/// One interface the program is attached to.
enum Attachment {
    /// Detached when the object drops (or the process dies).
    Owned(XdpLinkId),
    OwnedTc(SchedClassifierLinkId),
    /// Stays attached until its pin file is removed.
    Pinned {
        link: FdLink,
        pin: PathBuf,
    },
}

/// The loaded NAT. Unpinned, dropping it detaches it from every interface
/// and unloads it; the attachments are bpf_links, so the kernel also
/// detaches them when the process dies in any other way. Pinned, it stays
/// attached until [`Nat::unpin`].
pub struct Nat {
    ebpf: Ebpf,
    config: Array<MapData, NatConfig>,
    services: HashMap<MapData, u16, Service>,
    flows: HashMap<MapData, FlowKey, Rewrite>,
    stats: PerCpuHashMap<MapData, u16, SessionCounters>,
    events: PerCpuArray<MapData, Counters>,
    tx_ports: DevMapHash<MapData>,
    buckets: HashMap<MapData, u32, RateBucket>,
    attached: Vec<(String, Hook, Attachment)>,
    possible_cpus: usize,
    /// The bpffs directory of the pins, when pinned.
    pin_dir: Option<PathBuf>,
    /// The maps were pinned by an earlier process and taken over.
    adopted: bool,
}

impl std::fmt::Debug for Nat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ifaces: Vec<String> = self
            .attached
            .iter()
            .map(|(i, h, _)| format!("{i}:{h}"))
            .collect();
        f.debug_struct("Nat")
            .field("attached", &ifaces)
            .finish_non_exhaustive()
    }
}

impl Nat {
    /// Loads the program, not yet attached; it passes everything untouched
    /// until [`set_ranges`](Self::set_ranges).
    pub fn load() -> Result<Self, EbpfError> {
        let (ebpf, possible_cpus) = super::load_object(OBJECT_BYTES, OBJECT)?;
        Self::from_object(ebpf, possible_cpus, None, false)
    }

    /// Loads the program with its maps pinned in `dir` (a bpffs directory,
    /// created if missing): maps already pinned there by an earlier process
    /// are reused as they are, with their flows, services and counters.
    /// [`adopted`](Self::adopted) says which happened.
    pub fn load_pinned(dir: &Path) -> Result<Self, EbpfError> {
        if OBJECT_BYTES.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        std::fs::create_dir_all(dir).map_err(|e| pin_error(dir, e))?;
        let adopted = dir.join(layout::CONFIG_MAP).exists();
        let paths: Vec<(&str, PathBuf)> = layout::MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let possible_cpus =
            aya::util::nr_cpus().map_err(|(path, source)| EbpfError::Cpus { path, source })?;
        let ebpf = super::load_with(&mut loader, OBJECT_BYTES, OBJECT)?;
        Self::from_object(ebpf, possible_cpus, Some(dir.to_owned()), adopted)
    }

    /// Whether the bpffs directory has pins of an earlier run.
    pub fn has_pins(dir: &Path) -> bool {
        std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
    }

    /// Removes every pin in `dir` and the directory: the links pinned there
    /// detach (nothing else holds them) and the maps go with the last user.
    pub fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    std::fs::remove_file(entry.path()).map_err(|e| pin_error(&entry.path(), e))?;
                }
                std::fs::remove_dir(dir).map_err(|e| pin_error(dir, e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(pin_error(dir, e)),
        }
    }

    fn from_object(
        mut ebpf: Ebpf,
        possible_cpus: usize,
        pin_dir: Option<PathBuf>,
        adopted: bool,
    ) -> Result<Self, EbpfError> {
        super::load_xdp(&mut ebpf, OBJECT, layout::PROGRAM)?;
        classifier_mut(&mut ebpf, OBJECT, layout::TC_PROGRAM)?
            .load()
            .map_err(super::xdp_error(layout::TC_PROGRAM))?;
        Ok(Self {
            config: take_map(&mut ebpf, OBJECT, layout::CONFIG_MAP)?,
            services: take_map(&mut ebpf, OBJECT, layout::SERVICES_MAP)?,
            flows: take_map(&mut ebpf, OBJECT, layout::FLOWS_MAP)?,
            stats: take_map(&mut ebpf, OBJECT, layout::STATS_MAP)?,
            events: take_map(&mut ebpf, OBJECT, layout::EVENTS_MAP)?,
            tx_ports: take_map(&mut ebpf, OBJECT, layout::TX_PORTS_MAP)?,
            buckets: take_map(&mut ebpf, OBJECT, layout::BUCKETS_MAP)?,
            ebpf,
            attached: Vec::new(),
            possible_cpus,
            pin_dir,
            adopted,
        })
    }

    /// The maps (with their flows) were taken over from an earlier process.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The guarded data range and the source ports the NAT hands out, both
    /// inclusive; they must not overlap.
    pub fn set_ranges(&mut self, data: (u16, u16), nat: (u16, u16)) -> Result<(), EbpfError> {
        let valid = |(lo, hi): (u16, u16)| lo != 0 && lo <= hi;
        if !valid(data) {
            return Err(EbpfError::InvalidPortRange {
                lo: data.0,
                hi: data.1,
            });
        }
        if !valid(nat) || (nat.0 <= data.1 && data.0 <= nat.1) {
            return Err(EbpfError::InvalidPortRange {
                lo: nat.0,
                hi: nat.1,
            });
        }
        let config = NatConfig {
            data_lo: data.0,
            data_hi: data.1,
            nat_lo: nat.0,
            nat_hi: nat.1,
            idle_s: layout::IDLE_S,
            linger_s: layout::LINGER_S,
            unanswered_s: layout::UNANSWERED_S,
        };
        self.config
            .set(0, config, 0)
            .map_err(map_error(layout::CONFIG_MAP))
    }

    /// How long flows live (see [`NatConfig::expired`]), after
    /// [`set_ranges`](Self::set_ranges) set the defaults; for tests.
    pub fn set_lifetimes(
        &mut self,
        idle_s: u32,
        linger_s: u16,
        unanswered_s: u16,
    ) -> Result<(), EbpfError> {
        let config = NatConfig {
            idle_s,
            linger_s,
            unanswered_s,
            ..self.nat_config()?
        };
        self.config
            .set(0, config, 0)
            .map_err(map_error(layout::CONFIG_MAP))
    }

    fn nat_config(&self) -> Result<NatConfig, EbpfError> {
        self.config
            .get(&0, 0)
            .map_err(map_error(layout::CONFIG_MAP))
    }
}

mod hooks;
mod tables;
mod test_run;

fn pin_error(path: &Path, source: std::io::Error) -> EbpfError {
    EbpfError::Pin {
        path: path.to_owned(),
        source,
    }
}

/// bpffs's magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at `path` unless one is there (what systemd does at boot;
/// minimal container and VM images skip it). Pins need it.
pub fn ensure_bpffs(path: &Path) -> Result<(), EbpfError> {
    // The magic's C type (__fsword_t) is not i64 on every architecture.
    #[allow(clippy::unnecessary_cast)]
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
    };
    if is_bpffs(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|e| pin_error(path, e))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| pin_error(path, e.into()))?;
    tracing::info!(path = %path.display(), "mounted bpffs for the XDP NAT's pins");
    Ok(())
}

fn action(code: u32) -> Action {
    match code {
        XDP_PASS => Action::Pass,
        XDP_DROP => Action::Drop,
        XDP_TX | XDP_REDIRECT => Action::Forward,
        other => Action::Other(other),
    }
}
