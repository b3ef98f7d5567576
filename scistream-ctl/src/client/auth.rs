//! s2uc's side of authentication: `login` (OAuth2 authorization code with
//! PKCE, as a native app; Globus Auth by default), `logout` (revocation at
//! the server), `check-auth`, the per-scope token store (mode 0600), silent
//! refresh, and which scope a server address needs (from `config.toml`).
//!
//! Files, in `$XDG_CONFIG_HOME/scistream` (or `~/.config/scistream`):
//! `tokens.json` (written by s2uc) and `config.toml` (written by the user):
//!
//! ```toml
//! [servers]
//! "10.0.0.1:5000" = "26c25f3c-c4b7-4107-8a25-df96898a24fe"   # a client id or a full scope
//!
//! [auth]                      # all optional; defaults are Globus Auth's
//! token_url = "https://keycloak.example.org/realms/x/protocol/openid-connect/token"
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::oauth::{self, OAuthSetupError};

pub const GLOBUS_AUTHORIZE_URL: &str = "https://auth.globus.org/v2/oauth2/authorize";
pub const GLOBUS_TOKEN_URL: &str = "https://auth.globus.org/v2/oauth2/token";
pub const GLOBUS_REVOKE_URL: &str = "https://auth.globus.org/v2/oauth2/token/revoke";
pub const GLOBUS_REDIRECT_URI: &str = "https://auth.globus.org/v2/web/auth-code";
/// SciStream's registered native-app client.
pub const SCISTREAM_NATIVE_CLIENT_ID: &str = "4787c84e-9c55-4881-b941-cb6720cea11c";

/// A token this close to expiry is refreshed before use, so it does not
/// expire between here and the server's check.
const REFRESH_MARGIN_SECS: i64 = 60;

/// Asked for next to the server scopes, so the answer names the user.
const IDENTITY_SCOPES: &str = "openid profile";

const TOKENS_FILE: &str = "tokens.json";
const CONFIG_FILE: &str = "config.toml";

#[derive(Debug, thiserror::Error)]
pub enum AuthClientError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("neither XDG_CONFIG_HOME nor HOME is set; cannot find the scistream config directory")]
    NoConfigDir,
    #[error(transparent)]
    Setup(#[from] OAuthSetupError),
    #[error("{what} at {url}: {reason}")]
    Http {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error("{what} refused: {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        what: &'static str,
        error: String,
        description: Option<String>,
    },
    #[error("no authorization code given")]
    NoCode,
    #[error("the pasted redirect address belongs to another login (state does not match)")]
    StateMismatch,
    #[error("the token server granted no token for scope {0}")]
    ScopeNotGranted(String),
    #[error("no scope to log in for: give --scope, or map servers to scopes in {0}")]
    NoScopes(PathBuf),
    #[error("not logged in for scope {0} (s2uc login --scope {0})")]
    NotLoggedIn(String),
    #[error("server {0} has no scope in {1}; give --scope")]
    UnknownServer(String, PathBuf),
    #[error("the token for scope {scope} has expired and cannot be refreshed ({reason}); log in again: s2uc login --scope {scope}")]
    RefreshFailed { scope: String, reason: String },
    #[error("logged out locally, but the server did not confirm revocation: {0}")]
    RevocationFailed(String),
    #[error("no random numbers from the system: {0}")]
    Random(String),
}

type Result<T> = std::result::Result<T, AuthClientError>;

/// Where the OAuth2 server is. Flags win over environment variables, which
/// win over `[auth]` in config.toml, which wins over Globus Auth's addresses.
#[derive(Args, Debug, Clone, Default)]
pub struct OAuthFlags {
    /// OAuth2 client id of s2uc itself, a native (public) app.
    #[arg(
        long = "native_client_id",
        alias = "native-client-id",
        env = "S2UC_NATIVE_CLIENT_ID",
        global = true,
        help_heading = "OAuth2 server"
    )]
    pub native_client_id: Option<String>,
    /// Authorization endpoint (the login page).
    #[arg(
        long = "authorize_url",
        alias = "authorize-url",
        env = "S2UC_AUTHORIZE_URL",
        global = true,
        help_heading = "OAuth2 server"
    )]
    pub authorize_url: Option<String>,
    /// Token endpoint (code exchange and refresh).
    #[arg(
        long = "token_url",
        alias = "token-url",
        env = "S2UC_TOKEN_URL",
        global = true,
        help_heading = "OAuth2 server"
    )]
    pub token_url: Option<String>,
    /// Revocation endpoint (RFC 7009), used by logout.
    #[arg(
        long = "revoke_url",
        alias = "revoke-url",
        env = "S2UC_REVOKE_URL",
        global = true,
        help_heading = "OAuth2 server"
    )]
    pub revoke_url: Option<String>,
    /// Redirect URI registered for the native client; its page shows the code.
    #[arg(
        long = "redirect_uri",
        alias = "redirect-uri",
        env = "S2UC_REDIRECT_URI",
        global = true,
        help_heading = "OAuth2 server"
    )]
    pub redirect_uri: Option<String>,
}

/// `config.toml`.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub auth: AuthSection,
    /// `"host:port" = scope` (a bare client id means its Globus scope).
    #[serde(default)]
    pub servers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub native_client_id: Option<String>,
    pub authorize_url: Option<String>,
    pub token_url: Option<String>,
    pub revoke_url: Option<String>,
    pub redirect_uri: Option<String>,
}

impl FileConfig {
    fn load(path: &Path) -> Result<Self> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(error) => {
                return Err(AuthClientError::Io {
                    path: path.into(),
                    error,
                })
            }
        };
        toml::from_str(&text).map_err(|e| {
            // toml's Display draws a multi-line snippet; s2uc errors are one line.
            let line = e.span().map(|sp| {
                text.get(..sp.start)
                    .unwrap_or_default()
                    .matches('\n')
                    .count()
                    + 1
            });
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            AuthClientError::BadFile {
                path: path.into(),
                reason: format!("{}{at}", e.message().trim()),
            }
        })
    }

    /// The scope `config.toml` gives for a server address: the entry written
    /// as in `--s2cs`, else a host-only entry or query (SciStream's
    /// `check-auth --ip` names just the host).
    pub fn scope_of(&self, s2cs: &str) -> Option<String> {
        let s2cs = s2cs.trim();
        let host = |a: &str| -> Option<String> {
            if a.parse::<std::net::IpAddr>().is_ok() {
                return None;
            }
            a.rsplit_once(':')
                .filter(|(_, p)| p.parse::<u16>().is_ok())
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        };
        let bare = |a: &str| host(a).unwrap_or_else(|| a.trim_matches(['[', ']']).to_string());
        let found = self.servers.get(s2cs).or_else(|| {
            let (wanted, has_port) = (bare(s2cs), host(s2cs).is_some());
            self.servers
                .iter()
                .find(|(k, _)| {
                    (has_port && host(k).is_none() && bare(k) == wanted)
                        || (!has_port && bare(k) == wanted)
                })
                .map(|(_, v)| v)
        });
        found.map(|s| oauth::scope_for(s))
    }
}

/// The resolved endpoints.
pub struct Endpoints {
    pub client_id: String,
    pub authorize_url: String,
    pub token_url: String,
    pub revoke_url: String,
    pub redirect_uri: String,
}

impl Endpoints {
    pub fn resolve(flags: &OAuthFlags, file: &AuthSection) -> Self {
        let pick = |flag: &Option<String>, file: &Option<String>, default: &str| {
            flag.clone()
                .or_else(|| file.clone())
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        Self {
            client_id: pick(
                &flags.native_client_id,
                &file.native_client_id,
                SCISTREAM_NATIVE_CLIENT_ID,
            ),
            authorize_url: pick(
                &flags.authorize_url,
                &file.authorize_url,
                GLOBUS_AUTHORIZE_URL,
            ),
            token_url: pick(&flags.token_url, &file.token_url, GLOBUS_TOKEN_URL),
            revoke_url: pick(&flags.revoke_url, &file.revoke_url, GLOBUS_REVOKE_URL),
            redirect_uri: pick(&flags.redirect_uri, &file.redirect_uri, GLOBUS_REDIRECT_URI),
        }
    }
}

/// `$XDG_CONFIG_HOME/scistream`, else `~/.config/scistream`.
pub fn config_dir() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(x) = var("XDG_CONFIG_HOME") {
        return Ok(x.join("scistream"));
    }
    var("HOME")
        .map(|h| h.join(".config/scistream"))
        .ok_or(AuthClientError::NoConfigDir)
}

/// One scope's tokens. No `Debug`: nothing should print a token by accident.
#[derive(Serialize, Deserialize, Clone)]
pub struct StoredToken {
    pub access_token: String,
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
    #[serde(default)]
    pub identity: Option<String>,
}

/// `tokens.json`: tokens by scope.
#[derive(Serialize, Deserialize, Default)]
pub struct TokenStore {
    #[serde(default)]
    pub tokens: BTreeMap<String, StoredToken>,
}

impl TokenStore {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(error) => {
                return Err(AuthClientError::Io {
                    path: path.into(),
                    error,
                })
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| AuthClientError::BadFile {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// Replaces the file atomically. The new file is created with mode 0600
    /// (never readable by others, not even for a moment) and renamed over
    /// the old one, so a reader sees the old store or the new, never half.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |error| AuthClientError::Io {
            path: path.into(),
            error,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let tmp = dir.join(format!(".{TOKENS_FILE}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let json = serde_json::to_vec_pretty(self).map_err(|e| AuthClientError::BadFile {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The umask may only have removed bits; make it exactly 0600.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

/// PKCE (RFC 7636): a random verifier and its S256 challenge.
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Result<Self> {
        let verifier = random_urlsafe(32)?;
        let challenge = s256_challenge(&verifier);
        Ok(Self {
            verifier,
            challenge,
        })
    }
}

pub fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn random_urlsafe(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| AuthClientError::Random(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token endpoint's answer. Globus answers a request for several resource
/// servers' scopes with one token at top level and the rest in `other_tokens`.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    other_tokens: Vec<TokenAnswer>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Who the ID token names, for display only (`check-auth`). It came straight
/// from the token endpoint over TLS, which is why its signature is not checked
/// (OpenID Connect Core 3.1.3.7); servers never see it.
fn identity_from_id_token(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let s = |k: &str| {
        claims
            .get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let name = s("preferred_username")
        .or_else(|| s("email"))
        .or_else(|| s("name"));
    match (name, s("sub")) {
        (Some(n), Some(sub)) => Some(format!("{n} ({sub})")),
        (n, sub) => n.or(sub),
    }
}

/// Picks, for each wanted scope, the token granted for it.
fn tokens_for_scopes(
    answer: TokenAnswer,
    wanted: &[String],
    now: i64,
) -> Result<BTreeMap<String, StoredToken>> {
    let identity = answer.id_token.as_deref().and_then(identity_from_id_token);
    let lone = wanted.len() == 1 && answer.other_tokens.is_empty() && answer.scope.is_none();
    let mut all = vec![];
    let mut stack = vec![answer];
    while let Some(mut a) = stack.pop() {
        stack.append(&mut a.other_tokens);
        all.push(a);
    }
    let mut out = BTreeMap::new();
    for scope in wanted {
        let granted = all.iter().find(|a| {
            a.scope
                .as_deref()
                .unwrap_or_default()
                .split_whitespace()
                .any(|s| s == scope)
        });
        // RFC 6749 5.1: an answer may omit `scope` when it is the one asked for.
        let granted = granted.or(if lone { all.first() } else { None });
        let a = granted.ok_or_else(|| AuthClientError::ScopeNotGranted(scope.clone()))?;
        out.insert(
            scope.clone(),
            StoredToken {
                access_token: a.access_token.clone(),
                refresh_token: a.refresh_token.clone(),
                expires_at: now + a.expires_in.unwrap_or(0).max(0),
                identity: identity.clone(),
            },
        );
    }
    Ok(out)
}

/// The code from what the user pasted: the bare code, or the whole address
/// the login page was redirected to (then its `state` must be ours).
fn code_from_input(input: &str, state: &str) -> Result<String> {
    let input = input.trim();
    if input.is_empty() {
        return Err(AuthClientError::NoCode);
    }
    let Ok(url) = reqwest::Url::parse(input) else {
        return Ok(input.to_string());
    };
    let param = |k: &str| {
        url.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    if param("state").is_some_and(|s| s != state) {
        return Err(AuthClientError::StateMismatch);
    }
    param("code")
        .filter(|c| !c.is_empty())
        .ok_or(AuthClientError::NoCode)
}

/// The OAuth2 endpoints with an HTTP client; what login, refresh and logout use.
struct OAuthClient {
    ep: Endpoints,
    http: reqwest::Client,
}

impl OAuthClient {
    fn new(ep: Endpoints) -> Result<Self> {
        Ok(Self {
            ep,
            http: oauth::http_client()?,
        })
    }

    /// POSTs a form to the token endpoint and decodes its answer.
    async fn token_call(&self, form: &[(&str, &str)]) -> Result<TokenAnswer> {
        let url = oauth::check_endpoint("token URL", &self.ep.token_url)?;
        let body = self.post("token endpoint", url, form).await?;
        serde_json::from_slice(&body).map_err(|e| AuthClientError::Http {
            what: "token endpoint",
            url: self.ep.token_url.clone(),
            reason: format!("not a token answer: {e}"),
        })
    }

    async fn post(
        &self,
        what: &'static str,
        url: reqwest::Url,
        form: &[(&str, &str)],
    ) -> Result<Vec<u8>> {
        let shown = url.to_string();
        let http_err = |reason: String| AuthClientError::Http {
            what,
            url: shown.clone(),
            reason,
        };
        let resp = self
            .http
            .post(url.clone())
            .form(form)
            .send()
            .await
            .map_err(|e| http_err(oauth::error_chain(&e)))?;
        let status = resp.status();
        let body = oauth::read_body(resp)
            .await
            .map_err(|e| http_err(e.to_string()))?;
        if status.is_success() {
            return Ok(body);
        }
        match serde_json::from_slice::<ErrorAnswer>(&body) {
            Ok(e) => Err(AuthClientError::Refused {
                what,
                error: e.error,
                description: e.error_description,
            }),
            Err(_) => Err(http_err(format!("HTTP {status}"))),
        }
    }

    fn authorize_url(&self, scopes: &[String], pkce: &Pkce, state: &str) -> Result<reqwest::Url> {
        let base = oauth::check_endpoint("authorize URL", &self.ep.authorize_url)?;
        let scope = std::iter::once(IDENTITY_SCOPES.to_string())
            .chain(scopes.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut url = base;
        url.query_pairs_mut()
            .append_pair("client_id", &self.ep.client_id)
            .append_pair("redirect_uri", &self.ep.redirect_uri)
            .append_pair("scope", &scope)
            .append_pair("response_type", "code")
            .append_pair("code_challenge", &pkce.challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("state", state)
            // Globus hands out refresh tokens only for offline access.
            .append_pair("access_type", "offline");
        Ok(url)
    }

    async fn exchange(&self, code: &str, pkce: &Pkce) -> Result<TokenAnswer> {
        self.token_call(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.ep.redirect_uri),
            ("client_id", &self.ep.client_id),
            ("code_verifier", &pkce.verifier),
        ])
        .await
    }

    async fn refresh(&self, scope: &str, old: &StoredToken) -> Result<StoredToken> {
        let failed = |reason: String| AuthClientError::RefreshFailed {
            scope: scope.into(),
            reason,
        };
        let Some(rt) = old.refresh_token.as_deref() else {
            return Err(failed("no refresh token was granted".into()));
        };
        let answer = self
            .token_call(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt),
                ("client_id", &self.ep.client_id),
            ])
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(StoredToken {
            access_token: answer.access_token,
            // A server that rotates refresh tokens sends a new one; others keep the old.
            refresh_token: answer.refresh_token.or_else(|| old.refresh_token.clone()),
            expires_at: unix_now() + answer.expires_in.unwrap_or(0).max(0),
            identity: old.identity.clone(),
        })
    }

    async fn revoke(&self, token: &str, hint: &str) -> Result<()> {
        let url = oauth::check_endpoint("revoke URL", &self.ep.revoke_url)?;
        self.post(
            "revocation endpoint",
            url,
            &[
                ("token", token),
                ("token_type_hint", hint),
                ("client_id", &self.ep.client_id),
            ],
        )
        .await
        .map(drop)
    }
}

/// What the commands below need: the two files and the endpoints.
pub struct Context {
    pub dir: PathBuf,
    pub file: FileConfig,
    flags: OAuthFlags,
}

impl Context {
    pub fn load(flags: &OAuthFlags) -> Result<Self> {
        let dir = config_dir()?;
        let file = FileConfig::load(&dir.join(CONFIG_FILE))?;
        Ok(Self {
            dir,
            file,
            flags: flags.clone(),
        })
    }

    fn tokens_path(&self) -> PathBuf {
        self.dir.join(TOKENS_FILE)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    fn client(&self) -> Result<OAuthClient> {
        OAuthClient::new(Endpoints::resolve(&self.flags, &self.file.auth))
    }

    /// The token to send to `s2cs`: for `--scope`, else for the scope
    /// config.toml maps the address to; refreshed first when about to expire.
    /// `None` when there is no scope or no token (s2uc then sends
    /// `INVALID_TOKEN`, as SciStream does).
    pub async fn token_for(&self, s2cs: &str, scope: Option<&str>) -> Result<Option<String>> {
        let Some(scope) = scope
            .map(oauth::scope_for)
            .or_else(|| self.file.scope_of(s2cs))
        else {
            return Ok(None);
        };
        let path = self.tokens_path();
        let mut store = TokenStore::load(&path)?;
        // Not logged in: nothing to send; an s2cs that checks tokens answers
        // UNAUTHENTICATED naming the scope and the login command.
        let Some(tok) = store.tokens.get(&scope).cloned() else {
            return Ok(None);
        };
        if tok.expires_at - unix_now() > REFRESH_MARGIN_SECS {
            return Ok(Some(tok.access_token));
        }
        let fresh = self.client()?.refresh(&scope, &tok).await?;
        let access = fresh.access_token.clone();
        store.tokens.insert(scope, fresh);
        store.save(&path)?;
        Ok(Some(access))
    }

    /// `s2uc login`: for `--scope`, or every scope config.toml names.
    pub async fn login(&self, scope: Option<&str>) -> Result<()> {
        let scopes: Vec<String> = match scope {
            Some(s) => vec![oauth::scope_for(s)],
            None => {
                let mut v: Vec<String> = self
                    .file
                    .servers
                    .values()
                    .map(|s| oauth::scope_for(s))
                    .collect();
                v.sort();
                v.dedup();
                v
            }
        };
        if scopes.is_empty() {
            return Err(AuthClientError::NoScopes(self.config_path()));
        }
        let client = self.client()?;
        let pkce = Pkce::new()?;
        let state = random_urlsafe(16)?;
        let url = client.authorize_url(&scopes, &pkce, &state)?;
        println!("Please log in at this address:\n\n{url}\n");
        print!("Then enter the authorization code shown: ");
        let _ = std::io::stdout().flush();
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await
        .map_err(|_| AuthClientError::NoCode)?
        .map_err(|error| AuthClientError::Io {
            path: "stdin".into(),
            error,
        })?;
        if line.trim().is_empty() {
            println!();
        }
        let code = code_from_input(&line, &state)?;
        let answer = client.exchange(&code, &pkce).await?;
        let granted = tokens_for_scopes(answer, &scopes, unix_now())?;
        let path = self.tokens_path();
        let mut store = TokenStore::load(&path)?;
        let who = granted.values().find_map(|t| t.identity.clone());
        store.tokens.extend(granted);
        store.save(&path)?;
        println!();
        for s in &scopes {
            println!("logged in for scope {s}");
        }
        if let Some(who) = who {
            println!("identity: {who}");
        }
        println!("tokens saved in {}", path.display());
        Ok(())
    }

    /// `s2uc logout`: revokes every stored token at the server, then deletes
    /// them all, also when the server could not be reached.
    pub async fn logout(&self) -> Result<()> {
        let path = self.tokens_path();
        let store = TokenStore::load(&path)?;
        if store.tokens.is_empty() {
            println!("not logged in; nothing to revoke");
            return Ok(());
        }
        let client = self.client()?;
        let mut failures = vec![];
        let mut revoked = 0;
        for (scope, t) in &store.tokens {
            let pairs = [
                (Some(t.access_token.as_str()), "access_token"),
                (t.refresh_token.as_deref(), "refresh_token"),
            ];
            for (token, hint) in pairs {
                let Some(token) = token else { continue };
                match client.revoke(token, hint).await {
                    Ok(()) => revoked += 1,
                    Err(e) => failures.push(format!("{hint} of {scope}: {e}")),
                }
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(AuthClientError::Io { path, error }),
        }
        if !failures.is_empty() {
            return Err(AuthClientError::RevocationFailed(failures.join("; ")));
        }
        println!(
            "logged out: revoked {revoked} tokens of {} scopes and deleted them",
            store.tokens.len()
        );
        Ok(())
    }

    /// `s2uc check-auth`: scope, identity and expiry of the stored tokens.
    pub fn check_auth(
        &self,
        scope: Option<&str>,
        ip: Option<&str>,
        show_token: bool,
    ) -> Result<()> {
        let store = TokenStore::load(&self.tokens_path())?;
        let scopes: Vec<String> = match (scope, ip) {
            (Some(s), _) => vec![oauth::scope_for(s)],
            (None, Some(ip)) => vec![self
                .file
                .scope_of(ip)
                .ok_or_else(|| AuthClientError::UnknownServer(ip.into(), self.config_path()))?],
            (None, None) if store.tokens.is_empty() => {
                println!("not logged in");
                return Ok(());
            }
            (None, None) => store.tokens.keys().cloned().collect(),
        };
        let now = unix_now();
        for (i, scope) in scopes.iter().enumerate() {
            let t = store
                .tokens
                .get(scope)
                .ok_or_else(|| AuthClientError::NotLoggedIn(scope.clone()))?;
            if i > 0 {
                println!();
            }
            println!("scope: {scope}");
            println!(
                "identity: {}",
                t.identity
                    .as_deref()
                    .unwrap_or("(not named by the token server)")
            );
            if t.expires_at > now {
                println!(
                    "expires: {} (in {})",
                    utc(t.expires_at),
                    span(t.expires_at - now)
                );
            } else {
                let next = if t.refresh_token.is_some() {
                    "refreshed on next use"
                } else {
                    "log in again"
                };
                println!(
                    "expires: {} (expired {} ago; {next})",
                    utc(t.expires_at),
                    span(now - t.expires_at)
                );
            }
            println!(
                "refresh token: {}",
                if t.refresh_token.is_some() {
                    "yes"
                } else {
                    "no"
                }
            );
            if show_token {
                println!("access token: {}", t.access_token);
            }
        }
        Ok(())
    }
}

fn span(secs: i64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m} min"),
        (0, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h"),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, proleptic Gregorian).
fn utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
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
}
