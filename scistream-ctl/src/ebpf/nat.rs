//! The XDP NAT (`scistream-ebpf/src/bin/xdp-nat.rs`) of the `xdp` backend:
//! translates the TCP flows of each session listener to its target at the
//! driver and guards the data port range (the guard cannot share the
//! interface with it). User space declares services (listener port ->
//! target), the kernel creates the flows.
//!
//! ```no_run
//! use scistream_ctl::ebpf::{AttachMode, Nat};
//! use scistream_common::nat::Service;
//!
//! let mut nat = Nat::load()?;
//! nat.set_ranges((5100, 5200), (61000, 65535))?;
//! nat.attach("eth0", AttachMode::Driver)?;
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
        xdp::{XdpLink, XdpLinkId},
    },
    Ebpf, EbpfLoader,
};
use scistream_common::guard::Counters;
use scistream_common::nat::{
    self as layout, Event, FlowKey, NatConfig, RateBucket, Rewrite, Service, SessionCounters,
};

use super::{map_error, take_map, AttachMode, EbpfError};

const OBJECT: &str = "xdp-nat";
/// Built by build.rs; empty when the build skipped the eBPF programs.
static OBJECT_BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-nat"));

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
    /// Stays attached until its pin file is removed.
    Pinned { link: FdLink, pin: PathBuf },
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
    attached: Vec<(String, Attachment)>,
    possible_cpus: usize,
    /// The bpffs directory of the pins, when pinned.
    pin_dir: Option<PathBuf>,
    /// The maps were pinned by an earlier process and taken over.
    adopted: bool,
}

impl std::fmt::Debug for Nat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ifaces: Vec<&str> = self.attached.iter().map(|(i, _)| i.as_str()).collect();
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
        };
        self.config
            .set(0, config, 0)
            .map_err(map_error(layout::CONFIG_MAP))
    }

    /// Attaches to `iface` and lets translated frames be redirected out of it.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), EbpfError> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| EbpfError::Attach {
            program: layout::PROGRAM,
            iface: iface.to_owned(),
            mode,
            source: aya::programs::ProgramError::IOError(e.into()),
        })?;
        let attachment = match &self.pin_dir {
            None => Attachment::Owned(super::attach_xdp(
                &mut self.ebpf,
                OBJECT,
                layout::PROGRAM,
                iface,
                mode,
            )?),
            Some(dir) => {
                let pin = dir.join(format!("link-{iface}"));
                self.attach_pinned(iface, mode, pin)?
            }
        };
        self.attached.push((iface.to_owned(), attachment));
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| EbpfError::DevMap {
                map: layout::TX_PORTS_MAP,
                source,
            })
    }

    /// Takes over the link pinned at `pin` (this program replaces the one
    /// in it, atomically: frames never meet an interface without one), or
    /// attaches afresh and pins the new link there.
    fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin: PathBuf,
    ) -> Result<Attachment, EbpfError> {
        let program = super::xdp_program_mut(&mut self.ebpf, OBJECT, layout::PROGRAM)?;
        if pin.exists() {
            let taken = PinnedLink::from_pin(&pin)
                .map_err(|e| pin_error(&pin, std::io::Error::other(e)))
                .and_then(|p| {
                    XdpLink::try_from(FdLink::from(p))
                        .map_err(|e| pin_error(&pin, std::io::Error::other(e)))
                })
                .and_then(|link| {
                    program
                        .attach_to_link(link)
                        .map_err(super::xdp_error(layout::PROGRAM))
                });
            match taken {
                Ok(id) => {
                    let link = program
                        .take_link(id)
                        .map_err(super::xdp_error(layout::PROGRAM))?;
                    let link = FdLink::try_from(link)
                        .map_err(|e| pin_error(&pin, std::io::Error::other(e)))?;
                    return Ok(Attachment::Pinned { link, pin });
                }
                // A link whose interface went away (or not an XDP link): a
                // fresh one replaces it.
                Err(e) => {
                    tracing::warn!(iface, pin = %pin.display(), error = %crate::error_chain(&e), "pinned XDP link not reusable; attaching afresh");
                    std::fs::remove_file(&pin).map_err(|e| pin_error(&pin, e))?;
                }
            }
        }
        let id = super::attach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, iface, mode)?;
        let program = super::xdp_program_mut(&mut self.ebpf, OBJECT, layout::PROGRAM)?;
        let link = program
            .take_link(id)
            .map_err(super::xdp_error(layout::PROGRAM))?;
        let link = FdLink::try_from(link).map_err(|e| pin_error(&pin, std::io::Error::other(e)))?;
        let pinned = link
            .pin(&pin)
            .map_err(|e| pin_error(&pin, std::io::Error::other(e)))?;
        Ok(Attachment::Pinned {
            link: pinned.into(),
            pin,
        })
    }

    /// Detaches from every interface (pinned links are unpinned first).
    pub fn detach_all(&mut self) -> Result<(), EbpfError> {
        for (iface, attachment) in std::mem::take(&mut self.attached) {
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str()) {
                let _ = self.tx_ports.remove(ifindex);
            }
            match attachment {
                Attachment::Owned(link) => {
                    super::detach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, link)?
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
                if !self.attached.iter().any(|(i, _)| i == iface) {
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
        match self.buckets.remove(&tag) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(layout::BUCKETS_MAP)(e)),
        }
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
        self.attached.iter().map(|(i, _)| i.as_str())
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
        match self.services.remove(&port) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_error(layout::SERVICES_MAP)(e)),
        }
        // The program already ignores these flows (no service); removing
        // them frees their source ports and map slots now.
        for key in self.flow_keys_of(port)? {
            match self.flows.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(layout::FLOWS_MAP)(e)),
            }
        }
        let last = self.session_counters(port)?;
        if last.is_some() {
            self.stats
                .remove(&port)
                .map_err(map_error(layout::STATS_MAP))?;
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
}

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
