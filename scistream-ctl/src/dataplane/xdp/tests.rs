//! Unit tests of `xdp`.

use super::*;

fn range(start: u16, end: u16) -> PortRange {
    PortRange { start, end }
}

#[test]
fn nat_ports_come_from_the_highest_free_run_outside_ephemeral_and_data_ports() {
    // Linux's default ephemeral range leaves 61000-65535.
    assert_eq!(
        nat_port_range(range(5100, 5200), Some((32768, 60999))),
        Some((61000, 65535))
    );
    // Data range at the top: the gap below the ephemeral ports is larger.
    assert_eq!(
        nat_port_range(range(61000, 65535), Some((32768, 60999))),
        Some((1024, 32767))
    );
    assert_eq!(nat_port_range(range(5100, 5200), None), Some((5201, 65535)));
}

#[test]
fn no_nat_ports_when_everything_is_taken() {
    assert_eq!(
        nat_port_range(range(1024, 30000), Some((30001, 65535))),
        None
    );
}

#[test]
fn bucket_holds_250_ms_at_the_rate_and_never_less_than_64_kib() {
    assert_eq!(bucket_depth(80_000), 2_500_000);
    assert_eq!(bucket_depth(1_000), 64 * 1024);
    assert_eq!(bucket_depth(10_000_000), 312_500_000);
}

#[test]
fn ipv6_targets_are_refused_with_a_reason() {
    let err = service_for("[::1]:7000".parse().unwrap(), 1).unwrap_err();
    assert!(err.to_string().contains("IPv4 only"), "{err}");
}
