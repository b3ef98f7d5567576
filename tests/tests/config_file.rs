//! `s2cs --config FILE`: the real daemon takes its settings from a TOML file,
//! flags on the command line override it, and an unknown key stops it with
//! a message naming the key and the file.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Gateway, CONTROL_PORT};
use testbed::netns::addr;
use testbed::{
    bin, in_netns, require_root, run_in, spawn_in, wait_for_tcp, Node, Producer, Topology,
};

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("config dir");
    let path = dir.join("s2cs.toml");
    std::fs::write(&path, text).expect("writing the config");
    path
}

#[test]
fn config_file_sets_flags_and_the_command_line_overrides_it() {
    if !require_root("config_file_sets_flags_and_the_command_line_overrides_it") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let ns = topo.ns(Node::InboundGw);
    let echo = Producer::start_echo(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
    )
    .expect("echo");
    let dir = std::env::temp_dir().join(format!("ss-config-test-{}", std::process::id()));
    let config = write_config(
        &dir,
        &format!(
            r#"# as an operator would write it
listener_ip = "{ip}"
port = 5999            # overridden on the command line below
port-range = "5150-5159"
type = "splice"
state_dir = "{state}"
session_ttl = 0
keep_sessions = true
"#,
            ip = addr::INBOUND_GW_WAN,
            state = dir.display()
        ),
    );
    let port = CONTROL_PORT.to_string();
    let daemon = spawn_in(
        ns,
        bin("s2cs"),
        ["--config", config.to_str().expect("utf-8"), "--port", &port],
    )
    .expect("starting s2cs");
    let control = SocketAddr::new(addr::INBOUND_GW_WAN.into(), CONTROL_PORT);
    if let Err(e) = wait_for_tcp(ns, control, Duration::from_secs(20)) {
        panic!(
            "s2cs did not come up on the command line's port: {e:#}\n{}",
            daemon.log_contents()
        );
    }
    let gw = Gateway {
        daemon,
        ns: ns.to_string(),
        control,
        listener_ip: addr::INBOUND_GW_WAN.into(),
        cert: dir.join("server.crt"),
        state_dir: dir,
    };
    assert!(
        in_netns(ns, || std::net::TcpStream::connect(SocketAddr::new(
            addr::INBOUND_GW_WAN.into(),
            5999
        )))
        .is_err(),
        "the file's port was overridden, nothing listens there"
    );
    // listener_ip, port range and type come from the file; the certificate
    // was made in the file's state_dir (Gateway reads it from there).
    let session = gw.inbound(ns, echo.addr(), 1);
    assert_eq!(
        session.listeners,
        vec![SocketAddr::new(addr::INBOUND_GW_WAN.into(), 5150)]
    );
    let out = gw.s2uc(ns, "status", &[&session.uid, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(status["backend"], "splice");
}

#[test]
fn an_unknown_config_key_is_a_clear_error() {
    if !require_root("an_unknown_config_key_is_a_clear_error") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let dir = std::env::temp_dir().join(format!("ss-config-bad-{}", std::process::id()));
    let config = write_config(
        &dir,
        "port_range = \"5150-5159\"\nlistner_ip = \"10.0.0.1\"\n",
    );
    let out = run_in(
        topo.ns(Node::InboundGw),
        bin("s2cs"),
        ["--config", config.to_str().expect("utf-8")],
    )
    .expect("running s2cs");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "s2cs refuses to start: {stderr}"
    );
    assert!(stderr.contains("unknown key \"listner_ip\""), "{stderr}");
    assert!(
        stderr.contains(config.to_str().expect("utf-8")),
        "the file is named: {stderr}"
    );
    assert!(
        stderr.contains("listener_ip"),
        "the valid keys are listed: {stderr}"
    );
}
