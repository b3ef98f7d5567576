//! Unit tests of `auth.rs`.

use super::*;

const SCOPE: &str = "https://auth.globus.org/scopes/abc/scistream";

fn who(id: &str) -> Identity {
    Identity {
        id: id.into(),
        username: None,
        linked: vec![],
    }
}

fn key(n: u8) -> [u8; 32] {
    [n; 32]
}

#[test]
fn cache_forgets_a_token_when_it_expires() {
    let t0 = Instant::now();
    let mut c = Cache::new(10, Duration::from_secs(600));
    c.insert(key(1), who("a"), Some(t0 + Duration::from_secs(5)), t0);
    assert_eq!(c.get(&key(1), t0 + Duration::from_secs(4)), Some(who("a")));
    assert_eq!(c.get(&key(1), t0 + Duration::from_secs(5)), None);
    assert_eq!(c.len(), 0);
}

#[test]
fn cache_age_is_bounded_even_for_long_lived_tokens() {
    let t0 = Instant::now();
    let mut c = Cache::new(10, Duration::from_secs(60));
    c.insert(
        key(1),
        who("a"),
        Some(t0 + Duration::from_secs(48 * 3600)),
        t0,
    );
    c.insert(key(2), who("b"), None, t0);
    assert!(c.get(&key(1), t0 + Duration::from_secs(59)).is_some());
    assert!(c.get(&key(1), t0 + Duration::from_secs(60)).is_none());
    assert!(c.get(&key(2), t0 + Duration::from_secs(60)).is_none());
}

#[test]
fn cache_size_is_bounded_and_evicts_the_soonest_expiring() {
    let t0 = Instant::now();
    let mut c = Cache::new(3, Duration::from_secs(600));
    for n in 1..=3u8 {
        c.insert(
            key(n),
            who("x"),
            Some(t0 + Duration::from_secs(100 * u64::from(n))),
            t0,
        );
    }
    c.insert(key(4), who("y"), Some(t0 + Duration::from_secs(500)), t0);
    assert_eq!(c.len(), 3);
    assert!(
        c.get(&key(1), t0).is_none(),
        "the soonest-expiring entry made room"
    );
    assert!(c.get(&key(4), t0).is_some());
    for n in 5..50u8 {
        c.insert(key(n), who("z"), None, t0);
    }
    assert_eq!(c.len(), 3);
}

#[test]
fn zero_max_age_disables_the_cache() {
    let t0 = Instant::now();
    let mut c = Cache::new(10, Duration::ZERO);
    c.insert(key(1), who("a"), None, t0);
    assert!(c.get(&key(1), t0).is_none());
}

#[test]
fn raw_and_bearer_tokens_are_both_accepted() {
    let t = |s: &'static str| extract_token(Some(s.as_bytes()));
    assert_eq!(t("AgTok123"), Ok("AgTok123"));
    assert_eq!(t("Bearer AgTok123"), Ok("AgTok123"));
    assert_eq!(t("bearer  AgTok123 "), Ok("AgTok123"));
    assert_eq!(t("INVALID_TOKEN"), Err(None));
    assert_eq!(t(""), Err(None));
    assert_eq!(extract_token(None), Err(None));
    assert_eq!(t("Basic dXNlcjpwYXNz"), Err(Some(Rejection::Malformed)));
    assert_eq!(
        extract_token(Some(&[0xff, 0xfe])),
        Err(Some(Rejection::Malformed))
    );
}

fn answer(json: &str) -> Introspection {
    serde_json::from_str(json).unwrap()
}

#[test]
fn globus_answer_yields_subject_and_linked_identities() {
    let a = answer(&format!(
        r#"{{"active":true,"scope":"openid {SCOPE}","exp":2000,"sub":"u1","username":"ann@uni.edu","identity_set":["u1","u2"]}}"#
    ));
    let (id, exp) = evaluate(&a, SCOPE, 1000).unwrap();
    assert_eq!(id.id, "u1");
    assert!(id.is("u2") && !id.is("u3"));
    assert_eq!(exp, Some(2000));
}

#[test]
fn each_rule_rejects_what_it_should() {
    let ok = format!(r#""active":true,"scope":"{SCOPE}","sub":"u1""#);
    assert_eq!(
        evaluate(&answer(r#"{"active":false}"#), SCOPE, 1000).unwrap_err(),
        Rejection::Inactive
    );
    assert_eq!(
        evaluate(&answer(&format!("{{{ok},\"exp\":999}}")), SCOPE, 1000).unwrap_err(),
        Rejection::Expired
    );
    assert_eq!(
        evaluate(&answer(&format!("{{{ok},\"nbf\":5000}}")), SCOPE, 1000).unwrap_err(),
        Rejection::NotYetValid
    );
    let other =
        r#"{"active":true,"scope":"https://auth.globus.org/scopes/abc/scistreamX","sub":"u1"}"#;
    assert_eq!(
        evaluate(&answer(other), SCOPE, 1000).unwrap_err(),
        Rejection::WrongScope
    );
    let anon = format!(r#"{{"active":true,"scope":"{SCOPE}","sub":" "}}"#);
    assert_eq!(
        evaluate(&answer(&anon), SCOPE, 1000).unwrap_err(),
        Rejection::NoIdentity
    );
    assert!(evaluate(&answer(&format!("{{{ok}}}")), SCOPE, 1000).is_ok());
}

#[test]
fn rejections_name_the_scope() {
    let e = AuthError::Rejected {
        reason: Rejection::WrongScope,
        scope: SCOPE.into(),
    };
    assert!(e.to_string().contains(SCOPE));
    assert!(AuthError::Missing {
        scope: SCOPE.into()
    }
    .to_string()
    .contains(SCOPE));
}
