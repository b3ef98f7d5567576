//! Unit tests of `bench_report` (and the chart it feeds).

use super::*;

#[test]
fn percentiles_use_nearest_rank() {
    let v: Vec<f64> = (1..=50).map(f64::from).collect();
    assert_eq!(percentile(&v, 50.0), Some(25.0));
    assert_eq!(percentile(&v, 99.0), Some(50.0));
    assert_eq!(percentile(&[], 50.0), None);
}

#[test]
fn ratios_are_against_direct_at_the_same_stream_count() {
    let mut r = Report::new(5, 1, &[1, 4], 9000, crate::bench::Way::Forward);
    let s = |gbps| {
        Ok(Sample {
            gbps,
            bytes: 1_000_000_000,
            gateway_cpu_s: Some(2.0),
            peak_rss_kib: Some(10),
            host_busy_s: 3.0,
            wall_s: 1.0,
        })
    };
    r.record("direct", 1, s(20.0));
    r.record("tls", 1, s(5.0));
    r.record("direct", 4, s(10.0));
    r.record("tls", 4, s(5.0));
    let cells = r.cells();
    let tls4 = cells
        .iter()
        .find(|c| c.label == "tls" && c.streams == 4)
        .expect("cell");
    assert_eq!(tls4.ratio_to_direct, Some(0.5));
    assert_eq!(tls4.cpu_s_per_gb, Some(2.0));
    // 3 busy CPU seconds for 1 GB in 1 s of wall time.
    assert_eq!(tls4.host_cpu_s_per_gb, Some(3.0));
    let cpus = r.machine.cpus as f64;
    assert_eq!(tls4.host_busy_fraction, Some(3.0 / cpus));
}

#[test]
fn guard_cost_pairs_each_round_with_its_noguard_twin() {
    let mut r = Report::new(5, 3, &[1], 9000, crate::bench::Way::Forward);
    let s = |gbps, cpu| {
        Ok(Sample {
            gbps,
            bytes: 1_000_000_000,
            gateway_cpu_s: Some(cpu),
            peak_rss_kib: None,
            host_busy_s: 3.0,
            wall_s: 1.0,
        })
    };
    // Load swings between rounds; within a round the twins see the same.
    for (with, without) in [(9.0, 10.0), (4.75, 5.0), (19.0, 20.0)] {
        r.record("splice", 1, s(with, 1.1));
        r.record("splice-noguard", 1, s(without, 1.0));
    }
    r.record("splice", 1, Err("iperf3 died".into())); // unpaired: ignored
    r.record("splice-noguard", 1, s(1.0, 1.0));
    let cells = r.cells();
    let costs = r.guard_costs(&cells);
    assert_eq!(costs.len(), 1);
    let g = &costs[0];
    assert_eq!(
        (g.config.as_str(), g.streams, g.paired_rounds),
        ("splice", 1, 3)
    );
    assert!(
        (g.throughput_ratio - 0.95).abs() < 1e-9,
        "{}",
        g.throughput_ratio
    );
    assert!((g.cost_percent() - 5.0).abs() < 1e-9);
    assert!((g.cpu_per_gb_ratio.unwrap() - 1.1).abs() < 1e-9);
    // The same figures reach the JSON and the chart.
    let dir = tempfile::tempdir().expect("temp dir");
    let (json_path, svg_path) = (dir.path().join("b.json"), dir.path().join("b.svg"));
    write_json(&[(&r, &cells)], &json_path).expect("json");
    crate::bench_chart::write_svg(&r, &cells, &svg_path).expect("svg");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(doc["mtu"], 9000);
    let doc = &doc["directions"][0];
    assert_eq!(doc["method"]["direction"], "forward");
    assert_eq!(doc["guard_cost"][0]["without_guard"], "splice-noguard");
    assert!((doc["guard_cost"][0]["cost_percent"].as_f64().unwrap() - 5.0).abs() < 1e-9);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.contains("splice P1 0.950x"), "{svg}");
    // Without a twin there is no cost to give.
    let mut lone = Report::new(5, 1, &[1], 9000, crate::bench::Way::Forward);
    lone.record("splice", 1, s(9.0, 1.0));
    assert!(lone.guard_costs(&lone.cells()).is_empty());
}
