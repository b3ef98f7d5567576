//! `HaproxySubprocess`: the real HAProxy in TCP mode, one process per
//! session, as SciStream 1.2 runs it (plaintext between the gateways), but in
//! the foreground under s2cs instead of daemonised out of reach. HAProxy
//! serves the session's reserved listening sockets themselves (`bind fd@N`),
//! so the ports never leave our hands. A retarget changes each server's
//! address through HAProxy's runtime API on a private unix socket: new
//! connections go to the new targets, live ones keep theirs, and the
//! process stays the same.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

use super::{control_command_within, Compat, Listeners, Retarget};
use crate::dataplane::{SessionSpec, StatsSnapshot};

/// How long a `/metrics` scrape or `status` call waits for HAProxy's counters.
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub struct Haproxy;

/// HAProxy's server address; `ipv6@` says which colon ends the address.
fn server(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(_) => a.to_string(),
        SocketAddr::V6(v6) => format!("ipv6@{}:{}", v6.ip(), v6.port()),
    }
}

/// The runtime API socket next to a session's config.
pub fn control_socket(config: &Path) -> PathBuf {
    config.with_extension("sock")
}

/// The config of a session whose listening sockets are the inherited `fds`;
/// `socket` is its runtime API (mode 0600, admin level, for retargets).
pub fn config(uid: &str, fds: &[i32], targets: &[SocketAddr], socket: &Path) -> String {
    // No maxconn: HAProxy derives it from the fd limit it inherits from s2cs.
    // Idle timeouts long enough for a quiet stream; SciStream 1.2's 50 s cut
    // off streams that paused.
    let socket = socket.display();
    let mut c = format!(
        "# scistream-rs HaproxySubprocess, session {uid}\n\
         global\n    stats socket {socket} mode 600 level admin\n\n\
         defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 1h\n    timeout server 1h\n"
    );
    for (i, (fd, t)) in fds.iter().zip(targets.iter().cycle()).enumerate() {
        let _ = write!(c, "\nfrontend f{i}\n    bind fd@{fd}\n    default_backend b{i}\n\nbackend b{i}\n    server s{i} {}\n", server(*t));
    }
    c
}

/// A session's counters from HAProxy's `show stat` CSV: its frontends' bytes
/// in (from the accepting side: forward) and out, current and total
/// sessions, and its backends' failed connects to the target. `None` when
/// the answer has no header line naming those columns.
pub fn parse_show_stat(csv: &str) -> Option<StatsSnapshot> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()?
        .trim_start_matches('#')
        .trim()
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (sv, scur, stot, bin, bout, econ) = (
        col("svname")?,
        col("scur")?,
        col("stot")?,
        col("bin")?,
        col("bout")?,
        col("econ")?,
    );
    let mut s = StatsSnapshot::default();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match f.get(sv) {
            Some(&"FRONTEND") => {
                s.bytes_forward += num(bin);
                s.bytes_backward += num(bout);
                s.connections_active += num(scur);
                s.connections_total += num(stot);
            }
            Some(&"BACKEND") => s.connections_failed += num(econ),
            _ => {}
        }
    }
    Some(s)
}

impl Compat for Haproxy {
    const NAME: &'static str = "HaproxySubprocess";
    const PROGRAM: &'static str = "haproxy";
    const PACKAGE: &'static str = "haproxy";

    fn files(
        &self,
        spec: &SessionSpec,
        listeners: &Listeners,
        targets: &[SocketAddr],
        config_path: &Path,
    ) -> Vec<(&'static str, String)> {
        let socket = control_socket(config_path);
        vec![
            (
                "cfg",
                config(&spec.log_id, &listeners.fds(), targets, &socket),
            ),
            // Holds the socket's path: HAProxy renames its socket over it,
            // and release deletes it with the other files.
            ("sock", String::new()),
        ]
    }

    fn args(&self, config: &Path) -> Vec<OsString> {
        vec!["-db".into(), "-f".into(), config.into()]
    }

    fn check_args(&self, config: &Path) -> Option<Vec<OsString>> {
        // The sockets are already listening when HAProxy starts, so only a
        // dry run tells whether it will accept the config.
        Some(vec!["-c".into(), "-q".into(), "-f".into(), config.into()])
    }

    fn inherits_listeners(&self) -> bool {
        true
    }

    fn is_error_line(line: &str) -> bool {
        line.contains("[ALERT]") || line.contains("[WARNING]")
    }

    fn is_loaded_line(_line: &str) -> bool {
        // A new HAProxy takes over instead; its epoll set shows when it serves.
        false
    }

    const COUNTERS: bool = true;

    fn counters(&self, config: &Path) -> std::io::Result<StatsSnapshot> {
        let answer = control_command_within(&control_socket(config), "show stat", STATS_TIMEOUT)?;
        parse_show_stat(&answer).ok_or_else(|| {
            std::io::Error::other(format!(
                "unexpected `show stat` answer: {:.200}",
                answer.trim()
            ))
        })
    }

    fn retarget(&self, config: &Path, _pid: Pid, targets: &[SocketAddr]) -> Retarget {
        let lines = (0..targets.len())
            .map(|i| {
                let t = targets[i];
                format!("set server b{i}/s{i} addr {} port {}", t.ip(), t.port())
            })
            .collect();
        Retarget::Commands {
            socket: control_socket(config),
            lines,
            refusals: &[
                "No such", "Unknown", "Require", "Invalid", "invalid", "failed",
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_stat_sums_frontend_bytes_and_sessions_and_backend_connect_errors() {
        // Trimmed from HAProxy 2.6's answer for a two-listener session.
        let csv =
            "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,\n\
                   f0,FRONTEND,,,1,1,100,3,1000,20,0,0,0,,,\n\
                   b0,s0,0,0,1,1,,3,1000,20,,0,,0,0,\n\
                   b0,BACKEND,0,0,1,1,10,3,1000,20,0,0,,2,0,\n\
                   f1,FRONTEND,,,0,1,100,1,24,4000,0,0,0,,,\n\
                   b1,BACKEND,0,0,0,1,10,1,24,4000,0,0,,0,0,\n\n";
        let s = parse_show_stat(csv).expect("parsed");
        assert_eq!((s.bytes_forward, s.bytes_backward), (1024, 4020));
        assert_eq!(
            (
                s.connections_active,
                s.connections_total,
                s.connections_failed
            ),
            (1, 4, 2)
        );
        assert_eq!(parse_show_stat("Unknown command.\n"), None);
    }

    #[test]
    fn haproxy_config_binds_inherited_fds_and_cycles_targets() {
        let c = config(
            "u",
            &[7, 8],
            &["10.0.0.2:7000".parse().unwrap()],
            Path::new("/s.sock"),
        );
        assert!(c.contains("bind fd@7") && c.contains("bind fd@8"), "{c}");
        assert_eq!(c.matches("server s").count(), 2);
        assert!(c.contains("server s1 10.0.0.2:7000"), "{c}");
        assert!(
            !c.contains("daemon") && c.contains("stats socket /s.sock mode 600 level admin"),
            "{c}"
        );
        assert!(config(
            "u",
            &[3],
            &["[::1]:7000".parse().unwrap()],
            Path::new("/s.sock")
        )
        .contains("ipv6@::1:7000"));
    }
}
