//! For tests/auth.rs: a small but real OAuth2 server on loopback (authorize,
//! token with PKCE and refresh, RFC 7662 introspection, RFC 7009 revocation,
//! Globus-shaped answers), `s2cs` daemons in the host namespace, `s2uc` runs
//! in a private config directory, and a gRPC client that sends any token.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use testbed::process::run_command;
use testbed::{bin, Daemon};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Status;
use tonic_prost::ProstCodec;

/// The s2cs's OAuth2 client (a resource server) and its secret.
pub const RS_CLIENT_ID: &str = "26c25f3c-c4b7-4107-8a25-df96898a24fe";
pub const RS_SECRET: &str = "s2cs-test-secret";
/// The scope `--client_id RS_CLIENT_ID` requires.
pub const RS_SCOPE: &str =
    "https://auth.globus.org/scopes/26c25f3c-c4b7-4107-8a25-df96898a24fe/scistream";
/// s2uc's native client and redirect address, as registered at this server.
pub const NATIVE_CLIENT_ID: &str = "test-native-client";
pub const REDIRECT_URI: &str = "https://auth.test/auth-code";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub username: String,
}

impl User {
    pub fn new(name: &str) -> User {
        User {
            id: uuid::Uuid::new_v4().to_string(),
            username: format!("{name}@example.org"),
        }
    }
}

/// What [`OAuthServer::issue`] hands out.
pub struct TokenSpec {
    pub scope: String,
    pub user: Option<User>,
    /// Seconds from now; negative for an already expired token.
    pub lifetime: i64,
    /// Report the token active even once expired (a lax server), so that
    /// s2cs's own `exp` check is what must catch it.
    pub active_when_expired: bool,
}

impl TokenSpec {
    pub fn valid(user: &User) -> TokenSpec {
        TokenSpec {
            scope: RS_SCOPE.into(),
            user: Some(user.clone()),
            lifetime: 3600,
            active_when_expired: false,
        }
    }
}

struct Token {
    scope: String,
    user: Option<User>,
    exp: i64,
    revoked: bool,
    active_when_expired: bool,
}

struct Refresh {
    scope: String,
    user: User,
    revoked: bool,
}

struct Grant {
    challenge: String,
    scope: String,
    user: User,
}

#[derive(Default)]
pub struct Counts {
    pub authorize: AtomicUsize,
    pub code_exchanges: AtomicUsize,
    pub refreshes: AtomicUsize,
    pub introspections: AtomicUsize,
    pub revocations: AtomicUsize,
}

struct Inner {
    tokens: HashMap<String, Token>,
    refresh: HashMap<String, Refresh>,
    grants: HashMap<String, Grant>,
    login_user: User,
    access_lifetime: i64,
    introspect_delay: Duration,
    revoked: Vec<String>,
}

struct Shared {
    inner: Mutex<Inner>,
    counts: Counts,
    serial: AtomicU32,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn new_secret(&self, kind: &str) -> String {
        format!(
            "{kind}-{}-{}",
            self.serial.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        )
    }
}

/// The running server. Dropping it stops it.
pub struct OAuthServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl OAuthServer {
    pub fn start() -> OAuthServer {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                tokens: HashMap::new(),
                refresh: HashMap::new(),
                grants: HashMap::new(),
                login_user: User::new("alice"),
                access_lifetime: 3600,
                introspect_delay: Duration::ZERO,
                revoked: Vec::new(),
            }),
            counts: Counts::default(),
            serial: AtomicU32::new(1),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the OAuth2 server");
        let addr = listener.local_addr().expect("local address");
        let app = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/introspect", post(introspect))
            .route("/revoke", post(revoke))
            .with_state(shared.clone());
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OAuthServer {
            addr,
            shared,
            rt: Some(rt),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn counts(&self) -> &Counts {
        &self.shared.counts
    }

    /// The user whose login the next /authorize completes.
    pub fn set_login_user(&self, user: &User) {
        self.shared.lock().login_user = user.clone();
    }

    /// Lifetime of access tokens issued from now on (code exchange and refresh).
    pub fn set_access_lifetime(&self, secs: i64) {
        self.shared.lock().access_lifetime = secs;
    }

    pub fn set_introspect_delay(&self, d: Duration) {
        self.shared.lock().introspect_delay = d;
    }

    /// Issues an access token directly, as if some login had happened.
    pub fn issue(&self, spec: TokenSpec) -> String {
        let t = self.shared.new_secret("at");
        let token = Token {
            scope: spec.scope,
            user: spec.user,
            exp: now() + spec.lifetime,
            revoked: false,
            active_when_expired: spec.active_when_expired,
        };
        self.shared.lock().tokens.insert(t.clone(), token);
        t
    }

    pub fn revoke_token(&self, t: &str) {
        revoke_in(&mut self.shared.lock(), t);
    }

    /// What introspection would answer now.
    pub fn is_active(&self, t: &str) -> bool {
        self.shared
            .lock()
            .tokens
            .get(t)
            .is_some_and(|tok| active(tok, now()))
    }

    /// Every token revoked through /revoke, in order.
    pub fn revoked(&self) -> Vec<String> {
        self.shared.lock().revoked.clone()
    }

    /// Whether a refresh token is still usable.
    pub fn refresh_token_live(&self, t: &str) -> bool {
        self.shared
            .lock()
            .refresh
            .get(t)
            .is_some_and(|r| !r.revoked)
    }
}

fn active(t: &Token, now: i64) -> bool {
    !t.revoked && (t.active_when_expired || t.exp > now)
}

fn revoke_in(inner: &mut Inner, t: &str) {
    if let Some(tok) = inner.tokens.get_mut(t) {
        tok.revoked = true;
    }
    if let Some(r) = inner.refresh.get_mut(t) {
        r.revoked = true;
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The login page: checks the request as Globus would and shows the code
/// (the test pastes it into `s2uc login`).
async fn authorize(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    s.counts.authorize.fetch_add(1, Ordering::Relaxed);
    let p = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    if p("response_type") != "code"
        || p("client_id") != NATIVE_CLIENT_ID
        || p("redirect_uri") != REDIRECT_URI
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("bad authorization request: {q:?}"),
        )
            .into_response();
    }
    if p("code_challenge_method") != "S256"
        || p("code_challenge").len() != 43
        || p("state").is_empty()
    {
        return (
            StatusCode::BAD_REQUEST,
            "PKCE S256 and a state are required",
        )
            .into_response();
    }
    let code = s.new_secret("code");
    let mut inner = s.lock();
    let user = inner.login_user.clone();
    inner.grants.insert(
        code.clone(),
        Grant {
            challenge: p("code_challenge").into(),
            scope: p("scope").into(),
            user,
        },
    );
    code.into_response()
}

fn token_json(access: &str, refresh: Option<&str>, scope: &str, lifetime: i64) -> Value {
    let mut v = json!({"access_token": access, "scope": scope, "expires_in": lifetime, "token_type": "Bearer",
                       "resource_server": scope});
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    v
}

async fn token(State(s): State<Arc<Shared>>, Form(f): Form<HashMap<String, String>>) -> Response {
    let p = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    if p("client_id") != NATIVE_CLIENT_ID {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client");
    }
    let mut inner = s.lock();
    let lifetime = inner.access_lifetime;
    match p("grant_type") {
        "authorization_code" => {
            s.counts.code_exchanges.fetch_add(1, Ordering::Relaxed);
            // A code is good for one exchange.
            let Some(g) = inner.grants.remove(p("code")) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown or used code",
                );
            };
            if p("redirect_uri") != REDIRECT_URI || s256(p("code_verifier")) != g.challenge {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "PKCE verification failed",
                );
            }
            let scopes: Vec<&str> = g.scope.split_whitespace().collect();
            let identity: Vec<&str> = scopes
                .iter()
                .copied()
                .filter(|s| matches!(*s, "openid" | "profile" | "email"))
                .collect();
            let mut others = Vec::new();
            for scope in scopes.iter().filter(|s| !identity.contains(s)) {
                let (at, rt) = (s.new_secret("at"), s.new_secret("rt"));
                let exp = now() + lifetime;
                inner.tokens.insert(
                    at.clone(),
                    Token {
                        scope: scope.to_string(),
                        user: Some(g.user.clone()),
                        exp,
                        revoked: false,
                        active_when_expired: false,
                    },
                );
                inner.refresh.insert(
                    rt.clone(),
                    Refresh {
                        scope: scope.to_string(),
                        user: g.user.clone(),
                        revoked: false,
                    },
                );
                others.push(token_json(&at, Some(&rt), scope, lifetime));
            }
            if identity.contains(&"openid") {
                // Globus's shape: the identity token on top, one token per resource server below.
                let at = s.new_secret("at");
                let claims =
                    json!({"sub": g.user.id, "preferred_username": g.user.username, "iss": "test"});
                let id_token = format!(
                    "{}.{}.",
                    URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
                    URL_SAFE_NO_PAD.encode(claims.to_string())
                );
                let mut top = token_json(&at, None, &identity.join(" "), lifetime);
                top["id_token"] = json!(id_token);
                top["other_tokens"] = json!(others);
                Json(top).into_response()
            } else if let Some(first) = others.first() {
                Json(first.clone()).into_response()
            } else {
                oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", "no scope")
            }
        }
        "refresh_token" => {
            s.counts.refreshes.fetch_add(1, Ordering::Relaxed);
            let rt = p("refresh_token").to_string();
            let Some((scope, user)) = inner
                .refresh
                .get(&rt)
                .filter(|r| !r.revoked)
                .map(|r| (r.scope.clone(), r.user.clone()))
            else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown or revoked refresh token",
                );
            };
            let at = s.new_secret("at");
            inner.tokens.insert(
                at.clone(),
                Token {
                    scope: scope.clone(),
                    user: Some(user),
                    exp: now() + lifetime,
                    revoked: false,
                    active_when_expired: false,
                },
            );
            Json(token_json(&at, Some(&rt), &scope, lifetime)).into_response()
        }
        other => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", other),
    }
}

async fn introspect(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    s.counts.introspections.fetch_add(1, Ordering::Relaxed);
    let delay = s.lock().introspect_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let expected = format!(
        "Basic {}",
        STANDARD.encode(format!("{RS_CLIENT_ID}:{RS_SECRET}"))
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "bad client credentials",
        );
    }
    let inner = s.lock();
    let Some(t) = f
        .get("token")
        .and_then(|t| inner.tokens.get(t))
        .filter(|t| active(t, now()))
    else {
        return Json(json!({"active": false})).into_response();
    };
    let mut v = json!({"active": true, "scope": t.scope, "exp": t.exp, "iat": t.exp - 3600, "client_id": NATIVE_CLIENT_ID,
                       "token_type": "Bearer"});
    if let Some(u) = &t.user {
        v["sub"] = json!(u.id);
        v["username"] = json!(u.username);
        v["identity_set"] = json!([u.id]);
    }
    Json(v).into_response()
}

async fn revoke(State(s): State<Arc<Shared>>, Form(f): Form<HashMap<String, String>>) -> Response {
    s.counts.revocations.fetch_add(1, Ordering::Relaxed);
    if f.get("client_id").map(String::as_str) != Some(NATIVE_CLIENT_ID) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client");
    }
    let Some(t) = f.get("token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "no token");
    };
    let mut inner = s.lock();
    revoke_in(&mut inner, t);
    inner.revoked.push(t.clone());
    Json(json!({})).into_response()
}

/// GET over a plain TCP connection; returns status and body.
pub fn http_get(url: &str) -> (u16, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http URL: {url}"));
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = TcpStream::connect(host).expect("connecting to the OAuth2 server");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("reading the answer");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

static DIRS: AtomicU32 = AtomicU32::new(0);

fn fresh_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ss-auth-{tag}-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a temp dir");
    d
}

/// An `s2cs --ssl false --type splice` on loopback.
pub struct S2cs {
    pub daemon: Daemon,
    pub addr: SocketAddr,
    state_dir: PathBuf,
}

impl Drop for S2cs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

impl S2cs {
    /// Control port `base`, data ports `base+1..=base+9`.
    pub fn start(base: u16, extra: &[&str]) -> S2cs {
        let dir = fresh_dir("s2cs");
        let mut cmd = Command::new(bin("s2cs"));
        cmd.args([
            "--listener_ip",
            "127.0.0.1",
            "--control_ip",
            "127.0.0.1",
            "--ssl",
            "false",
            "--type",
            "splice",
        ])
        // Producers and targets of these tests are on loopback.
        .args(["--allow_target_nets", "127.0.0.0/8"])
        .args([
            "--port",
            &base.to_string(),
            "--port_range",
            &format!("{}-{}", base + 1, base + 9),
        ])
        .arg("--state_dir")
        .arg(&dir)
        .args(extra)
        .env_remove("S2CS_CLIENT_SECRET");
        let mut daemon = Daemon::spawn(cmd).expect("starting s2cs");
        let addr = SocketAddr::from(([127, 0, 0, 1], base));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline || !daemon.is_running() {
                panic!(
                    "s2cs did not come up on {addr}; log:\n{}",
                    daemon.log_contents()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        S2cs {
            daemon,
            addr,
            state_dir: dir,
        }
    }

    /// Authentication on, checked at `oauth`'s introspection endpoint.
    pub fn with_auth(base: u16, oauth: &OAuthServer, extra: &[&str]) -> S2cs {
        let url = oauth.url("/introspect");
        let mut args = vec![
            "--client_id",
            RS_CLIENT_ID,
            "--client_secret",
            RS_SECRET,
            "--introspect_url",
            &url,
        ];
        args.extend_from_slice(extra);
        S2cs::start(base, &args)
    }
}

/// One user of `s2uc`: a private HOME and XDG_CONFIG_HOME, and the OAuth2
/// endpoints of the test server in the environment.
pub struct ClientUser {
    pub home: PathBuf,
    oauth_base: String,
}

impl Drop for ClientUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

impl ClientUser {
    pub fn new(oauth: &OAuthServer) -> ClientUser {
        ClientUser {
            home: fresh_dir("home"),
            oauth_base: oauth.url(""),
        }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.home.join("config/scistream")
    }

    pub fn tokens_path(&self) -> PathBuf {
        self.config_dir().join("tokens.json")
    }

    pub fn tokens(&self) -> Value {
        let text = std::fs::read_to_string(self.tokens_path()).expect("reading tokens.json");
        serde_json::from_str(&text).expect("tokens.json is JSON")
    }

    pub fn write_config(&self, toml: &str) {
        std::fs::create_dir_all(self.config_dir()).expect("config dir");
        std::fs::write(self.config_dir().join("config.toml"), toml).expect("writing config.toml");
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(bin("s2uc"));
        cmd.env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env(
                "S2UC_AUTHORIZE_URL",
                format!("{}/authorize", self.oauth_base),
            )
            .env("S2UC_TOKEN_URL", format!("{}/token", self.oauth_base))
            .env("S2UC_REVOKE_URL", format!("{}/revoke", self.oauth_base))
            .env("S2UC_REDIRECT_URI", REDIRECT_URI)
            .env("S2UC_NATIVE_CLIENT_ID", NATIVE_CLIENT_ID);
        cmd
    }

    pub fn s2uc(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        run_command(cmd, Duration::from_secs(60)).expect("running s2uc")
    }

    /// Like [`ClientUser::s2uc`], asserting success; returns stdout.
    pub fn s2uc_ok(&self, args: &[&str]) -> String {
        let out = self.s2uc(args);
        assert!(
            out.status.success(),
            "s2uc {args:?} failed: {}{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }

    /// `s2uc login args...` as a person would do it: open the printed
    /// address (the test server's login page shows a code) and paste the code.
    pub fn login(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.arg("login")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting s2uc login");
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.trim().starts_with("http") => break Some(line.trim().to_string()),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break None,
                Err(_) if Instant::now() > deadline => break None,
                Err(_) => {}
            }
        };
        if let Some(url) = url {
            let (status, body) = http_get(&url);
            assert_eq!(status, 200, "the login page refused {url}: {body}");
            let _ = writeln!(stdin, "{}", body.trim());
        }
        drop(stdin);
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for s2uc") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("s2uc login hung");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: reader.join().unwrap_or_default().into_bytes(),
            stderr: err_reader.join().unwrap_or_default().into_bytes(),
        }
    }

    pub fn login_ok(&self, args: &[&str]) -> String {
        let out = self.login(args);
        assert!(
            out.status.success(),
            "s2uc login {args:?} failed: {}{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

// The message layouts come from docs/protocol.md, shared with the other tests' raw client.
pub use crate::common::raw::{
    AppResponse as AppResponseMsg, Hello as HelloMsg, Release as ReleaseMsg, Request as ReqMsg,
    Response as ResponseMsg, UpdateTargets as UpdateMsg,
};

/// A plaintext control client sending `authorization: <token>` verbatim.
pub struct TokenClient {
    rt: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<Channel>,
}

impl TokenClient {
    pub fn connect(addr: SocketAddr) -> TokenClient {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ch = rt
            .block_on(
                Channel::from_shared(format!("http://{addr}"))
                    .expect("uri")
                    .timeout(Duration::from_secs(30))
                    .connect(),
            )
            .expect("connecting to s2cs");
        TokenClient {
            rt,
            grpc: tonic::client::Grpc::new(ch),
        }
    }

    fn call<Q, A>(&self, method: &'static str, msg: Q, token: &str) -> Result<A, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc.clone();
        let token = token.to_string();
        self.rt.block_on(async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let mut req = tonic::Request::new(msg);
            req.metadata_mut().insert(
                "authorization",
                token
                    .parse()
                    .map_err(|_| Status::internal("token not ASCII"))?,
            );
            Ok(grpc
                .unary(
                    req,
                    PathAndQuery::from_static(method),
                    ProstCodec::<Q, A>::default(),
                )
                .await?
                .into_inner())
        })
    }

    /// `req` on a thread of its own: it blocks until the session's hello.
    pub fn req_in_background(
        &self,
        uid: &str,
        token: &str,
    ) -> std::thread::JoinHandle<Result<ResponseMsg, Status>> {
        let grpc = self.grpc.clone();
        let handle = self.rt.handle().clone();
        let (uid, token) = (uid.to_string(), token.to_string());
        std::thread::spawn(move || {
            handle.block_on(async move {
                let mut grpc = grpc;
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let mut req = tonic::Request::new(ReqMsg {
                    uid,
                    role: "PROD".into(),
                    num_conn: 1,
                    rate: 0,
                });
                req.metadata_mut().insert(
                    "authorization",
                    token
                        .parse()
                        .map_err(|_| Status::internal("token not ASCII"))?,
                );
                let path = PathAndQuery::from_static("/scistream.Control/req");
                Ok(grpc
                    .unary(req, path, ProstCodec::<ReqMsg, ResponseMsg>::default())
                    .await?
                    .into_inner())
            })
        })
    }

    pub fn req(&self, uid: &str, token: &str) -> Result<ResponseMsg, Status> {
        self.call(
            "/scistream.Control/req",
            ReqMsg {
                uid: uid.into(),
                role: "PROD".into(),
                num_conn: 1,
                rate: 0,
            },
            token,
        )
    }

    pub fn hello(&self, uid: &str, prod: &str, token: &str) -> Result<AppResponseMsg, Status> {
        let msg = HelloMsg {
            uid: uid.into(),
            prod_listeners: vec![prod.into()],
            role: "PROD".into(),
        };
        self.call("/scistream.Control/hello", msg, token)
    }

    pub fn update(&self, uid: &str, remote: &str, token: &str) -> Result<ResponseMsg, Status> {
        let msg = UpdateMsg {
            uid: uid.into(),
            remote_listeners: vec![remote.into()],
            role: "PROD".into(),
        };
        self.call("/scistream.Control/update", msg, token)
    }

    pub fn release(&self, uid: &str, token: &str) -> Result<ResponseMsg, Status> {
        self.call(
            "/scistream.Control/release",
            ReleaseMsg { uid: uid.into() },
            token,
        )
    }
}

pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The code and message of a failed call.
pub fn failure<T: std::fmt::Debug>(r: Result<T, Status>) -> (tonic::Code, String) {
    match r {
        Err(s) => (s.code(), s.message().to_string()),
        Ok(v) => panic!("expected a failure, got {v:?}"),
    }
}

pub fn file_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
