//! The SciStream 1.2 compat backends against real programs: our
//! `StunnelSubprocess` gateway paired with a stunnel configured as SciStream
//! 1.2's template configures it (PSK identity `client1`, the uid without
//! dashes as key, TLS <= 1.2), with only its `ciphers = eNULL` line changed to
//! `PSK`; a peer without the key, or a stock 1.2 peer that offers only NULL
//! ciphers, is refused. The programs die with s2cs, are reaped on release,
//! and their key files are private and removed.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Gateway, MIB};
use testbed::netns::addr;
use testbed::process::{run_command, Signal};
use testbed::traffic::{PatternStream, PRODUCER_SEED};
use testbed::{
    bin, consume, expected_sha256, require_root, spawn_in, Daemon, Node, Producer, Topology,
};

const PRODUCER_PORT: u16 = 7000;
/// Where the SciStream 1.2-style stunnel listens (its template takes bare ports).
const PEER_PORT: u16 = 6000;
/// What the consumer sends back before it reads the producer's stream.
const CONSUMER_BYTES: u64 = 64 * 1024;

/// A consumer that sends `CONSUMER_BYTES` of `seed`'s stream, reads until the
/// producer's end of stream, and only then closes: no half-close while data
/// is in flight. stunnel does not carry half-closed connections reliably
/// (a peer's close_notify while the other direction still flows ended it
/// early, dropping up to a MiB of the tail, in about 1 of 10 runs), so the
/// stunnel tests stream as SciStream applications do, one way at a time.
/// Returns the bytes received and their SHA-256.
fn consume_then_close(ns: &str, to: SocketAddr, seed: u64) -> std::io::Result<(u64, String)> {
    use sha2::Digest;
    use std::io::{Read, Write};
    let mut s = testbed::in_netns(ns, || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut pattern = PatternStream::new(seed);
    let mut left = CONSUMER_BYTES as usize;
    while left > 0 {
        let chunk = pattern.next_bytes(left);
        s.write_all(chunk)?;
        left -= chunk.len();
    }
    let (mut buf, mut hasher, mut n) = (vec![0u8; 256 * 1024], sha2::Sha256::new(), 0u64);
    loop {
        match s.read(&mut buf)? {
            0 => break,
            k => {
                hasher.update(&buf[..k]);
                n += k as u64;
            }
        }
    }
    Ok((
        n,
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    ))
}

/// The consumer got all of the producer's `bytes`, and some producer
/// connection got exactly what consumer `seed` sent.
fn verify_one_way(got: (u64, String), producer: &Producer, seed: u64, bytes: u64, conns: usize) {
    assert_eq!(
        got.0, bytes,
        "the consumer received {} of the producer's {bytes} bytes",
        got.0
    );
    assert_eq!(
        got.1,
        expected_sha256(PRODUCER_SEED, bytes),
        "the consumer's bytes differ from the producer's"
    );
    let sent = expected_sha256(seed, CONSUMER_BYTES);
    let seen = producer.wait_for(conns, Duration::from_secs(30)).unwrap();
    assert!(
        seen.iter()
            .any(|c| c.received_bytes == CONSUMER_BYTES && c.received_sha256 == sent),
        "no producer connection received the consumer's {CONSUMER_BYTES} bytes: {:?}",
        seen.iter()
            .map(|c| (c.received_bytes, c.error.as_deref()))
            .collect::<Vec<_>>()
    );
}

/// A stunnel run with SciStream 1.2's `stunnel.conf.j2` settings for one
/// session: `psk` is what goes after `client1:` in its key file.
struct Scistream12Stunnel {
    daemon: Daemon,
    dir: PathBuf,
}

impl Drop for Scistream12Stunnel {
    fn drop(&mut self) {
        self.daemon.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scistream12_stunnel(
    ns: &str,
    client: bool,
    connect: SocketAddr,
    psk: &str,
    ciphers: &str,
) -> Scistream12Stunnel {
    let dir = std::env::temp_dir().join(format!(
        "ss12-stunnel-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("uid.key");
    // SciStream 1.2 writes "client1:" + uid.replace("-", "") with no newline.
    std::fs::write(&key, format!("client1:{psk}")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let conf = dir.join("uid.conf");
    std::fs::write(
        &conf,
        format!(
            "fips = no\nPSKsecrets = {}\nsecurityLevel = 0\ndebug = 5\nforeground = yes\nsslVersionMax = TLSv1.2\npid = {}\n\n\
             [{PEER_PORT}]\nclient = {}\naccept = {PEER_PORT}\nconnect = {}:{}\nciphers = {ciphers}\n",
            key.display(),
            dir.join("uid.pid").display(),
            if client { "yes" } else { "no" },
            connect.ip(),
            connect.port()
        ),
    )
    .unwrap();
    let mut daemon = spawn_in(ns, "stunnel", [conf.to_str().unwrap()]).expect("starting stunnel");
    daemon
        .wait_for_log("Configuration successful", Duration::from_secs(10))
        .expect("stunnel started");
    // It binds right after logging that.
    std::thread::sleep(Duration::from_millis(200));
    Scistream12Stunnel { daemon, dir }
}

fn psk(uid: &str) -> String {
    uid.replace('-', "")
}

/// Pids of the live (not zombie) children of `parent` whose name is `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        if comm == name
            && f.first() != Some(&"Z")
            && f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent)
        {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn compat_files(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state_dir.join("compat"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// `s2cs --type StunnelSubprocess` listening on `ip` in `ns`.
fn stunnel_gateway(ns: &str, ip: IpAddr) -> Gateway {
    Gateway::start(ns, ip, "5100-5199", "StunnelSubprocess", &[])
}

struct Bed {
    topo: Topology,
    producer: Producer,
}

fn bed(bytes: u64) -> Bed {
    let topo = Topology::new().expect("topology");
    let producer = Producer::start(
        topo.ns(Node::Producer),
        SocketAddr::new(addr::PRODUCER.into(), PRODUCER_PORT),
        bytes,
    )
    .expect("producer");
    Bed { topo, producer }
}

#[test]
fn stunnel_subprocess_streams_with_a_scistream_1_2_stunnel_and_cleans_up() {
    if !require_root("stunnel_subprocess_streams_with_a_scistream_1_2_stunnel_and_cleans_up") {
        return;
    }
    let bytes = 8 * MIB;
    let b = bed(bytes);
    let ns_in = b.topo.ns(Node::InboundGw);
    let gin = stunnel_gateway(ns_in, addr::INBOUND_GW_WAN.into());
    let inbound = gin.inbound(ns_in, b.producer.addr(), 1);

    // The session's stunnel runs under s2cs, and its files are private.
    let ours = children_named(gin.daemon.pid(), "stunnel");
    assert_eq!(ours.len(), 1, "one stunnel per session under s2cs");
    let files = compat_files(&gin.state_dir);
    assert!(!files.is_empty());
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let key = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .find(|t| t.starts_with("client1:"))
        .expect("a PSK file");
    assert_eq!(
        key.trim(),
        format!("client1:{}", psk(&inbound.uid)),
        "SciStream 1.2's identity and key"
    );
    let conf = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .find(|t| t.contains("ciphers"))
        .expect("a config");
    assert!(
        !conf.to_ascii_lowercase().contains("null"),
        "no NULL cipher: {conf}"
    );

    let _peer = scistream12_stunnel(
        b.topo.ns(Node::OutboundGw),
        true,
        inbound.listeners[0],
        &psk(&inbound.uid),
        "PSK",
    );
    let got = consume_then_close(
        b.topo.ns(Node::Consumer),
        SocketAddr::new(addr::OUTBOUND_GW_LAN.into(), PEER_PORT),
        1,
    )
    .unwrap_or_else(|e| {
        panic!(
            "through the pair: {e:#}\ns2cs:\n{}",
            gin.daemon.log_contents()
        )
    });
    verify_one_way(got, &b.producer, 1, bytes, 1);

    let out = gin.s2uc(ns_in, "release", &[&inbound.uid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Release returns only once stunnel has exited and been reaped.
    assert!(!alive(ours[0]), "stunnel {} outlived its session", ours[0]);
    assert!(
        compat_files(&gin.state_dir).is_empty(),
        "files left: {:?}",
        compat_files(&gin.state_dir)
    );
}

/// A SciStream 1.2 stunnel towards our gateway with `psk` and `ciphers`: the
/// consumer gets nothing of the producer's and the producer sees no one.
fn assert_refused(test: &str, wrong_key: bool, ciphers: &str, expect_in_log: &str) {
    if !require_root(test) {
        return;
    }
    let b = bed(MIB);
    let ns_in = b.topo.ns(Node::InboundGw);
    let gin = stunnel_gateway(ns_in, addr::INBOUND_GW_WAN.into());
    let inbound = gin.inbound(ns_in, b.producer.addr(), 1);
    let key = if wrong_key {
        psk(&uuid::Uuid::new_v4().to_string())
    } else {
        psk(&inbound.uid)
    };
    let _peer = scistream12_stunnel(
        b.topo.ns(Node::OutboundGw),
        true,
        inbound.listeners[0],
        &key,
        ciphers,
    );
    let r = consume(
        b.topo.ns(Node::Consumer),
        SocketAddr::new(addr::OUTBOUND_GW_LAN.into(), PEER_PORT),
        MIB,
        1,
    );
    if let Ok(t) = &r {
        assert_eq!(t.received_bytes, 0, "the refused peer got producer data");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.producer.accepted(),
        0,
        "the producer was reached through a refused peer"
    );
    let log = gin.daemon.log_contents();
    assert!(
        log.contains(expect_in_log),
        "s2cs log does not show the refusal ({expect_in_log}):\n{log}"
    );
}

#[test]
fn peer_without_the_session_key_is_refused() {
    assert_refused(
        "peer_without_the_session_key_is_refused",
        true,
        "PSK",
        "SSL_accept",
    );
}

#[test]
fn stock_scistream_1_2_peer_offering_only_null_ciphers_is_refused() {
    assert_refused(
        "stock_scistream_1_2_peer_offering_only_null_ciphers_is_refused",
        false,
        "eNULL",
        "no shared cipher",
    );
}

#[test]
fn outbound_stunnel_subprocess_reaches_a_scistream_1_2_inbound_stunnel() {
    if !require_root("outbound_stunnel_subprocess_reaches_a_scistream_1_2_inbound_stunnel") {
        return;
    }
    let bytes = 4 * MIB;
    let b = bed(bytes);
    let uid = uuid::Uuid::new_v4().to_string();
    // The producer-side gateway is SciStream 1.2's stunnel in server mode.
    let _peer = scistream12_stunnel(
        b.topo.ns(Node::InboundGw),
        false,
        b.producer.addr(),
        &psk(&uid),
        "PSK",
    );
    let ns_out = b.topo.ns(Node::OutboundGw);
    let gout = stunnel_gateway(ns_out, addr::OUTBOUND_GW_LAN.into());
    let peer_addr = SocketAddr::new(IpAddr::from(addr::INBOUND_GW_WAN), PEER_PORT).to_string();
    let out = gout.s2uc_json(
        ns_out,
        "outbound-request",
        &["--num_conn", "1", &uid, &peer_addr],
    );
    let got =
        consume_then_close(b.topo.ns(Node::Consumer), out.listeners[0], 7).unwrap_or_else(|e| {
            panic!(
                "through the pair: {e:#}\ns2cs:\n{}",
                gout.daemon.log_contents()
            )
        });
    verify_one_way(got, &b.producer, 7, bytes, 1);
}

#[test]
fn stunnel_subprocess_gateways_set_up_by_s2uc_stream_to_each_other() {
    if !require_root("stunnel_subprocess_gateways_set_up_by_s2uc_stream_to_each_other") {
        return;
    }
    let bytes = 8 * MIB;
    let b = bed(bytes);
    let (ns_in, ns_out) = (b.topo.ns(Node::InboundGw), b.topo.ns(Node::OutboundGw));
    // The README tutorial's gateways.
    let gin = stunnel_gateway(ns_in, addr::INBOUND_GW_WAN.into());
    let gout = stunnel_gateway(ns_out, addr::OUTBOUND_GW_LAN.into());
    let inbound = gin.inbound(ns_in, b.producer.addr(), 2);
    let outbound = gout.outbound(ns_out, &inbound, 2);
    // One connection per listener, one after the other.
    for (i, l) in outbound.listeners.iter().enumerate() {
        let seed = 10 + i as u64;
        let got = consume_then_close(b.topo.ns(Node::Consumer), *l, seed).unwrap_or_else(|e| {
            panic!(
                "{e:#}\ninbound:\n{}\noutbound:\n{}",
                gin.daemon.log_contents(),
                gout.daemon.log_contents()
            )
        });
        verify_one_way(got, &b.producer, seed, bytes, i + 1);
    }
    // Status says the byte counters cannot be seen rather than showing zeros as facts.
    let status = gout.s2uc(ns_out, "status", &[&inbound.uid]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("StunnelSubprocess") && text.contains("not observable"),
        "{text}"
    );
    let json = gout.s2uc(ns_out, "status", &[&inbound.uid, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json");
    assert_eq!(v["counters_observable"], false, "{v}");
}

#[test]
fn stunnel_dies_with_s2cs() {
    if !require_root("stunnel_dies_with_s2cs") {
        return;
    }
    let b = bed(0);
    let ns_in = b.topo.ns(Node::InboundGw);
    let mut gin = stunnel_gateway(ns_in, addr::INBOUND_GW_WAN.into());
    gin.inbound(ns_in, b.producer.addr(), 2);
    let ours = children_named(gin.daemon.pid(), "stunnel");
    assert_eq!(ours.len(), 1);
    // No chance to clean up: only the kernel's parent-death signal can end it.
    gin.daemon.signal(Signal::SIGKILL).unwrap();
    gin.daemon.wait_exit(Duration::from_secs(5)).unwrap();
    wait_until(
        "stunnel killed with its s2cs",
        Duration::from_secs(5),
        || !alive(ours[0]),
    );
}

#[test]
fn missing_program_is_a_one_line_error() {
    let dir = std::env::temp_dir().join(format!("ss-compat-missing-{}", std::process::id()));
    let mut cmd = std::process::Command::new(bin("s2cs"));
    cmd.env("PATH", "/nonexistent")
        .args([
            "--type",
            "HaproxySubprocess",
            "--ssl",
            "false",
            "--guard",
            "false",
            "--listener_ip",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .arg("--state_dir")
        .arg(&dir);
    let out = run_command(cmd, Duration::from_secs(20)).expect("running s2cs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("s2cs: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"));
    assert!(
        line.contains("haproxy") && line.contains("not installed"),
        "{line}"
    );
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("s2cs: error:"))
            .count(),
        1,
        "{err}"
    );
}

/// A PROD session on an inbound gateway of `backend` (plaintext control,
/// driven by the raw gRPC client) forwarding to an echo producer A, with a
/// producer B (sending `RETARGET_BYTES`) ready to be switched to.
struct Retargetable {
    topo: Topology,
    echo_a: Producer,
    b: Producer,
    gin: Gateway,
    uid: String,
    listener: SocketAddr,
}

const RETARGET_BYTES: u64 = 4 * MIB;

impl Retargetable {
    fn start(backend: &str) -> Retargetable {
        use common::raw::{block_on, new_uid, RawClient};
        let topo = Topology::new().expect("topology");
        let ns_p = topo.ns(Node::Producer);
        let echo_a =
            Producer::start_echo(ns_p, SocketAddr::new(addr::PRODUCER.into(), 7000)).unwrap();
        let b = Producer::start(
            ns_p,
            SocketAddr::new(addr::PRODUCER.into(), 7001),
            RETARGET_BYTES,
        )
        .unwrap();
        let ns_in = topo.ns(Node::InboundGw);
        let gin = Gateway::start(
            ns_in,
            addr::INBOUND_GW_WAN.into(),
            "5100-5199",
            backend,
            &["--ssl", "false"],
        );
        let (uid, control, a) = (new_uid(), gin.control, echo_a.addr().to_string());
        let listener = testbed::in_netns(ns_in, || {
            block_on(async {
                let c = RawClient::connect(control).await;
                let pending = tokio::spawn({
                    let (c, uid) = (c.clone(), uid.clone());
                    async move { c.req(&uid, "PROD", 1, 0).await }
                });
                c.hello(&uid, &[&a], "PROD").await.expect("hello");
                pending.await.expect("join").expect("req").listeners[0]
                    .parse::<SocketAddr>()
                    .expect("listener")
            })
        });
        let r = Retargetable {
            topo,
            echo_a,
            b,
            gin,
            uid,
            listener,
        };
        r.update(r.echo_a.addr());
        r
    }

    /// The `update` call: (re)targets the session.
    fn update(&self, to: SocketAddr) {
        use common::raw::{block_on, RawClient};
        let (control, to) = (self.gin.control, to.to_string());
        testbed::in_netns(&self.gin.ns, || {
            block_on(async {
                RawClient::connect(control)
                    .await
                    .update(&self.uid, &[&to], "PROD")
                    .await
                    .expect("update")
            })
        });
    }

    fn release(&self) {
        use common::raw::{block_on, RawClient};
        let control = self.gin.control;
        testbed::in_netns(&self.gin.ns, || {
            block_on(async {
                RawClient::connect(control)
                    .await
                    .release(&self.uid)
                    .await
                    .expect("release")
            })
        });
    }
}

#[test]
fn haproxy_subprocess_retarget_keeps_live_connections_and_sends_new_ones_to_the_new_target() {
    if !require_root(
        "haproxy_subprocess_retarget_keeps_live_connections_and_sends_new_ones_to_the_new_target",
    ) {
        return;
    }
    let r = Retargetable::start("HaproxySubprocess");
    // The client side of the inbound gateway is the other gateway's namespace.
    let ns_client = r.topo.ns(Node::OutboundGw);
    let live = testbed::Stream::start(ns_client, r.listener).expect("stream to A");
    live.assert_progress(Duration::from_secs(5));
    let first = children_named(r.gin.daemon.pid(), "haproxy");
    assert_eq!(first.len(), 1);

    r.update(r.b.addr());
    // A new connection goes to B, every byte checked; the old one still flows to A.
    let t = consume(ns_client, r.listener, MIB, 3).expect("new connection after retarget");
    let seen = r.b.wait_for(1, Duration::from_secs(30)).unwrap();
    t.verify_with(&seen, RETARGET_BYTES)
        .expect("the new connection reached B intact");
    live.assert_progress(Duration::from_secs(5));
    live.finish()
        .expect("the live connection to A carried on intact");
    // One HAProxy all along: its servers were re-pointed in place.
    assert_eq!(children_named(r.gin.daemon.pid(), "haproxy"), first);

    r.release();
    assert!(
        children_named(r.gin.daemon.pid(), "haproxy").is_empty(),
        "haproxy outlived its session"
    );
    assert!(compat_files(&r.gin.state_dir).is_empty());
}

#[test]
fn stunnel_subprocess_retarget_keeps_live_connections_and_sends_new_ones_to_the_new_target() {
    if !require_root(
        "stunnel_subprocess_retarget_keeps_live_connections_and_sends_new_ones_to_the_new_target",
    ) {
        return;
    }
    let r = Retargetable::start("StunnelSubprocess");
    let _peer = scistream12_stunnel(
        r.topo.ns(Node::OutboundGw),
        true,
        r.listener,
        &psk(&r.uid),
        "PSK",
    );
    let via_peer = SocketAddr::new(addr::OUTBOUND_GW_LAN.into(), PEER_PORT);
    let live = testbed::Stream::start(r.topo.ns(Node::Consumer), via_peer).expect("stream to A");
    live.assert_progress(Duration::from_secs(5));

    r.update(r.b.addr());
    let got = consume_then_close(r.topo.ns(Node::Consumer), via_peer, 5)
        .expect("new connection after retarget");
    verify_one_way(got, &r.b, 5, RETARGET_BYTES, 1);
    live.assert_progress(Duration::from_secs(5));
    live.finish()
        .expect("the live connection to A carried on intact");
}
