//! `cargo xtask demo`: SciStream's tutorial on one machine. A four-namespace path
//! (consumer, outbound gateway, inbound gateway, producer), two `s2cs` gateways,
//! `s2uc inbound-request` then `outbound-request`, then verified bulk traffic
//! through the outbound listeners, once per data-plane backend.
//!
//! Everything it creates (namespaces, daemons, key files) is removed on success,
//! on failure and on Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::netns::{Link, Node, Topology};
use testbed::traffic::{consume_parallel, Producer};

use crate::gateways::{self, with_logs, Gateways};
use crate::privilege;

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
    if !gateways::is_handed_over(PREBUILT_ENV) {
        // `cargo xtask` runs a debug build of us, whose unoptimised hashing would cap
        // the figures at ~0.1 Gbit/s: hand over to an optimised xtask.
        gateways::hand_over(PREBUILT_ENV, &["iproute2"], true)?;
    }
    if !privilege::is_root() {
        bail!("the demo needs root (network namespaces)");
    }

    let state = tempfile::Builder::new()
        .prefix("scistream-demo-")
        .tempdir()
        .context("creating a state directory")?;
    gateways::install_ctrl_c_cleanup(state.path())?;

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

fn through_gateways(backend: &str, args: &Args, state: &Path) -> Result<Row> {
    let topo = Topology::new()?;
    let prod = topo.sock4(Node::Producer, Link::ProducerLan, PRODUCER_PORT);
    let producer = Producer::start(topo.ns(Node::Producer), prod, args.bytes)?;
    let gws = Gateways::start(&topo, backend, state, backend)?;
    let session = gws.session(prod, args.num_conn)?;
    println!(
        "{backend}: session {}: consumer -> {} -> {} -> {prod}",
        session.uid,
        gateways::join(&session.outbound_listeners),
        gateways::join(&session.inbound_listeners)
    );
    transfer(&topo, &producer, &session.outbound_listeners, args, backend)
        .map_err(|e| with_logs(e, &[&gws.inbound, &gws.outbound]))
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
