//! The tunnel keys `inbound-request` received, kept for `outbound-request`:
//! one 0600 file per uid in `<config dir>/tunnel-keys/` (0700), so the
//! tutorial's two commands carry the key from one gateway to the other with
//! no new flag. A file says `none` when the inbound gateway gave no key
//! (SciStream 1.2, stunnel), so the outbound side knows not to expect one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::control::tunnel_key::{hex, parse_hex_key, KEY_LEN};

/// Keys older than this are removed at the next save: a session is set up
/// on both gateways within minutes, and the gateways keep their copies.
/// `release` leaves the key alone: releasing the outbound side and setting
/// it up again elsewhere needs it, and a released inbound session's key
/// opens nothing.
const KEEP_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the store holds for a uid.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    Key([u8; KEY_LEN]),
    /// The inbound gateway gave no key: the session is keyed by its uid.
    NoKey,
    /// Nothing recorded here (inbound-request ran elsewhere, or long ago).
    Missing,
}

/// `<config dir>/tunnel-keys`, next to the tokens.
pub fn dir() -> anyhow::Result<PathBuf> {
    Ok(super::auth::config_dir()?.join("tunnel-keys"))
}

fn file(dir: &Path, uid: &str) -> PathBuf {
    dir.join(uid)
}

/// Records what the inbound gateway answered for `uid`; returns the file.
pub fn save(dir: &Path, uid: &str, key: Option<&[u8; KEY_LEN]>) -> std::io::Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    prune(dir);
    let path = file(dir, uid);
    let tmp = dir.join(format!(".{uid}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let text = key.map(|k| hex(k)).unwrap_or_else(|| "none".into());
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        writeln!(f, "{text}")?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map(|()| path)
}

pub fn load(dir: &Path, uid: &str) -> Stored {
    match fs::read_to_string(file(dir, uid)) {
        Ok(t) if t.trim() == "none" => Stored::NoKey,
        Ok(t) => parse_hex_key(&t)
            .map(Stored::Key)
            .unwrap_or(Stored::Missing),
        Err(_) => Stored::Missing,
    }
}

fn prune(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > KEEP_FOR));
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_kept_private_per_uid() {
        let dir = std::env::temp_dir()
            .join(format!("ss-tunnel-keys-{}", std::process::id()))
            .join("tunnel-keys");
        let _ = fs::remove_dir_all(&dir);
        let (a, b) = (
            "0c1f7c2e-5b9a-4a53-9f55-2f3f0c8f1d7e",
            "1c1f7c2e-5b9a-4a53-9f55-2f3f0c8f1d7e",
        );
        let key = [5u8; KEY_LEN];
        let path = save(&dir, a, Some(&key)).unwrap();
        save(&dir, b, None).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(load(&dir, a), Stored::Key(key));
        assert_eq!(load(&dir, b), Stored::NoKey);
        assert_eq!(
            load(&dir, "2c1f7c2e-5b9a-4a53-9f55-2f3f0c8f1d7e"),
            Stored::Missing
        );
        let _ = fs::remove_dir_all(dir.parent().unwrap());
    }
}
