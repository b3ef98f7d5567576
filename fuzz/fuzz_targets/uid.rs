//! Session uids: every RPC carries one, and the tunnel's secret derives from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scistream_ctl::control::error::ControlError;
use scistream_ctl::control::session::parse_uid;
use scistream_ctl::dataplane::tls::session_auth::is_time_based_uid;

fuzz_target!(|text: &str| {
    match parse_uid(text) {
        Ok(uid) => {
            // One spelling per session: registry keys, store keys and secrets use it.
            assert_eq!(uid.len(), 36, "{uid:?}");
            assert_eq!(uid, uid.to_ascii_lowercase());
            assert_eq!(parse_uid(&uid).ok().as_deref(), Some(uid.as_str()));
            assert_eq!(
                uuid::Uuid::try_parse(text.trim()).ok(),
                uuid::Uuid::try_parse(&uid).ok()
            );
        }
        Err(ControlError::InvalidArgument(msg)) => assert!(msg.contains("is not a UUID"), "{msg}"),
        Err(other) => panic!("parse_uid({text:?}) failed with {other:?}, not InvalidArgument"),
    }
    if is_time_based_uid(text) {
        assert!(
            parse_uid(text).is_ok(),
            "{text:?} is a v1 UUID but not a uid"
        );
    }
});
