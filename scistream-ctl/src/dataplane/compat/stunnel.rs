//! `StunnelSubprocess`: the real stunnel, one process per session, configured
//! as SciStream 1.2 configures it so the two can pair (the PSK identity
//! `client1`, the key the uid without dashes, client mode on the CONS side),
//! but with authenticated encryption only: PSK cipher suites with AES-GCM or
//! ChaCha20-Poly1305, never the NULL cipher SciStream 1.2 asks for.
//!
//! A SciStream 1.2 gateway interoperates once its template's `ciphers =
//! eNULL` reads `ciphers = PSK`; as shipped it offers only NULL ciphers,
//! which this side refuses (the handshake fails with "no shared cipher").

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{Compat, Listeners, Retarget};
use crate::dataplane::{SessionSpec, Side, TunnelKeying};

/// The PSK identity SciStream 1.2 writes in its key file.
pub const PSK_IDENTITY: &str = "client1";

/// TLS 1.2 PSK suites: AEAD only. `PSK` alone would also pull in CBC suites;
/// none of these is NULL or anonymous.
pub const TLS12_CIPHERS: &str =
    "kPSK+AESGCM:kDHEPSK+AESGCM:kECDHEPSK+CHACHA20:kDHEPSK+CHACHA20:kPSK+CHACHA20";
/// TLS 1.3 suites (used with the external PSK when both ends allow 1.3).
pub const TLS13_SUITES: &str =
    "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// The pre-shared key of a session, as SciStream 1.2 derives it.
pub fn psk_of(uid: &str) -> String {
    uid.replace('-', "")
}

pub struct Stunnel;

/// stunnel's `host:port`; it splits at the last colon, so IPv6 needs no brackets.
fn addr(a: SocketAddr) -> String {
    format!("{}:{}", a.ip(), a.port())
}

/// The whole stunnel config of a session; `key_file` holds `client1:<psk>`.
pub fn config(
    spec: &SessionSpec,
    listeners: &[SocketAddr],
    targets: &[SocketAddr],
    key_file: &Path,
) -> String {
    let client = if spec.side == Side::Outbound {
        "yes"
    } else {
        "no"
    };
    let mut c = format!(
        "; scistream-rs StunnelSubprocess, session {id}\n\
         foreground = yes\n\
         pid =\n\
         syslog = no\n\
         debug = 5\n",
        id = spec.log_id
    );
    for (i, (l, t)) in listeners.iter().zip(targets.iter().cycle()).enumerate() {
        let _ = write!(
            c,
            "\n[{i}]\nclient = {client}\naccept = {}\nconnect = {}\nPSKsecrets = {}\n",
            addr(*l),
            addr(*t),
            key_file.display()
        );
        if spec.side == Side::Outbound {
            let _ = writeln!(c, "PSKidentity = {PSK_IDENTITY}");
        }
        let _ = write!(
            c,
            "sslVersionMin = TLSv1.2\nciphers = {TLS12_CIPHERS}\nciphersuites = {TLS13_SUITES}\n"
        );
    }
    c
}

impl Compat for Stunnel {
    const NAME: &'static str = "StunnelSubprocess";
    const PROGRAM: &'static str = "stunnel";
    const PACKAGE: &'static str = "stunnel4";
    const KEYING: TunnelKeying = TunnelKeying::Uid;

    fn files(
        &self,
        spec: &SessionSpec,
        listeners: &Listeners,
        targets: &[SocketAddr],
        config_path: &Path,
    ) -> Vec<(&'static str, String)> {
        let key_file = config_path.with_extension("psk");
        vec![
            ("conf", config(spec, &listeners.addrs(), targets, &key_file)),
            ("psk", format!("{PSK_IDENTITY}:{}\n", psk_of(&spec.uid))),
        ]
    }

    fn args(&self, config: &Path) -> Vec<OsString> {
        vec![config.into()]
    }

    fn check_args(&self, _config: &Path) -> Option<Vec<OsString>> {
        // stunnel binds the ports itself: listening on them proves it started.
        None
    }

    fn inherits_listeners(&self) -> bool {
        false
    }

    fn is_error_line(line: &str) -> bool {
        // LOG0..LOG3 are emerg..err: refused handshakes, bind failures.
        ["LOG0[", "LOG1[", "LOG2[", "LOG3["]
            .iter()
            .any(|p| line.contains(p))
            && !line.contains("No trusted certificates")
    }

    fn is_loaded_line(line: &str) -> bool {
        line.contains("Configuration successful")
    }

    fn retarget(&self, _config: &Path, _pid: Pid, _targets: &[SocketAddr]) -> Retarget {
        // stunnel re-reads its config on SIGHUP; live connections go on.
        Retarget::Signal(Signal::SIGHUP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stunnel_config_allows_only_aead_psk_suites() {
        let spec = SessionSpec::new("0f8e2a7c-1b2d-4c3e-9f00-112233445566", Side::Outbound);
        let c = config(
            &spec,
            &["10.0.0.1:5100".parse().unwrap()],
            &["10.0.0.2:5200".parse().unwrap()],
            Path::new("/k.psk"),
        );
        assert!(
            c.contains("client = yes") && c.contains("PSKidentity = client1"),
            "{c}"
        );
        assert!(
            !c.to_ascii_lowercase().contains("null") && !c.contains("securityLevel"),
            "{c}"
        );
        assert_eq!(psk_of(&spec.uid), "0f8e2a7c1b2d4c3e9f00112233445566");
        // What OpenSSL makes of the list: no suite without encryption or authentication.
        if let Ok(out) = std::process::Command::new("openssl")
            .args(["ciphers", "-v", TLS12_CIPHERS])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("PSK-AES256-GCM-SHA384"),
                "{text}"
            );
            for line in text.lines() {
                assert!(
                    !line.contains("Enc=None") && !line.contains("Au=None"),
                    "{line}"
                );
            }
        }
    }
}
