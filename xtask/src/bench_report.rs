//! The results of `cargo xtask bench`: medians and ratios per configuration and
//! stream count, printed as a table and written as JSON and an SVG bar chart.
//! A configuration run with and without the guard (`splice` and
//! `splice-noguard`) also gets the guard's cost, from the paired rounds.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// One iperf3 run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub gbps: f64,
    pub bytes: u64,
    /// utime + stime of both gateway processes during the run; None for kernel routing.
    pub gateway_cpu_s: Option<f64>,
    /// VmHWM of the two gateways, summed; None for kernel routing.
    pub peak_rss_kib: Option<u64>,
    /// CPU seconds the whole machine worked during the run (gateways, both
    /// iperf3 ends, softirq charged to nobody, and anything else running).
    pub host_busy_s: f64,
    /// Wall time of the run.
    pub wall_s: f64,
}

impl Sample {
    /// `seconds` per GB the run moved; None when it moved nothing.
    fn per_gb(&self, seconds: f64) -> Option<f64> {
        let gb = self.bytes as f64 / 1e9;
        (gb > 0.0).then(|| seconds / gb)
    }

    fn cpu_s_per_gb(&self) -> Option<f64> {
        self.gateway_cpu_s.and_then(|cpu| self.per_gb(cpu))
    }

    fn host_cpu_s_per_gb(&self) -> Option<f64> {
        self.per_gb(self.host_busy_s)
    }

    /// How much of the machine was busy: near 1 means every CPU was, so
    /// throughput is set by CPU per GB, not by latency.
    fn host_busy_fraction(&self, cpus: usize) -> Option<f64> {
        (cpus > 0 && self.wall_s > 0.0).then(|| self.host_busy_s / (cpus as f64 * self.wall_s))
    }
}

pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// /proc/loadavg at the start: other work on a shared machine shows here.
    pub loadavg: String,
}

impl Machine {
    fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// `s2uc` session set-up wall times in milliseconds.
pub struct Latency {
    pub backend: String,
    pub inbound_ms: Vec<f64>,
    pub outbound_ms: Vec<f64>,
}

impl Latency {
    pub fn new(backend: &str, inbound_ms: Vec<f64>, outbound_ms: Vec<f64>) -> Latency {
        Latency {
            backend: backend.to_owned(),
            inbound_ms,
            outbound_ms,
        }
    }

    fn total_ms(&self) -> Vec<f64> {
        self.inbound_ms
            .iter()
            .zip(&self.outbound_ms)
            .map(|(a, b)| a + b)
            .collect()
    }
}

/// Nearest-rank percentile (`q` in 0..=100); None for no values.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// Label suffix of a configuration run with `s2cs --guard false`.
pub const NOGUARD_SUFFIX: &str = "-noguard";

/// What the guard costs one configuration: its runs against its
/// `-noguard` twin's runs of the same rounds.
pub struct GuardCost {
    pub config: String,
    pub streams: u32,
    /// Median over rounds of (with guard / without), throughput.
    pub throughput_ratio: f64,
    /// Rounds where both twins produced a sample.
    pub paired_rounds: usize,
    /// Median gateway CPU per GB with the guard over without.
    pub cpu_per_gb_ratio: Option<f64>,
}

impl GuardCost {
    /// Throughput lost to the guard, in percent (negative: the guarded twin was faster).
    pub fn cost_percent(&self) -> f64 {
        (1.0 - self.throughput_ratio) * 100.0
    }
}

pub struct Report {
    pub machine: Machine,
    /// MTU of every veth in the run.
    pub mtu: u32,
    /// Which way the stream went.
    pub way: crate::bench::Way,
    pub(crate) seconds: u32,
    pub(crate) rounds: u32,
    pub(crate) streams: Vec<u32>,
    /// Configurations in the order they were set up.
    pub(crate) order: Vec<String>,
    runs: Vec<(String, u32, Result<Sample, String>)>,
    skipped: Vec<(String, String)>,
    pub latency: Option<Latency>,
    pub idle: Option<crate::bench_control::IdleMemory>,
    started_unix: u64,
}

/// The summary of one configuration at one stream count.
pub struct Cell {
    pub label: String,
    pub streams: u32,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
    pub median_gbps: Option<f64>,
    pub ratio_to_direct: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    /// The whole machine's busy CPU seconds per GB: with every CPU busy,
    /// throughput is the CPU count over this.
    pub host_cpu_s_per_gb: Option<f64>,
    pub host_busy_fraction: Option<f64>,
    pub peak_rss_kib: Option<u64>,
}

impl Report {
    pub fn new(
        seconds: u32,
        rounds: u32,
        streams: &[u32],
        mtu: u32,
        way: crate::bench::Way,
    ) -> Report {
        Report {
            machine: Machine::probe(),
            mtu,
            way,
            seconds,
            rounds,
            streams: streams.to_vec(),
            order: Vec::new(),
            runs: Vec::new(),
            skipped: Vec::new(),
            latency: None,
            idle: None,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    pub fn skip(&mut self, label: &str, reason: String) {
        self.skipped.push((label.to_owned(), reason));
    }

    pub fn record(&mut self, label: &str, streams: u32, outcome: Result<Sample, String>) {
        if !self.order.iter().any(|l| l == label) {
            self.order.push(label.to_owned());
        }
        self.runs.push((label.to_owned(), streams, outcome));
    }

    /// Medians per configuration and stream count; CPU per GB is the median of
    /// each run's own ratio, peak RSS the largest of the runs.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &streams in &self.streams {
            let direct = self.summarise("direct", streams).median_gbps;
            for label in &self.order {
                let mut cell = self.summarise(label, streams);
                cell.ratio_to_direct = cell
                    .median_gbps
                    .zip(direct)
                    .filter(|(_, d)| *d > 0.0)
                    .map(|(g, d)| g / d);
                cells.push(cell);
            }
        }
        cells
    }

    /// Each configuration with a `-noguard` twin, per stream count. Rounds run
    /// the twins back to back, so each round's pair saw the same machine load:
    /// the median of the per-round ratios is steadier than a ratio of medians.
    pub fn guard_costs(&self, cells: &[Cell]) -> Vec<GuardCost> {
        let mut costs = Vec::new();
        for &streams in &self.streams {
            for twin in &self.order {
                let Some(base) = twin.strip_suffix(NOGUARD_SUFFIX) else {
                    continue;
                };
                let with = self.per_round(base, streams);
                let without = self.per_round(twin, streams);
                let ratios: Vec<f64> = with
                    .iter()
                    .zip(&without)
                    .filter_map(|(w, wo)| Some((*w)? / (*wo).filter(|g| *g > 0.0)?))
                    .collect();
                let Some(throughput_ratio) = median(&ratios) else {
                    continue;
                };
                let cpu = |label: &str| {
                    cells
                        .iter()
                        .find(|c| c.label == label && c.streams == streams)
                        .and_then(|c| c.cpu_s_per_gb)
                };
                costs.push(GuardCost {
                    config: base.to_owned(),
                    streams,
                    throughput_ratio,
                    paired_rounds: ratios.len(),
                    cpu_per_gb_ratio: cpu(base)
                        .zip(cpu(twin))
                        .filter(|(_, wo)| *wo > 0.0)
                        .map(|(w, wo)| w / wo),
                });
            }
        }
        costs
    }

    /// Throughput of each run of `label` at `streams`, in round order; `None`
    /// for a failed run.
    fn per_round(&self, label: &str, streams: u32) -> Vec<Option<f64>> {
        self.runs
            .iter()
            .filter(|(l, s, _)| l == label && *s == streams)
            .map(|(_, _, outcome)| outcome.as_ref().ok().map(|s| s.gbps))
            .collect()
    }

    fn summarise(&self, label: &str, streams: u32) -> Cell {
        let mut samples = Vec::new();
        let mut errors = Vec::new();
        for (l, s, outcome) in &self.runs {
            if l == label && *s == streams {
                match outcome {
                    Ok(sample) => samples.push(sample.clone()),
                    Err(e) => errors.push(e.clone()),
                }
            }
        }
        let gbps: Vec<f64> = samples.iter().map(|s| s.gbps).collect();
        let cpu: Vec<f64> = samples.iter().filter_map(Sample::cpu_s_per_gb).collect();
        let host: Vec<f64> = samples
            .iter()
            .filter_map(Sample::host_cpu_s_per_gb)
            .collect();
        let busy: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.host_busy_fraction(self.machine.cpus))
            .collect();
        Cell {
            label: label.to_owned(),
            streams,
            median_gbps: median(&gbps),
            ratio_to_direct: None,
            cpu_s_per_gb: median(&cpu),
            host_cpu_s_per_gb: median(&host),
            host_busy_fraction: median(&busy),
            peak_rss_kib: samples.iter().filter_map(|s| s.peak_rss_kib).max(),
            samples,
            errors,
        }
    }
}

fn opt(v: Option<f64>, precision: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
}

pub fn print_table(report: &Report, cells: &[Cell]) {
    let m = &report.machine;
    println!(
        "\n== {}, MTU {} ==\n{} CPUs ({}), kernel {}; {} s x {} round(s), medians; gateway CPU = utime+stime of both gateway processes; host CPU = the whole machine's busy time (iperf3 and softirq too), busy = its share of all CPUs",
        report.way.describe(), report.mtu, m.cpus, m.cpu_model, m.kernel, report.seconds, report.rounds
    );
    // Wide enough for the longest label ("splice-noguard").
    let w = cells
        .iter()
        .map(|c| c.label.len())
        .max()
        .unwrap_or(0)
        .max(10);
    for &streams in &report.streams {
        println!("\n{streams} stream(s):");
        println!(
            "{:<w$} {:>8} {:>10} {:>13} {:>15} {:>5} {:>14}  runs (Gbit/s)",
            "config", "Gbit/s", "vs direct", "gw CPU s/GB", "host CPU s/GB", "busy", "gw peak RSS"
        );
        for c in cells.iter().filter(|c| c.streams == streams) {
            let runs: Vec<String> = c.samples.iter().map(|s| format!("{:.2}", s.gbps)).collect();
            let failed = if c.errors.is_empty() {
                String::new()
            } else {
                format!(" ({} failed)", c.errors.len())
            };
            println!(
                "{:<w$} {:>8} {:>10} {:>13} {:>15} {:>5} {:>14}  {}{failed}",
                c.label,
                opt(c.median_gbps, 2),
                c.ratio_to_direct
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
                opt(c.cpu_s_per_gb, 2),
                opt(c.host_cpu_s_per_gb, 2),
                c.host_busy_fraction
                    .map_or_else(|| "-".to_owned(), |b| format!("{:.0}%", b * 100.0)),
                c.peak_rss_kib.map_or_else(
                    || "-".to_owned(),
                    |k| format!("{:.1} MiB", k as f64 / 1024.0)
                ),
                runs.join(" ")
            );
        }
    }
    for g in report.guard_costs(cells) {
        println!(
            "\nguard, {} P{}: {:.3}x of {}{NOGUARD_SUFFIX} (median of {} paired rounds; {:+.1}% throughput){}",
            g.config,
            g.streams,
            g.throughput_ratio,
            g.config,
            g.paired_rounds,
            -g.cost_percent(),
            g.cpu_per_gb_ratio
                .map_or_else(String::new, |r| format!(", gateway CPU/GB {r:.3}x"))
        );
    }
    for c in cells {
        if let Some(e) = c.errors.first() {
            println!(
                "\n{} P{} failed {} time(s); first: {e}",
                c.label,
                c.streams,
                c.errors.len()
            );
        }
    }
    for (label, reason) in &report.skipped {
        println!("\n{label}: skipped: {reason}");
    }
    if let Some(l) = &report.latency {
        let total = l.total_ms();
        println!(
            "\nsession set-up ({} gateways, {} sessions, wall time of the s2uc commands):",
            l.backend,
            total.len()
        );
        for (name, v) in [
            ("inbound-request", &l.inbound_ms),
            ("outbound-request", &l.outbound_ms),
            ("both", &total),
        ] {
            println!(
                "  {name:<17} p50 {:>7} ms   p99 {:>7} ms",
                opt(percentile(v, 50.0), 1),
                opt(percentile(v, 99.0), 1)
            );
        }
    }
    if let Some(m) = &report.idle {
        println!(
            "\nidle sessions ({} gateway, {} sessions open): RSS {} -> {} KiB, {:.1} KiB per session; threads {} -> {}",
            m.backend,
            m.sessions,
            m.rss_before_kib,
            m.rss_after_kib,
            m.per_session_kib(),
            m.threads_before,
            m.threads_after
        );
    }
}

/// bench.json: one document per direction run, in `directions`.
pub fn write_json(reports: &[(&Report, &[Cell])], path: &Path) -> Result<()> {
    let docs: Vec<Value> = reports.iter().map(|(r, c)| report_json(r, c)).collect();
    let doc = json!({ "mtu": reports.first().map(|(r, _)| r.mtu), "directions": docs });
    let text = serde_json::to_string_pretty(&doc).context("encoding the results")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn report_json(report: &Report, cells: &[Cell]) -> Value {
    let m = &report.machine;
    let results: Vec<Value> = cells
        .iter()
        .map(|c| {
            json!({
                "config": c.label,
                "streams": c.streams,
                "median_gbit_per_s": c.median_gbps,
                "ratio_to_direct": c.ratio_to_direct,
                "gateway_cpu_s_per_gb": c.cpu_s_per_gb,
                "host_cpu_s_per_gb": c.host_cpu_s_per_gb,
                "host_busy_fraction": c.host_busy_fraction,
                "gateway_peak_rss_kib": c.peak_rss_kib,
                "runs": c.samples.iter().map(|s| json!({
                    "gbit_per_s": s.gbps,
                    "bytes": s.bytes,
                    "gateway_cpu_s": s.gateway_cpu_s,
                    "host_busy_s": s.host_busy_s,
                    "wall_s": s.wall_s,
                    "gateway_peak_rss_kib": s.peak_rss_kib,
                })).collect::<Vec<_>>(),
                "errors": c.errors,
            })
        })
        .collect();
    let latency = report.latency.as_ref().map(|l| {
        let total = l.total_ms();
        let stats =
            |v: &[f64]| json!({"p50_ms": percentile(v, 50.0), "p99_ms": percentile(v, 99.0)});
        json!({
            "backend": l.backend,
            "sessions": total.len(),
            "inbound_request": stats(&l.inbound_ms),
            "outbound_request": stats(&l.outbound_ms),
            "both": stats(&total),
            "both_ms": total,
        })
    });
    json!({
        "started_unix": report.started_unix,
        "machine": {
            "kernel": m.kernel,
            "cpus": m.cpus,
            "cpu_model": m.cpu_model,
            "loadavg_at_start": m.loadavg,
        },
        "method": {
            "tool": match report.way {
                crate::bench::Way::Forward => "iperf3 -R -J (producer sends; received bytes)",
                crate::bench::Way::Reverse => "iperf3 -J (consumer sends; received bytes)",
            },
            "direction": report.way.name(),
            "mtu": report.mtu,
            "seconds_per_run": report.seconds,
            "rounds": report.rounds,
            "streams": report.streams,
        },
        "results": results,
        "guard_cost": report.guard_costs(cells).iter().map(|g| json!({
            "config": g.config,
            "without_guard": format!("{}{NOGUARD_SUFFIX}", g.config),
            "streams": g.streams,
            "throughput_ratio": g.throughput_ratio,
            "cost_percent": g.cost_percent(),
            "paired_rounds": g.paired_rounds,
            "gateway_cpu_per_gb_ratio": g.cpu_per_gb_ratio,
        })).collect::<Vec<_>>(),
        "skipped": report.skipped.iter().map(|(l, r)| json!({"config": l, "reason": r})).collect::<Vec<_>>(),
        "session_setup": latency,
        "idle_sessions": report.idle.as_ref().map(|m| json!({
            "backend": m.backend,
            "sessions": m.sessions,
            "rss_before_kib": m.rss_before_kib,
            "rss_after_kib": m.rss_after_kib,
            "rss_per_session_kib": m.per_session_kib(),
            "threads_before": m.threads_before,
            "threads_after": m.threads_after,
        })),
    })
}

#[cfg(test)]
#[path = "bench_report_tests.rs"]
mod tests;
