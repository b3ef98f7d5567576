//! Process-wide list of the namespaces and daemons the test bed created, so a
//! Ctrl-C handler (which cannot reach the owners' `Drop`) can still remove them.

use std::sync::{Mutex, MutexGuard};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

struct Registry {
    namespaces: Vec<String>,
    pids: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    pids: Vec::new(),
});

// A panicking test must not make every other test's cleanup panic too.
fn lock() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn add_namespace(name: &str) {
    lock().namespaces.push(name.to_owned());
}

/// False when `cleanup_all` already took it (the caller then has nothing to do).
pub(crate) fn remove_namespace(name: &str) -> bool {
    let mut reg = lock();
    let before = reg.namespaces.len();
    reg.namespaces.retain(|n| n != name);
    reg.namespaces.len() != before
}

pub(crate) fn add_pid(pid: u32) {
    lock().pids.push(pid);
}

pub(crate) fn remove_pid(pid: u32) -> bool {
    let mut reg = lock();
    let before = reg.pids.len();
    reg.pids.retain(|p| *p != pid);
    reg.pids.len() != before
}

/// Kills every daemon started with [`crate::process`] and deletes every namespace
/// of every live [`crate::Topology`] in this process. Meant for a SIGINT handler
/// that exits right after; the owning values' `Drop` then finds nothing left to do.
pub fn cleanup_all() {
    let mut reg = lock();
    for pid in reg.pids.drain(..) {
        if let Ok(pid) = i32::try_from(pid) {
            // SIGKILL: there is no time to wait for a graceful exit in a signal handler's path.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    for ns in reg.namespaces.drain(..) {
        crate::netns::delete_namespace(&ns);
    }
}
