//! Authentication and session ownership end to end: the real `s2cs` and
//! `s2uc` against a real OAuth2 server on loopback (tests/auth_server).
//! No root needed: everything runs in the host namespace on 127.0.0.1, each
//! test with its own control port in 28000-28099 (data ports next to it),
//! below the ephemeral range (32768-60999 by default) so that no outgoing
//! connection of another test can hold one of them.

mod auth_server;
mod common;

use std::time::{Duration, Instant};

use auth_server::*;
use tonic::Code;

/// `release` of an unknown uid answers NOT_FOUND only to an authenticated
/// caller, so it probes a token without creating anything.
fn probe(c: &TokenClient, token: &str) -> Result<(), (Code, String)> {
    match c.release(&new_uid(), token) {
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err((s.code(), s.message().to_string())),
        Ok(r) => panic!("release of an unknown uid succeeded: {r:?}"),
    }
}

fn stderr_line(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        text(&out.stdout)
    );
    let err = text(&out.stderr).trim().to_string();
    assert_eq!(
        err.lines().count(),
        1,
        "one error line expected, got:\n{err}"
    );
    assert!(err.starts_with("s2uc: error:"), "{err}");
    err
}

#[test]
fn login_with_pkce_stores_tokens_0600_and_requests_send_them() {
    let oauth = OAuthServer::start();
    let alice = User::new("alice");
    oauth.set_login_user(&alice);
    let gw = S2cs::with_auth(28000, &oauth, &[]);
    let s2cs = gw.addr.to_string();
    let user = ClientUser::new(&oauth);

    let out = user.login_ok(&["--scope", RS_CLIENT_ID]);
    assert!(
        out.contains(&format!("logged in for scope {RS_SCOPE}")),
        "{out}"
    );
    assert_eq!(
        oauth
            .counts()
            .authorize
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        oauth
            .counts()
            .code_exchanges
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(file_mode(&user.tokens_path()), 0o600);
    let stored = user.tokens();
    let access = stored["tokens"][RS_SCOPE]["access_token"]
        .as_str()
        .expect("an access token for the scope")
        .to_string();
    assert!(oauth.is_active(&access));
    assert!(stored["tokens"][RS_SCOPE]["refresh_token"].is_string());

    // check-auth: scope, identity, expiry; the token only when asked.
    let shown = user.s2uc_ok(&["check-auth", "--scope", RS_CLIENT_ID]);
    assert!(
        shown.contains(RS_SCOPE) && shown.contains(&alice.username) && shown.contains("expires:"),
        "{shown}"
    );
    assert!(
        !shown.contains(&access),
        "check-auth printed the token without --show-token"
    );
    assert!(user
        .s2uc_ok(&["check-auth", "--scope", RS_SCOPE, "--show-token"])
        .contains(&access));

    // --scope given as SciStream does (the bare client id).
    let inbound = [
        "inbound-request",
        "--ssl",
        "false",
        "--s2cs",
        &s2cs,
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        "9",
        "--num_conn",
        "1",
    ];
    let mut with_scope = inbound.to_vec();
    with_scope.extend(["--scope", RS_CLIENT_ID]);
    let out = user.s2uc_ok(&with_scope);
    assert!(out.lines().any(|l| l.starts_with("uid: ")), "{out}");

    // Without --scope, config.toml maps the server to its scope.
    user.write_config(&format!("[servers]\n\"{s2cs}\" = \"{RS_CLIENT_ID}\"\n"));
    let out = user.s2uc_ok(&inbound);
    let uid = out
        .lines()
        .find_map(|l| l.strip_prefix("uid: "))
        .expect("a uid")
        .to_string();
    assert!(user
        .s2uc_ok(&["release", "--ssl", "false", "--s2cs", &s2cs, &uid])
        .contains("Release completed"));
    assert_eq!(
        oauth
            .counts()
            .refreshes
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a fresh token needs no refresh"
    );

    // Someone who never logged in sends INVALID_TOKEN and is told which scope to get.
    let stranger = ClientUser::new(&oauth);
    let e = stderr_line(&stranger.s2uc(&inbound));
    assert!(e.contains("Unauthenticated") && e.contains(RS_SCOPE), "{e}");
}

#[test]
fn expired_access_token_is_refreshed_before_use() {
    let oauth = OAuthServer::start();
    let gw = S2cs::with_auth(28010, &oauth, &[]);
    let s2cs = gw.addr.to_string();
    let user = ClientUser::new(&oauth);
    oauth.set_access_lifetime(1);
    user.login_ok(&["--scope", RS_SCOPE]);
    let old = user.tokens()["tokens"][RS_SCOPE]["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    assert!(!oauth.is_active(&old), "the first access token has expired");
    assert!(user.s2uc_ok(&["check-auth"]).contains("expired"));

    oauth.set_access_lifetime(3600);
    let release = [
        "release",
        "--ssl",
        "false",
        "--s2cs",
        &s2cs,
        "--scope",
        RS_SCOPE,
        &new_uid(),
    ];
    let e = stderr_line(&user.s2uc(&release));
    assert!(
        e.contains("NotFound"),
        "authenticated (the uid is just unknown): {e}"
    );
    assert_eq!(
        oauth
            .counts()
            .refreshes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let new = user.tokens()["tokens"][RS_SCOPE]["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_ne!(new, old, "the refreshed token was stored");
    assert!(oauth.is_active(&new));
    assert_eq!(file_mode(&user.tokens_path()), 0o600);

    // The new token is fresh: no second refresh.
    let e = stderr_line(&user.s2uc(&release));
    assert!(e.contains("NotFound"), "{e}");
    assert_eq!(
        oauth
            .counts()
            .refreshes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn logout_revokes_every_token_at_the_server_and_deletes_them() {
    let oauth = OAuthServer::start();
    let gw = S2cs::with_auth(28020, &oauth, &[]);
    let s2cs = gw.addr.to_string();
    let user = ClientUser::new(&oauth);
    let other_scope =
        "https://auth.globus.org/scopes/0d9a1c1e-7e54-4f3a-9a47-1f3c4b7c2a11/scistream";
    user.write_config(&format!(
        "[servers]\n\"{s2cs}\" = \"{RS_SCOPE}\"\n\"10.0.0.1:5000\" = \"{other_scope}\"\n"
    ));

    // Without --scope, login covers every scope config.toml names.
    let out = user.login_ok(&[]);
    assert!(out.contains(RS_SCOPE) && out.contains(other_scope), "{out}");
    let stored = user.tokens();
    let mut all = vec![];
    for scope in [RS_SCOPE, other_scope] {
        for kind in ["access_token", "refresh_token"] {
            all.push(
                stored["tokens"][scope][kind]
                    .as_str()
                    .unwrap_or_else(|| panic!("{kind} for {scope}"))
                    .to_string(),
            );
        }
    }
    let listed = user.s2uc_ok(&["check-auth"]);
    assert!(
        listed.contains(RS_SCOPE) && listed.contains(other_scope),
        "{listed}"
    );
    let c = TokenClient::connect(gw.addr);
    probe(&c, &all[0]).expect("the token works before logout");

    let out = user.s2uc_ok(&["logout"]);
    assert!(out.contains("revoked 4 tokens"), "{out}");
    let mut revoked = oauth.revoked();
    revoked.sort();
    let mut expected = all.clone();
    expected.sort();
    assert_eq!(
        revoked, expected,
        "every access and refresh token was revoked at the server"
    );
    assert!(!oauth.is_active(&all[0]) && !oauth.is_active(&all[2]));
    assert!(!oauth.refresh_token_live(&all[1]) && !oauth.refresh_token_live(&all[3]));
    assert!(!user.tokens_path().exists(), "tokens deleted");
    assert!(user.s2uc_ok(&["check-auth"]).contains("not logged in"));

    let e = stderr_line(&user.s2uc(&["release", "--ssl", "false", "--s2cs", &s2cs, &new_uid()]));
    assert!(e.contains("Unauthenticated"), "{e}");
}

#[test]
fn s2cs_rejects_expired_revoked_wrong_scope_anonymous_and_garbage_tokens() {
    let oauth = OAuthServer::start();
    let gw = S2cs::with_auth(28030, &oauth, &[]);
    let c = TokenClient::connect(gw.addr);
    let alice = User::new("alice");

    let good = oauth.issue(TokenSpec::valid(&alice));
    // SciStream 1.2 sends the raw token; `Bearer <t>` is accepted too.
    probe(&c, &good).expect("raw token accepted");
    probe(&c, &format!("Bearer {good}")).expect("Bearer token accepted");
    let calls = oauth
        .counts()
        .introspections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(calls, 1, "the second use of the token came from the cache");

    let expired = oauth.issue(TokenSpec {
        lifetime: -10,
        ..TokenSpec::valid(&alice)
    });
    let expired_but_active = oauth.issue(TokenSpec {
        lifetime: -10,
        active_when_expired: true,
        ..TokenSpec::valid(&alice)
    });
    let revoked = oauth.issue(TokenSpec::valid(&alice));
    oauth.revoke_token(&revoked);
    let wrong_scope = oauth.issue(TokenSpec {
        scope: "https://auth.globus.org/scopes/other/scistream".into(),
        ..TokenSpec::valid(&alice)
    });
    let anonymous = oauth.issue(TokenSpec {
        user: None,
        ..TokenSpec::valid(&alice)
    });
    for (what, token) in [
        ("expired", expired.as_str()),
        ("expired (server still says active)", &expired_but_active),
        ("revoked", &revoked),
        ("wrong scope", &wrong_scope),
        ("no identity", &anonymous),
        ("garbage", "garbage-token-123"),
        ("no token (SciStream's INVALID_TOKEN)", "INVALID_TOKEN"),
        ("another scheme", "Basic YWxpY2U6cHc="),
    ] {
        let (code, msg) = probe(&c, token).expect_err(what);
        assert_eq!(code, Code::Unauthenticated, "{what}: {msg}");
        assert!(
            msg.contains(RS_SCOPE),
            "{what}: the message names the scope: {msg}"
        );
    }
    // A rejected call does nothing: a req with a bad token creates no session.
    let uid = new_uid();
    assert_eq!(failure(c.req(&uid, "garbage")).0, Code::Unauthenticated);
    assert_eq!(failure(c.release(&uid, &good)).0, Code::NotFound);
}

#[test]
fn unreachable_slow_or_refusing_introspection_gives_unavailable() {
    let alice = User::new("alice");
    let oauth = OAuthServer::start();
    let good = oauth.issue(TokenSpec::valid(&alice));

    // Nothing listens at the introspection address.
    let url = format!("http://127.0.0.1:{}/introspect", closed_port());
    let gw = S2cs::start(
        28040,
        &[
            "--client_id",
            RS_CLIENT_ID,
            "--client_secret",
            RS_SECRET,
            "--introspect_url",
            &url,
        ],
    );
    let (code, msg) = probe(&TokenClient::connect(gw.addr), &good).expect_err("never let through");
    assert_eq!(code, Code::Unavailable, "{msg}");

    // The introspection server answers too late.
    let slow = OAuthServer::start();
    slow.set_introspect_delay(Duration::from_secs(20));
    let slow_token = slow.issue(TokenSpec::valid(&alice));
    let gw_slow = S2cs::with_auth(28050, &slow, &[]);
    let started = Instant::now();
    let (code, msg) =
        probe(&TokenClient::connect(gw_slow.addr), &slow_token).expect_err("never let through");
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "s2cs gave up on its own timeout, took {:?}",
        started.elapsed()
    );

    // The server refuses s2cs's own credentials.
    let gw_bad = S2cs::start(
        28060,
        &[
            "--client_id",
            RS_CLIENT_ID,
            "--client_secret",
            "wrong",
            "--introspect_url",
            &oauth.url("/introspect"),
        ],
    );
    let (code, msg) =
        probe(&TokenClient::connect(gw_bad.addr), &good).expect_err("never let through");
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(msg.contains("client"), "{msg}");
}

#[test]
fn revoked_token_stops_working_within_the_cache_age() {
    let oauth = OAuthServer::start();
    let gw = S2cs::with_auth(28070, &oauth, &["--token_cache_secs", "1"]);
    let c = TokenClient::connect(gw.addr);
    let token = oauth.issue(TokenSpec::valid(&User::new("alice")));
    probe(&c, &token).expect("accepted before revocation");
    oauth.revoke_token(&token);
    std::thread::sleep(Duration::from_millis(1300));
    let (code, msg) = probe(&c, &token).expect_err("revoked");
    assert_eq!(code, Code::Unauthenticated, "{msg}");
}

#[test]
fn only_the_session_owner_may_update_release_or_hello() {
    let oauth = OAuthServer::start();
    let gw = S2cs::with_auth(28080, &oauth, &[]);
    let c = TokenClient::connect(gw.addr);
    let (alice, bob) = (User::new("alice"), User::new("bob"));
    let (ta, tb) = (
        oauth.issue(TokenSpec::valid(&alice)),
        oauth.issue(TokenSpec::valid(&bob)),
    );

    // Raw calls: bob's hello, update and release on alice's session are refused.
    let uid = new_uid();
    let pending = c.req_in_background(&uid, &ta);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        failure(c.hello(&uid, "127.0.0.1:9", &tb)).0,
        Code::PermissionDenied
    );
    c.hello(&uid, "127.0.0.1:9", &ta)
        .expect("alice's own hello");
    pending
        .join()
        .expect("req thread")
        .expect("alice's req completes");
    let (code, msg) = failure(c.update(&uid, "127.0.0.1:9", &tb));
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert_eq!(failure(c.release(&uid, &tb)).0, Code::PermissionDenied);
    c.update(&uid, "127.0.0.1:9", &ta)
        .expect("alice updates her session");

    // Through s2uc: two users, each logged in as themselves.
    let s2cs = gw.addr.to_string();
    let (ua, ub) = (ClientUser::new(&oauth), ClientUser::new(&oauth));
    oauth.set_login_user(&alice);
    ua.login_ok(&["--scope", RS_CLIENT_ID]);
    oauth.set_login_user(&bob);
    ub.login_ok(&["--scope", RS_CLIENT_ID]);
    let out = ua.s2uc_ok(&[
        "inbound-request",
        "--ssl",
        "false",
        "--s2cs",
        &s2cs,
        "--scope",
        RS_CLIENT_ID,
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        "9",
        "--num_conn",
        "1",
    ]);
    let uid2 = out
        .lines()
        .find_map(|l| l.strip_prefix("uid: "))
        .expect("a uid")
        .to_string();
    let release = |u: &ClientUser, uid: &str| {
        u.s2uc(&[
            "release",
            "--ssl",
            "false",
            "--s2cs",
            &s2cs,
            "--scope",
            RS_CLIENT_ID,
            uid,
        ])
    };
    let e = stderr_line(&release(&ub, &uid2));
    assert!(e.contains("PermissionDenied"), "{e}");
    assert!(
        release(&ua, &uid2).status.success(),
        "alice releases her own session"
    );
    assert!(release(&ua, &uid).status.success());
    // Gone for real: releasing again is NOT_FOUND.
    assert_eq!(failure(c.release(&uid2, &ta)).0, Code::NotFound);
}

#[test]
fn without_a_secret_authentication_is_off_with_a_warning() {
    let oauth = OAuthServer::start();
    let mut gw = S2cs::start(
        28090,
        &[
            "--client_id",
            RS_CLIENT_ID,
            "--introspect_url",
            &oauth.url("/introspect"),
        ],
    );
    gw.daemon
        .wait_for_log("authentication is OFF", Duration::from_secs(10))
        .expect("a warning at start");
    let c = TokenClient::connect(gw.addr);
    probe(&c, "INVALID_TOKEN").expect("accepted as SciStream does");
    probe(&c, "garbage").expect("accepted as SciStream does");
    // No owner checks either: anyone may release.
    let uid = new_uid();
    let pending = c.req_in_background(&uid, "one");
    std::thread::sleep(Duration::from_millis(200));
    c.hello(&uid, "127.0.0.1:9", "two").expect("hello");
    pending.join().expect("req thread").expect("req");
    c.release(&uid, "three").expect("release");
    assert_eq!(
        oauth
            .counts()
            .introspections
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
