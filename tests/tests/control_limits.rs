//! The control port under clients that hold connections, and counters that
//! tell the truth, against real `s2cs` processes on loopback (no namespaces):
//! a TLS client that never sends its HTTP/2 preface is closed after
//! `--control_timeout`, an idle connection after `--control_idle_timeout`
//! while a call in flight keeps its own, connections over
//! `--max_control_connections` are closed before TLS while open ones keep
//! working, a session stored under authentication can be managed after a
//! restart without it, and the compat backends' counters are HAProxy's own
//! or marked unavailable (stunnel). Each test has its own ports in 29100-29299,
//! below the ephemeral range (32768-60999 by default), so no outgoing
//! connection can hold one while an s2cs restarts on it.

mod auth_server;
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use auth_server::{
    failure, new_uid, text, OAuthServer, TokenClient, TokenSpec, User, RS_CLIENT_ID, RS_SECRET,
};
use common::closed_by_peer;
use testbed::process::{run_command, Signal};
use testbed::{bin, Daemon};
use tonic::Code;

/// The client's HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: the rest of a complete preface.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

/// One `s2cs` on 127.0.0.1: control port `base`, data ports `base+1..=base+8`.
struct Gw {
    daemon: Daemon,
    control: SocketAddr,
    dir: PathBuf,
    ssl: bool,
}

fn state_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ss-limits-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl Gw {
    fn start(base: u16, dir: &Path, extra: &[&str]) -> Gw {
        let daemon = spawn_s2cs(base, dir, extra);
        Gw {
            daemon,
            control: SocketAddr::from(([127, 0, 0, 1], base)),
            dir: dir.to_path_buf(),
            ssl: uses_tls(extra),
        }
    }

    /// A new `s2cs` on the same ports and state directory, once the old one exited.
    fn respawn(&mut self, extra: &[&str]) {
        assert!(!self.daemon.is_running(), "the old s2cs still runs");
        self.daemon = spawn_s2cs(self.control.port(), &self.dir, extra);
        self.ssl = uses_tls(extra);
    }

    fn s2uc(&self, cmd: &str, args: &[&str]) -> Output {
        let mut c = Command::new(bin("s2uc"));
        c.args([cmd, "--s2cs", &self.control.to_string()]);
        if self.ssl {
            c.arg("--server_cert").arg(self.dir.join("server.crt"));
        } else {
            c.args(["--ssl", "false"]);
        }
        c.args(args);
        run_command(c, Duration::from_secs(30)).expect("running s2uc")
    }

    fn status_json(&self, uid: &str) -> serde_json::Value {
        let out = self.s2uc("status", &[uid, "--json"]);
        assert!(out.status.success(), "s2uc status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
    }

    fn log_count(&self, needle: &str) -> usize {
        self.daemon.log_contents().matches(needle).count()
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uses_tls(extra: &[&str]) -> bool {
    !extra.windows(2).any(|w| w == ["--ssl", "false"])
}

fn spawn_s2cs(base: u16, dir: &Path, extra: &[&str]) -> Daemon {
    let mut cmd = Command::new(bin("s2cs"));
    cmd.args([
        "--listener_ip",
        "127.0.0.1",
        "--control_ip",
        "127.0.0.1",
        "--guard",
        "false",
        // Producers and targets of these tests are on loopback.
        "--allow_target_nets",
        "127.0.0.0/8",
    ])
    .args([
        "--port",
        &base.to_string(),
        "--port_range",
        &format!("{}-{}", base + 1, base + 8),
    ])
    .arg("--state_dir")
    .arg(dir)
    .args(extra)
    .env_remove("S2CS_CLIENT_SECRET");
    let mut daemon = Daemon::spawn(cmd).expect("starting s2cs");
    // Waiting on the log, not by connecting: a probe would be one of the
    // connections these tests count.
    if let Err(e) = daemon.wait_for_log("serving scistream.Control", Duration::from_secs(20)) {
        panic!("s2cs did not come up: {e:#}\n{}", daemon.log_contents());
    }
    daemon
}

/// Skips (or under CI=true fails) when a program the test runs is missing.
fn require_program(test: &str, program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()));
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{test} needs `{program}` and under CI=true may not be skipped");
        }
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: `{program}` is not installed"
        );
    }
    found
}

/// `openssl s_client` that completes a TLS handshake (ALPN h2) and then
/// sends nothing: its stdin stays open and empty.
struct SilentTls {
    child: Child,
    opened: Instant,
}

impl SilentTls {
    fn open(to: SocketAddr) -> SilentTls {
        let opened = Instant::now();
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &to.to_string(), "-alpn", "h2"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut alpn = false;
            for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line);
                alpn |= line.contains("ALPN protocol: h2");
                if line.contains("Verify return code") {
                    let _ = tx.send(alpn);
                }
            }
        });
        let alpn = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the TLS handshake completes");
        assert!(alpn, "s2cs did not choose ALPN h2");
        SilentTls { child, opened }
    }

    /// How long after opening s2cs closed the connection (s_client exits then).
    fn closed_after(&mut self, within: Duration) -> Option<Duration> {
        while self.opened.elapsed() < within {
            if self.child.try_wait().expect("s_client status").is_some() {
                return Some(self.opened.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for SilentTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PROD session on `gw` towards `target`, set up with `token`: req, hello, update.
fn open_session(c: &TokenClient, target: SocketAddr, token: &str) -> (String, SocketAddr) {
    let uid = new_uid();
    let pending = c.req_in_background(&uid, token);
    std::thread::sleep(Duration::from_millis(200));
    c.hello(&uid, &target.to_string(), token).expect("hello");
    let granted = pending.join().expect("req thread").expect("req");
    c.update(&uid, &target.to_string(), token).expect("update");
    (uid, granted.listeners[0].parse().expect("listener address"))
}

#[test]
fn a_tls_client_that_never_sends_the_http2_preface_is_closed_after_the_control_timeout() {
    let test =
        "a_tls_client_that_never_sends_the_http2_preface_is_closed_after_the_control_timeout";
    if !require_program(test, "openssl") {
        return;
    }
    let timeout = Duration::from_secs(2);
    let gw = Gw::start(29100, &state_dir("preface"), &["--control_timeout", "2"]);
    let mut silent: Vec<SilentTls> = (0..3).map(|_| SilentTls::open(gw.control)).collect();

    // While they hang on, a normal client is served at once.
    let t = Instant::now();
    let out = gw.s2uc("list", &[]);
    assert!(
        out.status.success() && text(&out.stdout).contains("no sessions"),
        "{}",
        text(&out.stderr)
    );
    assert!(t.elapsed() < timeout, "s2uc list took {:?}", t.elapsed());

    for s in &mut silent {
        let after = s
            .closed_after(timeout + Duration::from_secs(5))
            .expect("s2cs closes a connection that never sent its preface");
        assert!(
            after >= timeout - Duration::from_millis(300),
            "closed after {after:?}: before the timeout"
        );
        eprintln!("silent TLS connection closed {after:?} after connecting (--control_timeout 2)");
    }
    // And the server still serves.
    assert!(gw.s2uc("list", &[]).status.success());
}

#[test]
fn idle_control_connections_are_closed_but_a_call_in_flight_keeps_its_connection() {
    let gw = Gw::start(
        29120,
        &state_dir("idle"),
        &[
            "--ssl",
            "false",
            "--type",
            "splice",
            "--control_timeout",
            "1",
            "--control_idle_timeout",
            "3",
        ],
    );

    // Half a preface: closed at the control timeout.
    let since = Instant::now();
    let s = TcpStream::connect(gw.control).expect("connect");
    (&s).write_all(&PREFACE[..10]).expect("write");
    let after =
        closed_by_peer(&s, since, Duration::from_secs(5)).expect("half a preface is closed");
    assert!(
        after >= Duration::from_millis(800),
        "closed after {after:?}"
    );

    // A whole preface, then silence: no longer the control timeout but the
    // idle one; s2cs answers with its own SETTINGS meanwhile.
    let since = Instant::now();
    let mut s = TcpStream::connect(gw.control).expect("connect");
    s.write_all(PREFACE)
        .and_then(|_| s.write_all(&EMPTY_SETTINGS))
        .expect("write the preface");
    let mut head = [0u8; 9];
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.read_exact(&mut head).expect("the server's first frame");
    assert_eq!(head[3], 0x4, "the server's first frame is SETTINGS");
    let after =
        closed_by_peer(&s, since, Duration::from_secs(8)).expect("an idle connection is closed");
    assert!(
        after >= Duration::from_millis(2700),
        "closed after {after:?}, before the idle timeout of 3 s"
    );
    eprintln!(
        "idle HTTP/2 connection closed {after:?} after its preface (--control_idle_timeout 3)"
    );

    // A req waits 5 s for its hello, past the idle timeout: its connection
    // is not idle, and the answer arrives on it.
    let c = TokenClient::connect(gw.control);
    let uid = new_uid();
    let pending = c.req_in_background(&uid, "INVALID_TOKEN");
    std::thread::sleep(Duration::from_secs(5));
    TokenClient::connect(gw.control)
        .hello(&uid, "127.0.0.1:9", "INVALID_TOKEN")
        .expect("hello");
    let granted = pending
        .join()
        .expect("req thread")
        .expect("the pending req is answered on its connection");
    assert_eq!(granted.listeners.len(), 1);
}

#[test]
fn over_max_control_connections_new_ones_are_closed_before_tls_and_open_ones_keep_working() {
    let test =
        "over_max_control_connections_new_ones_are_closed_before_tls_and_open_ones_keep_working";
    if !require_program(test, "socat") {
        return;
    }
    let gw = Gw::start(
        29140,
        &state_dir("cap"),
        &["--max_control_connections", "3", "--control_timeout", "30"],
    );
    // The test's gRPC client speaks plaintext; socat carries it over one TLS
    // connection to s2cs.
    let bridge = SocketAddr::from(([127, 0, 0, 1], 29159));
    let socat = Command::new("socat")
        .args([
            format!("TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork", bridge.port()),
            format!("OPENSSL:{},verify=0", gw.control),
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("socat");
    // Killed also when an assertion fails, so no socat outlives the test
    // holding its fixed port.
    let _socat = KillOnDrop(socat);
    // Wait for socat's listener without connecting to it: each connection
    // makes socat open one more TLS connection to s2cs, which would count
    // against the cap until socat noticed the probe had gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listening_on(bridge.port()) {
        assert!(Instant::now() < deadline, "socat does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = TokenClient::connect(bridge);
    assert_eq!(
        failure(c.release(&new_uid(), "INVALID_TOKEN")).0,
        Code::NotFound,
        "served through the bridge"
    );

    // Two silent connections fill the cap of 3 and are held (for the 30 s control timeout).
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(gw.control).expect("connect"))
        .collect();
    let since = Instant::now();
    assert_eq!(
        closed_by_peer(&silent[1], since, Duration::from_millis(700)),
        None,
        "a connection under the cap is held"
    );

    // Over the cap: closed at once, without a TLS handshake, every time; one warning.
    for _ in 0..5 {
        let since = Instant::now();
        let s = TcpStream::connect(gw.control).expect("the kernel still accepts");
        let after = closed_by_peer(&s, since, Duration::from_secs(2))
            .expect("a connection over the cap is closed");
        assert!(
            after < Duration::from_secs(1),
            "closed only after {after:?}"
        );
    }
    let refused = gw.s2uc("list", &[]);
    assert!(
        !refused.status.success(),
        "s2uc got through over the cap: {}",
        text(&refused.stdout)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        gw.log_count("--max_control_connections"),
        1,
        "the refusals are warned about once:\n{}",
        gw.daemon.log_contents()
    );

    // The open connection keeps working.
    assert_eq!(
        failure(c.release(&new_uid(), "INVALID_TOKEN")).0,
        Code::NotFound,
        "the open connection still served"
    );

    // A freed slot takes a new client again.
    drop(silent);
    std::thread::sleep(Duration::from_millis(300));
    let out = gw.s2uc("list", &[]);
    assert!(
        out.status.success(),
        "s2uc list under the cap again: {}",
        text(&out.stderr)
    );
    drop(c);
}

#[test]
fn a_session_stored_under_authentication_is_managed_after_a_restart_without_it() {
    let oauth = OAuthServer::start();
    let alice = User::new("alice");
    let token = oauth.issue(TokenSpec::valid(&alice));
    let dir = state_dir("owner");
    let url = oauth.url("/introspect");
    let with_auth = [
        "--ssl",
        "false",
        "--type",
        "splice",
        "--keep_sessions",
        "--client_id",
        RS_CLIENT_ID,
        "--client_secret",
        RS_SECRET,
        "--introspect_url",
        &url,
    ];
    let mut gw = Gw::start(29160, &dir, &with_auth);
    let c = TokenClient::connect(gw.control);
    let (uid, _) = open_session(&c, "127.0.0.1:9".parse().unwrap(), &token);
    assert_eq!(
        failure(c.update(&uid, "127.0.0.1:10", "INVALID_TOKEN")).0,
        Code::Unauthenticated
    );
    drop(c);
    gw.daemon.signal(Signal::SIGTERM).expect("SIGTERM");
    gw.daemon
        .wait_exit(Duration::from_secs(10))
        .expect("s2cs exits");

    // Authentication off now: nobody can prove to be alice, so her session is
    // managed by anyone, with a warning logged once for it.
    gw.respawn(&["--ssl", "false", "--type", "splice", "--keep_sessions"]);
    assert!(
        gw.daemon
            .log_contents()
            .contains("restored 1 stored sessions"),
        "{}",
        gw.daemon.log_contents()
    );
    let s = gw.status_json(&uid);
    assert_eq!(
        s["owner"],
        alice.id.as_str(),
        "the restored session keeps its owner: {s}"
    );
    let c = TokenClient::connect(gw.control);
    c.update(&uid, "127.0.0.1:10", "INVALID_TOKEN")
        .expect("update without authentication");
    c.update(&uid, "127.0.0.1:11", "INVALID_TOKEN")
        .expect("a second update");
    let listed = gw.s2uc("list", &["--json"]);
    assert!(
        text(&listed.stdout).contains(&uid),
        "list shows the owned session: {}",
        text(&listed.stdout)
    );
    c.release(&uid, "INVALID_TOKEN")
        .expect("release without authentication");
    assert_eq!(
        failure(c.release(&uid, "INVALID_TOKEN")).0,
        Code::NotFound,
        "released for real"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        gw.log_count("managed without authentication"),
        1,
        "warned once for the session:\n{}",
        gw.daemon.log_contents()
    );
}

/// A loopback echo server; returns its address.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let (mut r, mut w) = (&s, &s);
                let _ = std::io::copy(&mut r, &mut w);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// The value of the first series `name{...}` whose labels contain `uid` and `extra`.
fn series(page: &str, name: &str, uid: &str, extra: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(uid) && l.contains(extra))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn haproxy_subprocess_counters_come_from_haproxy_into_metrics_and_status() {
    if !require_program(
        "haproxy_subprocess_counters_come_from_haproxy_into_metrics_and_status",
        "haproxy",
    ) {
        return;
    }
    const N: usize = 3 << 20;
    let gw = Gw::start(
        29180,
        &state_dir("haproxy"),
        &[
            "--ssl",
            "false",
            "--type",
            "HaproxySubprocess",
            "--metrics_addr",
            "127.0.0.1:29189",
        ],
    );
    let c = TokenClient::connect(gw.control);
    let (uid, listener) = open_session(&c, echo_server(), "INVALID_TOKEN");

    // N bytes through HAProxy to the echo server and back.
    let s = TcpStream::connect(listener).expect("connect to the session");
    let writer = {
        let s = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            let data: Vec<u8> = (0..N).map(|i| (i * 7 % 251) as u8).collect();
            (&s).write_all(&data).expect("send");
            s.shutdown(std::net::Shutdown::Write).expect("half-close");
        })
    };
    let mut back = Vec::new();
    (&s).read_to_end(&mut back).expect("echo");
    writer.join().expect("writer");
    assert_eq!(back.len(), N, "the echo came back whole");
    drop(s);

    let deadline = Instant::now() + Duration::from_secs(5);
    let page = loop {
        let (code, page) = auth_server::http_get("http://127.0.0.1:29189/metrics");
        assert_eq!(code, 200);
        let fwd = series(&page, "scistream_session_bytes_total", &uid, "forward").unwrap_or(0.0);
        let bwd = series(&page, "scistream_session_bytes_total", &uid, "backward").unwrap_or(0.0);
        if fwd >= N as f64 && bwd >= N as f64 {
            break page;
        }
        assert!(Instant::now() < deadline, "HAProxy's counters never reached {N} bytes each way (forward {fwd}, backward {bwd}):\n{page}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        series(&page, "scistream_session_counters_available", &uid, ""),
        Some(1.0),
        "{page}"
    );
    assert!(
        series(&page, "scistream_session_connections_total", &uid, "").unwrap_or(0.0) >= 1.0,
        "{page}"
    );

    let st = gw.status_json(&uid);
    assert_eq!(st["counters_observable"], true, "{st}");
    assert!(
        st["bytes_forward"].as_u64().unwrap_or(0) >= N as u64
            && st["bytes_backward"].as_u64().unwrap_or(0) >= N as u64,
        "{st}"
    );
    assert!(st["connections_total"].as_u64().unwrap_or(0) >= 1, "{st}");
    eprintln!(
        "HaproxySubprocess session: {N} bytes sent, status {} forward / {} back",
        st["bytes_forward"], st["bytes_backward"]
    );
    c.release(&uid, "INVALID_TOKEN").expect("release");
}

#[test]
fn stunnel_subprocess_counters_are_marked_unavailable_not_reported_as_zero() {
    if !require_program(
        "stunnel_subprocess_counters_are_marked_unavailable_not_reported_as_zero",
        "stunnel",
    ) {
        return;
    }
    let gw = Gw::start(
        29200,
        &state_dir("stunnel"),
        &[
            "--ssl",
            "false",
            "--type",
            "StunnelSubprocess",
            "--metrics_addr",
            "127.0.0.1:29209",
        ],
    );
    let c = TokenClient::connect(gw.control);
    let (uid, _) = open_session(&c, echo_server(), "INVALID_TOKEN");

    let (code, page) = auth_server::http_get("http://127.0.0.1:29209/metrics");
    assert_eq!(code, 200);
    // A stunnel session is keyed by its uid, so /metrics names it by a stand-in.
    assert!(
        !page.contains(&uid),
        "the uid of a uid-keyed session is in /metrics:\n{page}"
    );
    let shown = page
        .split("uid=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a session series")
        .to_string();
    assert!(shown.starts_with("hidden-"), "{page}");
    assert_eq!(
        series(&page, "scistream_session_counters_available", &shown, ""),
        Some(0.0),
        "{page}"
    );
    for name in [
        "scistream_session_bytes_total",
        "scistream_session_connections_total",
        "scistream_session_connections_active",
    ] {
        assert_eq!(
            series(&page, name, &shown, ""),
            None,
            "{name} is reported for a session whose counters cannot be seen:\n{page}"
        );
    }
    assert!(page.contains("scistream_sessions 1"), "{page}");

    let st = gw.status_json(&uid);
    assert_eq!(st["counters_observable"], false, "{st}");
    assert!(
        st["bytes_forward"].is_null()
            && st["bytes_backward"].is_null()
            && st["connections_total"].is_null(),
        "{st}"
    );
    let list = gw.s2uc("list", &[]);
    let line = text(&list.stdout)
        .lines()
        // Unauthenticated, `list` too names a uid-keyed session by its stand-in.
        .find(|l| l.contains(&shown))
        .map(str::to_string)
        .expect("the session is listed");
    assert_eq!(
        line.matches("n/a").count(),
        3,
        "connections and both byte columns say n/a: {line}"
    );
    c.release(&uid, "INVALID_TOKEN").expect("release");
}

/// Whether a TCP socket listens on `port` (IPv4), from /proc/net/tcp.
fn listening_on(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!(":{port:04X}");
    // Columns: sl, local_address, rem_address, st (0A = LISTEN).
    table.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() > 3 && cols[1].ends_with(&local) && cols[3] == "0A"
    })
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
