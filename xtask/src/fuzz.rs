//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` (one per parser
//! of bytes from outside: tunnel proof, addresses, port ranges, uids, config
//! file) for a bounded time, a few at once. `cargo xtask test` runs it briefly
//! under CI=true. A crash fails the command and leaves its input in
//! `fuzz/artifacts/<target>/`; fix the parser, then copy the input into
//! `fuzz/corpus/<target>/` so it stays a regression seed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{bins, setup};

/// Seconds per target under `cargo xtask test` with CI=true.
pub const CI_SECONDS: u64 = 20;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Targets to run (default: all of them).
    targets: Vec<String>,
}

pub fn main(args: &Args) -> Result<ExitCode> {
    run(args.seconds, &args.targets)?;
    Ok(ExitCode::SUCCESS)
}

fn fuzz_dir() -> PathBuf {
    bins::workspace_root().join("fuzz")
}

/// How every target is built: unoptimised (see fuzz/Cargo.toml) and without
/// AddressSanitizer, since the parsers are safe Rust; debug assertions catch
/// integer overflow.
const BUILD_FLAGS: &[&str] = &["--dev", "--sanitizer", "none", "--debug-assertions"];

/// A cargo-fuzz command on the nightly toolchain, run in `fuzz/`.
fn cargo_fuzz(target_dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(fuzz_dir())
        // The parsers need no eBPF object; skipping it spares a nested build.
        .env("AYA_BUILD_SKIP", "1")
        .env("CARGO_TARGET_DIR", target_dir)
        // Set by `cargo xtask` for the stable toolchain; nightly must pick its own.
        .env_remove("RUSTC")
        .env_remove("CARGO");
    cmd
}

/// Builds every target, then runs them `seconds` each, as many at once as
/// there are CPUs. Fails naming each target that crashed.
pub fn run(seconds: u64, only: &[String]) -> Result<()> {
    setup::ensure_fuzzing()?;
    // Sanitizer flags make their own artifacts: keep them apart from the main build's.
    let target_dir = bins::target_dir()?.join("fuzz");
    let listed = setup::output(cargo_fuzz(&target_dir).arg("list"))?;
    let all: Vec<String> = listed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let targets: Vec<String> = if only.is_empty() {
        all.clone()
    } else {
        only.to_vec()
    };
    if let Some(unknown) = targets.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {unknown}; there are {}", all.join(", "));
    }

    let started = Instant::now();
    println!("fuzz: building {} targets...", targets.len());
    // `cargo fuzz build` takes one target or builds them all.
    let builds: Vec<Option<&String>> = if only.is_empty() {
        vec![None]
    } else {
        targets.iter().map(Some).collect()
    };
    for target in builds {
        setup::run(
            cargo_fuzz(&target_dir)
                .arg("build")
                .args(BUILD_FLAGS)
                .args(target),
        )
        .context("building the fuzz targets")?;
    }
    println!(
        "fuzz: built in {:.0?}; running each for {seconds} s",
        started.elapsed()
    );

    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pending: Vec<&String> = targets.iter().rev().collect();
    let mut running: Vec<Running> = Vec::new();
    let mut failed = Vec::new();
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < parallel {
            let Some(target) = pending.pop() else { break };
            running.push(Running::start(&target_dir, target, seconds)?);
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut still = Vec::new();
        for mut r in running {
            match r.child.try_wait().context("waiting for cargo fuzz run")? {
                None => still.push(r),
                Some(status) => {
                    let log = std::fs::read_to_string(&r.log).unwrap_or_default();
                    if status.success() {
                        println!("fuzz: {:<14} ok: {}", r.target, summary(&log));
                    } else {
                        let tail: Vec<&str> = log.lines().rev().take(40).collect();
                        eprintln!(
                            "fuzz: {} FAILED ({status}); last lines of {}:",
                            r.target,
                            r.log.display()
                        );
                        for line in tail.iter().rev() {
                            eprintln!("  {line}");
                        }
                        failed.push(r.target);
                    }
                }
            }
        }
        running = still;
    }
    println!(
        "fuzz: {} targets in {:.0?} (build included)",
        targets.len(),
        started.elapsed()
    );
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (crash inputs in {}/artifacts/<target>/)",
            failed.join(", "),
            fuzz_dir().display()
        );
    }
    Ok(())
}

struct Running {
    target: String,
    child: Child,
    log: PathBuf,
}

impl Running {
    fn start(target_dir: &Path, target: &str, seconds: u64) -> Result<Running> {
        let fuzz = fuzz_dir();
        // New inputs go to a working corpus outside the source tree; the seeds
        // in fuzz/corpus/ are only read.
        let work = target_dir.join("corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let log = target_dir.join(format!("{target}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = cargo_fuzz(target_dir);
        cmd.arg("run")
            .args(BUILD_FLAGS)
            .arg(target)
            .arg(&work)
            .arg(fuzz.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input that takes a second is a hang worth reporting.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1");
        let dict = fuzz.join("dicts").join(format!("{target}.dict"));
        if dict.is_file() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("running cargo fuzz run")?;
        Ok(Running {
            target: target.to_string(),
            child,
            log,
        })
    }
}

/// "N runs, corpus C, coverage E" from libFuzzer's final lines.
fn summary(log: &str) -> String {
    let stat = |name: &str| {
        log.lines()
            .rev()
            .find_map(|l| {
                l.strip_prefix(name)
                    .map(|v| v.trim_start_matches([':', ' ']).trim().to_string())
            })
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{} runs, {} new inputs, {} coverage edges",
        stat("stat::number_of_executed_units"),
        stat("stat::new_units_added"),
        log.lines()
            .rev()
            .find_map(|l| l.split_whitespace().skip_while(|w| *w != "cov:").nth(1))
            .unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_libfuzzers_final_stats() {
        let log = "#1024\tpulse  cov: 310 ft: 900 corp: 40/1Kb\n#2000\tDONE   cov: 352 ft: 1100 corp: 51/2Kb\n\
                   stat::number_of_executed_units: 2000\nstat::new_units_added: 11\n";
        assert_eq!(summary(log), "2000 runs, 11 new inputs, 352 coverage edges");
    }
}
