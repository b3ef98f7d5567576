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

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use crate::oauth::{self, OAuthSetupError};

mod config;
mod flow;
mod tokens;

pub use config::*;
pub use flow::*;
pub use tokens::*;

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
mod tests;
