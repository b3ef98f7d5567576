//! Unit tests of `nat.rs`.

use super::*;

#[test]
fn zeroed_config_translates_and_guards_nothing() {
    let c = NatConfig::default();
    assert!(!c.guards(5100));
    assert_eq!(c.nat_span(), 0);
}

#[test]
fn data_range_is_inclusive_and_needs_a_nat_range() {
    let c = NatConfig {
        data_lo: 5100,
        data_hi: 5200,
        nat_lo: 61000,
        nat_hi: 61009,
        ..Default::default()
    };
    assert!(c.guards(5100) && c.guards(5200));
    assert!(!c.guards(5099) && !c.guards(5201));
    assert_eq!(c.nat_span(), 10);
    let no_nat = NatConfig {
        nat_lo: 0,
        nat_hi: 0,
        ..c
    };
    assert!(!no_nat.guards(5100));
}

#[test]
fn bucket_starts_empty_fills_at_the_rate_and_holds_at_most_its_depth() {
    // 80 Mbit/s = 10 MB/s: 100 ns per byte; 100 KB deep = 10 ms.
    let b = RateBucket::new(80_000, 100_000);
    assert_eq!(b.cost_ns(1000), 100_000);
    assert_eq!(b.tolerance_ns, 10_000_000);
    let drain = |tat: &mut u64, now: u64| {
        let mut admitted = 0;
        while let Some(t) = b.admit(*tat, now, b.cost_ns(1000)) {
            *tat = t;
            admitted += 1;
        }
        admitted
    };
    let (mut tat, now) = (0u64, 1_000_000_000u64);
    assert_eq!(drain(&mut tat, now), 1, "a new bucket is empty");
    // 1 ms later: 10 KB worth of time has passed.
    assert_eq!(drain(&mut tat, now + 1_000_000), 10);
    // A second later the bucket is full, not fuller: 100 KB (+ the
    // segment that finds it just full).
    assert_eq!(drain(&mut tat, now + 1_001_000_000), 101);
}

#[test]
fn a_flow_is_closed_by_a_reset_either_way_or_fins_both_ways() {
    let r = |flags| Rewrite {
        flags,
        ..Default::default()
    };
    assert!(!r(0).closed_with(&r(0)));
    assert!(
        !r(Rewrite::FIN_SEEN).closed_with(&r(0)),
        "half-closed is still open"
    );
    assert!(r(Rewrite::FIN_SEEN).closed_with(&r(Rewrite::FIN_SEEN)));
    assert!(r(0).closed_with(&r(Rewrite::RST_SEEN)));
}

#[test]
fn flows_expire_after_linger_when_closed_unanswered_or_idle_otherwise() {
    let c = NatConfig {
        idle_s: IDLE_S,
        linger_s: LINGER_S,
        unanswered_s: UNANSWERED_S,
        ..Default::default()
    };
    let at = |seen_s, flags| Rewrite {
        seen_s,
        flags,
        ..Default::default()
    };
    let open = (at(100, 0), at(90, Rewrite::ANSWERED));
    assert!(!c.expired(&open.0, &open.1, 100 + UNANSWERED_S as u32 + 1));
    assert!(c.expired(&open.0, &open.1, 100 + IDLE_S));
    let closed = (
        at(100, Rewrite::FIN_SEEN),
        at(100, Rewrite::FIN_SEEN | Rewrite::ANSWERED),
    );
    assert!(!c.expired(&closed.0, &closed.1, 101));
    assert!(c.expired(&closed.0, &closed.1, 100 + LINGER_S as u32));
    let unanswered = (at(100, 0), at(100, 0));
    assert!(!c.expired(&unanswered.0, &unanswered.1, 100 + UNANSWERED_S as u32 - 1));
    assert!(c.expired(&unanswered.0, &unanswered.1, 100 + UNANSWERED_S as u32));
}
