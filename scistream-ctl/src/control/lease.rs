//! Session leases (`--session_ttl`): a session that moves no byte and
//! accepts no connection for the TTL is released, so sessions whose clients
//! vanished without `release` give their ports back. Traffic, read from the
//! session's counters, resets its idle clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::session::Registry;

/// When each session last showed traffic, by its activity count.
#[derive(Default)]
struct Clocks {
    seen: HashMap<String, (u64, Instant)>,
}

impl Clocks {
    /// Updates the clocks from one reading and returns the sessions idle
    /// for at least `ttl`, with how long. A session first seen starts its
    /// clock now (also every session after a restart).
    fn tick(
        &mut self,
        reading: Vec<(String, u64)>,
        now: Instant,
        ttl: Duration,
    ) -> Vec<(String, Duration)> {
        let mut next = HashMap::with_capacity(reading.len());
        let mut expired = Vec::new();
        for (uid, count) in reading {
            let since = match self.seen.get(&uid) {
                Some(&(old, since)) if old == count => since,
                _ => now,
            };
            let idle = now.duration_since(since);
            if idle >= ttl {
                expired.push((uid, idle));
            } else {
                next.insert(uid, (count, since));
            }
        }
        self.seen = next;
        expired
    }
}

/// Checks every session a few times per TTL until the registry is gone.
pub fn spawn(registry: &Arc<Registry>, ttl: Duration) -> tokio::task::JoinHandle<()> {
    let registry = Arc::downgrade(registry);
    let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut clocks = Clocks::default();
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(reg) = registry.upgrade() else {
                return;
            };
            for (uid, idle) in clocks.tick(reg.activity(), Instant::now(), ttl) {
                reg.expire(&uid, idle).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_resets_the_idle_clock_and_silence_expires_it() {
        let ttl = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut c = Clocks::default();
        let at = |s| t0 + Duration::from_secs(s);
        assert!(c
            .tick(vec![("busy".into(), 0), ("idle".into(), 0)], at(0), ttl)
            .is_empty());
        assert!(c
            .tick(vec![("busy".into(), 5), ("idle".into(), 0)], at(6), ttl)
            .is_empty());
        let expired = c.tick(vec![("busy".into(), 9), ("idle".into(), 0)], at(10), ttl);
        assert_eq!(expired, vec![("idle".to_string(), ttl)]);
        // The busy one's clock restarted at its last change (6 s), not at 0.
        assert!(c.tick(vec![("busy".into(), 9)], at(15), ttl).is_empty());
        assert_eq!(
            c.tick(vec![("busy".into(), 9)], at(20), ttl),
            vec![("busy".to_string(), ttl)]
        );
    }
}
