//! The NAT's upkeep from user space: a thread that frees the entries of
//! ended flows every second, and the count of open connections per
//! listener that session stats read (one pass over the flow map a second).

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use tracing::warn;

use super::{lock, OPEN_IDLE_S};
use crate::ebpf::Nat;
use crate::error_chain;

/// Frees, every `every`, the entries of flows that ended, until the NAT goes.
pub(super) fn sweep_ended_flows(every: Duration, nat: Weak<Mutex<Nat>>) {
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

/// Open connections per listener port, read from the flow map at most once
/// a second (one pass over the map serves every session's stats).
#[derive(Default)]
pub(super) struct OpenFlows {
    cache: Mutex<Option<(Instant, HashMap<u16, u64>)>>,
}

impl OpenFlows {
    pub(super) fn of(&self, nat: &Mutex<Nat>, ports: &[u16]) -> u64 {
        let mut cache = crate::lock(&self.cache);
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
pub(super) fn uptime_s() -> u32 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split('.').next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}
