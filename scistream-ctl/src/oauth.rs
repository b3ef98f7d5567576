//! What s2cs (token introspection) and s2uc (login, refresh, revocation) share
//! to talk to an OAuth2 server: an HTTP client whose TLS is our rustls over
//! ring, with timeouts on every request; endpoint checks; Globus scope names.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// Connect and whole-request limit for every call to an OAuth2 server: a
/// slow authorization server must never hold a control call for long.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// OAuth2 answers are small JSON objects; anything larger is not one.
pub const MAX_BODY: usize = 256 * 1024;

const GLOBUS_SCOPE_PREFIX: &str = "https://auth.globus.org/scopes/";

#[derive(Debug, thiserror::Error)]
pub enum OAuthSetupError {
    #[error("{what} {url:?} is not a URL: {reason}")]
    BadUrl {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error("{what} {url:?} must be https (plain http is accepted only to a loopback address)")]
    NotHttps { what: &'static str, url: String },
    // Display only (no source): s2uc prints an error's whole chain in one line.
    #[error("HTTP client: {0}")]
    Client(String),
    #[error("TLS: {0}")]
    Tls(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("answer larger than {MAX_BODY} bytes")]
    TooLarge,
}

/// The scope of a SciStream server. SciStream lets users give the server's
/// bare Globus client id (`--scope 26c25f3c-...`), meaning its standard scope.
pub fn scope_for(s: &str) -> String {
    let s = s.trim();
    match uuid::Uuid::try_parse(s) {
        Ok(id) => globus_scope(&id.hyphenated().to_string()),
        Err(_) => s.to_string(),
    }
}

/// `https://auth.globus.org/scopes/<client_id>/scistream`.
pub fn globus_scope(client_id: &str) -> String {
    format!("{GLOBUS_SCOPE_PREFIX}{client_id}/scistream")
}

/// Tokens and client secrets travel to these endpoints, so they must be
/// https; tests and same-host servers may use http on loopback.
pub fn check_endpoint(what: &'static str, url: &str) -> Result<reqwest::Url, OAuthSetupError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| OAuthSetupError::BadUrl {
        what,
        url: url.into(),
        reason: e.to_string(),
    })?;
    let Some(host) = parsed.host_str() else {
        return Err(OAuthSetupError::BadUrl {
            what,
            url: url.into(),
            reason: "no host".into(),
        });
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if loopback => Ok(parsed),
        _ => Err(OAuthSetupError::NotHttps {
            what,
            url: url.into(),
        }),
    }
}

/// An HTTP client for OAuth2 endpoints. Its TLS configuration is built here
/// with the ring provider and handed to reqwest ready-made, so nothing ever
/// looks for a process-wide rustls provider (and none can panic for lack of one).
pub fn http_client() -> Result<reqwest::Client, OAuthSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| OAuthSetupError::Tls(e.to_string()))?;
    let tls = match rustls_platform_verifier::Verifier::new(provider) {
        Ok(v) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(v))
            .with_no_client_auth(),
        // Without system CA certificates no https server can be verified; a
        // loopback http endpoint still works, and https fails with this reason.
        Err(e) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoRoots(e.to_string())))
            .with_no_client_auth(),
    };
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(HTTP_TIMEOUT)
        .timeout(HTTP_TIMEOUT)
        // Credentials go in headers and bodies; an OAuth2 endpoint has no
        // reason to redirect, so a redirect is not followed anywhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("scistream-rs/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| OAuthSetupError::Client(error_chain(&e)))?;
    Ok(client)
}

/// Reads a response body up to [`MAX_BODY`] bytes.
pub async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| HttpError::Transport(error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(HttpError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub use crate::error_chain;

/// Refuses every certificate, naming why no real verifier could be built.
#[derive(Debug)]
struct NoRoots(String);

impl ServerCertVerifier for NoRoots {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(format!(
            "no CA certificates to verify the server with: {}",
            self.0
        )))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("unverifiable".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("unverifiable".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_client_id_means_its_scistream_scope() {
        assert_eq!(
            scope_for("26c25f3c-c4b7-4107-8a25-df96898a24fe"),
            "https://auth.globus.org/scopes/26c25f3c-c4b7-4107-8a25-df96898a24fe/scistream"
        );
        assert_eq!(scope_for("urn:custom:scope"), "urn:custom:scope");
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(check_endpoint("x", "https://auth.globus.org/v2/oauth2/token").is_ok());
        assert!(check_endpoint("x", "http://127.0.0.1:8080/introspect").is_ok());
        assert!(check_endpoint("x", "http://[::1]:8080/introspect").is_ok());
        assert!(check_endpoint("x", "http://localhost/introspect").is_ok());
        assert!(matches!(
            check_endpoint("x", "http://10.0.0.1/introspect"),
            Err(OAuthSetupError::NotHttps { .. })
        ));
        assert!(matches!(
            check_endpoint("x", "not a url"),
            Err(OAuthSetupError::BadUrl { .. })
        ));
    }

    #[test]
    fn client_builds_without_a_process_wide_crypto_provider() {
        assert!(rustls::crypto::CryptoProvider::get_default().is_none());
        http_client().expect("client");
    }
}
