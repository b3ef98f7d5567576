//! Unit tests of `guard.rs`.

use super::*;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn peers_parse_as_hosts_or_networks_with_host_bits_cleared() {
    let nets = parse_peers(&strings(&[
        "192.0.2.7",
        "198.51.100.77/24",
        "2001:db8::1/32",
        " 203.0.113.1 ",
    ]))
    .unwrap();
    let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "192.0.2.7/32",
            "198.51.100.0/24",
            "2001:db8::/32",
            "203.0.113.1/32"
        ]
    );
    assert!(nets[1].contains("198.51.100.200".parse().unwrap()));
    assert!(!nets[1].contains("198.51.101.1".parse().unwrap()));
    assert!(
        !nets[1].contains("::ffff:198.51.100.1".parse().unwrap()),
        "families never mix"
    );
}

#[test]
fn duplicate_peers_take_one_entry() {
    let nets = parse_peers(&strings(&["192.0.2.0/24", "192.0.2.9/24", "192.0.2.0/24"])).unwrap();
    assert_eq!(nets.len(), 1);
}

#[test]
fn bad_peers_are_invalid_arguments_naming_the_entry() {
    for bad in [
        "",
        "example.org",
        "192.0.2.1/33",
        "2001:db8::/129",
        "192.0.2.1/-1",
        "192.0.2.1/",
        "10.0.0.0/8/8",
    ] {
        match parse_peers(&strings(&[bad])) {
            Err(ControlError::InvalidArgument(m)) => {
                assert!(m.contains(&format!("{bad:?}")), "{m}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[test]
fn too_many_peers_for_one_session_are_refused() {
    let many: Vec<String> = (0..=MAX_PEERS_PER_SESSION)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    assert!(matches!(
        parse_peers(&many),
        Err(ControlError::InvalidArgument(_))
    ));
    assert!(parse_peers(&many[..MAX_PEERS_PER_SESSION]).is_ok());
}

#[test]
fn peers_without_a_running_guard_are_refused_not_ignored() {
    let uid = "6a1f4f7e-3c5e-4c53-9a61-0f1d2f3e4a5b";
    assert!(matches!(
        expect_peers(None, uid, &strings(&["192.0.2.1"])),
        Err(ControlError::FailedPrecondition(_))
    ));
    assert!(
        expect_peers(None, uid, &[]).is_ok(),
        "no peers asked: nothing to enforce"
    );
}
