//! The per-session tunnel key: the inbound gateway makes a random 256-bit
//! key for a client that asks (`Request.want_tunnel_key`), returns it in the
//! `req` answer only, and the outbound gateway gets it in its own `req`
//! (`Request.tunnel_key`); both mix it into the tunnel's secret. Sessions
//! without one (SciStream 1.2's client, stunnel) are keyed by the uid alone,
//! so their uid is kept out of logs and metrics: they go by a stand-in.

use ring::rand::{SecureRandom, SystemRandom};

use super::error::ControlError;
use super::session::Role;
use crate::dataplane::TunnelKeying;

/// Length of a session key, in bytes.
pub const KEY_LEN: usize = 32;

/// What a `req` carried about the session key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KeyRequest {
    /// Nothing (SciStream 1.2's client, or no key to carry).
    #[default]
    None,
    /// A PROD request asking for a fresh key.
    Wanted,
    /// A CONS request carrying the key its inbound gateway made.
    Given(Vec<u8>),
}

impl KeyRequest {
    /// From `Request.want_tunnel_key` and `Request.tunnel_key`.
    pub fn from_fields(want: bool, key: &[u8]) -> Self {
        match (want, key.is_empty()) {
            (_, false) => Self::Given(key.to_vec()),
            (true, true) => Self::Wanted,
            (false, true) => Self::None,
        }
    }
}

/// What a session's tunnel secret comes from, as `status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// No secret: the backend carries plaintext.
    None,
    /// The uid alone: whoever knows the uid can key the tunnel.
    Uid,
    /// The uid and a random key only the session's client was given.
    Key,
}

impl SecretKind {
    /// `SessionInfo.tunnel_secret`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Uid => "uid",
            Self::Key => "key",
        }
    }
}

/// A session's key and what follows from it.
#[derive(Clone, Debug)]
pub struct SessionKeying {
    pub key: Option<[u8; KEY_LEN]>,
    pub kind: SecretKind,
    /// What logs, metrics and unauthenticated lists call the session: the
    /// uid, or `hidden-<random>` when the uid is the secret.
    pub log_id: String,
}

impl SessionKeying {
    /// Decides a new session's key: makes one for a PROD request that asks,
    /// takes the one a CONS request carries, and none where the backend
    /// cannot use it.
    pub fn for_request(
        uid: &str,
        role: Role,
        keying: TunnelKeying,
        asked: KeyRequest,
    ) -> Result<Self, ControlError> {
        let key = match (role, asked) {
            (Role::Prod, KeyRequest::Given(_)) => {
                return Err(ControlError::InvalidArgument(
                    "tunnel_key is for CONS requests; a PROD request asks for a key with want_tunnel_key".into(),
                ))
            }
            (_, KeyRequest::Given(k)) if k.len() != KEY_LEN => {
                return Err(ControlError::InvalidArgument(format!("tunnel_key has {} bytes, not {KEY_LEN}", k.len())))
            }
            (_, _) if keying != TunnelKeying::SessionKey => None,
            (Role::Cons, KeyRequest::Given(k)) => {
                let mut key = [0u8; KEY_LEN];
                key.copy_from_slice(&k);
                Some(key)
            }
            (Role::Prod, KeyRequest::Wanted) => Some(random_key()?),
            _ => None,
        };
        Ok(Self::new(uid, keying, key))
    }

    /// A session's keying from its key (a restored one: `key` from the store).
    pub fn new(uid: &str, keying: TunnelKeying, key: Option<[u8; KEY_LEN]>) -> Self {
        let kind = match (keying, key) {
            (TunnelKeying::Plaintext, _) => SecretKind::None,
            (TunnelKeying::SessionKey, Some(_)) => SecretKind::Key,
            _ => SecretKind::Uid,
        };
        let log_id = if kind == SecretKind::Uid {
            hidden_id()
        } else {
            uid.to_string()
        };
        Self {
            key: if kind == SecretKind::Key { key } else { None },
            kind,
            log_id,
        }
    }

    /// Whether the uid may be shown to someone who has not proven to own the session.
    pub fn uid_is_public(&self) -> bool {
        self.kind != SecretKind::Uid
    }
}

fn random_key() -> Result<[u8; KEY_LEN], ControlError> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new().fill(&mut key).map_err(|_| {
        ControlError::FailedPrecondition("the system's random number generator failed".into())
    })?;
    Ok(key)
}

/// A stand-in name, random so that it says nothing about the uid.
fn hidden_id() -> String {
    let mut b = [0u8; 6];
    // On a failure of the generator the name is merely less unique.
    let _ = SystemRandom::new().fill(&mut b);
    format!("hidden-{}", hex(&b))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a key written with [`hex`]; `None` unless it is exactly [`KEY_LEN`] bytes.
pub fn parse_hex_key(s: &str) -> Option<[u8; KEY_LEN]> {
    let s = s.trim();
    if s.len() != 2 * KEY_LEN || !s.is_ascii() {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (i, out) in key.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0c1f7c2e-5b9a-4a53-9f55-2f3f0c8f1d7e";

    #[test]
    fn a_prod_request_that_asks_gets_a_fresh_random_key() {
        let a = SessionKeying::for_request(
            UID,
            Role::Prod,
            TunnelKeying::SessionKey,
            KeyRequest::Wanted,
        )
        .unwrap();
        let b = SessionKeying::for_request(
            UID,
            Role::Prod,
            TunnelKeying::SessionKey,
            KeyRequest::Wanted,
        )
        .unwrap();
        assert_eq!(a.kind, SecretKind::Key);
        assert_ne!(a.key, b.key, "each session its own key");
        assert_ne!(a.key, Some([0u8; KEY_LEN]));
        assert_eq!(a.log_id, UID, "the uid is no secret then");
    }

    #[test]
    fn sessions_keyed_by_their_uid_go_by_a_stand_in() {
        for (role, keying, asked) in [
            (Role::Prod, TunnelKeying::SessionKey, KeyRequest::None),
            (Role::Cons, TunnelKeying::SessionKey, KeyRequest::None),
            (Role::Prod, TunnelKeying::Uid, KeyRequest::Wanted),
            (
                Role::Cons,
                TunnelKeying::Uid,
                KeyRequest::Given(vec![7; KEY_LEN]),
            ),
        ] {
            let k = SessionKeying::for_request(UID, role, keying, asked.clone()).unwrap();
            assert_eq!(
                (k.kind, k.key),
                (SecretKind::Uid, None),
                "{role:?} {keying:?} {asked:?}"
            );
            assert!(
                k.log_id.starts_with("hidden-") && !k.log_id.contains(&UID[..8]),
                "{}",
                k.log_id
            );
            assert!(!k.uid_is_public());
        }
        let plain = SessionKeying::for_request(
            UID,
            Role::Prod,
            TunnelKeying::Plaintext,
            KeyRequest::Wanted,
        )
        .unwrap();
        assert_eq!(
            (plain.kind, plain.key, plain.log_id.as_str()),
            (SecretKind::None, None, UID)
        );
    }

    #[test]
    fn a_cons_request_keeps_the_key_it_carries_and_bad_keys_are_refused() {
        let k = SessionKeying::for_request(
            UID,
            Role::Cons,
            TunnelKeying::SessionKey,
            KeyRequest::Given(vec![9; KEY_LEN]),
        )
        .unwrap();
        assert_eq!((k.kind, k.key), (SecretKind::Key, Some([9; KEY_LEN])));
        let short = SessionKeying::for_request(
            UID,
            Role::Cons,
            TunnelKeying::SessionKey,
            KeyRequest::Given(vec![9; 16]),
        );
        assert!(matches!(short, Err(ControlError::InvalidArgument(_))));
        let on_prod = SessionKeying::for_request(
            UID,
            Role::Prod,
            TunnelKeying::SessionKey,
            KeyRequest::Given(vec![9; KEY_LEN]),
        );
        assert!(matches!(on_prod, Err(ControlError::InvalidArgument(_))));
    }

    #[test]
    fn keys_print_and_parse_back() {
        let key: [u8; KEY_LEN] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(parse_hex_key(&hex(&key)), Some(key));
        assert_eq!(parse_hex_key("abcd"), None);
        assert_eq!(parse_hex_key(&"zz".repeat(KEY_LEN)), None);
        assert_eq!(KeyRequest::from_fields(true, &[]), KeyRequest::Wanted);
        assert_eq!(KeyRequest::from_fields(false, &[]), KeyRequest::None);
        assert_eq!(
            KeyRequest::from_fields(false, &[1]),
            KeyRequest::Given(vec![1])
        );
    }
}
