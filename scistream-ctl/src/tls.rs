//! Certificates and TLS configurations: the server identity (given or
//! self-signed on first start), and the TLS 1.3-only configurations of the
//! gateway-to-gateway tunnel.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no certificate usable to verify a peer ({unusable} unparsable)")]
    Unusable { path: PathBuf, unusable: usize },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Where the server's certificate and key live, and their PEM text.
#[derive(Clone)]
pub struct Identity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// True when this start generated the pair.
    pub generated: bool,
}

/// Only AES-GCM (and ChaCha20) TLS 1.3 suites, over ring, AES-128-GCM
/// first: it is TLS 1.3's mandatory suite, 128-bit secure, and its 10 AES
/// rounds against AES-256's 14 make sealing a 16 KiB record about 11 %
/// cheaper here (criterion `tls13_record_16KiB`), on a path where AES-GCM is
/// the largest single cost. rustls' own order puts AES-256 first; a peer
/// that prefers it still gets it.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(0),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(1),
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(2),
        _ => None,
    };
    p.cipher_suites.retain(|s| rank(s).is_some());
    p.cipher_suites.sort_by_key(rank);
    Arc::new(p)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey { path: path.into() })
}

/// Resolves the server identity: explicit paths must exist; without them,
/// `./server.crt` + `./server.key` (SciStream's defaults) are used when both are
/// present, else a self-signed pair for `listener_ip` is kept in `state_dir`.
pub fn server_identity(
    crt: Option<&Path>,
    key: Option<&Path>,
    state_dir: &Path,
    listener_ip: IpAddr,
) -> Result<Identity, TlsError> {
    let (cert_path, key_path) = match (crt, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
        (Some(c), None) => (c.to_path_buf(), c.with_extension("key")),
        (None, Some(k)) => (k.with_extension("crt"), k.to_path_buf()),
        (None, None) => {
            let (c, k) = (PathBuf::from("server.crt"), PathBuf::from("server.key"));
            if c.is_file() && k.is_file() {
                (c, k)
            } else {
                return self_signed(state_dir, listener_ip);
            }
        }
    };
    Ok(Identity {
        cert_pem: read(&cert_path)?,
        key_pem: read(&key_path)?,
        cert_path,
        key_path,
        generated: false,
    })
}

/// Names a generated certificate covers: the listener address, loopback and
/// the host name, so local clients can verify it too.
fn subject_names(listener_ip: IpAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listener_ip.is_unspecified() {
        names.insert(0, listener_ip.to_string());
    }
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str().filter(|h| !h.is_empty() && *h != "localhost") {
            names.push(h.to_string());
        }
    }
    names
}

fn self_signed(state_dir: &Path, listener_ip: IpAddr) -> Result<Identity, TlsError> {
    let cert_path = state_dir.join("server.crt");
    let key_path = state_dir.join("server.key");
    let names_path = state_dir.join("server.crt.names");
    let names = subject_names(listener_ip);
    let wanted = names.join("\n");
    // Reuse the pair across restarts (peers may have pinned it) unless it was
    // made for other names.
    if cert_path.is_file()
        && key_path.is_file()
        && fs::read_to_string(&names_path).is_ok_and(|s| s == wanted)
    {
        return Ok(Identity {
            cert_pem: read(&cert_path)?,
            key_pem: read(&key_path)?,
            cert_path,
            key_path,
            generated: false,
        });
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Write { path, source }
    };
    fs::create_dir_all(state_dir).map_err(write_err(state_dir))?;
    let _ = fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700));
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.clone())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0].clone());
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "scistream-rs gateway");
    let cert = params.self_signed(&key)?;
    let cert_pem = cert.pem().into_bytes();
    let key_pem = key.serialize_pem().into_bytes();
    write_private(&key_path, &key_pem).map_err(write_err(&key_path))?;
    // Not secret, but the state directory keeps every file 0600.
    write_private(&cert_path, &cert_pem).map_err(write_err(&cert_path))?;
    write_private(&names_path, wanted.as_bytes()).map_err(write_err(&names_path))?;
    Ok(Identity {
        cert_path,
        key_path,
        cert_pem,
        key_pem,
        generated: true,
    })
}

/// Writes a secret with mode 0600 from the start (never briefly world-readable).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(tmp, path)
}

/// Tunnel server side (inbound gateway): TLS 1.3 only, AES-GCM, no tickets.
pub fn tunnel_server_config(id: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&id.cert_path)?;
    let key = load_key(&id.key_path)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    // The data plane hands the traffic keys to kernel TLS when it can.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Tunnel client side (outbound gateway). With a certificate file the inbound
/// gateway's certificate is verified against it ([`crate::trust`]: the very
/// certificate if self-signed, else one it signed); without, the channel is encrypted but
/// the peer is unauthenticated (the caller warns).
pub fn tunnel_client_config(peer_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    tunnel_client_config_with(peer_ca, provider())
}

/// As [`tunnel_client_config`] over another provider (tests narrow it to
/// one cipher suite).
pub(crate) fn tunnel_client_config_with(
    peer_ca: Option<&Path>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match peer_ca {
        Some(path) => builder
            .dangerous()
            .with_custom_certificate_verifier(crate::trust::TrustFile::load(
                path,
                provider.clone(),
            )?)
            .with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoPeerVerification(provider)))
            .with_no_client_auth(),
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    // The data plane hands the traffic keys to kernel TLS when it can.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Accepts any certificate but still checks the handshake signatures, so the
/// channel is encrypted to whoever holds the presented key.
#[derive(Debug)]
struct NoPeerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoPeerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_is_generated_once_with_a_private_key_file() {
        let dir = std::env::temp_dir().join(format!("ss-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let a = server_identity(None, None, &dir, ip).unwrap();
        assert!(a.generated);
        let mode = fs::metadata(&a.key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = server_identity(None, None, &dir, ip).unwrap();
        assert!(
            !b.generated,
            "an existing pair for the same names is reused"
        );
        assert_eq!(a.cert_pem, b.cert_pem);
        let c = server_identity(None, None, &dir, "10.1.2.4".parse().unwrap()).unwrap();
        assert!(c.generated, "a new listener address gets a new certificate");
        tunnel_server_config(&c).unwrap();
        tunnel_client_config(Some(&c.cert_path)).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn explicit_missing_certificate_is_an_error_naming_the_file() {
        let e = server_identity(
            Some(Path::new("/nonexistent/x.crt")),
            None,
            Path::new("/tmp"),
            "0.0.0.0".parse().unwrap(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/x.crt"), "{e}");
    }
}
