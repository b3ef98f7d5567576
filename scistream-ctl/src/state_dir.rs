//! `--state_dir` is private to `s2cs`: the directory (and every directory in
//! it) 0700, every file 0600, however it was made or last written, because
//! it holds what keys sessions' tunnels (uids, session keys, stunnel PSKs).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// How deep [`secure`] walks: the state directory holds files and one level
/// of subdirectories (`compat/`); anything deeper is not ours.
const MAX_DEPTH: usize = 4;

/// Creates the state directory if missing and takes group and other access
/// away from it and everything in it (symlinks are left alone, never followed).
pub fn secure(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    tighten(dir, 0)
}

/// chmod, except on what another user owns (an operator running s2cs
/// unprivileged in a directory root made): that is not ours to change, and
/// the start must go on to say what really stops it.
fn chmod_own(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::set_permissions(path, fs::Permissions::from_mode(mode)) {
        Err(e)
            if e.kind() == io::ErrorKind::PermissionDenied
                && fs::metadata(path).is_ok_and(|m| m.uid() != nix::unistd::geteuid().as_raw()) =>
        {
            tracing::warn!(path = %path.display(), "not owned by this user: its mode is left as it is");
            Ok(())
        }
        other => other,
    }
}

fn tighten(dir: &Path, depth: usize) -> io::Result<()> {
    chmod_own(dir, 0o700)?;
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            tighten(&entry.path(), depth + 1)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode() & 0o7777;
            if mode != 0o600 {
                chmod_own(&entry.path(), 0o600)?;
            }
        }
    }
    Ok(())
}

/// Replaces `path` with `data` through a 0600 temporary file and a rename,
/// so the file is never readable by others and never half-written.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask can only have taken bits away; make it exactly 0600.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_state_directory_and_everything_in_it_become_private() {
        let dir = std::env::temp_dir().join(format!("ss-state-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("compat")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.join("compat"), fs::Permissions::from_mode(0o777)).unwrap();
        for (f, m) in [
            ("guard-peers.json", 0o644),
            ("server.crt", 0o664),
            ("compat/x.stunnel", 0o755),
        ] {
            fs::write(dir.join(f), b"x").unwrap();
            fs::set_permissions(dir.join(f), fs::Permissions::from_mode(m)).unwrap();
        }
        // A link pointing out of the directory must not be followed.
        let outside = dir.with_extension("outside");
        fs::write(&outside, b"y").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();

        secure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("compat")), 0o700);
        for f in ["guard-peers.json", "server.crt", "compat/x.stunnel"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&outside), 0o644, "a symlink's target is not ours");

        write_private(&dir.join("new.json"), b"{}").unwrap();
        assert_eq!(mode(&dir.join("new.json")), 0o600);
        assert_eq!(fs::read(dir.join("new.json")).unwrap(), b"{}");
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_file(&outside);
    }
}
