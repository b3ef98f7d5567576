//! What `cargo xtask demo` and `cargo xtask bench` share: handing over to a root
//! process that runs prebuilt binaries, the Ctrl-C clean-up, and a pair of real
//! `s2cs` gateways on a test-bed path, driven with `s2uc` exactly as a user would.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::netns::{Link, Node, Topology};
use testbed::process::{bin, run_in, spawn_in, Daemon};

use crate::{bins, privilege, setup};

/// s2cs control port on both gateways.
pub const CONTROL_PORT: u16 = 5000;
/// Data listener ports on both gateways: room for a few hundred sessions of one
/// connection (the set-up latency measurement opens many).
pub const PORT_RANGE: &str = "5100-5499";
const DAEMON_START: Duration = Duration::from_secs(30);

/// Builds what the command needs (release s2cs/s2uc, and with `build_xtask` an
/// optimised xtask), then re-runs this command as root with those binaries
/// (through sudo when needed: namespaces need root, the build ran as the user).
/// Returns only on failure. `prebuilt_env` marks the second run, so it does not
/// build again; callers check it with [`is_handed_over`].
pub fn hand_over(prebuilt_env: &str, packages: &[&str], build_xtask: bool) -> Result<()> {
    setup::ensure(packages)?;
    let packages: &[&str] = if build_xtask {
        &["scistream-ctl", "xtask"]
    } else {
        &["scistream-ctl"]
    };
    let built = bins::build_bins(true, packages)?;
    let dir = bins::bin_dir(&built)?;
    let xtask = if build_xtask {
        built
            .get("xtask")
            .context("cargo built no xtask executable")?
            .clone()
    } else {
        std::env::current_exe().context("locating the running xtask")?
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut cmd = privilege::as_root(&xtask, &args).into_command()?;
    cmd.env(prebuilt_env, "1").env("SCISTREAM_BIN_DIR", &dir);
    let shown = format!("{cmd:?}");
    Err(anyhow::anyhow!("starting {shown}: {}", cmd.exec()))
}

pub fn is_handed_over(prebuilt_env: &str) -> bool {
    std::env::var_os(prebuilt_env).is_some()
}

/// The Ctrl-C path cannot unwind into the owners' Drops, so it deletes what the
/// test bed registered (daemons, namespaces) plus `state`, then exits.
pub fn install_ctrl_c_cleanup(state: &Path) -> Result<()> {
    static STATE_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
    *STATE_DIR.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.to_path_buf());
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing daemons, namespaces and keys...");
        testbed::cleanup_all();
        if let Some(dir) = STATE_DIR.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")
}

/// The last lines of each daemon's log, to explain a failure.
pub fn with_logs(e: anyhow::Error, daemons: &[&Daemon]) -> anyhow::Error {
    let mut text = format!("{e:#}");
    for d in daemons {
        let log = d.log_contents();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        text.push_str(&format!(
            "\n--- {} ---\n{}",
            d.log_path().display(),
            tail.join("\n")
        ));
    }
    anyhow::anyhow!(text)
}

/// Waits until `daemon` accepts TCP on `addr` inside `ns`. Unlike a plain connect
/// loop it gives up as soon as the daemon exits (e.g. `s2cs` refusing a backend
/// this host cannot run), with the daemon's own words.
pub fn wait_listening(
    daemon: &mut Daemon,
    ns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if connects(ns, addr) {
            return Ok(());
        }
        if !daemon.is_running() {
            let status = daemon.exit_status();
            return Err(with_logs(
                anyhow::anyhow!("exited ({status:?}) before listening on {addr}"),
                &[daemon],
            ));
        }
        if Instant::now() >= deadline {
            return Err(with_logs(
                anyhow::anyhow!("not listening on {addr} after {timeout:?}"),
                &[daemon],
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Two `s2cs` of one backend: the inbound gateway (PROD role) and the outbound
/// gateway (CONS role), which trusts the inbound one's certificate for the tunnel.
pub struct Gateways {
    pub inbound: Daemon,
    pub outbound: Daemon,
    inbound_ip: Ipv4Addr,
    outbound_ip: Ipv4Addr,
    inbound_cert: PathBuf,
    outbound_cert: PathBuf,
    inbound_ns: String,
    outbound_ns: String,
    s2uc: PathBuf,
}

/// One session set up through both gateways.
pub struct Session {
    pub uid: String,
    /// The inbound gateway's listeners (the tunnel's far end).
    pub inbound_listeners: Vec<SocketAddr>,
    /// The outbound gateway's listeners: where the consumer connects.
    pub outbound_listeners: Vec<SocketAddr>,
}

impl Gateways {
    /// Starts both `s2cs --type backend` on `topo`, with keys and certificates
    /// under `state/<label>-{gin,gout}`. Fails with the daemon's log when it
    /// refuses to start.
    pub fn start(topo: &Topology, backend: &str, state: &Path, label: &str) -> Result<Gateways> {
        Self::start_with(topo, backend, state, label, &[])
    }

    /// Like [`start`](Self::start), with `extra` s2cs options for both gateways.
    pub fn start_with(
        topo: &Topology,
        backend: &str,
        state: &Path,
        label: &str,
        extra: &[&str],
    ) -> Result<Gateways> {
        let s2cs = bin("s2cs");
        let gin_dir = state.join(format!("{label}-gin"));
        let gout_dir = state.join(format!("{label}-gout"));
        for dir in [&gin_dir, &gout_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let inbound_ip = topo.ip4(Node::InboundGw, Link::Wan);
        let outbound_ip = topo.ip4(Node::OutboundGw, Link::ConsumerLan);
        let inbound_ns = topo.ns(Node::InboundGw).to_owned();
        let outbound_ns = topo.ns(Node::OutboundGw).to_owned();
        let port = CONTROL_PORT.to_string();
        // iperf3 -P 64 sends its 64 streams and its control connection
        // through one listener: over s2cs's default per-session cap.
        let cap = ["--max_conn_per_listener", "128"];

        let mut inbound = spawn_in(
            &inbound_ns,
            &s2cs,
            [
                "--listener_ip",
                &inbound_ip.to_string(),
                "--port",
                &port,
                "--port_range",
                PORT_RANGE,
                "--type",
                backend,
                "--state_dir",
                &path_str(&gin_dir)?,
            ]
            .into_iter()
            .chain(cap)
            .chain(extra.iter().copied()),
        )?;
        wait_listening(
            &mut inbound,
            &inbound_ns,
            (inbound_ip, CONTROL_PORT).into(),
            DAEMON_START,
        )
        .context("inbound s2cs")?;
        let inbound_cert = gin_dir.join("server.crt");
        if !inbound_cert.is_file() {
            return Err(with_logs(
                anyhow::anyhow!("the inbound s2cs wrote no {}", inbound_cert.display()),
                &[&inbound],
            ));
        }

        let mut outbound = spawn_in(
            &outbound_ns,
            &s2cs,
            [
                "--listener_ip",
                &outbound_ip.to_string(),
                "--port",
                &port,
                "--port_range",
                PORT_RANGE,
                "--type",
                backend,
                "--state_dir",
                &path_str(&gout_dir)?,
                "--peer_ca",
                &path_str(&inbound_cert)?,
            ]
            .into_iter()
            .chain(cap)
            .chain(extra.iter().copied()),
        )?;
        wait_listening(
            &mut outbound,
            &outbound_ns,
            (outbound_ip, CONTROL_PORT).into(),
            DAEMON_START,
        )
        .context("outbound s2cs")?;
        Ok(Gateways {
            inbound,
            outbound,
            inbound_ip,
            outbound_ip,
            inbound_cert,
            outbound_cert: gout_dir.join("server.crt"),
            inbound_ns,
            outbound_ns,
            s2uc: bin("s2uc"),
        })
    }

    /// `s2uc inbound-request` towards `producer`, then `outbound-request` with the
    /// listeners it returned: the tutorial's two calls.
    pub fn session(&self, producer: SocketAddr, num_conn: u32) -> Result<Session> {
        let (uid, inbound_listeners) = self.inbound_request(producer, num_conn)?;
        let outbound_listeners = self.outbound_request(&uid, &inbound_listeners, num_conn)?;
        Ok(Session {
            uid,
            inbound_listeners,
            outbound_listeners,
        })
    }

    /// `s2uc inbound-request` on the inbound gateway; returns the uid and its listeners.
    pub fn inbound_request(
        &self,
        producer: SocketAddr,
        num_conn: u32,
    ) -> Result<(String, Vec<SocketAddr>)> {
        let response = s2uc_json(
            &self.inbound_ns,
            &self.s2uc,
            &[
                "inbound-request",
                "--s2cs",
                &format!("{}:{CONTROL_PORT}", self.inbound_ip),
                "--server_cert",
                &path_str(&self.inbound_cert)?,
                "--remote_ip",
                &producer.ip().to_string(),
                "--receiver_ports",
                &producer.port().to_string(),
                "--num_conn",
                &num_conn.to_string(),
                "--json",
            ],
        )
        .map_err(|e| with_logs(e.context("s2uc inbound-request"), &[&self.inbound]))?;
        let uid = response["uid"]
            .as_str()
            .context("inbound-request printed no uid")?
            .to_owned();
        let listeners = listeners(&response).context("inbound-request")?;
        Ok((uid, listeners))
    }

    /// `s2uc outbound-request` on the outbound gateway; returns its listeners.
    pub fn outbound_request(
        &self,
        uid: &str,
        inbound_listeners: &[SocketAddr],
        num_conn: u32,
    ) -> Result<Vec<SocketAddr>> {
        let response = s2uc_json(
            &self.outbound_ns,
            &self.s2uc,
            &[
                "outbound-request",
                "--s2cs",
                &format!("{}:{CONTROL_PORT}", self.outbound_ip),
                "--server_cert",
                &path_str(&self.outbound_cert)?,
                "--num_conn",
                &num_conn.to_string(),
                "--json",
                uid,
                &join(inbound_listeners),
            ],
        )
        .map_err(|e| {
            with_logs(
                e.context("s2uc outbound-request"),
                &[&self.inbound, &self.outbound],
            )
        })?;
        let listeners = listeners(&response).context("outbound-request")?;
        if listeners.len() != num_conn as usize {
            bail!(
                "outbound-request returned {} listeners for num_conn {num_conn}",
                listeners.len()
            );
        }
        Ok(listeners)
    }

    /// Process ids of the two gateways, for CPU and memory accounting.
    pub fn pids(&self) -> [u32; 2] {
        [self.outbound.pid(), self.inbound.pid()]
    }
}

pub fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Runs s2uc and returns the one JSON object it prints on stdout with `--json`.
fn s2uc_json(ns: &str, s2uc: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = run_in(ns, s2uc, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "exited with {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(serde_json::Value::is_object)
        })
        .with_context(|| format!("no JSON object in its output: {stdout}"))
}

fn listeners(response: &serde_json::Value) -> Result<Vec<SocketAddr>> {
    let list = response["listeners"]
        .as_array()
        .context("no `listeners` array in the response")?;
    if list.is_empty() {
        bail!("empty `listeners` in the response");
    }
    list.iter()
        .map(|v| {
            let s = v.as_str().context("a listener is not a string")?;
            s.parse()
                .with_context(|| format!("listener {s:?} is not ip:port"))
        })
        .collect()
}

/// One connect attempt from inside `ns`, for polling a port without blocking long.
pub fn connects(ns: &str, addr: SocketAddr) -> bool {
    testbed::in_netns(ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
    })
}
