//! The session store: every answered session, written (and fsynced) before
//! its `req`, `update` or `release` is answered, so an `s2cs` killed at any
//! moment comes back with the sessions its clients were told about.
//!
//! One redb file, `sessions.redb` in `--state_dir`, one table from uid to a
//! JSON record. redb holds an exclusive lock on the file, so a second `s2cs`
//! pointed at the same state directory fails at start instead of corrupting it.
//!
//! ```no_run
//! # use scistream_ctl::control::store::Store;
//! let store = Store::open(std::path::Path::new("/var/lib/scistream"))?;
//! for s in store.load()? {
//!     println!("{} {} {:?}", s.uid, s.role, s.listeners);
//! }
//! # Ok::<(), scistream_ctl::control::store::StoreError>(())
//! ```

use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// File name of the store inside `--state_dir`.
pub const FILE_NAME: &str = "sessions.redb";

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// Bumped when a record changes shape; records of another version are
/// reported and skipped rather than misread.
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store {path}: another s2cs already uses this state directory")]
    InUse { path: PathBuf },
    #[error("session store {path}: {source}")]
    Db { path: PathBuf, source: redb::Error },
    #[error("session store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a session needs to come back after a restart: the answers its
/// clients hold (listeners, targets) and what the data plane was started with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub version: u32,
    pub uid: String,
    /// `PROD` or `CONS`.
    pub role: String,
    pub num_conn: usize,
    pub rate: i32,
    pub listeners: Vec<SocketAddr>,
    /// The producer addresses a PROD session's hello carried.
    pub prod_listeners: Vec<SocketAddr>,
    /// Empty until the session's `update`.
    pub targets: Vec<SocketAddr>,
    pub owner: Option<String>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Backend name (`tls`, `splice`, ...) the session was forwarded with.
    pub backend: String,
    /// The session's tunnel key (hex), when it has one; records written
    /// before keys existed have none and keep their uid-derived secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_key: Option<String>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `state_dir/sessions.redb`. A file left by a killed
    /// process is repaired by redb on open.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(FILE_NAME);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        // The uids in it are what the tunnel's session secrets derive from:
        // readable by root only, also when an older file was made otherwise.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
            .map_err(io)?;
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(e) if is_damage(&e) => {
                // The README promises s2cs carries on: the damaged file is
                // kept for a look, the sessions in it are lost.
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = path.with_file_name(format!("{FILE_NAME}.corrupt-{stamp}"));
                std::fs::rename(&path, &aside).map_err(io)?;
                tracing::error!(store = %path.display(), moved_to = %aside.display(), error = %e,
                    "session store unreadable; moved aside, starting with no stored sessions");
                eprintln!("s2cs: session store {} unreadable ({e}); moved to {}, starting with no stored sessions", path.display(), aside.display());
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io)?;
                Database::create(&path).map_err(|e| StoreError::Db {
                    path: path.clone(),
                    source: e.into(),
                })?
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse { path: path.clone() })
            }
            Err(e) => {
                return Err(StoreError::Db {
                    path: path.clone(),
                    source: e.into(),
                })
            }
        };
        let store = Self { db, path };
        // The table exists from the start, so reads never meet a missing one.
        store.write(|_| Ok(()))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// One committed (fsynced) write transaction on the sessions table.
    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), redb::StorageError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
            f(&mut table).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Inserts or replaces the session's record.
    pub fn put(&self, s: &StoredSession) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(s).expect("a StoredSession always serialises");
        self.write(|t| t.insert(s.uid.as_str(), bytes.as_slice()).map(drop))
    }

    /// Forgets the session; forgetting an unknown uid is not an error.
    pub fn delete(&self, uid: &str) -> Result<(), StoreError> {
        self.write(|t| t.remove(uid).map(drop))
    }

    /// Every stored session. Records that cannot be read (another version,
    /// damage) are logged and left out; [`Store::delete`] removes them.
    pub fn load(&self) -> Result<Vec<StoredSession>, StoreError> {
        Ok(self
            .load_raw()?
            .into_iter()
            .filter_map(|(_, r)| r)
            .collect())
    }

    /// Every stored uid with its record, `None` where the record is unreadable.
    pub fn load_raw(&self) -> Result<Vec<(String, Option<StoredSession>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let uid = k.value().to_string();
            let record = match serde_json::from_slice::<StoredSession>(v.value()) {
                Ok(r) if r.version == RECORD_VERSION && r.uid == uid => Some(r),
                Ok(r) => {
                    tracing::error!(uid = %uid, version = r.version, "stored session has another record version; skipped");
                    None
                }
                Err(e) => {
                    tracing::error!(uid = %uid, error = %e, "stored session unreadable; skipped");
                    None
                }
            };
            out.push((uid, record));
        }
        Ok(out)
    }
}

/// Whether opening failed on the file's contents (not on the system):
/// what moving the file aside cures.
fn is_damage(e: &redb::DatabaseError) -> bool {
    match e {
        redb::DatabaseError::RepairAborted => true,
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => true,
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
            io.kind() == std::io::ErrorKind::InvalidData
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> StoredSession {
        StoredSession {
            version: RECORD_VERSION,
            uid: uid.into(),
            role: "PROD".into(),
            num_conn: 2,
            rate: 10_000,
            listeners: vec![
                "10.0.0.1:5100".parse().unwrap(),
                "10.0.0.1:5101".parse().unwrap(),
            ],
            prod_listeners: vec!["10.0.0.2:80".parse().unwrap()],
            targets: vec!["10.0.0.2:80".parse().unwrap(); 2],
            owner: Some("alice".into()),
            created_unix_ms: 1_700_000_000_000,
            backend: "tls".into(),
            tunnel_key: Some("ab".repeat(32)),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ss-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_survive_reopening_and_deletes_stick() {
        let dir = temp_dir("reopen");
        {
            let s = Store::open(&dir).unwrap();
            s.put(&record("a")).unwrap();
            s.put(&record("b")).unwrap();
            let mut b = record("b");
            b.targets = vec!["10.0.0.3:81".parse().unwrap(); 2];
            s.put(&b).unwrap();
            s.delete("a").unwrap();
            s.delete("never-stored").unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the uids in it derive tunnel secrets");
        let all = s.load().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].uid, "b");
        assert_eq!(
            all[0].targets[0],
            "10.0.0.3:81".parse().unwrap(),
            "the later put replaced the record"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tunnel_key_is_kept_and_records_without_one_still_load() {
        let dir = temp_dir("key");
        {
            let s = Store::open(&dir).unwrap();
            s.put(&record("k")).unwrap();
        }
        let all = Store::open(&dir).unwrap().load().unwrap();
        assert_eq!(
            all[0].tunnel_key,
            Some("ab".repeat(32)),
            "a restart keeps the session's key"
        );
        // A record written before tunnel keys existed.
        let mut old = serde_json::to_value(record("o")).unwrap();
        old.as_object_mut().unwrap().remove("tunnel_key");
        let back: StoredSession = serde_json::from_value(old).unwrap();
        assert_eq!(back.tunnel_key, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_store_is_moved_aside_with_a_timestamp_and_an_empty_one_opens() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        let junk = b"this is not a redb database, just bytes on the disk".repeat(100);
        std::fs::write(dir.join(FILE_NAME), &junk).unwrap();
        let s = Store::open(&dir).expect("s2cs carries on");
        assert!(s.load().unwrap().is_empty());
        s.put(&record("a")).unwrap();
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{FILE_NAME}.corrupt-"))
            })
            .collect();
        assert_eq!(aside.len(), 1, "one file moved aside");
        assert_eq!(
            std::fs::read(aside[0].path()).unwrap(),
            junk,
            "kept as it was"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused() {
        let dir = temp_dir("twice");
        let _first = Store::open(&dir).unwrap();
        let second = Store::open(&dir);
        assert!(
            matches!(second, Err(StoreError::InUse { .. })),
            "{:?}",
            second.err()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
