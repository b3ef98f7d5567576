//! `cargo xtask demo`: SciStream's tutorial on one machine. A four-namespace path
//! (consumer, outbound gateway, inbound gateway, producer), two `s2cs` gateways,
//! `s2uc inbound-request` then `outbound-request`, then verified bulk traffic
//! through the outbound listeners, once per data-plane backend.
//!
//! Everything it creates (namespaces, daemons, key files) is removed on success,
//! on failure and on Ctrl-C.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::netns::{Link, Node, Topology};
use testbed::process::{bin, run_in, spawn_in, wait_for_tcp, Daemon};
use testbed::traffic::{consume_parallel, Producer};

use crate::{bins, privilege, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Data-plane backend(s): tls, splice, all (= tls and splice) or any other `s2cs --type`.
    #[arg(long, default_value = "all")]
    backend: String,
    /// Bytes each stream sends in each direction; suffixes K, M, G (powers of 1024).
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    bytes: u64,
    /// Parallel connections (the session's num_conn).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=50))]
    num_conn: u32,
}

/// Set when we re-ran ourselves through sudo after building as the user.
const PREBUILT_ENV: &str = "XTASK_DEMO_PREBUILT";
const PRODUCER_PORT: u16 = 7000;
const CONTROL_PORT: u16 = 5000;
const DAEMON_START: Duration = Duration::from_secs(30);

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(format!("unknown suffix {c:?} (use K, M or G)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub fn main(args: &Args) -> Result<ExitCode> {
    let backends: Vec<String> = match args.backend.to_ascii_lowercase().as_str() {
        "all" => vec!["tls".into(), "splice".into()],
        "" => bail!("--backend must name a backend"),
        one => vec![one.to_owned()],
    };
    if std::env::var_os(PREBUILT_ENV).is_none() {
        setup::ensure(&["iproute2"])?;
        // `cargo xtask` runs a debug build of us, whose unoptimised hashing would cap
        // the figures at ~0.1 Gbit/s: build an optimised xtask with the binaries and
        // hand over to it (through sudo when needed: namespaces need root, the build
        // above ran as the user).
        let built = bins::build_bins(true, &["scistream-ctl", "xtask"])?;
        let dir = bins::bin_dir(&built)?;
        let xtask = built
            .get("xtask")
            .context("cargo built no xtask executable")?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let mut cmd = privilege::as_root(xtask, &args).into_command()?;
        cmd.env(PREBUILT_ENV, "1").env("SCISTREAM_BIN_DIR", &dir);
        let shown = format!("{cmd:?}");
        return Err(anyhow::anyhow!("starting {shown}: {}", cmd.exec()));
    }
    if !privilege::is_root() {
        bail!("the demo needs root (network namespaces)");
    }

    let state = tempfile::Builder::new()
        .prefix("scistream-demo-")
        .tempdir()
        .context("creating a state directory")?;
    install_ctrl_c_cleanup(state.path())?;

    println!(
        "scistream demo: {} stream(s) x {} each way per backend; path consumer -> outbound gw -> inbound gw -> producer",
        args.num_conn,
        human_bytes(args.bytes)
    );
    let mut rows = vec![match baseline(args) {
        Ok(row) => row,
        Err(e) => Row::failed("kernel routing", args, e),
    }];
    for backend in &backends {
        let row = match through_gateways(backend, args, state.path()) {
            Ok(row) => row,
            Err(e) => Row::failed(backend, args, e),
        };
        rows.push(row);
    }
    print_table(&rows);
    let failed = rows.iter().filter(|r| r.failure.is_some()).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The Ctrl-C path cannot unwind into the owners' Drops, so it deletes what the
/// test bed registered (daemons, namespaces) plus the state dir, then exits.
fn install_ctrl_c_cleanup(state: &Path) -> Result<()> {
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

struct Row {
    label: String,
    streams: u32,
    up: u64,
    down: u64,
    elapsed: Duration,
    failure: Option<String>,
}

impl Row {
    fn failed(label: &str, args: &Args, e: anyhow::Error) -> Row {
        Row {
            label: label.into(),
            streams: args.num_conn,
            up: 0,
            down: 0,
            elapsed: Duration::ZERO,
            failure: Some(format!("{e:#}")),
        }
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<16} {:>7} {:>14} {:>14} {:>9} {:>13}  SHA-256",
        "backend", "streams", "cons->prod", "prod->cons", "time", "throughput"
    );
    for r in rows {
        let gbps = testbed::traffic::gbit_per_s(r.up + r.down, r.elapsed);
        let verdict = if r.failure.is_some() {
            "FAIL"
        } else {
            "verified OK"
        };
        println!(
            "{:<16} {:>7} {:>14} {:>14} {:>7.2} s {:>8.2} Gbit/s  {verdict}",
            r.label,
            r.streams,
            human_bytes(r.up),
            human_bytes(r.down),
            r.elapsed.as_secs_f64(),
            gbps
        );
    }
    for r in rows {
        if let Some(why) = &r.failure {
            println!("\n{} failed: {why}", r.label);
        }
    }
    println!("\nthroughput counts both directions; each side generates and SHA-256-hashes every byte, so on a small machine the figures are bounded by that CPU work (compare within one run).");
}

/// Streams `args` worth of traffic from the consumer to `targets`, checked against
/// the producer's records.
fn transfer(
    topo: &Topology,
    producer: &Producer,
    targets: &[SocketAddr],
    args: &Args,
    label: &str,
) -> Result<Row> {
    let started = Instant::now();
    let transfers = consume_parallel(topo.ns(Node::Consumer), targets, args.bytes, 1)?;
    let elapsed = started.elapsed();
    let records = producer.wait_for(targets.len(), Duration::from_secs(30))?;
    for t in &transfers {
        t.verify_with(&records, args.bytes)?;
    }
    Ok(Row {
        label: label.into(),
        streams: args.num_conn,
        up: transfers.iter().map(|t| t.sent_bytes).sum(),
        down: transfers.iter().map(|t| t.received_bytes).sum(),
        elapsed,
        failure: None,
    })
}

/// The same traffic routed by the kernel without gateways: the yardstick.
fn baseline(args: &Args) -> Result<Row> {
    let topo = Topology::new()?;
    let target = topo.sock4(Node::Producer, Link::ProducerLan, PRODUCER_PORT);
    let producer = Producer::start(topo.ns(Node::Producer), target, args.bytes)?;
    let targets = vec![target; args.num_conn as usize];
    transfer(&topo, &producer, &targets, args, "kernel routing")
}

/// The last lines of each daemon's log, to explain a failure.
fn with_logs(e: anyhow::Error, daemons: &[&Daemon]) -> anyhow::Error {
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

fn through_gateways(backend: &str, args: &Args, state: &Path) -> Result<Row> {
    let topo = Topology::new()?;
    let s2cs = bin("s2cs");
    let s2uc = bin("s2uc");
    let gin_dir = state.join(format!("{backend}-gin"));
    let gout_dir = state.join(format!("{backend}-gout"));
    for dir in [&gin_dir, &gout_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let gin_ip = topo.ip4(Node::InboundGw, Link::Wan);
    let gout_ip = topo.ip4(Node::OutboundGw, Link::ConsumerLan);
    let prod_ip = topo.ip4(Node::Producer, Link::ProducerLan);
    let num_conn = args.num_conn.to_string();

    let producer = Producer::start(
        topo.ns(Node::Producer),
        (prod_ip, PRODUCER_PORT).into(),
        args.bytes,
    )?;

    let gin = spawn_in(
        topo.ns(Node::InboundGw),
        &s2cs,
        [
            "--listener_ip",
            &gin_ip.to_string(),
            "--port",
            &CONTROL_PORT.to_string(),
            "--port_range",
            "5100-5199",
            "--type",
            backend,
            "--state_dir",
            &path_str(&gin_dir)?,
        ],
    )?;
    wait_for_tcp(
        topo.ns(Node::InboundGw),
        (gin_ip, CONTROL_PORT).into(),
        DAEMON_START,
    )
    .map_err(|e| with_logs(e, &[&gin]))?;
    let gin_cert = gin_dir.join("server.crt");
    if !gin_cert.is_file() {
        return Err(with_logs(
            anyhow::anyhow!("the inbound s2cs wrote no {}", gin_cert.display()),
            &[&gin],
        ));
    }

    let gout = spawn_in(
        topo.ns(Node::OutboundGw),
        &s2cs,
        [
            "--listener_ip",
            &gout_ip.to_string(),
            "--port",
            &CONTROL_PORT.to_string(),
            "--port_range",
            "5100-5199",
            "--type",
            backend,
            "--state_dir",
            &path_str(&gout_dir)?,
            "--peer_ca",
            &path_str(&gin_cert)?,
        ],
    )?;
    wait_for_tcp(
        topo.ns(Node::OutboundGw),
        (gout_ip, CONTROL_PORT).into(),
        DAEMON_START,
    )
    .map_err(|e| with_logs(e, &[&gin, &gout]))?;

    let inbound = s2uc_json(
        topo.ns(Node::InboundGw),
        &s2uc,
        &[
            "inbound-request",
            "--s2cs",
            &format!("{gin_ip}:{CONTROL_PORT}"),
            "--server_cert",
            &path_str(&gin_cert)?,
            "--remote_ip",
            &prod_ip.to_string(),
            "--receiver_ports",
            &PRODUCER_PORT.to_string(),
            "--num_conn",
            &num_conn,
            "--json",
        ],
    )
    .map_err(|e| with_logs(e.context("s2uc inbound-request"), &[&gin]))?;
    let uid = inbound["uid"]
        .as_str()
        .context("inbound-request printed no uid")?
        .to_owned();
    let inbound_listeners = listeners(&inbound).context("inbound-request")?;

    let outbound = s2uc_json(
        topo.ns(Node::OutboundGw),
        &s2uc,
        &[
            "outbound-request",
            "--s2cs",
            &format!("{gout_ip}:{CONTROL_PORT}"),
            "--server_cert",
            &path_str(&gout_dir.join("server.crt"))?,
            "--num_conn",
            &num_conn,
            "--json",
            &uid,
            &inbound_listeners
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ],
    )
    .map_err(|e| with_logs(e.context("s2uc outbound-request"), &[&gin, &gout]))?;
    let outbound_listeners = listeners(&outbound).context("outbound-request")?;
    if outbound_listeners.len() != args.num_conn as usize {
        bail!(
            "outbound-request returned {} listeners for num_conn {}",
            outbound_listeners.len(),
            args.num_conn
        );
    }
    println!(
        "{backend}: session {uid}: consumer -> {} -> {} -> {prod_ip}:{PRODUCER_PORT}",
        join(&outbound_listeners),
        join(&inbound_listeners)
    );

    transfer(&topo, &producer, &outbound_listeners, args, backend)
        .map_err(|e| with_logs(e, &[&gin, &gout]))
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn path_str(path: &Path) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("256m"), Ok(256 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("5T").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999G").is_err());
    }
}
