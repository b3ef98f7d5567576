//! Session authentication of the gateway-to-gateway tunnel. Right after the
//! TLS 1.3 handshake each gateway proves it knows the session secret with an
//! HMAC over a TLS exporter value (RFC 8446 section 7.5) of *this* channel,
//! with a different label per role. A proof cannot be replayed on another
//! connection, and a man in the middle who terminates TLS himself (possible
//! when certificates are not checked) sees a different exporter on each side,
//! so he cannot pass without the secret either.

use std::io;

use ring::hmac;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Length of the secret, the exporter value and the proof.
pub const LEN: usize = 32;

const CLIENT_LABEL: &[u8] = b"EXPORTER-scistream-rs tunnel proof client";
const SERVER_LABEL: &[u8] = b"EXPORTER-scistream-rs tunnel proof server";
/// Domain separation for the secret derived from a uid.
const DERIVE_KEY: &[u8] = b"scistream-rs session secret v1";

/// A session's shared secret. Debug never prints it.
#[derive(Clone)]
pub struct SessionSecret([u8; LEN]);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(..)")
    }
}

impl SessionSecret {
    /// The secret both gateways can compute: SciStream's flow shares only the
    /// uid (and listeners) between the two sides, so the uid is the secret's
    /// source; with our s2uc it carries 122 random bits. An optional
    /// separately supplied key is mixed in when both sides have it.
    pub fn derive(uid: &str, extra_key: Option<&[u8]>) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, DERIVE_KEY);
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(uid.trim().to_ascii_lowercase().as_bytes());
        if let Some(k) = extra_key {
            ctx.update(&[0]);
            ctx.update(k);
        }
        let mut out = [0u8; LEN];
        out.copy_from_slice(ctx.sign().as_ref());
        Self(out)
    }

    fn proof(&self, exporter: &[u8]) -> hmac::Tag {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &self.0), exporter)
    }

    fn verify(&self, exporter: &[u8], proof: &[u8]) -> bool {
        // Constant-time comparison inside ring.
        hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, &self.0), exporter, proof).is_ok()
    }
}

/// Which side of the tunnel we are; the client (outbound gateway) proves first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// Access to the channel's exporter; implemented for both tokio-rustls streams.
pub trait Exporter {
    fn export(&self, label: &[u8]) -> io::Result<[u8; LEN]>;
}

fn export_from<D>(conn: &rustls::ConnectionCommon<D>, label: &[u8]) -> io::Result<[u8; LEN]> {
    conn.export_keying_material([0u8; LEN], label, None)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS exporter: {e}")))
}

impl<S> Exporter for tokio_rustls::server::TlsStream<S> {
    fn export(&self, label: &[u8]) -> io::Result<[u8; LEN]> {
        export_from(self.get_ref().1, label)
    }
}

impl<S> Exporter for tokio_rustls::client::TlsStream<S> {
    fn export(&self, label: &[u8]) -> io::Result<[u8; LEN]> {
        export_from(self.get_ref().1, label)
    }
}

/// The error a failed proof gives; callers count and log it.
pub fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "peer gateway failed the session proof (wrong session secret)",
    )
}

/// Runs the mutual proof on a fresh TLS channel. Returns only when both sides
/// have proven the secret; any other outcome is an error and the caller must
/// drop the connection without forwarding anything.
pub async fn prove<T>(tls: &mut T, secret: &SessionSecret, role: Role) -> io::Result<()>
where
    T: Exporter + AsyncRead + AsyncWrite + Unpin,
{
    let mine = tls.export(if role == Role::Client {
        CLIENT_LABEL
    } else {
        SERVER_LABEL
    })?;
    let theirs = tls.export(if role == Role::Client {
        SERVER_LABEL
    } else {
        CLIENT_LABEL
    })?;
    let mut got = [0u8; LEN];
    match role {
        Role::Client => {
            tls.write_all(secret.proof(&mine).as_ref()).await?;
            tls.flush().await?;
            tls.read_exact(&mut got).await.map_err(|_| refused())?;
            if !secret.verify(&theirs, &got) {
                return Err(refused());
            }
        }
        Role::Server => {
            // The server proves only to a client that proved first, so a
            // prober without the secret learns nothing from us.
            tls.read_exact(&mut got).await.map_err(|_| refused())?;
            if !secret.verify(&theirs, &got) {
                return Err(refused());
            }
            tls.write_all(secret.proof(&mine).as_ref()).await?;
            tls.flush().await?;
        }
    }
    Ok(())
}

/// True for a time-based (version 1) UUID: its bits are guessable from the
/// clock and the host's MAC address, so it makes a weak session secret.
pub fn is_time_based_uid(uid: &str) -> bool {
    uuid::Uuid::try_parse(uid)
        .map(|u| u.get_version_num() == 1)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_depend_on_uid_and_key_but_not_on_case() {
        let a = SessionSecret::derive("0c1f7c2e-5b9a-4a53-9f55-2f3f0c8f1d7e", None);
        let b = SessionSecret::derive("0C1F7C2E-5B9A-4A53-9F55-2F3F0C8F1D7E", None);
        let c = SessionSecret::derive("0c1f7c2e-5b9a-4a53-9f55-2f3f0c8f1d7f", None);
        let d = SessionSecret::derive("0c1f7c2e-5b9a-4a53-9f55-2f3f0c8f1d7e", Some(b"k"));
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, c.0);
        assert_ne!(a.0, d.0);
        assert_eq!(format!("{a:?}"), "SessionSecret(..)");
    }

    #[test]
    fn a_proof_verifies_only_with_the_same_secret_and_exporter() {
        let s = SessionSecret::derive("u", None);
        let p = s.proof(b"exporter-1");
        assert!(s.verify(b"exporter-1", p.as_ref()));
        assert!(!s.verify(b"exporter-2", p.as_ref()));
        assert!(!SessionSecret::derive("v", None).verify(b"exporter-1", p.as_ref()));
    }

    #[test]
    fn version_1_uids_are_recognised() {
        assert!(is_time_based_uid("b6ed52b6-a3a9-11ef-946b-0242ac110003"));
        assert!(!is_time_based_uid(&uuid::Uuid::new_v4().to_string()));
    }
}
