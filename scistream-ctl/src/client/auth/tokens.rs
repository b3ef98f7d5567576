//! `tokens.json`: each scope's tokens, written atomically with mode 0600.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;

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
