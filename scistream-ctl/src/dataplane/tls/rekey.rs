//! TLS 1.3 re-keying of a tunnel in kernel TLS (RFC 8446 4.6.3 and 7.2).
//! An AES-GCM key may protect at most 2^24 records, so a long stream must
//! move to new keys; in rustls that happens by itself, under kernel TLS it
//! happens here: [`Rekey`] sends a KeyUpdate and installs the next sending key
//! when a budget runs out, and follows each KeyUpdate of the peer. The
//! bookkeeping behind it, [`KeyUpdates`], also drives the user-space record
//! layer ([`super::records`]), which installs keys its own way.
//!
//! rustls computes next keys only for a `rustls::kernel::KernelConnection`,
//! which only its unbuffered connections become; tokio-rustls drives buffered
//! ones. So a [`SecretLog`] on the connection's config catches the two
//! application traffic secrets during the handshake, and [`KeySchedule`]
//! derives each next generation with the suite's own HKDF, checked at the
//! hand-over against the keys rustls extracted.
//!
//! ```ignore
//! let log = Arc::new(SecretLog::default());
//! config.key_log = log.clone();               // a per-connection config
//! // ... handshake, then conn.dangerous_extract_secrets() ...
//! let keys = KeySchedule::new(&log, is_client, suite, &extracted)?;
//! let rekey = Rekey::new(keys, Some(64 << 20), &counter);
//! splice::splice_ktls(&plain, &sock, &to, &from, &rekey).await?;
//! ```

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix::sys::socket::sockopt::TlsCryptoInfo;
use rustls::crypto::tls13::OkmBlock;
use rustls::{ExtractedSecrets, SupportedCipherSuite, Tls13CipherSuite};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::ktls::{self, crypto_info, split_secrets, Cipher, ControlRecord};

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

/// Peer KeyUpdates accepted in a row without application data between them;
/// each costs a key derivation and two syscalls, so a peer that sends only
/// KeyUpdates is cut off (rustls applies the same bound in user space).
pub const MAX_KEYUPDATES_IN_A_ROW: u32 = 32;

/// Records one key may encrypt here before the next is installed: half of
/// AES-GCM's 2^24 (rustls' limit), leaving room for the records counted
/// loosely below.
pub const RECORD_BUDGET: u64 = 1 << 23;

/// The largest TLS record payload; the kernel cuts spliced bytes into records
/// of at most this.
const RECORD_PAYLOAD: u64 = 1 << 14;

/// A rustls `KeyLog` that keeps only the two application traffic secrets of
/// the one connection whose config carries it.
#[derive(Default)]
pub struct SecretLog {
    client: Mutex<Option<Secret>>,
    server: Mutex<Option<Secret>>,
}

impl fmt::Debug for SecretLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretLog(..)")
    }
}

impl rustls::KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            CLIENT_SECRET => &self.client,
            SERVER_SECRET => &self.server,
            _ => return,
        };
        *crate::lock(slot) = Some(Secret(secret.to_vec()));
    }
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }
}

impl SecretLog {
    fn take(&self, client: bool) -> Option<Secret> {
        let slot = if client { &self.client } else { &self.server };
        crate::lock(slot).take()
    }
}

/// A traffic secret, overwritten when dropped (best effort: copies the
/// allocator made on growth are not reached).
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

/// Both directions' current traffic secrets and how to step them.
pub struct KeySchedule {
    suite: &'static Tls13CipherSuite,
    cipher: Cipher,
    tx: Secret,
    rx: Secret,
}

/// Generations searched at the hand-over: a peer may have updated its key
/// while rustls still read (during the session proof).
const MAX_GENERATIONS_AT_HANDOVER: usize = MAX_KEYUPDATES_IN_A_ROW as usize;

impl KeySchedule {
    /// The schedule of the connection whose handshake `log` watched, at the
    /// generation of `extracted` (the keys now in the kernel). Fails unless a
    /// derived key equals the extracted one, so a wrong derivation can never
    /// reach the kernel.
    pub fn new(
        log: &SecretLog,
        is_client: bool,
        suite: SupportedCipherSuite,
        extracted: &ExtractedSecrets,
    ) -> io::Result<Self> {
        let missing = || {
            io::Error::other("the handshake's traffic secrets were not captured (no SecretLog on this connection)")
        };
        let SupportedCipherSuite::Tls13(suite) = suite else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "re-keying needs TLS 1.3",
            ));
        };
        let (client, server) = (
            log.take(true).ok_or_else(missing)?,
            log.take(false).ok_or_else(missing)?,
        );
        let (tx, rx) = if is_client {
            (client, server)
        } else {
            (server, client)
        };
        let (cipher, _, _) = split_secrets(&extracted.tx.1)?;
        let mut s = Self {
            suite,
            cipher,
            tx,
            rx,
        };
        for tx_dir in [true, false] {
            let (_, want) = if tx_dir { &extracted.tx } else { &extracted.rx };
            let (_, want_key, want_iv) = split_secrets(want)?;
            let mut found = false;
            for _ in 0..MAX_GENERATIONS_AT_HANDOVER {
                let (key, iv) = s.key_iv(if tx_dir { &s.tx } else { &s.rx });
                if key == want_key && iv == want_iv {
                    found = true;
                    break;
                }
                let slot = if tx_dir { &mut s.tx } else { &mut s.rx };
                *slot = next_secret(suite, slot);
            }
            if !found {
                return Err(io::Error::other(
                    "the captured traffic secret does not lead to the keys rustls extracted",
                ));
            }
        }
        Ok(s)
    }

    /// Steps the sending secret and returns its key for the kernel.
    pub fn next_tx(&mut self) -> TlsCryptoInfo {
        let (cipher, key, iv) = self.next_tx_key();
        crypto_info(cipher, &key, &iv, 0)
    }

    /// Steps the receiving secret and returns its key for the kernel.
    pub fn next_rx(&mut self) -> TlsCryptoInfo {
        let (cipher, key, iv) = self.next_rx_key();
        crypto_info(cipher, &key, &iv, 0)
    }

    /// Steps the sending secret and returns the cipher, key and iv, for the
    /// user-space record layer ([`super::records`]).
    pub fn next_tx_key(&mut self) -> (Cipher, Vec<u8>, [u8; 12]) {
        self.tx = next_secret(self.suite, &self.tx);
        let (key, iv) = self.key_iv(&self.tx);
        (self.cipher, key, iv)
    }

    /// Steps the receiving secret; as [`KeySchedule::next_tx_key`].
    pub fn next_rx_key(&mut self) -> (Cipher, Vec<u8>, [u8; 12]) {
        self.rx = next_secret(self.suite, &self.rx);
        let (key, iv) = self.key_iv(&self.rx);
        (self.cipher, key, iv)
    }

    fn key_iv(&self, secret: &Secret) -> (Vec<u8>, [u8; 12]) {
        let mut key = vec![0u8; self.cipher.key_len()];
        let mut iv = [0u8; 12];
        expand_label(self.suite, &secret.0, b"key", &mut key);
        expand_label(self.suite, &secret.0, b"iv", &mut iv);
        (key, iv)
    }
}

/// application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", Hash.length)
fn next_secret(suite: &'static Tls13CipherSuite, secret: &Secret) -> Secret {
    let mut out = vec![0u8; secret.0.len()];
    expand_label(suite, &secret.0, b"traffic upd", &mut out);
    Secret(out)
}

/// HKDF-Expand-Label(secret, label, "", out.len()) of RFC 8446 7.1.
fn expand_label(suite: &'static Tls13CipherSuite, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let expander = suite.hkdf_provider.expander_for_okm(&OkmBlock::new(secret));
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(b"tls13 ".len() + label.len()) as u8];
    // Outputs here are at most 48 bytes, far under HKDF's 255 * HashLen.
    expander
        .expand_slice(&[&len, &label_len, b"tls13 ", label, &[0]], out)
        .expect("HKDF output of a key, iv or secret length");
}

/// The KeyUpdate bookkeeping of one tunnel connection (RFC 8446 4.6.3),
/// the same for both tiers: which update is due before our next data, what
/// went out under the current sending key, and how many peer KeyUpdates came
/// in a row. The tiers differ only in how a next key is installed (a
/// setsockopt for kernel TLS, a new record key in user space), so they pass
/// that in. Both directions of a tunnel run in one task, so the lock is
/// never contended; callers take it once per splice or batch of records.
pub struct KeyUpdates<'a> {
    state: Mutex<State>,
    /// Send a KeyUpdate after this many bytes (the test knob), else only at
    /// [`RECORD_BUDGET`].
    every_bytes: u64,
    /// KeyUpdates this gateway started (budget or knob).
    initiated: &'a AtomicU64,
}

struct State {
    keys: KeySchedule,
    /// A KeyUpdate to send before the next data: Some(ask the peer to update too).
    due: Option<bool>,
    bytes: u64,
    records: u64,
    keyupdates_in_a_row: u32,
}

impl<'a> KeyUpdates<'a> {
    pub fn new(keys: KeySchedule, every_bytes: Option<u64>, initiated: &'a AtomicU64) -> Self {
        Self {
            state: Mutex::new(State {
                keys,
                due: None,
                bytes: 0,
                records: 0,
                keyupdates_in_a_row: 0,
            }),
            every_bytes: every_bytes.unwrap_or(u64::MAX),
            initiated,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// The KeyUpdate to send, under the current key, before our next data:
    /// Some(true) when ours fell due (it asks the peer to update too),
    /// Some(false) for the answer the peer asked for.
    pub fn due(&self) -> Option<bool> {
        self.lock().due
    }

    /// The due KeyUpdate went out: steps the sending secret, lets `install`
    /// put the next key in place, and starts counting afresh under it.
    pub fn sent_key_update<T>(
        &self,
        install: impl FnOnce(&mut KeySchedule) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut st = self.lock();
        let installed = install(&mut st.keys)?;
        st.due = None;
        st.bytes = 0;
        st.records = 0;
        Ok(installed)
    }

    /// `bytes` in at most `records` records went out under the current key;
    /// once the knob's bytes or the record budget are used up, our own
    /// KeyUpdate falls due (counted once, when it falls due).
    pub fn sent(&self, bytes: u64, records: u64) {
        let mut st = self.lock();
        st.bytes += bytes;
        st.records += records;
        if st.due.is_none() && (st.bytes >= self.every_bytes || st.records >= RECORD_BUDGET) {
            st.due = Some(true);
            self.initiated.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Application data arrived: the run of bare KeyUpdates is over.
    pub fn received_data(&self) {
        self.lock().keyupdates_in_a_row = 0;
    }

    /// The peer sent a KeyUpdate: unless it is one too many in a row (a
    /// flood, refused), steps the receiving secret and lets `install` put
    /// the peer's next key in place. When the peer asked, our answer falls
    /// due, unless an update of ours already is (that one answers it).
    pub fn peer_key_update<T>(
        &self,
        requested: bool,
        install: impl FnOnce(&mut KeySchedule) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut st = self.lock();
        st.keyupdates_in_a_row += 1;
        if st.keyupdates_in_a_row > MAX_KEYUPDATES_IN_A_ROW {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer sent over {MAX_KEYUPDATES_IN_A_ROW} TLS KeyUpdates without data between them (a KeyUpdate flood)"),
            ));
        }
        let installed = install(&mut st.keys)?;
        if requested && st.due.is_none() {
            // Our answer goes out before our next data (RFC 8446 4.6.3).
            st.due = Some(false);
        }
        Ok(installed)
    }
}

/// Re-keying of one tunnel connection in kernel TLS: [`KeyUpdates`] with
/// the kernel's sockets, shared by the connection's two directions.
pub struct Rekey<'a> {
    updates: KeyUpdates<'a>,
}

impl<'a> Rekey<'a> {
    pub fn new(keys: KeySchedule, every_bytes: Option<u64>, initiated: &'a AtomicU64) -> Self {
        Self {
            updates: KeyUpdates::new(keys, every_bytes, initiated),
        }
    }

    /// Before more data goes into `sock`: when a KeyUpdate is due (the
    /// budget ran out, or the peer asked), sends it under the current key and
    /// switches the kernel to the next one. Nothing is lost: records already
    /// handed to the kernel were sealed under the old key, and the kernel
    /// closes a partly filled record before it sends the KeyUpdate.
    pub async fn before_send(&self, sock: &TcpStream) -> io::Result<()> {
        let Some(request) = self.updates.due() else {
            return Ok(());
        };
        loop {
            sock.writable().await?;
            match sock.try_io(Interest::WRITABLE, || ktls::send_key_update(sock, request)) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("sending a TLS KeyUpdate: {e}"),
                    ))
                }
            }
        }
        self.updates
            .sent_key_update(|keys| ktls::install_next(sock, true, &keys.next_tx()))?;
        tracing::debug!(request, "kernel TLS: sending key updated");
        Ok(())
    }

    /// `n` bytes went into the socket in one splice(2): at most one record
    /// per 16 KiB plus a partly filled one.
    pub fn sent(&self, n: usize) {
        let n = n as u64;
        self.updates.sent(n, n.div_ceil(RECORD_PAYLOAD) + 1);
    }

    /// Application data arrived: the run of bare KeyUpdates is over.
    pub fn received_data(&self) {
        self.updates.received_data();
    }

    /// Handles the non-data record at the head of `sock` (splice refused
    /// it): a KeyUpdate installs the peer's next key at once, since the
    /// kernel holds every later record back until it has it. Returns the
    /// record so the caller sees a close_notify.
    pub fn on_control_record(&self, sock: &TcpStream) -> io::Result<ControlRecord> {
        let record = ktls::read_control_record(sock)?;
        if let ControlRecord::KeyUpdate { update_requested } = record {
            self.updates.peer_key_update(update_requested, |keys| {
                ktls::install_next(sock, false, &keys.next_rx())
            })?;
            tracing::debug!(update_requested, "kernel TLS: receiving key updated");
        }
        Ok(record)
    }
}

#[cfg(test)]
#[path = "rekey_tests.rs"]
mod tests;
