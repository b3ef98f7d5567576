//! What keys a session's tunnel stays with its owner. With our `s2uc` the
//! inbound gateway makes a random key that only the client gets and carries
//! to the outbound gateway, so knowing the uid is not enough to reach the
//! producer; a session made as SciStream 1.2 makes it (no key) still streams.
//! Where the uid is the secret (SciStream 1.2's client, stunnel's PSK) it
//! appears in no `/metrics` label, process command line, log line below
//! debug or file others can read, and the state directory is private.

mod common;

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::raw::{block_on, RawClient};
use common::{http_get, Gateway, MIB};
use testbed::netns::addr;
use testbed::process::{netns_command, run_command};
use testbed::{bin, consume, in_netns, require_root, Node, Producer, Topology};

/// A user who shares nothing with the session's owner but the uid and the
/// listeners: `s2uc` with a HOME of its own, so no key the owner kept.
struct Stranger {
    home: PathBuf,
}

impl Stranger {
    fn new(name: &str) -> Stranger {
        let home = std::env::temp_dir().join(format!("ss-stranger-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).expect("stranger's home");
        Stranger { home }
    }

    fn s2uc(&self, gw: &Gateway, ns: &str, args: &[&str]) -> Output {
        let control = gw.control.to_string();
        let mut cmd = netns_command(ns, bin("s2uc"));
        cmd.args([
            "outbound-request",
            "--s2cs",
            &control,
            "--server_cert",
            gw.cert_str(),
            "--json",
        ])
        .args(args)
        .env("HOME", &self.home)
        .env("XDG_CONFIG_HOME", self.home.join("config"))
        .env_remove("S2UC_TUNNEL_KEY");
        run_command(cmd, Duration::from_secs(60)).expect("running s2uc")
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn status_json(gw: &Gateway, ns: &str, uid: &str) -> serde_json::Value {
    let out = gw.s2uc(ns, "status", &[uid, "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json")
}

fn listener_of(out: &Output) -> SocketAddr {
    assert!(
        out.status.success(),
        "s2uc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    v["listeners"][0]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no listener in {v}"))
}

#[test]
fn a_peer_knowing_only_the_uid_of_an_s2uc_session_gets_no_byte_to_the_producer() {
    const TEST: &str =
        "a_peer_knowing_only_the_uid_of_an_s2uc_session_gets_no_byte_to_the_producer";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().unwrap();
    let data = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        MIB,
    )
    .unwrap();
    let (gin_ns, gout_ns) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    let gin = Gateway::start(gin_ns, addr::INBOUND_GW_WAN.into(), "5100-5199", "tls", &[]);
    let gout = Gateway::start(
        gout_ns,
        addr::OUTBOUND_GW_LAN.into(),
        "5300-5399",
        "tls",
        &["--peer_ca", gin.cert_str()],
    );

    let victim = gin.inbound(gin_ns, data.addr(), 1);
    assert_eq!(
        victim.tunnel_key.as_ref().map(String::len),
        Some(64),
        "inbound-request --json gives the key to its owner"
    );
    assert_eq!(
        status_json(&gin, gin_ns, &victim.uid)["tunnel_secret"],
        "key"
    );

    // The stranger sets up the outbound side with the right uid and listeners.
    let stranger = Stranger::new("uid-only");
    let listeners = victim.listeners[0].to_string();
    let out = stranger.s2uc(
        &gout,
        gout_ns,
        &["--num_conn", "1", &victim.uid, &listeners],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no tunnel key kept"),
        "the stranger is told: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forged = listener_of(&out);
    assert_eq!(
        status_json(&gout, gout_ns, &victim.uid)["tunnel_secret"],
        "uid"
    );
    let r = consume(topo.ns(Node::Consumer), forged, MIB, 3);
    assert!(
        r.as_ref().map(|t| t.received_bytes == 0).unwrap_or(true),
        "nothing may come back: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(data.accepted(), 0, "no connection reached the producer");
    let refused = status_json(&gin, gin_ns, &victim.uid)["auth_failures"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        refused >= 1,
        "the inbound gateway refused the stranger's tunnel: {refused}"
    );
    let out = gout.s2uc(gout_ns, "release", &[&victim.uid]);
    assert!(out.status.success());

    // The owner's own outbound-request, exactly as the tutorial writes it,
    // carries the key it kept and streams.
    let owned = gout.outbound(gout_ns, &victim, 1);
    assert_eq!(
        status_json(&gout, gout_ns, &victim.uid)["tunnel_secret"],
        "key"
    );
    let t = consume(topo.ns(Node::Consumer), owned.listeners[0], MIB, 4)
        .expect("the owner's session streams");
    t.verify_with(&data.wait_for(1, Duration::from_secs(10)).unwrap(), MIB)
        .unwrap();

    // The key also travels by hand (--tunnel_key) for an owner on another machine.
    let victim2 = gin.inbound(gin_ns, data.addr(), 1);
    let key = victim2.tunnel_key.clone().expect("a key");
    let elsewhere = Stranger::new("owner-elsewhere");
    let l2 = victim2.listeners[0].to_string();
    let out = elsewhere.s2uc(
        &gout,
        gout_ns,
        &["--num_conn", "1", "--tunnel_key", &key, &victim2.uid, &l2],
    );
    let t = consume(topo.ns(Node::Consumer), listener_of(&out), MIB, 5)
        .expect("streams with the key given by hand");
    t.verify_with(&data.wait_for(2, Duration::from_secs(10)).unwrap(), MIB)
        .unwrap();
}

#[test]
fn a_session_made_as_scistream_1_2_makes_it_keeps_the_uid_secret_and_streams() {
    const TEST: &str = "a_session_made_as_scistream_1_2_makes_it_keeps_the_uid_secret_and_streams";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().unwrap();
    let data = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        MIB,
    )
    .unwrap();
    let (gin_ns, gout_ns) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    let gin = Gateway::start(
        gin_ns,
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "tls",
        &["--ssl", "false"],
    );
    let gout = Gateway::start(
        gout_ns,
        addr::OUTBOUND_GW_LAN.into(),
        "5300-5399",
        "tls",
        &["--ssl", "false", "--peer_ca", gin.cert_str()],
    );

    // The inbound side as SciStream 1.2's client does it: no key asked for.
    let uid = common::raw::new_uid();
    let producer = data.addr().to_string();
    let (control, u) = (gin.control, uid.clone());
    let listeners = in_netns(gin_ns, move || {
        block_on(async move {
            let c = RawClient::connect(control).await;
            let (req, hello) = tokio::join!(c.req(&u, "PROD", 1, 10000), async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.hello(&u, &[&producer], "PROD").await
            });
            let resp = req.expect("req");
            hello.expect("hello");
            let targets: Vec<&str> = resp.prod_listeners.iter().map(String::as_str).collect();
            c.update(&u, &targets, "PROD").await.expect("update");
            resp.listeners
        })
    });
    let status = gin.s2uc(gin_ns, "status", &[&uid, "--json", "--ssl", "false"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json");
    assert_eq!(v["tunnel_secret"], "uid", "{v}");

    // Our s2uc on the outbound side finds no key for this uid and sends none.
    let out = gout.s2uc(
        gout_ns,
        "outbound-request",
        &[
            "--ssl",
            "false",
            "--json",
            "--num_conn",
            "1",
            &uid,
            &listeners[0],
        ],
    );
    let consumer_side = listener_of(&out);
    let t = consume(topo.ns(Node::Consumer), consumer_side, MIB, 6)
        .expect("a uid-keyed session streams");
    t.verify_with(&data.wait_for(1, Duration::from_secs(10)).unwrap(), MIB)
        .unwrap();
}

/// Every file and directory under `dir`, with its mode.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32, bool)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        out.push((e.path(), mode, meta.is_dir()));
        if meta.is_dir() {
            walk(&e.path(), out);
        }
    }
}

/// Reads everything the producer sends through `to` (sending nothing).
fn read_all(ns: &str, to: SocketAddr) -> u64 {
    in_netns(ns, || {
        let mut s =
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    })
}

#[test]
fn a_stunnel_sessions_uid_is_in_no_metrics_command_line_log_or_readable_file() {
    const TEST: &str = "a_stunnel_sessions_uid_is_in_no_metrics_command_line_log_or_readable_file";
    if !require_root(TEST) {
        return;
    }
    let topo = Topology::new().unwrap();
    let data = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), 7000),
        MIB,
    )
    .unwrap();
    let (gin_ns, gout_ns) = (topo.ns(Node::InboundGw), topo.ns(Node::OutboundGw));
    let gin_ip: IpAddr = addr::INBOUND_GW_WAN.into();
    let metrics = SocketAddr::new(gin_ip, 9102);
    let gin = Gateway::start(
        gin_ns,
        gin_ip,
        "5100-5199",
        "StunnelSubprocess",
        &["--metrics_addr", &metrics.to_string()],
    );
    let gout = Gateway::start(
        gout_ns,
        addr::OUTBOUND_GW_LAN.into(),
        "5300-5399",
        "StunnelSubprocess",
        &[],
    );

    // --allowed_peers makes the guard write guard-peers.json, keyed by uid.
    let (pip, pport) = (data.addr().ip().to_string(), data.addr().port().to_string());
    let peer = addr::OUTBOUND_GW_WAN.to_string();
    let inbound = gin.s2uc_json(
        gin_ns,
        "inbound-request",
        &[
            "--remote_ip",
            &pip,
            "--receiver_ports",
            &pport,
            "--num_conn",
            "1",
            "--allowed_peers",
            &peer,
        ],
    );
    assert_eq!(
        inbound.tunnel_key, None,
        "stunnel sessions are keyed by the uid, as in SciStream 1.2"
    );
    let outbound = gout.outbound(gout_ns, &inbound, 1);
    let got = read_all(topo.ns(Node::Consumer), outbound.listeners[0]);
    assert!(got > 0, "the stunnel pair carries the producer's bytes");

    let uid = inbound.uid.clone();
    let psk = uid.replace('-', "");
    let leaks = |text: &str| text.contains(&uid) || text.contains(&psk);

    // /metrics (no authentication) names the session by its stand-in.
    let page = http_get(gin_ns, metrics, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(!leaks(&page), "the uid is on /metrics:\n{page}");
    assert!(
        page.contains("scistream_session_counters_available{uid=\"hidden-"),
        "the session is still there:\n{page}"
    );

    // No process's command line, stunnel's included.
    let mut stunnels = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        assert!(!leaks(&line), "the uid is on a command line: {line}");
        stunnels += line.contains("stunnel") as usize;
    }
    assert!(
        stunnels >= 2,
        "both gateways' stunnels were looked at ({stunnels})"
    );

    // The list others can call without authentication hides it too.
    let list = gin.s2uc(gin_ns, "list", &["--json"]);
    assert!(
        list.status.success() && !leaks(&String::from_utf8_lossy(&list.stdout)),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    assert_eq!(status_json(&gin, gin_ns, &uid)["tunnel_secret"], "uid");

    // Logs at the default level.
    for gw in [&gin, &gout] {
        let log = gw.daemon.log_contents();
        assert!(!leaks(&log), "the uid is in the s2cs log:\n{log}");
        assert!(
            log.contains("hidden-"),
            "the log names the session by its stand-in:\n{log}"
        );
    }

    // The state directories: 0700, every file 0600, so no file others can
    // read; and stunnel's files hold the PSK, so this matters.
    for gw in [&gin, &gout] {
        let mode = std::fs::metadata(&gw.state_dir)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o700, "{}", gw.state_dir.display());
        let mut all = Vec::new();
        walk(&gw.state_dir, &mut all);
        assert!(
            all.iter()
                .any(|(p, ..)| p.extension().is_some_and(|e| e == "psk")),
            "stunnel's key file is there: {all:?}"
        );
        for (path, mode, is_dir) in &all {
            assert_eq!(
                *mode,
                if *is_dir { 0o700 } else { 0o600 },
                "{}",
                path.display()
            );
            if !is_dir && mode & 0o044 != 0 {
                assert!(
                    !leaks(&String::from_utf8_lossy(&std::fs::read(path).unwrap())),
                    "{} is readable by others and holds the uid",
                    path.display()
                );
            }
        }
    }
    let peers_file = gin.state_dir.join("guard-peers.json");
    if peers_file.exists() {
        assert_eq!(
            std::fs::metadata(&peers_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    } else {
        assert!(
            !gin.daemon.log_contents().contains("XDP guard attached"),
            "the guard ran but wrote no guard-peers.json"
        );
    }
}
