//! Who is calling: every call's `authorization` metadata is checked by OAuth2
//! token introspection (RFC 7662; Globus Auth by default, any OAuth2 server
//! with `--introspect_url`). Accepted tokens are cached until they expire,
//! within a bounded size and age, so a busy gateway asks once per token.
//!
//! ```no_run
//! # async fn f(checker: &scistream_ctl::control::auth::Authenticator) {
//! let who = checker.check(Some(b"Bearer AgXy...")).await; // or the raw token, as SciStream 1.2 sends it
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::ServerArgs;
use crate::oauth::{self, OAuthSetupError};

pub const GLOBUS_INTROSPECT_URL: &str = "https://auth.globus.org/v2/oauth2/token/introspect";

/// Entries kept at most; beyond it the soonest-expiring make room.
pub const CACHE_MAX_ENTRIES: usize = 10_000;

/// Introspection requests in flight at once: a flood of bad tokens must not
/// turn the gateway into a flood against the authorization server.
const MAX_IN_FLIGHT: usize = 32;

/// Introspections in flight for one source address: a flood of junk tokens
/// from one host takes at most these slots, and its calls past them are
/// refused at once (UNAVAILABLE), so callers elsewhere keep theirs.
pub const MAX_IN_FLIGHT_PER_SOURCE: usize = 4;

/// How long a rejected token is answered from memory; short, so a token
/// that was inactive only for a moment (clock skew) is asked about again soon.
pub const REJECTED_TTL: Duration = Duration::from_secs(10);

/// The caller's address, put into each call's extensions by the server.
#[derive(Clone, Copy, Debug)]
pub struct CallerAddr(pub std::net::IpAddr);

/// What SciStream clients send when they have no token.
const NO_TOKEN: &str = "INVALID_TOKEN";

/// The identity a token names: its subject, plus the identities linked to it
/// (Globus `identity_set`), any of which owns what the subject created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub username: Option<String>,
    pub linked: Vec<String>,
}

impl Identity {
    /// True when `owner` (the id that created a session) is this caller.
    pub fn is(&self, owner: &str) -> bool {
        self.id == owner || self.linked.iter().any(|l| l == owner)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.username {
            Some(u) => write!(f, "{u} ({})", self.id),
            None => f.write_str(&self.id),
        }
    }
}

/// Why a token was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the authorization metadata is not a token")]
    Malformed,
    #[error("the token is not active (unknown, expired or revoked)")]
    Inactive,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token lacks the scope")]
    WrongScope,
    #[error("the token names no identity")]
    NoIdentity,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no token sent; this s2cs needs a token for scope {scope} (s2uc login --scope {scope})"
    )]
    Missing { scope: String },
    #[error(
        "{reason}; this s2cs needs a valid token for scope {scope} (s2uc login --scope {scope})"
    )]
    Rejected { reason: Rejection, scope: String },
    /// The token could not be checked; the call is refused, never let through.
    #[error("cannot check the token: introspection at {url} failed: {reason}")]
    Unavailable { url: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("--client_secret needs --client_id")]
    SecretWithoutId,
    #[error(transparent)]
    OAuth(#[from] OAuthSetupError),
}

/// No `Debug`: it holds the client secret.
#[derive(Clone)]
pub struct AuthConfig {
    pub client_id: String,
    pub client_secret: String,
    pub introspect_url: String,
    pub required_scope: String,
    pub cache_max_age: Duration,
    pub cache_max_entries: usize,
}

impl AuthConfig {
    /// `None` when authentication is off: no `--client_secret`, as in SciStream.
    pub fn from_args(args: &ServerArgs) -> Result<Option<Self>, AuthSetupError> {
        let (id, secret) = match (&args.client_id, &args.client_secret) {
            (Some(id), Some(secret)) => (id.trim().to_string(), secret.clone()),
            (None, Some(_)) => return Err(AuthSetupError::SecretWithoutId),
            _ => return Ok(None),
        };
        let required_scope = args
            .required_scope
            .as_deref()
            .map(oauth::scope_for)
            .unwrap_or_else(|| oauth::globus_scope(&id));
        Ok(Some(Self {
            client_id: id,
            client_secret: secret,
            introspect_url: args.introspect_url.clone(),
            required_scope,
            cache_max_age: Duration::from_secs(args.token_cache_secs),
            cache_max_entries: CACHE_MAX_ENTRIES,
        }))
    }
}

/// RFC 7662 answer, with the Globus extras (`identity_set`). Everything but
/// `active` is optional in the RFC.
#[derive(Deserialize, Debug, Default)]
struct Introspection {
    #[serde(default)]
    active: bool,
    scope: Option<String>,
    exp: Option<i64>,
    nbf: Option<i64>,
    sub: Option<String>,
    username: Option<String>,
    identity_set: Option<Vec<String>>,
}

pub struct Authenticator {
    cfg: AuthConfig,
    url: reqwest::Url,
    http: reqwest::Client,
    cache: Mutex<Cache>,
    /// Tokens recently rejected, by hash, with the reason and until when.
    rejected: Mutex<HashMap<[u8; 32], (Rejection, Instant)>>,
    in_flight: Semaphore,
    per_source: Mutex<HashMap<std::net::IpAddr, usize>>,
}

/// One introspection slot of a source address, given back on drop.
struct SourceSlot<'a> {
    map: &'a Mutex<HashMap<std::net::IpAddr, usize>>,
    ip: std::net::IpAddr,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut m = crate::lock(self.map);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Authenticator {
    pub fn new(cfg: AuthConfig) -> Result<Self, AuthSetupError> {
        let url = oauth::check_endpoint("--introspect_url", &cfg.introspect_url)?;
        let http = oauth::http_client()?;
        let cache = Mutex::new(Cache::new(cfg.cache_max_entries, cfg.cache_max_age));
        Ok(Self {
            cfg,
            url,
            http,
            cache,
            rejected: Mutex::default(),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            per_source: Mutex::default(),
        })
    }

    pub fn required_scope(&self) -> &str {
        &self.cfg.required_scope
    }

    pub fn introspect_url(&self) -> &str {
        &self.cfg.introspect_url
    }

    /// Checks an `authorization` metadata value: the raw token (SciStream
    /// 1.2) or `Bearer <token>`.
    pub async fn check(&self, metadata: Option<&[u8]>) -> Result<Identity, AuthError> {
        self.check_from(metadata, None).await
    }

    /// [`Authenticator::check`] for a caller at `source`, whose
    /// introspections in flight are limited to [`MAX_IN_FLIGHT_PER_SOURCE`].
    pub async fn check_from(
        &self,
        metadata: Option<&[u8]>,
        source: Option<std::net::IpAddr>,
    ) -> Result<Identity, AuthError> {
        let scope = &self.cfg.required_scope;
        let token = extract_token(metadata).map_err(|reason| match reason {
            None => AuthError::Missing {
                scope: scope.clone(),
            },
            Some(reason) => AuthError::Rejected {
                reason,
                scope: scope.clone(),
            },
        })?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(id) = self.lock_cache().get(&key, Instant::now()) {
            return Ok(id);
        }
        if let Some(reason) = self.recently_rejected(&key) {
            return Err(AuthError::Rejected {
                reason,
                scope: scope.clone(),
            });
        }
        let _slot = match source {
            Some(ip) => Some(self.source_slot(ip)?),
            None => None,
        };
        let answer = self.introspect(token).await?;
        let (identity, expires) = evaluate(&answer, scope, unix_now()).map_err(|reason| {
            tracing::info!(%reason, "token rejected");
            self.remember_rejection(key, reason.clone());
            AuthError::Rejected {
                reason,
                scope: scope.clone(),
            }
        })?;
        tracing::debug!(identity = %identity, "token accepted");
        let until = expires.map(|exp| {
            Instant::now() + Duration::from_secs(exp.saturating_sub(unix_now()).max(0) as u64)
        });
        self.lock_cache()
            .insert(key, identity.clone(), until, Instant::now());
        Ok(identity)
    }

    fn recently_rejected(&self, key: &[u8; 32]) -> Option<Rejection> {
        let mut r = crate::lock(&self.rejected);
        match r.get(key) {
            Some((why, until)) if *until > Instant::now() => Some(why.clone()),
            Some(_) => {
                r.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember_rejection(&self, key: [u8; 32], why: Rejection) {
        let now = Instant::now();
        let mut r = crate::lock(&self.rejected);
        if r.len() >= CACHE_MAX_ENTRIES {
            r.retain(|_, (_, until)| *until > now);
            if r.len() >= CACHE_MAX_ENTRIES {
                // All fresh: a flood of distinct junk; forget it rather than grow.
                r.clear();
            }
        }
        r.insert(key, (why, now + REJECTED_TTL));
    }

    fn source_slot(&self, ip: std::net::IpAddr) -> Result<SourceSlot<'_>, AuthError> {
        let mut m = crate::lock(&self.per_source);
        let n = m.entry(ip).or_default();
        if *n >= MAX_IN_FLIGHT_PER_SOURCE {
            return Err(AuthError::Unavailable {
                url: self.cfg.introspect_url.clone(),
                reason: format!(
                    "{MAX_IN_FLIGHT_PER_SOURCE} token checks from {ip} already in flight; retry"
                ),
            });
        }
        *n += 1;
        Ok(SourceSlot {
            map: &self.per_source,
            ip,
        })
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        crate::lock(&self.cache)
    }

    async fn introspect(&self, token: &str) -> Result<Introspection, AuthError> {
        let unavailable = |reason: String| AuthError::Unavailable {
            url: self.cfg.introspect_url.clone(),
            reason,
        };
        let _permit = tokio::time::timeout(oauth::HTTP_TIMEOUT, self.in_flight.acquire())
            .await
            .map_err(|_| unavailable("too many token checks in flight".into()))?
            .map_err(|_| unavailable("shutting down".into()))?;
        let resp = self
            .http
            .post(self.url.clone())
            .basic_auth(&self.cfg.client_id, Some(&self.cfg.client_secret))
            .form(&[("token", token), ("include", "identity_set")])
            .send()
            .await
            .map_err(|e| unavailable(oauth::error_chain(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(unavailable(format!(
                "HTTP {status}: the server refused s2cs's --client_id/--client_secret"
            )));
        }
        if !status.is_success() {
            return Err(unavailable(format!("HTTP {status}")));
        }
        let body = oauth::read_body(resp)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        serde_json::from_slice(&body)
            .map_err(|e| unavailable(format!("not an introspection answer: {e}")))
    }
}

/// The token in an `authorization` value. `Err(None)`: no token at all.
fn extract_token(metadata: Option<&[u8]>) -> Result<&str, Option<Rejection>> {
    let v = match metadata.map(std::str::from_utf8) {
        None => "",
        Some(Ok(v)) => v.trim(),
        Some(Err(_)) => return Err(Some(Rejection::Malformed)),
    };
    let token = match v.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        Some(_) => return Err(Some(Rejection::Malformed)),
        None => v,
    };
    if token.is_empty() || token == NO_TOKEN {
        return Err(None);
    }
    if token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Some(Rejection::Malformed));
    }
    Ok(token)
}

/// Applies the rules to an introspection answer: active, unexpired, the
/// scope, an identity. Returns the identity and the expiry (unix seconds).
fn evaluate(
    a: &Introspection,
    scope: &str,
    now: i64,
) -> Result<(Identity, Option<i64>), Rejection> {
    // Clocks of the two hosts differ a little; `nbf` gets that much slack.
    const SKEW: i64 = 60;
    if !a.active {
        return Err(Rejection::Inactive);
    }
    if a.exp.is_some_and(|exp| exp <= now) {
        return Err(Rejection::Expired);
    }
    if a.nbf.is_some_and(|nbf| nbf > now + SKEW) {
        return Err(Rejection::NotYetValid);
    }
    if !a
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .any(|s| s == scope)
    {
        return Err(Rejection::WrongScope);
    }
    let nonempty = |s: &Option<String>| {
        s.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let linked: Vec<String> = a
        .identity_set
        .iter()
        .flatten()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let username = nonempty(&a.username);
    let id = nonempty(&a.sub)
        .or_else(|| linked.first().cloned())
        .or_else(|| username.clone())
        .ok_or(Rejection::NoIdentity)?;
    Ok((
        Identity {
            id,
            username,
            linked,
        },
        a.exp,
    ))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Accepted tokens by SHA-256 (the tokens themselves are not kept). An entry
/// lives until its token expires or `max_age` passes, whichever is first:
/// the age bound is how long a revoked token may still be honoured.
struct Cache {
    entries: HashMap<[u8; 32], Cached>,
    max_entries: usize,
    max_age: Duration,
}

struct Cached {
    identity: Identity,
    until: Instant,
}

impl Cache {
    fn new(max_entries: usize, max_age: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries,
            max_age,
        }
    }

    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<Identity> {
        match self.entries.get(key) {
            Some(c) if c.until > now => Some(c.identity.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(
        &mut self,
        key: [u8; 32],
        identity: Identity,
        expires: Option<Instant>,
        now: Instant,
    ) {
        let until = expires.map_or(now + self.max_age, |e| e.min(now + self.max_age));
        if until <= now || self.max_entries == 0 {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&key) {
            self.entries.retain(|_, c| c.until > now);
            while self.entries.len() >= self.max_entries {
                let Some(k) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, c)| c.until)
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, Cached { identity, until });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
