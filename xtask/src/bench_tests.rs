//! Unit tests of `bench.rs`.

use super::*;

#[test]
fn cpu_ticks_are_counted_after_the_command_name() {
    // A command name with a space and a `)` must not shift the fields.
    let stat = "4242 (s2cs) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 1 1";
    assert_eq!(parse_cpu_ticks(stat).expect("parses"), 325);
    assert!(parse_cpu_ticks("4242 (s2cs) S 1").is_err());
}

#[test]
fn host_busy_time_leaves_out_idle_iowait_and_steal() {
    let stat = "cpu  100 5 50 9000 40 3 7 11 0 0\ncpu0 50 2 25 4500 20 1 3 5 0 0\nintr 1\n";
    assert_eq!(parse_host_busy_ticks(stat).expect("parses"), 165);
    assert!(parse_host_busy_ticks("cpu  1 2 3\n").is_err());
    assert!(parse_host_busy_ticks("intr 1\n").is_err());
}

#[test]
fn iperf_json_gives_received_bytes_and_rate() {
    let json = br#"{"end":{"sum_received":{"bytes":1250000000,"bits_per_second":2.0e9}}}"#;
    let (bytes, gbps) = parse_iperf(json).expect("parses");
    assert_eq!(bytes, 1_250_000_000);
    assert!((gbps - 2.0).abs() < 1e-9);
    let err = parse_iperf(br#"{"error":"unable to connect to server"}"#).unwrap_err();
    assert!(format!("{err:#}").contains("unable to connect"));
}
