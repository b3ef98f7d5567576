//! Seeing what flows: `s2uc list` and `s2uc status` against a gateway with
//! live sessions, reading the real counters of a real stream.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{http_get, Gateway};
use testbed::netns::addr;
use testbed::{require_root, Node, Producer, Stream, Topology};

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "s2uc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn status_and_list_show_live_counters_and_watch_ends_at_release() {
    if !require_root("status_and_list_show_live_counters_and_watch_ends_at_release") {
        return;
    }
    let topo = Topology::new().unwrap();
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .unwrap();
    let gin = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "splice",
        &[],
    );
    let ns = topo.ns(Node::InboundGw);
    let a = gin.inbound(ns, echo.addr(), 1);
    let b = gin.inbound(ns, echo.addr(), 2);
    let stream = Stream::start(topo.ns(Node::OutboundGw), a.listeners[0]).unwrap();
    stream.assert_progress(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));

    let s = json(&gin.s2uc(ns, "status", &[&a.uid, "--json"]));
    assert_eq!(s["uid"], a.uid.as_str());
    assert_eq!(s["role"], "PROD");
    assert_eq!(s["backend"], "splice");
    assert_eq!(s["connections_active"], 1);
    assert_eq!(s["targets"][0], echo.addr().to_string().as_str());
    assert!(
        s["bytes_forward"].as_u64().unwrap_or(0) > 0
            && s["bytes_backward"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );

    let l = json(&gin.s2uc(ns, "list", &["--json"]));
    let uids: Vec<&str> = l
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|v| v["uid"].as_str())
        .collect();
    assert_eq!(uids.len(), 2, "{l}");
    assert!(uids.contains(&a.uid.as_str()) && uids.contains(&b.uid.as_str()));

    let human = gin.s2uc(ns, "list", &[]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains(&a.uid) && text.contains("PROD"), "{text}");

    let unknown = gin.s2uc(ns, "status", &[&uuid::Uuid::new_v4().to_string()]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("NotFound"));

    // --watch redraws until the session goes away.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            let out = gin.s2uc(ns, "release", &[&b.uid]);
            assert!(out.status.success());
        });
        let watched = gin.s2uc(ns, "status", &[&b.uid, "--watch", "--interval", "0.2"]);
        let text = String::from_utf8_lossy(&watched.stdout);
        assert!(
            watched.status.success(),
            "{}",
            String::from_utf8_lossy(&watched.stderr)
        );
        assert!(
            text.matches("connections:").count() >= 3,
            "refreshed several times:\n{text}"
        );
        assert!(
            text.contains("rate:"),
            "rates shown after the first reading:\n{text}"
        );
        assert!(text.trim_end().ends_with("was released"), "{text}");
    });
    stream.finish().expect("stream intact");
}

#[test]
fn metrics_endpoint_and_json_logs_carry_each_session() {
    if !require_root("metrics_endpoint_and_json_logs_carry_each_session") {
        return;
    }
    let topo = Topology::new().unwrap();
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .unwrap();
    let metrics: SocketAddr = "10.91.2.2:9100".parse().unwrap();
    let gin = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "splice",
        &["--metrics_addr", "10.91.2.2:9100", "--log_format", "json"],
    );
    let ns = topo.ns(Node::InboundGw);
    let a = gin.inbound(ns, echo.addr(), 1);
    let stream = Stream::start(topo.ns(Node::OutboundGw), a.listeners[0]).unwrap();
    stream.assert_progress(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));

    let page = http_get(ns, metrics, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let line = page
        .lines()
        .find(|l| {
            l.starts_with("scistream_session_bytes_total{")
                && l.contains(&a.uid)
                && l.contains("direction=\"forward\"")
        })
        .unwrap_or_else(|| panic!("no byte counter for the session:\n{page}"));
    let value: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(value > 0.0, "{line}");
    assert!(page.contains("scistream_sessions 1"), "{page}");
    assert!(page.contains("process_resident_memory_bytes"), "{page}");
    assert!(
        page.contains("scistream_session_connections_active{"),
        "{page}"
    );

    // Every log line is one JSON object; the session's lines carry its uid and role.
    let log = gin.daemon.log_contents();
    let session_lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .filter(|v: &serde_json::Value| v.to_string().contains(&a.uid))
        .collect();
    assert!(
        !session_lines.is_empty(),
        "no JSON log line names the session:\n{log}"
    );
    assert!(
        session_lines.iter().any(|v| v.to_string().contains("PROD")),
        "role missing:\n{log}"
    );
    stream.finish().expect("stream intact");
}
