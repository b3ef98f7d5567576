//! The OAuth2 exchanges of a native app: PKCE, the authorization code
//! typed back by the user, token and refresh requests, revocation, and the
//! identity read from an ID token.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::*;
use crate::oauth::{self};

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

pub(super) fn random_urlsafe(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| AuthClientError::Random(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token endpoint's answer. Globus answers a request for several resource
/// servers' scopes with one token at top level and the rest in `other_tokens`.
#[derive(Deserialize)]
pub(super) struct TokenAnswer {
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
pub(super) struct ErrorAnswer {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Who the ID token names, for display only (`check-auth`). It came straight
/// from the token endpoint over TLS, which is why its signature is not checked
/// (OpenID Connect Core 3.1.3.7); servers never see it.
pub(super) fn identity_from_id_token(jwt: &str) -> Option<String> {
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
pub(super) fn tokens_for_scopes(
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
pub(super) fn code_from_input(input: &str, state: &str) -> Result<String> {
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
pub(super) struct OAuthClient {
    ep: Endpoints,
    http: reqwest::Client,
}

impl OAuthClient {
    pub(super) fn new(ep: Endpoints) -> Result<Self> {
        Ok(Self {
            ep,
            http: oauth::http_client()?,
        })
    }

    /// POSTs a form to the token endpoint and decodes its answer.
    pub(super) async fn token_call(&self, form: &[(&str, &str)]) -> Result<TokenAnswer> {
        let url = oauth::check_endpoint("token URL", &self.ep.token_url)?;
        let body = self.post("token endpoint", url, form).await?;
        serde_json::from_slice(&body).map_err(|e| AuthClientError::Http {
            what: "token endpoint",
            url: self.ep.token_url.clone(),
            reason: format!("not a token answer: {e}"),
        })
    }

    pub(super) async fn post(
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

    pub(super) fn authorize_url(
        &self,
        scopes: &[String],
        pkce: &Pkce,
        state: &str,
    ) -> Result<reqwest::Url> {
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

    pub(super) async fn exchange(&self, code: &str, pkce: &Pkce) -> Result<TokenAnswer> {
        self.token_call(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.ep.redirect_uri),
            ("client_id", &self.ep.client_id),
            ("code_verifier", &pkce.verifier),
        ])
        .await
    }

    pub(super) async fn refresh(&self, scope: &str, old: &StoredToken) -> Result<StoredToken> {
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

    pub(super) async fn revoke(&self, token: &str, hint: &str) -> Result<()> {
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
