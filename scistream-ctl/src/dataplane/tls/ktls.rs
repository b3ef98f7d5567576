//! Kernel TLS offload of the `tls` backend. rustls does the handshake and the
//! session proof; then the TLS 1.3 traffic keys go to the kernel (TCP_ULP
//! "tls", SOL_TLS TLS_TX/TLS_RX) and the bytes move with splice(2), never
//! copied through user space. [`detect`] decides once per process whether
//! the kernel can do it; when it cannot, the backend stays in rustls.
//!
//! Handing over is only correct at a TLS record boundary with nothing left in
//! rustls: [`RecordBounded`] keeps rustls from reading past the record it
//! needs, so after the proof no undecrypted bytes hide in its buffers.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::libc;
use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};
use nix::sys::socket::{setsockopt, ControlMessageOwned, MsgFlags, TlsGetRecordType};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the `tls` backend's bytes are encrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Kernel TLS + splice. `rekey`: the kernel accepts new TLS 1.3 keys on a
    /// live socket (KeyUpdate; Linux 6.14+).
    Kernel { rekey: bool },
    /// rustls in user space, and why not the kernel.
    Rustls { reason: String },
}

/// `SCISTREAM_KTLS`: `auto` (default: kernel TLS where the kernel can also
/// re-key TLS 1.3), `on` (kernel TLS whenever the ULP exists, also without
/// re-keying: for tests and bounded streams), `off` (always rustls).
pub const MODE_VAR: &str = "SCISTREAM_KTLS";

/// Probes the kernel on a loopback connection and applies `SCISTREAM_KTLS`.
pub fn detect() -> Tier {
    let mode = std::env::var(MODE_VAR)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if mode == "off" {
        return Tier::Rustls {
            reason: format!("{MODE_VAR}=off"),
        };
    }
    match probe() {
        Err(reason) => Tier::Rustls { reason },
        Ok(true) => Tier::Kernel { rekey: true },
        Ok(false) if mode == "on" => Tier::Kernel { rekey: false },
        Ok(false) => Tier::Rustls {
            reason: format!(
                "the kernel has TLS offload but cannot re-key TLS 1.3 (before Linux 6.14), so long streams would \
                 outlive their keys; {MODE_VAR}=on uses it anyway"
            ),
        },
    }
}

/// Ok(re-key supported) when a connected TCP socket takes the TLS ULP and a
/// TX key; re-keying shows as the kernel accepting a second TX key.
fn probe() -> Result<bool, String> {
    let pair = || -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let c = std::net::TcpStream::connect(l.local_addr()?)?;
        let (s, _) = l.accept()?;
        Ok((c, s))
    };
    let (c, _s) = pair().map_err(|e| format!("loopback probe connection: {e}"))?;
    setsockopt(&c, TcpUlp::default(), b"tls").map_err(|e| match e {
        nix::errno::Errno::ENOENT => {
            "the kernel has no TLS ULP (CONFIG_TLS off or the tls module not loaded)".to_string()
        }
        e => format!("setsockopt(TCP_ULP, \"tls\"): {e}"),
    })?;
    let info = aes128(&[0; 16], &[0; 12], 0);
    setsockopt(&c, TcpTlsTx, &info).map_err(|e| match e {
        // The crypto API found no "gcm(aes)": its modules are not loadable.
        nix::errno::Errno::ENOENT => {
            "the kernel has TLS but no AES-GCM for it (crypto modules gcm/ctr/ghash missing)"
                .to_string()
        }
        e => format!("setsockopt(TLS_TX) with AES-128-GCM: {e}"),
    })?;
    Ok(setsockopt(&c, TcpTlsTx, &aes128(&[1; 16], &[0; 12], 0)).is_ok())
}

fn aes128(key: &[u8], iv: &[u8], seq: u64) -> TlsCryptoInfo {
    crypto_info(Cipher::Aes128Gcm, key, iv, seq)
}

/// The AEADs of TLS 1.3 that kernel TLS implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    pub fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }
}

/// The kernel's description of one direction's key: `key` of the cipher's
/// length, TLS 1.3's 12-byte `iv`, and the sequence number of the next record.
pub fn crypto_info(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> TlsCryptoInfo {
    let info = |cipher_type| libc::tls_crypto_info {
        version: libc::TLS_1_3_VERSION,
        cipher_type,
    };
    match cipher {
        Cipher::Aes128Gcm => {
            let mut i = libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq: seq.to_be_bytes(),
            };
            i.key.copy_from_slice(key);
            // TLS 1.3's 12-byte IV: the kernel calls the first 4 bytes the salt.
            i.salt.copy_from_slice(&iv[..4]);
            i.iv.copy_from_slice(&iv[4..12]);
            TlsCryptoInfo::Aes128Gcm(i)
        }
        Cipher::Aes256Gcm => {
            let mut i = libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq: seq.to_be_bytes(),
            };
            i.key.copy_from_slice(key);
            i.salt.copy_from_slice(&iv[..4]);
            i.iv.copy_from_slice(&iv[4..12]);
            TlsCryptoInfo::Aes256Gcm(i)
        }
        Cipher::Chacha20Poly1305 => {
            let mut i = libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: [0; 12],
                key: [0; 32],
                salt: [],
                rec_seq: seq.to_be_bytes(),
            };
            i.key.copy_from_slice(key);
            i.iv.copy_from_slice(iv);
            TlsCryptoInfo::Chacha20Poly1305(i)
        }
    }
}

/// The cipher and the key/iv bytes of one direction's extracted secrets.
pub fn split_secrets(secrets: &ConnectionTrafficSecrets) -> io::Result<(Cipher, &[u8], &[u8])> {
    Ok(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            (Cipher::Aes128Gcm, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            (Cipher::Aes256Gcm, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Cipher::Chacha20Poly1305, key.as_ref(), iv.as_ref())
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cipher suite without kernel TLS support",
            ))
        }
    })
}

fn info_of(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<TlsCryptoInfo> {
    let (cipher, key, iv) = split_secrets(secrets)?;
    Ok(crypto_info(cipher, key, iv, seq))
}

/// Installs the TLS ULP and both directions' keys on `sock`.
pub fn install<S: AsFd>(sock: &S, secrets: &ExtractedSecrets) -> io::Result<()> {
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    setsockopt(sock, TcpUlp::default(), b"tls")?;
    setsockopt(sock, TcpTlsTx, &info_of(*tx_seq, tx)?)?;
    setsockopt(sock, TcpTlsRx, &info_of(*rx_seq, rx)?)?;
    Ok(())
}

/// What a non-data record at the head of a kTLS socket's receive queue means.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlRecord {
    /// close_notify: the peer finished sending, like a TCP FIN.
    CloseNotify,
    /// A TLS 1.3 KeyUpdate: the peer's next records use its next key; a
    /// kernel that re-keys holds them back until TLS_RX gets that key.
    /// `update_requested`: the peer asks us to update our sending key too.
    KeyUpdate { update_requested: bool },
}

/// TLS record content types (RFC 8446 5.1).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// Handshake message type key_update (RFC 8446 4.6.3).
const KEY_UPDATE: u8 = 24;
/// The largest TLS plaintext record: a whole record is read at once, so a
/// record never arrives split over two reads.
const MAX_RECORD: usize = 1 << 14;

/// Reads the record that made splice(2) fail on a kTLS socket (splice only
/// carries application data; the kernel leaves other records for recvmsg with
/// their type in a control message).
pub fn read_control_record<S: AsRawFd>(sock: &S) -> io::Result<ControlRecord> {
    let mut data = vec![0u8; MAX_RECORD];
    let mut iov = [io::IoSliceMut::new(&mut data)];
    let mut cmsg = nix::cmsg_space!(u8);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let n = msg.bytes;
    let mut kind = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::TlsGetRecordType(t) = c {
            kind = Some(t);
        }
    }
    parse_control_record(kind, &data[..n])
}

fn parse_control_record(
    kind: Option<TlsGetRecordType>,
    record: &[u8],
) -> io::Result<ControlRecord> {
    match (kind, record) {
        // Alert level, description 0 = close_notify.
        (Some(TlsGetRecordType::Alert), [_, 0, ..]) => Ok(ControlRecord::CloseNotify),
        (Some(TlsGetRecordType::Alert), [_, d, ..]) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("peer sent TLS alert {d}"),
        )),
        // One KeyUpdate and nothing else: a KeyUpdate must end its record
        // (RFC 8446 5.1), and nothing else is expected after the handshake
        // (no tickets are issued).
        (Some(TlsGetRecordType::Handshake), [KEY_UPDATE, 0, 0, 1, r @ (0 | 1)]) => {
            Ok(ControlRecord::KeyUpdate {
                update_requested: *r == 1,
            })
        }
        (Some(TlsGetRecordType::Handshake), [t, ..]) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "peer sent a TLS handshake record (type {t}, {} bytes) that is not one KeyUpdate",
                record.len()
            ),
        )),
        (other, _) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unexpected TLS record on a kernel TLS socket: {other:?}, {} bytes",
                record.len()
            ),
        )),
    }
}

/// Sends a TLS close_notify alert through kernel TLS, so a peer still in
/// rustls sees a clean end of the direction rather than a truncation.
pub fn send_close_notify<S: AsRawFd>(sock: &S) -> io::Result<()> {
    send_record(sock, ALERT, &[1, 0]) // warning, close_notify
}

/// Sends a KeyUpdate under the current sending key. The caller switches the
/// kernel to the next key right after (RFC 8446 4.6.3).
pub fn send_key_update<S: AsRawFd>(sock: &S, update_requested: bool) -> io::Result<()> {
    send_record(
        sock,
        HANDSHAKE,
        &[KEY_UPDATE, 0, 0, 1, update_requested as u8],
    )
}

/// One whole record, or an error (EAGAIN when the socket buffer is full).
fn send_record<S: AsRawFd>(sock: &S, record_type: u8, data: &[u8]) -> io::Result<()> {
    let n = sendmsg_record_type(sock.as_raw_fd(), record_type, data)?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write of a TLS record of type {record_type}"),
        ));
    }
    Ok(())
}

/// Installs the next key for sending (after [`send_key_update`]) or
/// receiving (after the peer's KeyUpdate), record sequence 0. Kernels before
/// Linux 6.14 refuse a second key (EBUSY).
pub fn install_next<S: AsFd>(sock: &S, tx: bool, info: &TlsCryptoInfo) -> io::Result<()> {
    let r = if tx {
        setsockopt(sock, TcpTlsTx, info)
    } else {
        setsockopt(sock, TcpTlsRx, info)
    };
    r.map_err(|e| {
        let dir = if tx { "TLS_TX" } else { "TLS_RX" };
        match e {
            nix::errno::Errno::EBUSY => io::Error::new(
                io::ErrorKind::Unsupported,
                format!("this kernel cannot re-key TLS 1.3 ({dir} refused a new key: EBUSY; needs Linux 6.14+)"),
            ),
            e => io::Error::new(io::Error::from(e).kind(), format!("installing the next {dir} key: {e}")),
        }
    })
}

/// sendmsg(2) with a TLS_SET_RECORD_TYPE control message: kernel TLS sends
/// `data` as one record of `record_type` (nix has no safe form of this
/// control message).
fn sendmsg_record_type(fd: std::os::fd::RawFd, record_type: u8, data: &[u8]) -> io::Result<usize> {
    // Room for one cmsghdr carrying one byte, aligned as the kernel expects.
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: every pointer refers to a live local buffer of the stated
    // length for the duration of the call; CMSG_* compute offsets inside
    // `cbuf`, which is larger than CMSG_SPACE(1) (24 bytes on Linux).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = record_type;
        let n = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// A reader that never hands rustls bytes past the end of the TLS record it
/// is in, so when rustls has what it asked for, the socket is at a record
/// boundary. Writes pass through. [`RecordBounded::unbound`] ends the
/// bounding once the stream stays in rustls; from then on reads are
/// buffered (see [`READ_AHEAD`]).
pub struct RecordBounded<S> {
    inner: S,
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    bounded: bool,
    /// Read-ahead once unbound: `ahead[pos..end]` is still to be handed out.
    ahead: Vec<u8>,
    pos: usize,
    end: usize,
}

/// rustls asks its reader for at most 4 KiB at a time, so a 16 KiB record
/// took 4 or 5 read(2) calls; profiling the `tls` backend showed those
/// syscalls ahead of AES-GCM itself. One read of up to 64 KiB (four full
/// records) now serves the next requests from memory.
pub const READ_AHEAD: usize = 64 * 1024;

impl<S> RecordBounded<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            header: [0; 5],
            header_len: 0,
            body_left: 0,
            bounded: true,
            ahead: Vec::new(),
            pos: 0,
            end: 0,
        }
    }
    pub fn at_boundary(&self) -> bool {
        self.bounded && self.header_len == 0 && self.body_left == 0
    }
    pub fn unbound(&mut self) {
        self.bounded = false;
    }
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordBounded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.bounded {
            if this.pos == this.end {
                if buf.remaining() >= READ_AHEAD {
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                this.ahead.resize(READ_AHEAD, 0);
                let mut fill = ReadBuf::new(&mut this.ahead);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut fill))?;
                (this.pos, this.end) = (0, fill.filled().len());
            }
            let n = (this.end - this.pos).min(buf.remaining());
            buf.put_slice(&this.ahead[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        let want = if this.body_left > 0 {
            this.body_left
        } else {
            5 - this.header_len
        };
        let room = buf.initialize_unfilled();
        let limit = want.min(room.len());
        let mut part = ReadBuf::new(&mut room[..limit]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        if this.body_left > 0 {
            this.body_left -= n;
        } else {
            this.header[this.header_len..this.header_len + n].copy_from_slice(part.filled());
            this.header_len += n;
            if this.header_len == 5 {
                this.body_left = u16::from_be_bytes([this.header[3], this.header[4]]) as usize;
                this.header_len = 0;
            }
        }
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordBounded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "ktls_tests.rs"]
mod tests;
