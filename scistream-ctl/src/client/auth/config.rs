//! Where s2uc keeps its files and which OAuth2 server and scope a gateway
//! address needs: `config.toml`, read, never written.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::*;
use crate::oauth::{self};

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
    pub(super) fn load(path: &Path) -> Result<Self> {
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
