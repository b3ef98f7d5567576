//! `cargo xtask <command>`: the project's one entry point for setting a machine up,
//! building, testing and demonstrating scistream-rs (see `cargo xtask --help`).

mod bench;
mod bench_chart;
mod bench_control;
mod bench_peers;
mod bench_report;
mod bins;
mod demo;
mod fuzz;
mod gateways;
mod privilege;
mod setup;
mod vm;
mod vm_kernel;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set-up, build, test and demo tasks for scistream-rs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set up, build scistream-ctl and run `s2cs` as root (through sudo when needed).
    Run {
        /// Build with the release profile (the default).
        #[arg(long, conflicts_with = "debug")]
        release: bool,
        /// Build and run the debug profile instead.
        #[arg(long)]
        debug: bool,
        /// Arguments for s2cs, after `--`, e.g. `-- --listener_ip 10.0.0.1 --type splice`.
        #[arg(last = true)]
        s2cs_args: Vec<String>,
    },
    /// Set up (toolchain, bpf-linker, Debian packages), build the binaries and run
    /// `cargo test --workspace`; tests run as root (through sudo when needed).
    Test {
        /// Extra arguments for `cargo test`, after `--`, e.g. `-- -p scistream-tests -- --nocapture`.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run the whole tutorial on this machine: a four-namespace path, two s2cs
    /// gateways, s2uc inbound/outbound requests, then verified bulk traffic.
    Demo(demo::Args),
    /// Throughput of every data-plane backend against kernel routing, HAProxy and
    /// stunnel on the four-namespace path (iperf3), plus s2uc session set-up
    /// latency; writes target/bench/bench.json and bench.svg.
    Bench(bench::Args),
    /// Prove the kernel-TLS data path in QEMU VMs running Debian's bookworm (6.1)
    /// and sid cloud kernels: a static test binary streams a whole `tls` session
    /// inside each VM and checks /proc/net/tls_stat (the host has no kernel TLS).
    VmTest(vm::Args),
    /// Run every fuzz target in fuzz/ (cargo-fuzz, nightly) for a bounded
    /// time; `test` does so for 20 s each under CI=true.
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            release: _,
            debug,
            s2cs_args,
        } => run(!debug, &s2cs_args),
        Command::Test { cargo_test_args } => test(&cargo_test_args),
        Command::Demo(args) => demo::main(&args),
        Command::Bench(args) => bench::main(&args),
        Command::VmTest(args) => vm::main(&args),
        Command::Fuzz(args) => fuzz::main(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Debian packages the test suite uses: peers for comparison and interop
/// (iperf3, haproxy, stunnel4, socat, openssl), namespaces and NIC settings
/// (iproute2, ethtool) and the kernel-TLS VM (qemu, cpio, busybox).
const TEST_PACKAGES: &[&str] = &[
    "iperf3",
    "haproxy",
    "stunnel4",
    "socat",
    "openssl",
    "iproute2",
    "ethtool",
    "qemu-system-x86",
    "cpio",
    "busybox-static",
];

fn run(release: bool, s2cs_args: &[String]) -> Result<ExitCode> {
    setup::ensure(&[])?;
    let dir = bins::build(release)?;
    let s2cs = dir.join("s2cs");
    // BPF, XDP and privileged ports need root; exec so signals reach s2cs directly.
    let err = privilege::as_root(&s2cs, s2cs_args).exec_replacing();
    Err(err)
}

fn test(cargo_test_args: &[String]) -> Result<ExitCode> {
    setup::ensure(TEST_PACKAGES)?;
    let dir = bins::build(false)?;
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        fuzz::run(fuzz::CI_SECONDS, &[])?;
    }
    let mut cmd = bins::cargo();
    cmd.arg("test");
    // `--workspace` would override a `-p` the user gave to narrow the run.
    let narrowed = cargo_test_args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2));
    if !narrowed {
        cmd.arg("--workspace");
    }
    // The test bed generates and SHA-256-hashes every byte it moves; unoptimised
    // that runs at ~30 MB/s and dominates the suite's time (minutes instead of seconds).
    for package in ["sha2", "scistream-tests"] {
        cmd.arg("--config")
            .arg(format!("profile.dev.package.{package}.opt-level=3"));
    }
    cmd.args(cargo_test_args).env("SCISTREAM_BIN_DIR", &dir);
    if !privilege::is_root() {
        if privilege::has_sudo() {
            // Cargo builds as this user (no root-owned files in target/) and runs
            // each test executable through the runner. Doc tests bypass runners;
            // they need no root.
            let triple = bins::host_triple()?;
            let var = format!(
                "CARGO_TARGET_{}_RUNNER",
                triple.to_uppercase().replace(['-', '.'], "_")
            );
            cmd.env(var, "sudo -E");
            eprintln!("tests need root: running them through sudo -E");
        } else {
            eprintln!("not root and no sudo: tests that need root will be skipped (they fail under CI=true)");
        }
    }
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running cargo test: {e}"))?;
    Ok(exit_code(status))
}

/// The child's exit code as ours; a signal death counts as failure.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
