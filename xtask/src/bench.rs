//! `cargo xtask bench`: end-to-end throughput of scistream-rs against its peers on
//! the four-namespace path (consumer -> outbound gw -> inbound gw -> producer),
//! measured with iperf3, plus the session set-up latency of `s2uc`.
//!
//! Every configuration gets its own path, built once and kept for the whole run,
//! so rounds can interleave the configurations: a burst of load from another
//! process on this shared machine then hits all of them alike instead of
//! skewing one. Medians over the rounds are reported, with ratios to `direct`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::netns::{Link, Node, Topology};
use testbed::process::{netns_command, run_command, spawn_in, Daemon};

use crate::bench_chart;
use crate::bench_control;
use crate::bench_peers::{self, PeerPair};
use crate::bench_report::{self, Cell, Report, Sample};
use crate::gateways::{self, Gateways};
use crate::privilege;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
    seconds: u32,
    /// Rounds; each runs every configuration once per stream count (medians reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Parallel streams (iperf3 -P), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    streams: Vec<u32>,
    /// Configurations, comma-separated: direct (kernel routing), direct-xdp-path
    /// (kernel routing with the veth settings `xdp` needs), haproxy, stunnel, and any
    /// `s2cs --type` (tls, splice, sockmap, xdp, ...); `<type>-noguard` runs that type
    /// with `s2cs --guard false`, and the report gives the guard's cost as the
    /// ratio of the two. One the host cannot run is skipped.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,tls,splice,sockmap,haproxy,stunnel,xdp"
    )]
    configs: Vec<String>,
    /// Sessions for the set-up latency measurement (0 skips it).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=300))]
    sessions: u32,
    /// Idle sessions opened on one gateway to measure memory per session (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle_sessions: u32,
    /// The `s2cs --type` whose gateways the set-up latency and idle memory are
    /// measured on (two gateways on 127.0.0.1).
    #[arg(long, default_value = "tls")]
    latency_backend: String,
    /// MTU of every veth of every path (9000: what data transfer nodes run).
    #[arg(long, default_value_t = 9000, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    mtu: u32,
    /// Which way the stream goes: forward (producer -> consumer, iperf3 -R),
    /// reverse (consumer -> producer) or both, each with its own table.
    #[arg(long, value_enum, default_value_t = Direction::Both)]
    direction: Direction,
    /// Where bench.json and bench.svg go; default target/bench in the workspace.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    Forward,
    Reverse,
    Both,
}

impl Direction {
    /// The one-way directions this choice runs, forward first.
    fn ways(self) -> &'static [Way] {
        match self {
            Direction::Forward => &[Way::Forward],
            Direction::Reverse => &[Way::Reverse],
            Direction::Both => &[Way::Forward, Way::Reverse],
        }
    }
}

/// One direction of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Producer -> consumer, as a science stream flows (iperf3 -R).
    Forward,
    /// Consumer -> producer: what the inbound gateway's guard sees as data.
    Reverse,
}

impl Way {
    pub fn name(self) -> &'static str {
        match self {
            Way::Forward => "forward",
            Way::Reverse => "reverse",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Way::Forward => "producer -> consumer (iperf3 -R)",
            Way::Reverse => "consumer -> producer",
        }
    }
}

/// Set when we re-ran ourselves (as root) after building the release binaries.
const PREBUILT_ENV: &str = "XTASK_BENCH_PREBUILT";
/// iperf3's default port, on the producer.
const IPERF_PORT: u16 = 5201;
/// Debian packages of the peers and the load generator.
const PACKAGES: &[&str] = &[
    "iperf3", "haproxy", "stunnel4", "socat", "openssl", "iproute2",
];

/// What forwards between the gateways in one configuration; dropping it stops it.
enum Forwarding {
    /// Kernel routing: nothing runs on the gateways.
    Kernel,
    Scistream(Gateways),
    Peers(PeerPair),
}

impl Forwarding {
    fn pids(&self) -> Vec<u32> {
        match self {
            Forwarding::Kernel => Vec::new(),
            Forwarding::Scistream(g) => g.pids().to_vec(),
            Forwarding::Peers(p) => p.pids().to_vec(),
        }
    }
}

/// One configuration's own path, ready for iperf3 runs. Fields drop in order:
/// the forwarding daemons and the iperf3 server before their namespaces.
struct Bed {
    label: String,
    forwarding: Forwarding,
    iperf_server: Daemon,
    /// Where the iperf3 client connects.
    target: SocketAddr,
    topo: Topology,
}

pub fn main(args: &Args) -> Result<ExitCode> {
    if !gateways::is_handed_over(PREBUILT_ENV) {
        // iperf3 generates the load, so a debug xtask is fine; only s2cs/s2uc
        // must be release builds.
        gateways::hand_over(PREBUILT_ENV, PACKAGES, false)?;
    }
    if !privilege::is_root() {
        bail!("the benchmark needs root (network namespaces)");
    }
    if args.streams.is_empty() || args.configs.is_empty() {
        bail!("--streams and --configs must each name at least one value");
    }
    let out_dir = match &args.out {
        Some(dir) => dir.clone(),
        None => crate::bins::workspace_root().join("target").join("bench"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let state = tempfile::Builder::new()
        .prefix("scistream-bench-")
        .tempdir()
        .context("creating a state directory")?;
    gateways::install_ctrl_c_cleanup(state.path())?;

    let ways = args.direction.ways();
    let mut reports: Vec<Report> = ways
        .iter()
        .map(|&way| Report::new(args.seconds, args.rounds, &args.streams, args.mtu, way))
        .collect();
    println!(
        "scistream bench: MTU {}, {}, {} s per run, {} round(s), streams {:?}; load average at start: {}",
        args.mtu,
        ways.iter().map(|w| w.describe()).collect::<Vec<_>>().join(" and "),
        args.seconds,
        args.rounds,
        args.streams,
        reports[0].machine.loadavg
    );

    let mut beds = Vec::new();
    for label in &args.configs {
        let label = label.trim().to_ascii_lowercase();
        match prepare(&label, state.path(), args.mtu) {
            Ok(bed) => {
                println!("{label}: ready, iperf3 -> {}", bed.target);
                beds.push(bed);
            }
            Err(e) => {
                let reason = format!("{e:#}");
                println!("{label}: SKIPPED: {reason}");
                for report in &mut reports {
                    report.skip(&label, reason.clone());
                }
            }
        }
    }
    if beds.is_empty() {
        bail!("no configuration could be set up");
    }

    for round in 1..=args.rounds {
        for (report, &way) in reports.iter_mut().zip(ways) {
            for &streams in &args.streams {
                for bed in &mut beds {
                    let outcome = measure_or_reset(bed, streams, args.seconds, way);
                    match &outcome {
                        Ok(s) => println!(
                            "round {round}/{}: {:<8} {:<7} P{streams}: {:6.2} Gbit/s",
                            args.rounds,
                            bed.label,
                            way.name(),
                            s.gbps
                        ),
                        Err(e) => println!(
                            "round {round}/{}: {:<8} {:<7} P{streams}: FAILED: {e:#}",
                            args.rounds,
                            bed.label,
                            way.name()
                        ),
                    }
                    report.record(&bed.label, streams, outcome.map_err(|e| format!("{e:#}")));
                }
            }
        }
    }

    drop(beds);
    if args.sessions > 0 {
        match bench_control::setup_latency(&args.latency_backend, args.sessions, state.path()) {
            Ok(latency) => reports[0].latency = Some(latency),
            Err(e) => println!("set-up latency: FAILED: {e:#}"),
        }
    }
    if args.idle_sessions > 0 {
        match bench_control::idle_memory(&args.latency_backend, args.idle_sessions, state.path()) {
            Ok(idle) => reports[0].idle = Some(idle),
            Err(e) => println!("idle-session memory: FAILED: {e:#}"),
        }
    }

    let all_cells: Vec<Vec<Cell>> = reports.iter().map(Report::cells).collect();
    for (report, cells) in reports.iter().zip(&all_cells) {
        bench_report::print_table(report, cells);
    }
    let json = out_dir.join("bench.json");
    let pairs: Vec<(&Report, &[Cell])> = reports
        .iter()
        .zip(all_cells.iter().map(Vec::as_slice))
        .collect();
    bench_report::write_json(&pairs, &json)?;
    let mut written = vec![json.display().to_string()];
    for (report, cells) in &pairs {
        let svg = out_dir.join(format!("bench-{}.svg", report.way.name()));
        bench_chart::write_svg(report, cells, &svg)?;
        written.push(svg.display().to_string());
    }
    println!("\nwrote {}", written.join(", "));
    let cells: Vec<&Cell> = all_cells.iter().flatten().collect();
    let failed = cells.iter().any(|c| c.samples.is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Refuses a path where any veth runs generic (skb) XDP: it copies every
/// non-linear packet, and no configuration may be measured through it unseen.
fn refuse_generic_xdp(topo: &Topology) -> Result<()> {
    for link in Link::ALL {
        let (a, b) = link.ends();
        for node in [a, b] {
            let mut cmd = std::process::Command::new("ip");
            cmd.args([
                "-n",
                topo.ns(node),
                "link",
                "show",
                "dev",
                topo.iface(node, link),
            ]);
            let out = run_command(cmd, Duration::from_secs(10))?;
            if String::from_utf8_lossy(&out.stdout).contains("xdpgeneric") {
                bail!("{node:?}'s {} runs generic XDP", topo.iface(node, link));
            }
        }
    }
    Ok(())
}

/// Whether `node`'s veth on `link` carries an XDP program (`ip link` says `xdp`).
fn xdp_attached(topo: &Topology, node: Node, link: Link) -> Result<bool> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args([
        "-n",
        topo.ns(node),
        "link",
        "show",
        "dev",
        topo.iface(node, link),
    ]);
    let out = run_command(cmd, Duration::from_secs(10))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(" xdp"))
}

/// Builds `label`'s path: a topology, an iperf3 server on the producer, and the
/// gateways (none for `direct`).
fn prepare(label: &str, state: &Path, mtu: u32) -> Result<Bed> {
    let topo = Topology::new()?;
    topo.set_mtu(mtu)?;
    let producer = topo.sock4(Node::Producer, Link::ProducerLan, IPERF_PORT);
    let iperf_server = start_iperf_server(&topo)?;
    let dir = state.join(label);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if label == "direct-xdp-path" {
        // Kernel routing with the veth settings the NAT needed when it ran in
        // XDP on veths (NAPI for redirects, complete checksums: no TSO). `xdp`
        // itself now takes veths as they are: its NAT attaches at tc there.
        topo.enable_gro()?;
        topo.complete_checksums()?;
    }
    let (forwarding, target) = match label {
        "direct" | "direct-xdp-path" => (Forwarding::Kernel, producer),
        "haproxy" => {
            let pair = bench_peers::haproxy(&topo, producer, &dir)?;
            let entry = pair.entry;
            (Forwarding::Peers(pair), entry)
        }
        "stunnel" => {
            let pair = bench_peers::stunnel(&topo, producer, &dir)?;
            let entry = pair.entry;
            (Forwarding::Peers(pair), entry)
        }
        label => {
            // The guard is on by default (as root); the twin without it
            // prices the guard within the same run.
            let (backend, extra): (&str, &[&str]) =
                match label.strip_suffix(bench_report::NOGUARD_SUFFIX) {
                    Some(backend) => (backend, &["--guard", "false"]),
                    None => (label, &[]),
                };
            let gws = Gateways::start_with(&topo, backend, state, label, extra)
                .with_context(|| format!("s2cs --type {backend} {}", extra.join(" ")))?;
            // A guard cost is only a cost if the twins differ in the guard alone.
            let guarded = xdp_attached(&topo, Node::InboundGw, Link::Wan)?;
            if !extra.is_empty() && guarded {
                bail!("an XDP program is on the inbound gateway's WAN veth despite --guard false");
            }
            println!(
                "{label}: XDP program on the inbound gateway's data interface: {}",
                if guarded { "yes" } else { "no" }
            );
            // One listener: iperf3's control and data connections all go to the
            // same port, and the gateway forwards every connection it accepts.
            let session = gws.session(producer, 1)?;
            let entry = *session
                .outbound_listeners
                .first()
                .context("outbound-request returned no listener")?;
            (Forwarding::Scistream(gws), entry)
        }
    };
    refuse_generic_xdp(&topo)?;
    Ok(Bed {
        label: label.to_owned(),
        forwarding,
        iperf_server,
        target,
        topo,
    })
}

fn start_iperf_server(topo: &Topology) -> Result<Daemon> {
    let producer = topo.sock4(Node::Producer, Link::ProducerLan, IPERF_PORT);
    let prod_ns = topo.ns(Node::Producer);
    let port = IPERF_PORT.to_string();
    let mut server = spawn_in(prod_ns, "iperf3", ["-s", "-p", port.as_str()])?;
    gateways::wait_listening(&mut server, prod_ns, producer, Duration::from_secs(10))
        .context("iperf3 server")?;
    Ok(server)
}

/// [`measure`], and after a failed run a fresh iperf3 server: a killed client
/// whose close never reached the server leaves it busy with the dead test, which
/// would fail every later run of this configuration for a reason not its own.
fn measure_or_reset(bed: &mut Bed, streams: u32, seconds: u32, way: Way) -> Result<Sample> {
    let outcome = measure(bed, streams, seconds, way);
    if outcome.is_err() {
        bed.iperf_server.stop();
        bed.iperf_server = start_iperf_server(&bed.topo).context("restarting the iperf3 server")?;
    }
    outcome
}

/// One iperf3 run through `bed`, with the gateways' CPU time and peak memory.
fn measure(bed: &Bed, streams: u32, seconds: u32, way: Way) -> Result<Sample> {
    let pids = bed.forwarding.pids();
    for &pid in &pids {
        reset_peak_rss(pid)?;
    }
    let cpu_before = cpu_seconds(&pids)?;
    let host_before = host_busy_seconds()?;
    let mut cmd = netns_command(bed.topo.ns(Node::Consumer), "iperf3");
    cmd.args(["-c", &bed.target.ip().to_string()])
        .args(["-p", &bed.target.port().to_string()])
        .args(["-t", &seconds.to_string()])
        .args(["-P", &streams.to_string()])
        // A gateway that accepts but never connects onwards must fail the run, not hang it.
        .args(["--connect-timeout", "5000"])
        // -J: one JSON document.
        .arg("-J");
    if way == Way::Forward {
        // -R: the producer sends, as in a science stream.
        cmd.arg("-R");
    }
    let started = Instant::now();
    let out = run_command(cmd, Duration::from_secs(u64::from(seconds) + 15))?;
    let wall = started.elapsed();
    let cpu = cpu_seconds(&pids)? - cpu_before;
    let host_busy_s = host_busy_seconds()? - host_before;
    let peak_rss_kib = pids
        .iter()
        .map(|&pid| peak_rss_kib(pid))
        .sum::<Result<u64>>()?;
    let (bytes, gbps) = parse_iperf(&out.stdout)
        .with_context(|| format!("iperf3 exited with {} after {wall:?}", out.status))?;
    Ok(Sample {
        gbps,
        bytes,
        gateway_cpu_s: (!pids.is_empty()).then_some(cpu),
        peak_rss_kib: (!pids.is_empty()).then_some(peak_rss_kib),
        host_busy_s,
        wall_s: wall.as_secs_f64(),
    })
}

/// Bytes received and Gbit/s from iperf3's `-J` output (receiver side, so data
/// still queued in a buffer when the sender stops does not count).
fn parse_iperf(stdout: &[u8]) -> Result<(u64, f64)> {
    let doc: serde_json::Value = serde_json::from_slice(stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(stdout)
                .chars()
                .take(400)
                .collect::<String>()
        )
    })?;
    if let Some(err) = doc["error"].as_str() {
        bail!("iperf3: {err}");
    }
    let sum = &doc["end"]["sum_received"];
    let bytes = sum["bytes"].as_u64().context("no end.sum_received.bytes")?;
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second")?;
    Ok((bytes, bps / 1e9))
}

/// /proc reports CPU time in USER_HZ ticks, which the Linux ABI fixes at 100 on
/// every architecture we run on (it is not the kernel's CONFIG_HZ).
const USER_HZ: f64 = 100.0;

/// utime + stime of every thread of each process, in seconds.
fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let mut total = 0.0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        total +=
            parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))? as f64 / USER_HZ;
    }
    Ok(total)
}

/// utime + stime from a /proc/<pid>/stat line. The command name may contain
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Result<u64> {
    let rest = stat
        .rsplit_once(')')
        .context("no `)` after the command name")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .context("line too short")?
            .parse()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// CPU seconds the whole machine has spent working so far, over all CPUs:
/// everything in /proc/stat's `cpu` line but idle, iowait and steal (steal
/// is the hypervisor running someone else). Guest time is already in user.
fn host_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    Ok(parse_host_busy_ticks(&stat).context("parsing /proc/stat")? as f64 / USER_HZ)
}

fn parse_host_busy_ticks(stat: &str) -> Result<u64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no `cpu` line")?;
    let ticks = line
        .split_whitespace()
        .skip(1)
        .map(|f| {
            f.parse::<u64>()
                .with_context(|| format!("`{f}` is not a number"))
        })
        .collect::<Result<Vec<u64>>>()?;
    // user nice system idle iowait irq softirq steal ...
    let [user, nice, system, _idle, _iowait, irq, softirq, ..] = ticks[..] else {
        bail!("the `cpu` line has {} fields, not at least 7", ticks.len());
    };
    Ok(user + nice + system + irq + softirq)
}

/// Writing 5 to clear_refs resets VmHWM to the current RSS, so each run's peak
/// is its own even though the gateways live through all rounds.
fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    bench_control::status_field(pid, "VmHWM")
}

#[cfg(test)]
#[path = "bench_tests.rs"]
mod tests;
