//! Unit tests of `rekey.rs`.

use super::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A real rustls handshake over loopback with a SecretLog on each side;
/// returns both ends (client, server) and their logs.
async fn handshake() -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Arc<SecretLog>,
    Arc<SecretLog>,
) {
    // Generated once: tests run in parallel and would race writing it.
    static ID: std::sync::OnceLock<crate::tls::Identity> = std::sync::OnceLock::new();
    let id = ID.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ss-ktls-rekey-{}", std::process::id()));
        crate::tls::server_identity(None, None, &dir, "127.0.0.1".parse().unwrap())
            .expect("identity")
    });
    let (clog, slog) = (
        Arc::new(SecretLog::default()),
        Arc::new(SecretLog::default()),
    );
    let mut ccfg = (*crate::tls::tunnel_client_config(None).unwrap()).clone();
    ccfg.key_log = clog.clone();
    let mut scfg = (*crate::tls::tunnel_server_config(id).unwrap()).clone();
    scfg.key_log = slog.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = async {
        let (s, _) = l.accept().await.unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(scfg))
            .accept(s)
            .await
            .unwrap()
    };
    let client = async {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        tokio_rustls::TlsConnector::from(Arc::new(ccfg))
            .connect(name, s)
            .await
            .unwrap()
    };
    let (c, s) = tokio::join!(client, server);
    (c, s, clog, slog)
}

fn key_of(info: &TlsCryptoInfo) -> Vec<u8> {
    match info {
        TlsCryptoInfo::Aes128Gcm(i) => [&i.salt[..], &i.iv[..], &i.key[..]].concat(),
        TlsCryptoInfo::Aes256Gcm(i) => [&i.salt[..], &i.iv[..], &i.key[..]].concat(),
        TlsCryptoInfo::Chacha20Poly1305(i) => [&i.iv[..], &i.key[..]].concat(),
    }
}

fn extracted_key(s: &rustls::ConnectionTrafficSecrets) -> Vec<u8> {
    let (_, key, iv) = split_secrets(s).unwrap();
    [iv, key].concat()
}

/// The derivation must give exactly the keys rustls itself moves to
/// after a KeyUpdate: otherwise the kernel would decrypt garbage.
#[tokio::test]
async fn derived_next_keys_equal_the_keys_rustls_uses_after_a_key_update() {
    let (mut c, mut s, clog, slog) = handshake().await;
    let suite = c.get_ref().1.negotiated_cipher_suite().unwrap();
    // Schedules at generation 0, from copies of what the logs caught.
    let copy = |log: &SecretLog| {
        let l = SecretLog::default();
        *l.client.lock().unwrap() = log
            .client
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| Secret(s.0.clone()));
        *l.server.lock().unwrap() = log
            .server
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| Secret(s.0.clone()));
        l
    };
    let (clog0, slog0) = (copy(&clog), copy(&slog));

    // The client updates its sending key (and asks the server to update
    // too); data after it proves both sides switched.
    c.get_mut().1.refresh_traffic_keys().unwrap();
    c.write_all(b"after").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    s.write_all(b"reply").await.unwrap();
    s.flush().await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"reply");

    let (_, cconn) = c.into_inner();
    let cx = cconn.dangerous_extract_secrets().unwrap();
    let (_, sconn) = s.into_inner();
    let sx = sconn.dangerous_extract_secrets().unwrap();
    // The extracted keys are one generation on; the schedule finds them.
    let mut cks = KeySchedule::new(&clog, true, suite, &cx).expect("client schedule");
    let mut sks = KeySchedule::new(&slog, false, suite, &sx).expect("server schedule");
    // From generation 0, one step lands on what rustls uses now.
    let cipher = split_secrets(&cx.tx.1).unwrap().0;
    let (mut c0, mut s0) = (
        copy_schedule(&clog0, true, suite, cipher),
        copy_schedule(&slog0, false, suite, cipher),
    );
    assert_eq!(key_of(&c0.next_tx()), extracted_key(&cx.tx.1));
    assert_eq!(key_of(&s0.next_rx()), extracted_key(&sx.rx.1));
    assert_eq!(key_of(&s0.next_tx()), extracted_key(&sx.tx.1));
    assert_eq!(key_of(&c0.next_rx()), extracted_key(&cx.rx.1));
    // And both schedules agree on every later generation.
    for _ in 0..3 {
        assert_eq!(key_of(&cks.next_tx()), key_of(&sks.next_rx()));
        assert_eq!(key_of(&sks.next_tx()), key_of(&cks.next_rx()));
    }
}

/// A schedule at generation 0 straight from a log (no extracted keys to
/// check against).
fn copy_schedule(
    log: &SecretLog,
    is_client: bool,
    suite: SupportedCipherSuite,
    cipher: Cipher,
) -> KeySchedule {
    let SupportedCipherSuite::Tls13(suite) = suite else {
        panic!("TLS 1.3")
    };
    let (client, server) = (log.take(true).unwrap(), log.take(false).unwrap());
    let (tx, rx) = if is_client {
        (client, server)
    } else {
        (server, client)
    };
    KeySchedule {
        suite,
        cipher,
        tx,
        rx,
    }
}

/// A schedule from a real handshake, for the budget tests.
async fn schedule() -> KeySchedule {
    let (c, _s, clog, _slog) = handshake().await;
    let suite = c.get_ref().1.negotiated_cipher_suite().unwrap();
    let (_, conn) = c.into_inner();
    KeySchedule::new(
        &clog,
        true,
        suite,
        &conn.dangerous_extract_secrets().unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_key_update_falls_due_after_the_knobs_bytes_and_only_once() {
    let counter = AtomicU64::new(0);
    let r = Rekey::new(schedule().await, Some(1000), &counter);
    r.sent(600);
    assert_eq!(r.updates.due(), None);
    r.sent(600);
    assert_eq!(
        r.updates.due(),
        Some(true),
        "due, asking the peer to update too"
    );
    r.sent(5000);
    assert_eq!(
        counter.load(Ordering::Relaxed),
        1,
        "one update pending, not one per splice"
    );
}

#[tokio::test]
async fn a_key_update_falls_due_before_the_record_budget_without_the_knob() {
    let counter = AtomicU64::new(0);
    let r = Rekey::new(schedule().await, None, &counter);
    // Full records: one splice of (budget - 2) records counts budget - 1.
    r.sent(((RECORD_BUDGET - 2) * RECORD_PAYLOAD) as usize);
    assert_eq!(r.updates.due(), None);
    // A splice of one byte counts as up to two records (a full and a partial one).
    r.sent(1);
    assert_eq!(r.updates.due(), Some(true));
}

/// The user-space tier counts exact records: the budget alone makes an
/// update of ours due, and after it goes out both counts start afresh.
#[tokio::test]
async fn our_update_falls_due_at_the_record_budget_and_counting_restarts_after_it() {
    let counter = AtomicU64::new(0);
    let u = KeyUpdates::new(schedule().await, None, &counter);
    u.sent(1, RECORD_BUDGET - 1);
    assert_eq!(u.due(), None);
    u.sent(1, 1);
    assert_eq!(u.due(), Some(true));
    u.sent_key_update(|keys| Ok(keys.next_tx_key())).unwrap();
    assert_eq!(u.due(), None, "sent, so no longer due");
    u.sent(1, RECORD_BUDGET - 1);
    assert_eq!(u.due(), None, "the budget counts from the update on");
    assert_eq!(counter.load(Ordering::Relaxed), 1);
}

/// A peer's request is answered once, before our next data; when our own
/// update is already due, that one answers it and nothing more is sent.
#[tokio::test]
async fn a_peer_request_is_answered_once_and_not_when_ours_is_already_due() {
    let counter = AtomicU64::new(0);
    let u = KeyUpdates::new(schedule().await, Some(1000), &counter);
    u.peer_key_update(true, |keys| Ok(keys.next_rx_key()))
        .unwrap();
    assert_eq!(u.due(), Some(false), "an answer, not a request of ours");
    u.received_data();
    u.peer_key_update(true, |keys| Ok(keys.next_rx_key()))
        .unwrap();
    assert_eq!(u.due(), Some(false), "still one answer");
    u.sent_key_update(|keys| Ok(keys.next_tx_key())).unwrap();
    assert_eq!(u.due(), None);
    assert_eq!(counter.load(Ordering::Relaxed), 0, "answers are not ours");

    u.sent(1000, 1);
    assert_eq!(u.due(), Some(true));
    u.peer_key_update(true, |keys| Ok(keys.next_rx_key()))
        .unwrap();
    assert_eq!(u.due(), Some(true), "ours answers the peer too");
    u.sent_key_update(|keys| Ok(keys.next_tx_key())).unwrap();
    assert_eq!(u.due(), None, "one update for both");
    assert_eq!(counter.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn peer_key_updates_beyond_the_bound_without_data_are_a_flood() {
    let counter = AtomicU64::new(0);
    let u = KeyUpdates::new(schedule().await, None, &counter);
    for _ in 0..MAX_KEYUPDATES_IN_A_ROW {
        u.peer_key_update(false, |keys| Ok(keys.next_rx_key()))
            .unwrap();
    }
    u.received_data();
    for _ in 0..MAX_KEYUPDATES_IN_A_ROW {
        u.peer_key_update(false, |keys| Ok(keys.next_rx_key()))
            .expect("data between runs starts the count afresh");
    }
    let mut installed = false;
    let e = u
        .peer_key_update(false, |_| {
            installed = true;
            Ok(())
        })
        .expect_err("one over the bound");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("(a KeyUpdate flood)"), "{e}");
    assert!(!installed, "no key derived for the flood");
}

// Half of AES-GCM's 2^24 records per key, checked when compiling.
const _: () = assert!(RECORD_BUDGET < 1 << 24);

#[tokio::test]
async fn a_schedule_without_captured_secrets_is_refused() {
    let (c, _s, _clog, _slog) = handshake().await;
    let suite = c.get_ref().1.negotiated_cipher_suite().unwrap();
    let (_, conn) = c.into_inner();
    let x = conn.dangerous_extract_secrets().unwrap();
    let e = KeySchedule::new(&SecretLog::default(), true, suite, &x)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("not captured"), "{e}");
}
