//! `s2uc list` and `s2uc status`: what flows through a gateway, read with the
//! `list`/`status` extension RPCs. Rates come from two readings of the byte
//! counters, so the server keeps no history.

use std::time::{Duration, Instant};

use tonic::Code;

use super::{status_error, Connection};
use crate::proto::SessionInfo;

pub fn info_json(s: &SessionInfo) -> serde_json::Value {
    // Unknown counters are null, never a zero that reads as "idle".
    let seen = counters_observable(s);
    let n = |v: u64| {
        if seen {
            serde_json::json!(v)
        } else {
            serde_json::Value::Null
        }
    };
    serde_json::json!({
        "uid": s.uid, "role": s.role, "backend": s.backend,
        "listeners": s.listeners, "targets": s.targets,
        "hello_received": s.hello_received, "rate_kbps": s.rate, "num_conn": s.num_conn,
        "connections_active": n(s.connections_active), "connections_total": n(s.connections_total),
        "connections_failed": n(s.connections_failed),
        "bytes_forward": n(s.bytes_forward), "bytes_backward": n(s.bytes_backward),
        "auth_failures": s.auth_failures, "age_ms": s.age_ms, "owner": s.owner,
        "guard_dropped_packets": s.guard_dropped_packets, "guard_dropped_bytes": s.guard_dropped_bytes,
        "guard_attach": s.guard_attach,
        "counters_observable": seen,
        "tunnel_secret": if s.tunnel_secret.is_empty() { serde_json::Value::Null } else { serde_json::json!(s.tunnel_secret) },
    })
}

/// What `tunnel_secret` means, for people; older servers do not say.
fn secret_text(s: &SessionInfo) -> &'static str {
    match s.tunnel_secret.as_str() {
        "key" => "uid + random session key (only this session's client has it)",
        "uid" => "the uid alone, as SciStream 1.2: whoever learns the uid can join the tunnel",
        "none" => "none: this backend carries plaintext between the gateways",
        _ => "not reported by this s2cs",
    }
}

/// Whether the session's counters are real. Servers say so
/// (`counters_available`); an older s2cs does not, and then its compat
/// backends (`StunnelSubprocess`, `HaproxySubprocess`) counted nothing.
fn counters_observable(s: &SessionInfo) -> bool {
    s.counters_available
        .unwrap_or(!s.backend.ends_with("Subprocess"))
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn gbits(bytes: u64, over: Duration) -> String {
    let s = over.as_secs_f64();
    if s <= 0.0 {
        "-".into()
    } else {
        format!("{:.3} Gbit/s", bytes as f64 * 8.0 / s / 1e9)
    }
}

pub async fn list(conn: &Connection, json: bool) -> anyhow::Result<()> {
    let sessions = conn
        .list()
        .await
        .map_err(|s| status_error(&conn.target, "list", &s))?;
    if json {
        println!(
            "{}",
            serde_json::Value::Array(sessions.iter().map(info_json).collect())
        );
        return Ok(());
    }
    if sessions.is_empty() {
        println!("no sessions on {}", conn.target);
        return Ok(());
    }
    println!(
        "{:<36} {:<4} {:<8} {:<6} {:>5} {:>11} {:>11} {:>8}  LISTENERS -> TARGETS",
        "UID", "ROLE", "BACKEND", "SECRET", "CONNS", "FORWARD", "BACK", "AGE"
    );
    for s in &sessions {
        println!(
            "{:<36} {:<4} {:<8} {:<6} {:>5} {:>11} {:>11} {:>7}s  {} -> {}",
            s.uid,
            s.role,
            s.backend,
            if s.tunnel_secret.is_empty() {
                "?"
            } else {
                s.tunnel_secret.as_str()
            },
            if counters_observable(s) {
                s.connections_active.to_string()
            } else {
                "n/a".into()
            },
            if counters_observable(s) {
                bytes(s.bytes_forward)
            } else {
                "n/a".into()
            },
            if counters_observable(s) {
                bytes(s.bytes_backward)
            } else {
                "n/a".into()
            },
            s.age_ms / 1000,
            s.listeners.join(","),
            if s.targets.is_empty() {
                "(not set)".to_string()
            } else {
                s.targets.join(",")
            },
        );
    }
    Ok(())
}

fn print_status(s: &SessionInfo, rates: Option<(String, String)>) {
    println!("uid:         {}", s.uid);
    println!("role:        {} ({} backend)", s.role, s.backend);
    println!("listeners:   {}", s.listeners.join(", "));
    println!(
        "targets:     {}",
        if s.targets.is_empty() {
            "(not set yet)".into()
        } else {
            s.targets.join(", ")
        }
    );
    println!(
        "hello:       {}",
        if s.hello_received {
            "received"
        } else {
            "waiting"
        }
    );
    println!("secret:      {}", secret_text(s));
    if counters_observable(s) {
        println!(
            "connections: {} active, {} total, {} failed",
            s.connections_active, s.connections_total, s.connections_failed
        );
        println!("forward:     {}", bytes(s.bytes_forward));
        println!("back:        {}", bytes(s.bytes_backward));
    } else {
        println!(
            "counters:    not observable: the {} backend's program moves the bytes outside s2cs",
            s.backend
        );
    }
    if let Some((f, b)) = rates.filter(|_| counters_observable(s)) {
        println!("rate:        {f} forward, {b} back");
    }
    if s.auth_failures > 0 {
        println!(
            "refused:     {} tunnel peers failed the session proof",
            s.auth_failures
        );
    }
    if !s.guard_attach.is_empty() {
        println!(
            "guard:       on {}",
            s.guard_attach.replace('=', " at ").replace(',', ", ")
        );
    }
    if s.guard_dropped_packets > 0 {
        println!(
            "guard:       {} frames ({}) from peers not allowed, dropped",
            s.guard_dropped_packets,
            bytes(s.guard_dropped_bytes)
        );
    }
    println!(
        "age:         {} s (requested rate {} kbit/s)",
        s.age_ms / 1000,
        s.rate
    );
}

pub async fn status(
    conn: &Connection,
    uid: &str,
    watch: bool,
    every: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut last: Option<(Instant, SessionInfo)> = None;
    loop {
        let s = match conn.status(uid).await {
            Ok(s) => s,
            // The session ended while we watched: that is an answer, not an error.
            Err(e) if watch && last.is_some() && e.code() == Code::NotFound => {
                println!("session {uid} was released");
                return Ok(());
            }
            Err(e) => return Err(status_error(&conn.target, "status", &e)),
        };
        let now = Instant::now();
        let rates = last.as_ref().map(|(t, prev)| {
            let dt = now - *t;
            (
                gbits(s.bytes_forward.saturating_sub(prev.bytes_forward), dt),
                gbits(s.bytes_backward.saturating_sub(prev.bytes_backward), dt),
            )
        });
        if json {
            println!("{}", info_json(&s));
        } else {
            if watch {
                // Redraw in place: clear the screen, cursor home.
                print!("\x1b[2J\x1b[H");
            }
            print_status(&s, rates);
        }
        if !watch {
            return Ok(());
        }
        last = Some((now, s));
        tokio::time::sleep(every).await;
    }
}
