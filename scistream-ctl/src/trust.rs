//! What a certificate file given to trust (`s2uc --server_cert`, `s2cs
//! --peer_ca`) means. SciStream's tutorial makes each gateway's certificate
//! with `openssl req -x509`, which marks it CA:TRUE; webpki refuses such a
//! certificate as a server's own (`CaUsedAsEndEntity`). So a self-signed
//! certificate in the file is pinned: a peer presenting exactly it (byte-equal
//! DER) is accepted once its dates and names check out. Every certificate in
//! the file is also a trust anchor, so a facility CA keeps meaning "anything
//! it signed". Nothing else gets through.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::tls::{load_certs, TlsError};

/// Why a peer's certificate was refused, in words a user can act on. Carried
/// inside rustls' error and recovered by [`explain`].
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "the certificate {peer} presented ({subject}) is not the one in {file} and not signed by it: \
         wrong certificate file, or the gateway changed its certificate?"
    )]
    NotTrusted {
        peer: String,
        subject: String,
        file: PathBuf,
    },
    #[error("the certificate {peer} presented ({subject}) expired on {not_after}; make a new one (its file is {file})")]
    Expired {
        peer: String,
        subject: String,
        not_after: String,
        file: PathBuf,
    },
    #[error("the certificate {peer} presented ({subject}) is not valid before {not_before}: check both hosts' clocks")]
    NotYetValid {
        peer: String,
        subject: String,
        not_before: String,
    },
    #[error(
        "the certificate {peer} presented names {names}, not the address or host dialled: \
         make it with subjectAltName=IP:{peer} (or DNS:), or dial a name it holds"
    )]
    WrongName { peer: String, names: String },
    #[error("the certificate {peer} presented was refused: {reason}")]
    Other { peer: String, reason: String },
}

/// Verifies a peer against one certificate file: pinned self-signed
/// certificates first, then a chain to any certificate in the file.
pub struct TrustFile {
    file: PathBuf,
    pinned: Vec<CertificateDer<'static>>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TrustFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustFile")
            .field("file", &self.file)
            .field("pinned", &self.pinned.len())
            .field("chain", &self.chain.is_some())
            .finish()
    }
}

impl TrustFile {
    /// Reads `file` (PEM, one or more certificates).
    pub fn load(file: &Path, provider: Arc<CryptoProvider>) -> Result<Arc<Self>, TlsError> {
        let certs = load_certs(file)?;
        let pinned: Vec<_> = certs
            .iter()
            .filter(|c| is_self_signed(c))
            .cloned()
            .collect();
        let mut roots = RootCertStore::empty();
        let (_, unusable) = roots.add_parsable_certificates(certs);
        let chain = if roots.is_empty() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?,
            )
        };
        if pinned.is_empty() && chain.is_none() {
            return Err(TlsError::Unusable {
                path: file.into(),
                unusable,
            });
        }
        Ok(Arc::new(Self {
            file: file.into(),
            pinned,
            chain,
            provider,
        }))
    }

    fn refuse(&self, ee: &CertificateDer<'_>, peer: &ServerName<'_>, why: Why) -> rustls::Error {
        let peer = peer.to_str().into_owned();
        let parsed = X509Certificate::from_der(ee).ok().map(|(_, c)| c);
        let subject = parsed
            .as_ref()
            .map_or_else(|| "unparsable".into(), |c| c.subject().to_string());
        let e = match why {
            Why::NotTrusted => TrustError::NotTrusted {
                peer,
                subject,
                file: self.file.clone(),
            },
            Why::Expired => {
                let not_after = parsed
                    .as_ref()
                    .map_or_else(String::new, |c| c.validity().not_after.to_string());
                TrustError::Expired {
                    peer,
                    subject,
                    not_after,
                    file: self.file.clone(),
                }
            }
            Why::NotYetValid => {
                let not_before = parsed
                    .as_ref()
                    .map_or_else(String::new, |c| c.validity().not_before.to_string());
                TrustError::NotYetValid {
                    peer,
                    subject,
                    not_before,
                }
            }
            Why::WrongName => TrustError::WrongName {
                peer,
                names: parsed.as_ref().map_or_else(String::new, names_of),
            },
            Why::Other(reason) => TrustError::Other { peer, reason },
        };
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }

    /// The checks a pinned certificate still gets: dates and names.
    fn check_pinned(
        &self,
        ee: &CertificateDer<'_>,
        peer: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), Why> {
        let (_, cert) =
            X509Certificate::from_der(ee).map_err(|e| Why::Other(format!("unparsable: {e}")))?;
        let now = now.as_secs() as i64;
        if now < cert.validity().not_before.timestamp() {
            return Err(Why::NotYetValid);
        }
        if now > cert.validity().not_after.timestamp() {
            return Err(Why::Expired);
        }
        let parsed = rustls::server::ParsedCertificate::try_from(ee)
            .map_err(|e| Why::Other(e.to_string()))?;
        rustls::client::verify_server_name(&parsed, peer).map_err(|_| Why::WrongName)
    }
}

enum Why {
    NotTrusted,
    Expired,
    NotYetValid,
    WrongName,
    Other(String),
}

impl From<&CertificateError> for Why {
    fn from(e: &CertificateError) -> Self {
        match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Why::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Why::NotYetValid
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Why::WrongName
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Why::NotTrusted,
            CertificateError::Other(o) if format!("{o:?}").contains("CaUsedAsEndEntity") => {
                Why::NotTrusted
            }
            other => Why::Other(other.to_string()),
        }
    }
}

impl ServerCertVerifier for TrustFile {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        peer: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pinned.iter().any(|p| p.as_ref() == ee.as_ref()) {
            return match self.check_pinned(ee, peer, now) {
                Ok(()) => Ok(ServerCertVerified::assertion()),
                Err(why) => Err(self.refuse(ee, peer, why)),
            };
        }
        let Some(chain) = &self.chain else {
            return Err(self.refuse(ee, peer, Why::NotTrusted));
        };
        chain
            .verify_server_cert(ee, intermediates, peer, ocsp, now)
            .map_err(|e| match &e {
                rustls::Error::InvalidCertificate(c) => self.refuse(ee, peer, Why::from(c)),
                _ => e,
            })
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Self-signed: issued by itself (subject = issuer) and its signature checks
/// out with its own key, so a CA-signed leaf is never pinned by mistake.
fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    match X509Certificate::from_der(der) {
        Ok((_, c)) => {
            c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
        }
        Err(_) => false,
    }
}

fn names_of(c: &X509Certificate<'_>) -> String {
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(format!("DNS:{d}")),
                GeneralName::IPAddress(ip) => names.push(match ip.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                    ),
                    16 => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                    ),
                    _ => "IP:?".into(),
                }),
                _ => {}
            }
        }
    }
    if names.is_empty() {
        format!("no subjectAltName ({})", c.subject())
    } else {
        names.join(", ")
    }
}

/// The user-facing reason inside a TLS error, when it is one of ours;
/// otherwise the error's own text. Walks `err`'s sources.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) =
            e.downcast_ref::<rustls::Error>()
        {
            if let Some(t) = o.0.downcast_ref::<TrustError>() {
                return Some(t.to_string());
            }
        }
        if let Some(t) = e.downcast_ref::<TrustError>() {
            return Some(t.to_string());
        }
        // io::Error's source() skips the error it wraps (tokio-rustls puts rustls' there).
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = explain(inner) {
                return Some(found);
            }
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA:TRUE certificate for `ip`, like the tutorial's openssl line makes.
    fn tutorial_like(dir: &Path, name: &str, ip: &str) -> (PathBuf, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![ip.to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, cert.pem()).unwrap();
        (path, cert.der().clone())
    }

    fn verify(
        file: &Path,
        ee: &CertificateDer<'_>,
        ip: &str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let v = TrustFile::load(file, crate::tls::provider()).unwrap();
        let name = ServerName::try_from(ip.to_string()).unwrap();
        v.verify_server_cert(ee, &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn a_self_signed_ca_true_file_trusts_exactly_that_certificate() {
        let dir = std::env::temp_dir().join(format!("ss-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, a_der) = tutorial_like(&dir, "a.crt", "10.0.0.1");
        let (_, b_der) = tutorial_like(&dir, "b.crt", "10.0.0.1");
        assert!(
            verify(&a, &a_der, "10.0.0.1").is_ok(),
            "the pinned certificate itself passes"
        );
        let other = verify(&a, &b_der, "10.0.0.1").unwrap_err();
        assert!(
            explain(&other).unwrap().contains("is not the one in"),
            "{other}"
        );
        let name = verify(&a, &a_der, "10.0.0.2").unwrap_err();
        assert!(
            explain(&name).unwrap().contains("names IP:10.0.0.1"),
            "{name}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
