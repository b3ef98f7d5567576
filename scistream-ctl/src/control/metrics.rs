//! Prometheus `/metrics` (`s2cs --metrics_addr`): per-session bytes and
//! connections, tunnel refusals, guard drops and process figures. Built
//! fresh from the registry at each scrape, so a released session's series
//! disappear with it.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as Prom;

use super::session::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    uid: String,
    role: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    uid: String,
    role: String,
    backend: String,
    direction: &'static str,
}

/// The exposition text for the current state.
pub fn render(reg: &Registry) -> String {
    let mut prom = Prom::default();
    let bytes = Family::<DirLabels, Counter<u64, AtomicU64>>::default();
    let active = Family::<SessionLabels, Gauge>::default();
    let total = Family::<SessionLabels, Counter<u64, AtomicU64>>::default();
    let failed = Family::<SessionLabels, Counter<u64, AtomicU64>>::default();
    let refused = Family::<SessionLabels, Counter<u64, AtomicU64>>::default();
    let guard_session = Family::<SessionLabels, Counter<u64, AtomicU64>>::default();
    let available = Family::<SessionLabels, Gauge>::default();
    let sessions = Gauge::<i64>::default();
    let views = reg.list(None);
    sessions.set(views.len() as i64);
    for v in &views {
        // /metrics has no authentication: a uid that keys its tunnel is
        // shown as the session's stand-in name, as in the logs.
        let l = SessionLabels {
            uid: v.log_id.clone(),
            role: v.role.as_str().into(),
            backend: v.backend.into(),
        };
        let d = |direction| DirLabels {
            uid: l.uid.clone(),
            role: l.role.clone(),
            backend: l.backend.clone(),
            direction,
        };
        // The guard sees frames whatever the backend, so before the skip below.
        if let Some(d) = reg.guard_session_dropped(&v.uid) {
            guard_session.get_or_create(&l).inc_by(d.packets);
        }
        available
            .get_or_create(&l)
            .set(v.counters_observable as i64);
        if !v.counters_observable {
            // No series rather than zeros a dashboard would read as idle.
            continue;
        }
        bytes
            .get_or_create(&d("forward"))
            .inc_by(v.stats.bytes_forward);
        bytes
            .get_or_create(&d("backward"))
            .inc_by(v.stats.bytes_backward);
        active
            .get_or_create(&l)
            .set(v.stats.connections_active as i64);
        total.get_or_create(&l).inc_by(v.stats.connections_total);
        failed.get_or_create(&l).inc_by(v.stats.connections_failed);
        refused.get_or_create(&l).inc_by(v.stats.auth_failures);
    }
    prom.register("scistream_sessions", "Live sessions", sessions);
    prom.register(
        "scistream_session_bytes",
        "Bytes moved by a session (forward: from the accepting side)",
        bytes,
    );
    prom.register(
        "scistream_session_connections_active",
        "Open connections of a session",
        active,
    );
    prom.register(
        "scistream_session_connections",
        "Connections a session accepted",
        total,
    );
    prom.register(
        "scistream_session_connections_failed",
        "Connections that ended with an error",
        failed,
    );
    prom.register(
        "scistream_tunnel_auth_failures",
        "Tunnel peers refused (handshake or session proof)",
        refused,
    );
    prom.register(
        "scistream_guard_session_dropped_packets",
        "Packets the guard dropped at a session's ports from sources it does not allow",
        guard_session,
    );
    prom.register(
        "scistream_session_counters_available",
        "1 when the session's byte and connection series are real; 0 when its backend's program moves the bytes out of s2cs's sight (StunnelSubprocess) and they are omitted",
        available,
    );
    // One family for every program's hooks: the guard's and the NAT's series
    // share the name, so a scrape never sees it registered twice.
    let attached = Family::<Vec<(&str, String)>, Gauge>::default();
    let mut any_attached = false;
    for (iface, hook) in reg.guard_hooks() {
        attached
            .get_or_create(&vec![
                ("program", "guard".into()),
                ("iface", iface),
                ("hook", hook.to_string()),
            ])
            .set(1);
        any_attached = true;
    }
    let host = reg.backend().host_metrics();
    for (iface, hook) in host.iter().flat_map(|h| h.hooks.iter().cloned()) {
        attached
            .get_or_create(&vec![
                ("program", "nat".into()),
                ("iface", iface),
                ("hook", hook.to_string()),
            ])
            .set(1);
        any_attached = true;
    }
    if any_attached {
        prom.register("scistream_ebpf_attached", "1 for each eBPF program on each data interface, with the hook it runs at (xdp: driver mode, tc: clsact)", attached);
    }
    if let Some(d) = reg.guard_dropped() {
        let packets = Counter::<u64, AtomicU64>::default();
        packets.inc_by(d.packets);
        let dropped_bytes = Counter::<u64, AtomicU64>::default();
        dropped_bytes.inc_by(d.bytes);
        prom.register(
            "scistream_guard_dropped_packets",
            "Packets the guard dropped on the data port range",
            packets,
        );
        prom.register(
            "scistream_guard_dropped_bytes",
            "Bytes the guard dropped on the data port range",
            dropped_bytes,
        );
    }
    if let Some(drops) = host.map(|h| h.drops) {
        let (packets, nat_bytes) = (
            Family::<Vec<(&str, &str)>, Counter<u64, AtomicU64>>::default(),
            Family::<Vec<(&str, &str)>, Counter<u64, AtomicU64>>::default(),
        );
        for (reason, c) in drops {
            packets
                .get_or_create(&vec![("reason", reason)])
                .inc_by(c.packets);
            nat_bytes
                .get_or_create(&vec![("reason", reason)])
                .inc_by(c.bytes);
        }
        prom.register(
            "scistream_xdp_nat_dropped_packets",
            "Frames the xdp backend's NAT dropped, by reason",
            packets,
        );
        prom.register(
            "scistream_xdp_nat_dropped_bytes",
            "Bytes the xdp backend's NAT dropped, by reason",
            nat_bytes,
        );
    }
    process_metrics(&mut prom);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &prom);
    out
}

/// The usual process_* series, read from /proc/self.
fn process_metrics(prom: &mut Prom) {
    let page = 4096i64;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which may contain spaces.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let cpu = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            cpu.set((num(11) + num(12)) / ticks);
            prom.register("process_cpu_seconds", "User and system CPU time", cpu);
            let threads = Gauge::<i64>::default();
            threads.set(num(17) as i64);
            prom.register("process_threads", "Threads", threads);
            let rss = Gauge::<i64>::default();
            rss.set(num(21) as i64 * page);
            prom.register("process_resident_memory_bytes", "Resident memory", rss);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let g = Gauge::<i64>::default();
        g.set(fds.count() as i64);
        prom.register("process_open_fds", "Open file descriptors", g);
    }
}

/// Serves `/metrics` on an already bound listener (bound by the caller so a
/// taken port stops s2cs at start with a clear error).
pub async fn serve(listener: tokio::net::TcpListener, reg: Arc<Registry>) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let reg = reg.clone();
            async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    render(&reg),
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app).await
}
