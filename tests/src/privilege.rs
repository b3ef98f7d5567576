//! Whether this process may build network namespaces, and what a test does when not.
//!
//! Root-only tests skip with a note on a developer's machine but must fail under
//! CI: a CI run that silently skipped them would prove nothing.

use std::io::Write;
use std::process::Command;
use std::sync::OnceLock;

use nix::sched::{unshare, CloneFlags};
use nix::unistd::geteuid;

/// True when the caller is root and can create network namespaces (and `ip` exists).
/// Otherwise: with `CI=true` in the environment it panics, naming the test and the
/// reason; without it, prints `skipping <test_name>: <reason>` to stderr and returns
/// false, and the test should return early.
pub fn require_root(test_name: &str) -> bool {
    match capability() {
        Ok(()) => true,
        Err(reason) if under_ci() => {
            panic!("{test_name} needs root and network namespaces, and under CI=true it may not be skipped: {reason}")
        }
        Err(reason) => {
            // Straight to fd 2, not eprintln!: libtest captures the macro's output of
            // passing tests, and a skip nobody sees looks like a pass.
            let _ = writeln!(std::io::stderr(), "skipping {test_name}: {reason}");
            false
        }
    }
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn capability() -> Result<(), &'static str> {
    static RESULT: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *RESULT.get_or_init(probe)
}

fn probe() -> Result<(), &'static str> {
    if !geteuid().is_root() {
        return Err("not running as root (`cargo xtask test` re-runs the tests through sudo)");
    }
    // Root in a container may still lack CAP_SYS_ADMIN; trying is the only sure test.
    // A throwaway thread does it so the caller's thread keeps its namespace.
    let unshared = std::thread::spawn(|| unshare(CloneFlags::CLONE_NEWNET).is_ok())
        .join()
        .unwrap_or(false);
    if !unshared {
        return Err("cannot create a network namespace (unshare(CLONE_NEWNET) failed: missing CAP_SYS_ADMIN?)");
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err("the `ip` command (Debian package iproute2) is missing"),
    }
}
