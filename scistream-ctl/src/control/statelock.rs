//! One `s2cs` per state directory: an exclusive lock on `<state_dir>/s2cs.lock`,
//! taken before anything in the directory (certificates, the session store,
//! the XDP pins) is read or written, and held for the process's life.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub const FILE_NAME: &str = "s2cs.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error("state directory {dir} is in use by another s2cs{holder}; give each s2cs its own --state_dir")]
    InUse { dir: PathBuf, holder: String },
    #[error("state directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Held while s2cs runs; the lock goes with the process.
pub struct StateLock {
    _file: Flock<std::fs::File>,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> Result<Self, StateLockError> {
        let io = |source| StateLockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let path = dir.join(FILE_NAME);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let pid = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match pid.trim() {
                    "" => String::new(),
                    p => format!(" (pid {p})"),
                };
                return Err(StateLockError::InUse {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        // Our pid, for the message a second s2cs prints.
        file.set_len(0)
            .and_then(|()| write!(&mut *file, "{}", std::process::id()))
            .map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_naming_the_holder() {
        let dir = std::env::temp_dir().join(format!("ss-statelock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = StateLock::acquire(&dir).unwrap();
        let e = StateLock::acquire(&dir).err().expect("second lock refused");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        StateLock::acquire(&dir).expect("free again once the holder is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
