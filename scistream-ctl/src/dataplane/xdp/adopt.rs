//! Taking over what an earlier run left in the kernel: the pin directory of
//! this state directory, the services of stored sessions (kept, with their
//! session tags, for the restored sessions to claim) and the rest (removed),
//! and the tags new sessions get.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use scistream_common::nat::LAYOUT_VERSION;
use tracing::{info, warn};

use super::{bpffs, lock, NAME};
use crate::dataplane::StoredForwarding;
use crate::ebpf::{EbpfError, Nat};
use crate::error_chain;

/// The pin directory of the state directory `state_dir`: two s2cs on one
/// host never adopt each other's NAT, and a program of another map layout
/// is never adopted.
pub(super) fn pin_dir(state_dir: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let hash = fnv1a(canonical.as_os_str().as_bytes());
    bpffs()
        .join("scistream")
        .join(format!("nat-v{LAYOUT_VERSION}-{hash:016x}"))
}

/// FNV-1a, 64 bits: stable across builds and runs, unlike std's hasher.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Session tags. A tag tells a session's flows from those of an earlier
/// holder of the same port, and keys its rate bucket, so two live sessions
/// never share one: new ones come from a counter (random start, so a restart
/// does not replay the last run's) skipping the tags in use.
pub(super) struct Tags {
    next: u32,
    live: HashSet<u32>,
    /// Tags of adopted services, by the uid of the stored session.
    pub(super) adopted: HashMap<String, u32>,
}

impl Tags {
    pub(super) fn new() -> Self {
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
    pub(super) fn take(&mut self, uid: &str) -> u32 {
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

    pub(super) fn release(&mut self, tag: u32) {
        self.live.remove(&tag);
    }
}

/// The stored xdp sessions that were forwarding: their uids by listener port.
pub(super) fn stored_sessions(stored: &[StoredForwarding]) -> HashMap<u16, String> {
    stored
        .iter()
        .filter(|r| r.backend == NAME && r.forwarding)
        .flat_map(|r| r.listener_ports.iter().map(|&p| (p, r.uid.clone())))
        .collect()
}

/// Keeps the adopted services of stored sessions (`stored`: port -> uid;
/// every port of one session must carry one tag) and removes the others with
/// their flows; returns the kept ports, which the restored sessions are
/// expected to claim, and the tag of each uid.
pub(super) fn adopt(
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

/// Removes, after `grace`, the adopted services no restored session claimed
/// (a stored session that failed to come back): nothing may keep
/// forwarding for a session that no longer exists.
pub(super) fn sweep_unclaimed_after(
    grace: Duration,
    nat: Weak<Mutex<Nat>>,
    unclaimed: Arc<Mutex<HashSet<u16>>>,
) {
    if crate::lock(&unclaimed).is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new().name("xdp-adoption".into()).spawn(move || {
        std::thread::sleep(grace);
        let Some(nat) = nat.upgrade() else { return };
        let ports: Vec<u16> = crate::lock(&unclaimed).drain().collect();
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
