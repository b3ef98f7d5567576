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

use aya::{
    maps::{
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
    programs::xdp::XdpLinkId,
    Ebpf,
};
use scistream_common::guard::Counters;
use scistream_common::nat::{
    self as layout, Event, FlowKey, NatConfig, Rewrite, Service, SessionCounters,
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

/// The loaded NAT. Dropping it detaches it from every interface and unloads
/// it; the attachments are bpf_links, so the kernel also detaches them when
/// the process dies in any other way.
pub struct Nat {
    ebpf: Ebpf,
    config: Array<MapData, NatConfig>,
    services: HashMap<MapData, u16, Service>,
    flows: HashMap<MapData, FlowKey, Rewrite>,
    stats: PerCpuHashMap<MapData, u16, SessionCounters>,
    events: PerCpuArray<MapData, Counters>,
    tx_ports: DevMapHash<MapData>,
    attached: Vec<(String, XdpLinkId)>,
    possible_cpus: usize,
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
        let (mut ebpf, possible_cpus) = super::load_object(OBJECT_BYTES, OBJECT)?;
        super::load_xdp(&mut ebpf, OBJECT, layout::PROGRAM)?;
        Ok(Self {
            config: take_map(&mut ebpf, OBJECT, layout::CONFIG_MAP)?,
            services: take_map(&mut ebpf, OBJECT, layout::SERVICES_MAP)?,
            flows: take_map(&mut ebpf, OBJECT, layout::FLOWS_MAP)?,
            stats: take_map(&mut ebpf, OBJECT, layout::STATS_MAP)?,
            events: take_map(&mut ebpf, OBJECT, layout::EVENTS_MAP)?,
            tx_ports: take_map(&mut ebpf, OBJECT, layout::TX_PORTS_MAP)?,
            ebpf,
            attached: Vec::new(),
            possible_cpus,
        })
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
        let link = super::attach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, iface, mode)?;
        self.attached.push((iface.to_owned(), link));
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| EbpfError::DevMap {
                map: layout::TX_PORTS_MAP,
                source,
            })
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) -> Result<(), EbpfError> {
        for (iface, link) in std::mem::take(&mut self.attached) {
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str()) {
                let _ = self.tx_ports.remove(ifindex);
            }
            super::detach_xdp(&mut self.ebpf, OBJECT, layout::PROGRAM, link)?;
        }
        Ok(())
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|(i, _)| i.as_str())
    }

    /// Lets new TCP flows to `port` through, translated as `service` says;
    /// counters start from zero. Replacing a service with another tag cuts
    /// the flows of the old one.
    pub fn add_service(&mut self, port: u16, service: Service) -> Result<(), EbpfError> {
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

fn action(code: u32) -> Action {
    match code {
        XDP_PASS => Action::Pass,
        XDP_DROP => Action::Drop,
        XDP_TX | XDP_REDIRECT => Action::Forward,
        other => Action::Other(other),
    }
}
