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
    maps::{
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachType},
        xdp::{XdpLink, XdpLinkId},
    },
    Ebpf, EbpfLoader,
};
use scistream_common::guard::Counters;
use scistream_common::nat::{
    self as layout, Event, FlowKey, NatConfig, RateBucket, Rewrite, Service, SessionCounters,
};

use super::attach::{self, classifier_mut, AttachPolicy, Hook};
use super::{map_error, take_map, AttachMode, EbpfError};

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

    /// Attaches to `iface` where `policy` says: with `Auto`, tc on virtual
    /// interfaces and XDP in driver mode on the others; XDP refused (no
    /// native support, or a limit such as the MTU) falls back to tc with a
    /// warning naming the interface and the reason. Generic XDP never.
    pub fn attach_with(&mut self, iface: &str, policy: AttachPolicy) -> Result<Hook, EbpfError> {
        let hook = attach::preferred_hook(iface, policy);
        match (hook, self.attach_hook(iface, hook)) {
            (_, Ok(())) => Ok(hook),
            (Hook::XdpDriver, Err(refused)) => {
                tracing::warn!(iface, reason = %crate::error_chain(&refused), "XDP in driver mode refused; the NAT uses tc on this interface");
                self.attach_hook(iface, Hook::Tc)?;
                Ok(Hook::Tc)
            }
            (Hook::Tc, Err(e)) => Err(e),
        }
    }

    /// Where the program is attached: interface and hook.
    pub fn hooks(&self) -> impl Iterator<Item = (&str, Hook)> {
        self.attached.iter().map(|(i, h, _)| (i.as_str(), *h))
    }

    /// Attaches to `iface` at `hook`; an XDP-hooked interface also takes
    /// the XDP program's redirects (tc ones are reached by the tc program's
    /// `bpf_redirect`, or through the stack).
    pub fn attach_hook(&mut self, iface: &str, hook: Hook) -> Result<(), EbpfError> {
        let mode = AttachMode::Driver;
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| EbpfError::Attach {
            program: layout::PROGRAM,
            iface: iface.to_owned(),
            mode,
            source: aya::programs::ProgramError::IOError(e.into()),
        })?;
        let attachment = match (&self.pin_dir, hook) {
            (None, Hook::XdpDriver) => Attachment::Owned(super::attach_xdp(
                &mut self.ebpf,
                OBJECT,
                layout::PROGRAM,
                iface,
                mode,
            )?),
            (None, Hook::Tc) => Attachment::OwnedTc(attach::attach_tc(
                &mut self.ebpf,
                OBJECT,
                layout::TC_PROGRAM,
                iface,
                TcAttachType::Ingress,
            )?),
            (Some(dir), _) => {
                let pin = dir.join(format!("link-{iface}"));
                self.attach_pinned(iface, hook, pin)?
            }
        };
        self.attached.push((iface.to_owned(), hook, attachment));
        if hook == Hook::Tc {
            // An adopted devmap may still name it from an XDP run.
            let _ = self.tx_ports.remove(ifindex);
            return Ok(());
        }
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| EbpfError::DevMap {
                map: layout::TX_PORTS_MAP,
                source,
            })
    }

    /// Takes over the link pinned at `pin` (this program replaces the one
    /// in it, atomically: frames never meet an interface without one), or
    /// attaches afresh and pins the new link there. A pinned link of the
    /// other hook is removed first.
    fn attach_pinned(
        &mut self,
        iface: &str,
        hook: Hook,
        pin: PathBuf,
    ) -> Result<Attachment, EbpfError> {
        let io = |pin: &Path, e: &dyn std::fmt::Display| {
            pin_error(pin, std::io::Error::other(e.to_string()))
        };
        if pin.exists() {
            match self.take_pinned(hook, &pin) {
                Ok(link) => return Ok(Attachment::Pinned { link, pin }),
                // A link whose interface went away, or of the other hook: a
                // fresh one replaces it.
                Err(e) => {
                    tracing::warn!(iface, %hook, pin = %pin.display(), error = %crate::error_chain(&e), "pinned NAT link not reusable; attaching afresh");
                    std::fs::remove_file(&pin).map_err(|e| pin_error(&pin, e))?;
                }
            }
        }
        let link: FdLink = match hook {
            Hook::XdpDriver => {
                let id = super::attach_xdp(
                    &mut self.ebpf,
                    OBJECT,
                    layout::PROGRAM,
                    iface,
                    AttachMode::Driver,
                )?;
                let program = super::xdp_program_mut(&mut self.ebpf, OBJECT, layout::PROGRAM)?;
                let link = program
                    .take_link(id)
                    .map_err(super::xdp_error(layout::PROGRAM))?;
                FdLink::try_from(link).map_err(|e| io(&pin, &e))?
            }
            Hook::Tc => {
                let id = attach::attach_tc(
                    &mut self.ebpf,
                    OBJECT,
                    layout::TC_PROGRAM,
                    iface,
                    TcAttachType::Ingress,
                )?;
                let program = classifier_mut(&mut self.ebpf, OBJECT, layout::TC_PROGRAM)?;
                let link = program
                    .take_link(id)
                    .map_err(super::xdp_error(layout::TC_PROGRAM))?;
                // A tcx link (kernel 6.6+); a netlink filter cannot be pinned.
                FdLink::try_from(link).map_err(|e| io(&pin, &e))?
            }
        };
        let pinned = link.pin(&pin).map_err(|e| io(&pin, &e))?;
        Ok(Attachment::Pinned {
            link: pinned.into(),
            pin,
        })
    }

    /// The pinned link at `pin` with this object's program of `hook` swapped in.
    fn take_pinned(&mut self, hook: Hook, pin: &Path) -> Result<FdLink, EbpfError> {
        let io = |e: &dyn std::fmt::Display| pin_error(pin, std::io::Error::other(e.to_string()));
        let fd = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| io(&e))?);
        match hook {
            Hook::XdpDriver => {
                let link = XdpLink::try_from(fd).map_err(|e| io(&e))?;
                let program = super::xdp_program_mut(&mut self.ebpf, OBJECT, layout::PROGRAM)?;
                let id = program
                    .attach_to_link(link)
                    .map_err(super::xdp_error(layout::PROGRAM))?;
                let link = program
                    .take_link(id)
                    .map_err(super::xdp_error(layout::PROGRAM))?;
                FdLink::try_from(link).map_err(|e| io(&e))
            }
            Hook::Tc => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| io(&e))?;
                let program = classifier_mut(&mut self.ebpf, OBJECT, layout::TC_PROGRAM)?;
                let id = program
                    .attach_to_link(link)
                    .map_err(super::xdp_error(layout::TC_PROGRAM))?;
                let link = program
                    .take_link(id)
                    .map_err(super::xdp_error(layout::TC_PROGRAM))?;
                FdLink::try_from(link).map_err(|e| io(&e))
            }
        }
    }

    /// Detaches from every interface (pinned links are unpinned first).
    pub fn detach_all(&mut self) -> Result<(), EbpfError> {
        for (iface, _, attachment) in std::mem::take(&mut self.attached) {
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str()) {
                let _ = self.tx_ports.remove(ifindex);
            }
            match attachment {
                Attachment::Owned(link) => {
                    super::detach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, link)?
                }
                Attachment::OwnedTc(link) => {
                    classifier_mut(&mut self.ebpf, OBJECT, layout::TC_PROGRAM)?
                        .detach(link)
                        .map_err(super::xdp_error(layout::TC_PROGRAM))?
                }
                Attachment::Pinned { link, pin } => {
                    std::fs::remove_file(&pin).map_err(|e| pin_error(&pin, e))?;
                    drop(link);
                }
            }
        }
        Ok(())
    }

    /// Links pinned in this object's directory for interfaces it did not
    /// attach to (an earlier run's interface list): unpinned, so detached.
    pub fn unpin_other_links(&self) -> Result<Vec<String>, EbpfError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(dir)
            .map_err(|e| pin_error(dir, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link-") {
                if !self.attached.iter().any(|(i, _, _)| i == iface) {
                    std::fs::remove_file(entry.path()).map_err(|e| pin_error(&entry.path(), e))?;
                    removed.push(iface.to_owned());
                }
            }
        }
        Ok(removed)
    }

    /// Detaches everything and removes the pins (maps and links) and their
    /// directory: nothing of this NAT is left once the object drops.
    pub fn unpin(&mut self) -> Result<(), EbpfError> {
        self.detach_all()?;
        if let Some(dir) = self.pin_dir.take() {
            Self::remove_pins(&dir)?;
        }
        Ok(())
    }

    /// The bpffs directory of the pins, when pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Every service: listener port and where its flows go.
    pub fn services(&self) -> Result<Vec<(u16, Service)>, EbpfError> {
        let mut all = Vec::new();
        for entry in self.services.iter() {
            match entry {
                Ok(e) => all.push(e),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_error(layout::SERVICES_MAP)(e)),
            }
        }
        Ok(all)
    }

    /// Polices the payload of the services with `tag` and
    /// [`Service::POLICED`] with `bucket` (starting full).
    pub fn set_bucket(&mut self, tag: u32, bucket: RateBucket) -> Result<(), EbpfError> {
        self.buckets
            .insert(tag, bucket, 0)
            .map_err(map_error(layout::BUCKETS_MAP))
    }

    /// Tags of every rate bucket.
    pub fn bucket_tags(&self) -> Result<Vec<u32>, EbpfError> {
        let mut tags = Vec::new();
        for tag in self.buckets.keys() {
            match tag {
                Ok(t) => tags.push(t),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_error(layout::BUCKETS_MAP)(e)),
            }
        }
        Ok(tags)
    }

    /// The rate bucket of `tag`, if any.
    pub fn bucket(&self, tag: u32) -> Result<Option<RateBucket>, EbpfError> {
        match self.buckets.get(&tag, 0) {
            Ok(b) => Ok(Some(b)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(layout::BUCKETS_MAP)(e)),
        }
    }

    pub fn remove_bucket(&mut self, tag: u32) -> Result<(), EbpfError> {
        super::deleted(self.buckets.remove(&tag)).map_err(map_error(layout::BUCKETS_MAP))
    }

    /// Open connections per listener port: flows with neither a reset nor
    /// a FIN each way, either direction seen in the last `idle_s` seconds
    /// (`now_s` in CLOCK_MONOTONIC seconds, the program's clock).
    pub fn open_connections(
        &self,
        now_s: u32,
        idle_s: u32,
    ) -> Result<std::collections::HashMap<u16, u64>, EbpfError> {
        let mut open = std::collections::HashMap::new();
        for key in self.flows.keys() {
            let key = match key {
                Ok(k) => k,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_error(layout::FLOWS_MAP)(e)),
            };
            let Some(forward) = self.flow(&key)? else {
                continue;
            };
            if forward.direction != Rewrite::FORWARD {
                continue;
            }
            let Some(backward) = self.flow(&forward.reverse_key())? else {
                continue;
            };
            let seen = forward.seen_s.max(backward.seen_s);
            if !forward.closed_with(&backward) && now_s.saturating_sub(seen) <= idle_s {
                *open.entry(forward.listener_port).or_insert(0) += 1;
            }
        }
        Ok(open)
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|(i, _, _)| i.as_str())
    }

    /// Frees the entries of every flow that ended at `now_s` (CLOCK_BOOTTIME
    /// seconds, the program's clock; see [`NatConfig::expired`]), and half
    /// flows: entries whose other half is gone or belongs to a newer flow.
    /// Returns the flows (or halves) freed.
    ///
    /// The program reclaims an ended flow's source port on its own when a
    /// SYN draws it, so the reply key read here may hold a new flow by the
    /// time of the delete: each entry is read again just before it goes and
    /// kept if it changed. Deleting a key that is already gone is fine.
    pub fn sweep_ended(&mut self, now_s: u32) -> Result<usize, EbpfError> {
        let config = self.nat_config()?;
        let mut ended: Vec<(FlowKey, Rewrite)> = Vec::new();
        let mut freed = 0;
        for key in self.flows.keys() {
            let key = match key {
                Ok(k) => k,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_error(layout::FLOWS_MAP)(e)),
            };
            let Some(this) = self.flow(&key)? else {
                continue;
            };
            let other_key = this.reverse_key();
            let other = self.flow(&other_key)?.filter(|o| o.reverse_key() == key);
            match other {
                None => {
                    ended.push((key, this));
                    freed += 1;
                }
                // A whole flow is judged from its forward entry, once.
                Some(other)
                    if this.direction == Rewrite::FORWARD
                        && config.expired(&this, &other, now_s) =>
                {
                    ended.push((key, this));
                    ended.push((other_key, other));
                    freed += 1;
                }
                Some(_) => {}
            }
        }
        for (key, seen) in ended {
            if self.flow(&key)? == Some(seen) {
                super::deleted(self.flows.remove(&key)).map_err(map_error(layout::FLOWS_MAP))?;
            }
        }
        Ok(freed)
    }

    /// Deletes one half of a flow, as a SYN that takes over an ended flow's
    /// port may leave the other half behind.
    #[cfg(test)]
    pub(super) fn forget_flow_entry(&mut self, key: &FlowKey) {
        self.flows.remove(key).expect("flow entry to forget");
    }

    /// Overwrites one flow entry, as the program does when it hands a port on.
    #[cfg(test)]
    pub(super) fn set_flow_entry(&mut self, key: &FlowKey, rewrite: Rewrite) {
        self.flows
            .insert(key, rewrite, 0)
            .expect("flow entry to set");
    }

    /// Entries in the flow map (two per flow).
    pub fn flow_entries(&self) -> usize {
        self.flows.keys().filter(|k| k.is_ok()).count()
    }

    /// Lets new TCP flows to `port` through, translated as `service` says;
    /// counters start from zero. Replacing a service with another tag cuts
    /// the flows of the old one.
    pub fn add_service(&mut self, port: u16, service: Service) -> Result<(), EbpfError> {
        // The same session's service, taken over from an earlier process:
        // its flows and counters go on.
        let same = matches!(self.services.get(&port, 0), Ok(old) if old.tag == service.tag);
        if same && self.session_counters(port)?.is_some() {
            return self.retarget(port, service);
        }
        // Counters first, so the first flow finds its entry.
        let zero = PerCpuValues::try_from(vec![SessionCounters::ZERO; self.possible_cpus])
            .map_err(|source| EbpfError::Cpus {
                path: "/sys/devices/system/cpu/possible",
                source,
            })?;
        self.stats
            .insert(port, zero, 0)
            .map_err(map_error(layout::STATS_MAP))?;
        if let Err(e) = self.services.insert(port, service, 0) {
            let _ = self.stats.remove(&port);
            return Err(map_error(layout::SERVICES_MAP)(e));
        }
        Ok(())
    }

    /// Points new flows of `port` elsewhere; live flows keep their target.
    pub fn retarget(&mut self, port: u16, service: Service) -> Result<(), EbpfError> {
        self.services
            .insert(port, service, 0)
            .map_err(map_error(layout::SERVICES_MAP))
    }

    /// Stops translating `port`: new frames to it are dropped, its flows are
    /// removed. Returns its final counters (zero if it was not a service).
    pub fn remove_service(&mut self, port: u16) -> Result<SessionCounters, EbpfError> {
        super::deleted(self.services.remove(&port)).map_err(map_error(layout::SERVICES_MAP))?;
        // The program already ignores these flows (no service); removing
        // them frees their source ports and map slots now.
        for key in self.flow_keys_of(port)? {
            super::deleted(self.flows.remove(&key)).map_err(map_error(layout::FLOWS_MAP))?;
        }
        let last = self.session_counters(port)?;
        if last.is_some() {
            super::deleted(self.stats.remove(&port)).map_err(map_error(layout::STATS_MAP))?;
        }
        Ok(last.unwrap_or_default())
    }

    /// Keys of the flow entries (both directions) of listener `port`.
    pub fn flow_keys_of(&self, port: u16) -> Result<Vec<FlowKey>, EbpfError> {
        let mut keys = Vec::new();
        for key in self.flows.keys() {
            // A key the kernel evicted between listing and lookup is skipped.
            let key = match key {
                Ok(k) => k,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_error(layout::FLOWS_MAP)(e)),
            };
            match self.flows.get(&key, 0) {
                Ok(r) if r.listener_port == port => keys.push(key),
                Ok(_) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(layout::FLOWS_MAP)(e)),
            }
        }
        Ok(keys)
    }

    /// The rewrite of one flow entry, if the kernel holds one.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<Rewrite>, EbpfError> {
        match self.flows.get(key, 0) {
            Ok(r) => Ok(Some(r)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(layout::FLOWS_MAP)(e)),
        }
    }

    /// Traffic of listener `port` summed over CPUs; `None` if not a service.
    pub fn session_counters(&self, port: u16) -> Result<Option<SessionCounters>, EbpfError> {
        match self.stats.get(&port, 0) {
            Ok(per_cpu) => Ok(Some(per_cpu.iter().copied().sum())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(layout::STATS_MAP)(e)),
        }
    }

    /// Frames and bytes of one kind of event, summed over CPUs.
    pub fn events(&self, event: Event) -> Result<Counters, EbpfError> {
        let per_cpu = self
            .events
            .get(&event.index(), 0)
            .map_err(map_error(layout::EVENTS_MAP))?;
        Ok(per_cpu.iter().copied().sum())
    }

    /// Everything dropped (not allowed, malformed, fragments, no port).
    pub fn dropped(&self) -> Result<Counters, EbpfError> {
        [
            Event::NotAllowed,
            Event::Malformed,
            Event::Fragment,
            Event::PortsExhausted,
        ]
        .into_iter()
        .map(|e| self.events(e))
        .sum()
    }

    /// Runs the program once on `frame` in the kernel (BPF_PROG_TEST_RUN),
    /// with no interface involved; maps change as for a received frame.
    /// Returns the action and the frame as the program left it.
    pub fn run_on_frame(&self, frame: &[u8]) -> Result<(Action, Vec<u8>), EbpfError> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.test_run(frame, Some(&mut out), 1)?;
        out.truncate(result.data_size_out as usize);
        Ok((action(result.return_value), out))
    }

    /// Runs the program `repeat` times on `frame` and returns the kernel's
    /// mean time per run; for benchmarks.
    pub fn time_per_frame(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, EbpfError> {
        Ok(self.test_run(frame, None, repeat)?.duration)
    }

    fn test_run(
        &self,
        frame: &[u8],
        data_out: Option<&mut [u8]>,
        repeat: u32,
    ) -> Result<aya::programs::TestRunResult, EbpfError> {
        super::xdp_test_run(&self.ebpf, OBJECT, layout::PROGRAM, frame, data_out, repeat)
    }

    /// Runs the tc form once on `packet` (an Ethernet frame) as an skb
    /// (BPF_PROG_TEST_RUN); `gso` = (segment size, segments) makes it a GSO
    /// packet, as the stack hands a veth. Returns the action and the packet.
    pub fn tc_run_on_packet(
        &self,
        packet: &[u8],
        gso: Option<(u32, u32)>,
    ) -> Result<(Action, Vec<u8>), EbpfError> {
        use aya::programs::{TestRun, TestRunOptions};
        let mut ctx = [0u8; SK_BUFF_SIZE];
        if let Some((size, segs)) = gso {
            ctx[SK_BUFF_GSO_SEGS..SK_BUFF_GSO_SEGS + 4].copy_from_slice(&segs.to_ne_bytes());
            ctx[SK_BUFF_GSO_SIZE..SK_BUFF_GSO_SIZE + 4].copy_from_slice(&size.to_ne_bytes());
        }
        let mut out = vec![0u8; packet.len() + 256];
        let program = self
            .ebpf
            .program(layout::TC_PROGRAM)
            .ok_or(EbpfError::Missing {
                object: OBJECT,
                kind: "program",
                name: layout::TC_PROGRAM,
            })?;
        let program: &aya::programs::SchedClassifier = program
            .try_into()
            .map_err(super::xdp_error(layout::TC_PROGRAM))?;
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        let result = program
            .test_run(options)
            .map_err(super::xdp_error(layout::TC_PROGRAM))?;
        out.truncate(result.data_size_out as usize);
        let action = match result.return_value {
            TC_ACT_OK => Action::Pass,
            TC_ACT_SHOT => Action::Drop,
            TC_ACT_REDIRECT => Action::Forward,
            other => Action::Other(other),
        };
        Ok((action, out))
    }
}

/// uapi `struct __sk_buff`: its size and where the GSO fields sit, the only
/// ones a test run takes here (the kernel wants every other field zero).
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_GSO_SEGS: usize = 164;
const SK_BUFF_GSO_SIZE: usize = 176;

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
