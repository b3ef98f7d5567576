//! The NAT's maps as user space sees them: services (listener port ->
//! target), rate buckets, the flow table and its sweep, and the counters.

use aya::maps::{MapError, PerCpuValues};
use scistream_common::guard::Counters;
use scistream_common::nat::{
    self as layout, Event, FlowKey, RateBucket, Rewrite, Service, SessionCounters,
};

use crate::ebpf::{map_error, EbpfError};

use super::*;

impl Nat {
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
        crate::ebpf::deleted(self.buckets.remove(&tag)).map_err(map_error(layout::BUCKETS_MAP))
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
                crate::ebpf::deleted(self.flows.remove(&key))
                    .map_err(map_error(layout::FLOWS_MAP))?;
            }
        }
        Ok(freed)
    }

    /// Deletes one half of a flow, as a SYN that takes over an ended flow's
    /// port may leave the other half behind.
    #[cfg(test)]
    pub(crate) fn forget_flow_entry(&mut self, key: &FlowKey) {
        self.flows.remove(key).expect("flow entry to forget");
    }

    /// Overwrites one flow entry, as the program does when it hands a port on.
    #[cfg(test)]
    pub(crate) fn set_flow_entry(&mut self, key: &FlowKey, rewrite: Rewrite) {
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
        crate::ebpf::deleted(self.services.remove(&port))
            .map_err(map_error(layout::SERVICES_MAP))?;
        // The program already ignores these flows (no service); removing
        // them frees their source ports and map slots now.
        for key in self.flow_keys_of(port)? {
            crate::ebpf::deleted(self.flows.remove(&key)).map_err(map_error(layout::FLOWS_MAP))?;
        }
        let last = self.session_counters(port)?;
        crate::ebpf::deleted(self.stats.remove(&port)).map_err(map_error(layout::STATS_MAP))?;
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
}
