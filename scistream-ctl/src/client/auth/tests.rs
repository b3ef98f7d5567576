//! Unit tests of `client::auth`.

use std::os::unix::fs::PermissionsExt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "s2uc-auth-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    d
}

fn token(access: &str) -> StoredToken {
    StoredToken {
        access_token: access.into(),
        refresh_token: Some("r".into()),
        expires_at: 5,
        identity: None,
    }
}

#[test]
fn pkce_challenge_matches_rfc7636_appendix_b() {
    assert_eq!(
        s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    );
}

#[test]
fn pkce_verifiers_are_random_and_of_legal_length() {
    let (a, b) = (Pkce::new().unwrap(), Pkce::new().unwrap());
    assert_ne!(a.verifier, b.verifier);
    // RFC 7636 4.1: 43 to 128 unreserved characters.
    assert!((43..=128).contains(&a.verifier.len()));
    assert!(a
        .verifier
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c)));
    assert_eq!(a.challenge, s256_challenge(&a.verifier));
}

#[test]
fn token_file_is_mode_0600_in_a_0700_directory() {
    let dir = temp_dir().join("scistream");
    let path = dir.join(TOKENS_FILE);
    let mut store = TokenStore::default();
    store.tokens.insert("s".into(), token("a1"));
    store.save(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        TokenStore::load(&path).unwrap().tokens["s"].access_token,
        "a1"
    );
    let _ = fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn saving_over_a_readable_file_leaves_it_0600() {
    let dir = temp_dir();
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(TOKENS_FILE);
    fs::write(&path, "{}").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    TokenStore::default().save(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != TOKENS_FILE)
        .collect();
    assert!(leftovers.is_empty(), "no temporary file left behind");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn globus_answer_with_other_tokens_gives_each_scope_its_token() {
    let claims = URL_SAFE_NO_PAD.encode(r#"{"sub":"u-1","preferred_username":"ann@uni.edu"}"#);
    let json = format!(
        r#"{{"access_token":"auth-tok","scope":"openid profile","expires_in":100,"id_token":"h.{claims}.s",
               "other_tokens":[{{"access_token":"ss-tok","refresh_token":"ss-r","scope":"S1","expires_in":200}},
                               {{"access_token":"ss2","scope":"S2","expires_in":300}}]}}"#
    );
    let answer: TokenAnswer = serde_json::from_str(&json).unwrap();
    let got = tokens_for_scopes(answer, &["S1".into(), "S2".into()], 1000).unwrap();
    assert_eq!(got["S1"].access_token, "ss-tok");
    assert_eq!(got["S1"].refresh_token.as_deref(), Some("ss-r"));
    assert_eq!(got["S1"].expires_at, 1200);
    assert_eq!(got["S2"].access_token, "ss2");
    assert_eq!(got["S1"].identity.as_deref(), Some("ann@uni.edu (u-1)"));
    let answer: TokenAnswer =
        serde_json::from_str(r#"{"access_token":"x","scope":"other"}"#).unwrap();
    assert!(matches!(
        tokens_for_scopes(answer, &["S1".into()], 0),
        Err(AuthClientError::ScopeNotGranted(_))
    ));
}

#[test]
fn pasted_code_or_redirect_address() {
    assert_eq!(code_from_input(" abc123\n", "st").unwrap(), "abc123");
    assert_eq!(
        code_from_input("https://app/cb?code=xyz&state=st", "st").unwrap(),
        "xyz"
    );
    assert!(matches!(
        code_from_input("https://app/cb?code=xyz&state=other", "st"),
        Err(AuthClientError::StateMismatch)
    ));
    assert!(matches!(
        code_from_input("\n", "st"),
        Err(AuthClientError::NoCode)
    ));
}

#[test]
fn config_maps_servers_to_scopes_and_endpoints_fall_back_in_order() {
    let cfg: FileConfig = toml::from_str(
        r#"
            [servers]
            "10.0.0.1:5000" = "26c25f3c-c4b7-4107-8a25-df96898a24fe"
            "gw.example.org:5000" = "urn:x"
            [auth]
            token_url = "https://kc.example.org/token"
            "#,
    )
    .unwrap();
    assert_eq!(
        cfg.scope_of("10.0.0.1:5000").unwrap(),
        oauth::globus_scope("26c25f3c-c4b7-4107-8a25-df96898a24fe")
    );
    assert_eq!(cfg.scope_of("gw.example.org:5000").unwrap(), "urn:x");
    assert!(cfg.scope_of("10.0.0.2:5000").is_none());
    assert_eq!(
        cfg.scope_of("gw.example.org").unwrap(),
        "urn:x",
        "a bare host finds its host:port entry"
    );
    let hosts: FileConfig =
        toml::from_str("[servers]\n\"10.0.0.9\" = \"urn:y\"\n\"::1\" = \"urn:z\"").unwrap();
    assert_eq!(
        hosts.scope_of("10.0.0.9:5000").unwrap(),
        "urn:y",
        "a host-only entry covers every port"
    );
    assert_eq!(hosts.scope_of("[::1]:5000").unwrap(), "urn:z");
    assert!(hosts.scope_of("10.0.0.10:5000").is_none());
    let flags = OAuthFlags {
        revoke_url: Some("https://flag/revoke".into()),
        ..Default::default()
    };
    let ep = Endpoints::resolve(&flags, &cfg.auth);
    assert_eq!(ep.token_url, "https://kc.example.org/token");
    assert_eq!(ep.revoke_url, "https://flag/revoke");
    assert_eq!(ep.authorize_url, GLOBUS_AUTHORIZE_URL);
    assert_eq!(ep.client_id, SCISTREAM_NATIVE_CLIENT_ID);
    assert!(
        toml::from_str::<FileConfig>("[auth]\ntoken_ur = \"x\"").is_err(),
        "typos are reported"
    );
}

#[test]
fn utc_dates() {
    assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
}
