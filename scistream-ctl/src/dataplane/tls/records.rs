//! The `tls` backend's user-space data path once a tunnel is proven, where
//! the kernel has no TLS offload: TLS 1.3 records sealed and opened in place
//! in our own buffers, as kernel TLS would do them, with the keys rustls
//! negotiated (see [`super::ktls`] for the same hand-over to the kernel).
//!
//! Why not stay in rustls: its buffered connection copies every byte twice
//! more on each side (plaintext into its send queue and out of its receive
//! queue, and the deframer shifts its buffer), and tokio's copy adds one
//! more. Profiles of the `tls` backend showed those copies and the read(2)
//! calls of 4 KiB each next to AES-GCM itself. Here a batch of up to 16
//! records is read with one readv(2) straight into the record slots, sealed
//! in place and sent with one writev(2); received records are opened in the
//! read buffer and their plaintext goes out with one writev(2). User space
//! never copies a payload byte.
//!
//! What rustls did after the handshake happens here: a sequence number per
//! direction in the nonce, the inner content type and padding of TLS 1.3
//! records (RFC 8446 5.2-5.4), KeyUpdate both ways as kernel TLS does it,
//! with the same [`KeyUpdates`] bookkeeping (a KeyUpdate before a key's
//! record budget runs out or after `SCISTREAM_REKEY_BYTES`, the peer's
//! KeyUpdate followed at once, a flood of them cut off), close_notify both
//! ways (a half-close), and any other alert, malformed or forged record ends
//! the connection.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{shutdown, Shutdown};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use tokio::net::TcpStream;

use super::ktls::{split_secrets, Cipher};
use super::rekey::KeyUpdates;

/// TLS record header: type, legacy version (2), length (2).
const HEADER: usize = 5;
/// The largest plaintext of one record (RFC 8446 5.1).
const MAX_PLAIN: usize = 1 << 14;
/// AES-GCM and ChaCha20-Poly1305 tags are both 16 bytes.
const TAG: usize = 16;
/// The largest ciphertext a peer may send: 2^14 + 256 (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// One outgoing record's room: header, payload, inner content type, tag.
pub const SLOT: usize = HEADER + MAX_PLAIN + 1 + TAG;
/// Records read, sealed and sent per batch: up to 256 KiB of plaintext per
/// readv. Against 4 (64 KiB), the bench's 4-stream `tls` moved 8-11 % more
/// at 8-14 % less gateway CPU per GB (fewer syscalls and fewer window
/// updates to the producer); 32 and 64 gained nothing more.
const BATCH: usize = 16;
/// Receive buffer: many records per read(2); a partial record at its end is
/// moved to the front only when less than one record's room is left.
const RX_BUF: usize = 256 * 1024;

/// TLS content types (RFC 8446 5.1) and the KeyUpdate handshake type.
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;
pub const KEY_UPDATE: u8 = 24;
/// TLS 1.3 records carry 0x0303 as their legacy version (RFC 8446 5.1).
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// One direction's AEAD key, its static IV and the next record's sequence.
pub struct RecordKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl RecordKey {
    pub fn new(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> io::Result<Self> {
        let alg = match cipher {
            Cipher::Aes128Gcm => &aead::AES_128_GCM,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        };
        let key = UnboundKey::new(alg, key)
            .map_err(|_| io::Error::other(format!("a {cipher:?} key of the wrong length")))?;
        let iv: [u8; 12] = iv
            .try_into()
            .map_err(|_| io::Error::other("a TLS 1.3 IV that is not 12 bytes"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The current direction of rustls' extracted secrets, at its sequence.
    pub fn from_extracted(
        (seq, secrets): &(u64, rustls::ConnectionTrafficSecrets),
    ) -> io::Result<Self> {
        let (cipher, key, iv) = split_secrets(secrets)?;
        Self::new(cipher, key, iv, *seq)
    }

    fn next((cipher, key, iv): (Cipher, Vec<u8>, [u8; 12])) -> io::Result<Self> {
        Self::new(cipher, &key, &iv, 0)
    }

    /// The per-record nonce: the IV XOR the 64-bit sequence number, which
    /// then moves on. A key never reuses a nonce: at 2^64 it refuses.
    fn nonce(&mut self) -> io::Result<Nonce> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS record sequence number exhausted"))?;
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seals `slot[HEADER..HEADER + len]` into a whole record of content
    /// `kind` in place; returns the record's length. `slot` must hold the
    /// header, the payload, the content type and the tag ([`SLOT`] bytes
    /// for a full record).
    pub fn seal(&mut self, slot: &mut [u8], len: usize, kind: u8) -> io::Result<usize> {
        let body = len + 1 + TAG;
        let header = header(body);
        slot[..HEADER].copy_from_slice(&header);
        slot[HEADER + len] = kind;
        let nonce = self.nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce,
                Aad::from(header),
                &mut slot[HEADER..HEADER + len + 1],
            )
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        slot[HEADER + len + 1..HEADER + body].copy_from_slice(tag.as_ref());
        Ok(HEADER + body)
    }

    /// One whole record of content `kind` around `payload` (at most 16 KiB),
    /// as a peer sends it; for tests and the fuzz target.
    pub fn seal_record(&mut self, kind: u8, payload: &[u8]) -> io::Result<Vec<u8>> {
        if payload.len() > MAX_PLAIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TLS record holds at most 16 KiB",
            ));
        }
        let mut slot = vec![0u8; HEADER + payload.len() + 1 + TAG];
        slot[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        let len = self.seal(&mut slot, payload.len(), kind)?;
        slot.truncate(len);
        Ok(slot)
    }

    /// Opens one record's body in place; returns the inner plaintext
    /// (content, type, padding).
    fn open<'a>(&mut self, header: [u8; HEADER], body: &'a mut [u8]) -> io::Result<&'a mut [u8]> {
        let nonce = self.nonce()?;
        self.key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS record failed authentication (forged, corrupted or out of order)",
                )
            })
    }
}

fn header(body: usize) -> [u8; HEADER] {
    let [hi, lo] = (body as u16).to_be_bytes();
    [
        APPLICATION_DATA,
        LEGACY_VERSION[0],
        LEGACY_VERSION[1],
        hi,
        lo,
    ]
}

/// Moves a proven tunnel's bytes both ways until each direction ended with
/// a close_notify or an EOF, or the first error.
pub async fn carry(
    plain: &TcpStream,
    tunnel: &TcpStream,
    tx: RecordKey,
    rx: RecordKey,
    updates: &KeyUpdates<'_>,
    to_tunnel: &AtomicU64,
    from_tunnel: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(
        seal_loop(plain, tunnel, tx, updates, to_tunnel),
        open_loop(tunnel, plain, rx, updates, from_tunnel)
    )?;
    Ok(())
}

/// plain -> tunnel: read up to [`BATCH`] records' plaintext with one readv
/// into the slots, seal each in place, send them with one writev. An EOF
/// becomes a close_notify and a FIN.
async fn seal_loop(
    plain: &TcpStream,
    tunnel: &TcpStream,
    mut key: RecordKey,
    updates: &KeyUpdates<'_>,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; SLOT * BATCH];
    loop {
        let n = loop {
            plain.readable().await?;
            // On the stack: this runs once per batch (up to 256 KiB).
            let mut slots = buf.chunks_mut(SLOT);
            let mut iov: [IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                let slot = slots.next().expect("BATCH slots");
                IoSliceMut::new(&mut slot[HEADER..HEADER + MAX_PLAIN])
            });
            match plain.try_read_vectored(&mut iov) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        // A KeyUpdate goes out before the next data under the key it
        // replaces: ours when the budget ran out, or the answer the peer
        // asked for (RFC 8446 4.6.3).
        if let Some(request) = updates.due() {
            let mut rec = [0u8; HEADER + 5 + 1 + TAG];
            rec[HEADER..HEADER + 5].copy_from_slice(&[KEY_UPDATE, 0, 0, 1, request as u8]);
            let len = key.seal(&mut rec, 5, HANDSHAKE)?;
            write_all(tunnel, &mut [IoSlice::new(&rec[..len])]).await?;
            key = updates.sent_key_update(|keys| RecordKey::next(keys.next_tx_key()))?;
            tracing::debug!(request, "user-space TLS: sending key updated");
        }
        if n == 0 {
            let mut rec = [0u8; HEADER + 2 + 1 + TAG];
            rec[HEADER..HEADER + 2].copy_from_slice(&[1, 0]); // warning, close_notify
            let len = key.seal(&mut rec, 2, ALERT)?;
            write_all(tunnel, &mut [IoSlice::new(&rec[..len])]).await?;
            shutdown(tunnel.as_raw_fd(), Shutdown::Write).map_err(io::Error::from)?;
            return Ok(());
        }
        let mut lens = [0usize; BATCH];
        let mut left = n;
        for (slot, len) in buf.chunks_mut(SLOT).zip(lens.iter_mut()) {
            if left == 0 {
                break;
            }
            let take = left.min(MAX_PLAIN);
            *len = key.seal(slot, take, APPLICATION_DATA)?;
            left -= take;
        }
        // readv fills the slots in order: the sealed records are a prefix.
        let sealed = lens.iter().take_while(|len| **len > 0).count();
        let mut slots = buf.chunks(SLOT).zip(lens);
        let mut iov: [IoSlice<'_>; BATCH] = std::array::from_fn(|_| {
            let (slot, len) = slots.next().expect("BATCH slots");
            IoSlice::new(&slot[..len])
        });
        write_all(tunnel, &mut iov[..sealed]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        updates.sent(n as u64, sealed as u64);
    }
}

/// tunnel -> plain: read as many records as arrived, open each in place,
/// send their plaintext with one writev. A close_notify becomes a FIN; an
/// EOF without one is a truncation and an error.
async fn open_loop(
    tunnel: &TcpStream,
    plain: &TcpStream,
    mut key: RecordKey,
    updates: &KeyUpdates<'_>,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; RX_BUF];
    let (mut start, mut end) = (0usize, 0usize);
    // Whether the last record was a KeyUpdate: data then ends the run of
    // them, and only then is the shared state locked for it (not per record).
    let mut after_keyupdate = false;
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(RX_BUF / MAX_PLAIN + 1);
    loop {
        let n = loop {
            tunnel.readable().await?;
            match tunnel.try_read(&mut buf[end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer gateway closed the tunnel without a TLS close_notify (the stream may be cut short)",
            ));
        }
        end += n;
        spans.clear();
        let mut closed = false;
        while let Some((record, used)) = open_record(&mut key, &mut buf[start..end])? {
            match record {
                Record::Data { at, len } => {
                    if after_keyupdate {
                        updates.received_data();
                        after_keyupdate = false;
                    }
                    if len > 0 {
                        spans.push((start + at, len));
                    }
                }
                Record::KeyUpdate { requested } => {
                    key = updates
                        .peer_key_update(requested, |keys| RecordKey::next(keys.next_rx_key()))?;
                    after_keyupdate = true;
                    tracing::debug!(requested, "user-space TLS: receiving key updated");
                }
                Record::CloseNotify => closed = true,
            }
            start += used;
            if closed {
                break;
            }
        }
        if !spans.is_empty() {
            let mut iov: Vec<IoSlice<'_>> = spans
                .iter()
                .map(|&(at, len)| IoSlice::new(&buf[at..at + len]))
                .collect();
            let total: usize = spans.iter().map(|s| s.1).sum();
            write_all(plain, &mut iov).await?;
            counter.fetch_add(total as u64, Ordering::Relaxed);
        }
        if closed {
            if start != end {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "peer sent TLS records after its close_notify",
                ));
            }
            shutdown(plain.as_raw_fd(), Shutdown::Write).map_err(io::Error::from)?;
            return Ok(());
        }
        if start == end {
            (start, end) = (0, 0);
        } else if buf.len() - end < HEADER + MAX_CIPHERTEXT {
            // Only a partial record is left; make room for a whole one.
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
    }
}

/// One opened record, as [`open_record`] found it.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    /// Application data at `buf[at..at + len]` (plaintext, in place).
    Data { at: usize, len: usize },
    /// The peer's next records use its next key; `requested`: it asks us to
    /// update ours too.
    KeyUpdate { requested: bool },
    /// The peer finished sending.
    CloseNotify,
}

/// Opens the record at the head of `buf` in place under `key` (which then
/// moves to the next sequence number). Ok(None): the record is not complete
/// yet. Ok(Some((record, bytes used))). Every malformed, oversize, forged or
/// unexpected record is an error; nothing of it is returned as data. Bytes
/// come from the network: this is what the `records` fuzz target drives.
pub fn open_record(key: &mut RecordKey, buf: &mut [u8]) -> io::Result<Option<(Record, usize)>> {
    let Some(h) = buf.first_chunk::<HEADER>().copied() else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    if h[0] != APPLICATION_DATA || h[1..3] != LEGACY_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a TLS 1.3 protected record after the handshake: header {h:02x?}"),
        ));
    }
    if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a TLS record of {len} bytes (record_overflow)"),
        ));
    }
    let Some(body) = buf.get_mut(HEADER..HEADER + len) else {
        return Ok(None);
    };
    let inner = key.open(h, body)?;
    // Content, then its type, then zero padding (RFC 8446 5.4).
    let Some(at) = inner.iter().rposition(|b| *b != 0) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a TLS record without a content type",
        ));
    };
    let record = match (inner[at], &inner[..at]) {
        (APPLICATION_DATA, _) => Record::Data {
            at: HEADER,
            len: at,
        },
        (HANDSHAKE, [KEY_UPDATE, 0, 0, 1, r @ (0 | 1)]) => Record::KeyUpdate { requested: *r == 1 },
        (HANDSHAKE, m) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "peer sent a TLS handshake record ({} bytes) that is not one KeyUpdate",
                    m.len()
                ),
            ))
        }
        (ALERT, [_, 0]) => Record::CloseNotify,
        (ALERT, [_, d]) => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("peer sent TLS alert {d}"),
            ))
        }
        (t, _) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected TLS record of content type {t}"),
            ))
        }
    };
    Ok(Some((record, HEADER + len)))
}

/// Writes every byte of `iov` to a non-blocking socket.
async fn write_all(sock: &TcpStream, mut iov: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !iov.is_empty() {
        sock.writable().await?;
        match sock.try_write_vectored(iov) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket took no bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut iov, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
