//! The user-space record layer against a peer that writes records by hand
//! with the real keys of a proven tunnel: valid records pass, and a forged,
//! malformed, oversize or truncated stream is refused with nothing of it
//! reaching the producer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::dataplane::tls::rekey::KeySchedule;
use crate::dataplane::tls::session_auth::{self, SessionSecret};
use crate::dataplane::tls::TlsPump;
use crate::dataplane::{SessionSpec, Side, Stats};

const UID: &str = "5b1c0e7a-2d4f-4a8b-9c6e-7f1a2b3c4d5e";

fn pump() -> Arc<TlsPump> {
    static ID: std::sync::OnceLock<crate::tls::Identity> = std::sync::OnceLock::new();
    let id = ID.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ss-records-{}", std::process::id()));
        crate::tls::server_identity(None, None, &dir, "127.0.0.1".parse().unwrap())
            .expect("identity")
    });
    Arc::new(TlsPump::new(id, None, Duration::from_secs(5)).expect("pump"))
}

/// An inbound gateway (the pump in user-space records) in front of a
/// producer that counts what it receives.
struct Inbound {
    tunnel: SocketAddr,
    relay: tokio::task::JoinHandle<io::Result<()>>,
    producer: tokio::task::JoinHandle<Vec<u8>>,
}

async fn inbound() -> Inbound {
    let tunnel_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel = tunnel_listener.local_addr().unwrap();
    let producer_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let producer_addr = producer_listener.local_addr().unwrap();
    let relay = tokio::spawn(async move {
        let (s, _) = tunnel_listener.accept().await.unwrap();
        use crate::dataplane::relay::Pump;
        pump()
            .relay(
                Arc::new(SessionSpec::new(UID, Side::Inbound)),
                s,
                producer_addr,
                Arc::new(Stats::default()),
            )
            .await
    });
    let producer = tokio::spawn(async move {
        let (mut s, _) = producer_listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // A reset after a refused record ends the stream like an EOF here.
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    Inbound {
        tunnel,
        relay,
        producer,
    }
}

/// A real TLS 1.3 client that proves the session, then leaves rustls with
/// the socket and its sending key, to write records by hand.
async fn proven_client(tunnel: SocketAddr) -> (TcpStream, RecordKey) {
    let (tcp, key, _) = proven_client_with(tunnel, crate::tls::provider()).await;
    (tcp, key)
}

/// As [`proven_client`] over `provider` (the server follows the client's
/// suite order), with the key schedule for the client's next sending keys.
async fn proven_client_with(
    tunnel: SocketAddr,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> (TcpStream, RecordKey, KeySchedule) {
    let log = Arc::new(crate::dataplane::tls::rekey::SecretLog::default());
    let mut cfg = (*crate::tls::tunnel_client_config_with(None, provider).unwrap()).clone();
    cfg.key_log = log.clone();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(tunnel).await.unwrap();
    let mut tls = connector
        .connect(ServerName::IpAddress(tunnel.ip().into()), tcp)
        .await
        .unwrap();
    session_auth::prove(
        &mut tls,
        &SessionSecret::derive(UID, None),
        session_auth::Role::Client,
    )
    .await
    .unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    let (tcp, conn) = tls.into_inner();
    let secrets = conn.dangerous_extract_secrets().unwrap();
    let schedule = KeySchedule::new(&log, true, suite, &secrets).unwrap();
    (
        tcp,
        RecordKey::from_extracted(&secrets.tx).unwrap(),
        schedule,
    )
}

fn record(key: &mut RecordKey, kind: u8, payload: &[u8]) -> Vec<u8> {
    key.seal_record(kind, payload).unwrap()
}

async fn refused(gw: Inbound) -> (io::Error, Vec<u8>) {
    let e = tokio::time::timeout(Duration::from_secs(10), gw.relay)
        .await
        .expect("the relay ended")
        .unwrap()
        .expect_err("refused");
    (e, gw.producer.await.unwrap())
}

#[tokio::test]
async fn hand_written_records_pass_and_a_clean_close_ends_the_stream() {
    let gw = inbound().await;
    let (mut tcp, mut key) = proven_client(gw.tunnel).await;
    let mut wire = record(&mut key, APPLICATION_DATA, b"first ");
    // Padding after the content type is allowed (RFC 8446 5.4).
    let mut padded = b"second".to_vec();
    padded.push(APPLICATION_DATA);
    padded.extend_from_slice(&[0; 40]);
    wire.extend(record(&mut key, 0, &padded));
    wire.extend(record(&mut key, ALERT, &[1, 0]));
    tcp.write_all(&wire).await.unwrap();
    tcp.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), gw.relay)
        .await
        .unwrap()
        .unwrap()
        .expect("a clean stream");
    assert_eq!(gw.producer.await.unwrap(), b"first second");
}

#[tokio::test]
async fn a_tampered_record_is_refused_after_the_good_ones() {
    let gw = inbound().await;
    let (mut tcp, mut key) = proven_client(gw.tunnel).await;
    tcp.write_all(&record(&mut key, APPLICATION_DATA, b"good"))
        .await
        .unwrap();
    let mut bad = record(&mut key, APPLICATION_DATA, b"evil bytes");
    bad[HEADER + 2] ^= 1;
    tcp.write_all(&bad).await.unwrap();
    let (e, got) = refused(gw).await;
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("authentication"), "{e}");
    assert_eq!(
        got, b"good",
        "only the authentic record reached the producer"
    );
}

#[tokio::test]
async fn a_replayed_record_is_refused() {
    let gw = inbound().await;
    let (mut tcp, mut key) = proven_client(gw.tunnel).await;
    let r = record(&mut key, APPLICATION_DATA, b"once");
    tcp.write_all(&r).await.unwrap();
    tcp.write_all(&r).await.unwrap();
    let (e, got) = refused(gw).await;
    assert!(e.to_string().contains("authentication"), "{e}");
    assert_eq!(got, b"once");
}

#[tokio::test]
async fn plaintext_garbage_after_the_proof_is_refused() {
    let gw = inbound().await;
    let (mut tcp, _key) = proven_client(gw.tunnel).await;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (e, got) = refused(gw).await;
    assert!(
        e.to_string().contains("not a TLS 1.3 protected record"),
        "{e}"
    );
    assert!(got.is_empty());
}

#[tokio::test]
async fn an_oversize_record_is_refused_before_it_is_buffered() {
    let gw = inbound().await;
    let (mut tcp, _key) = proven_client(gw.tunnel).await;
    let len = (MAX_CIPHERTEXT + 1) as u16;
    let [hi, lo] = len.to_be_bytes();
    tcp.write_all(&[APPLICATION_DATA, 3, 3, hi, lo])
        .await
        .unwrap();
    let (e, got) = refused(gw).await;
    assert!(e.to_string().contains("record_overflow"), "{e}");
    assert!(got.is_empty());
}

#[tokio::test]
async fn an_eof_without_close_notify_is_a_truncation() {
    let gw = inbound().await;
    let (mut tcp, mut key) = proven_client(gw.tunnel).await;
    tcp.write_all(&record(&mut key, APPLICATION_DATA, b"part"))
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let (e, got) = refused(gw).await;
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    assert_eq!(
        got, b"part",
        "the producer saw the bytes, then a reset rather than a clean end"
    );
}

#[tokio::test]
async fn a_record_after_close_notify_is_refused() {
    let gw = inbound().await;
    let (mut tcp, mut key) = proven_client(gw.tunnel).await;
    let mut wire = record(&mut key, ALERT, &[1, 0]);
    wire.extend(record(&mut key, APPLICATION_DATA, b"late"));
    tcp.write_all(&wire).await.unwrap();
    let (e, got) = refused(gw).await;
    assert!(e.to_string().contains("after its close_notify"), "{e}");
    assert!(got.is_empty());
}

#[tokio::test]
async fn a_handshake_record_other_than_key_update_is_refused() {
    let gw = inbound().await;
    let (mut tcp, mut key) = proven_client(gw.tunnel).await;
    // A NewSessionTicket-like message: no tickets are part of this protocol.
    tcp.write_all(&record(&mut key, HANDSHAKE, &[4, 0, 0, 2, 0, 0]))
        .await
        .unwrap();
    let (e, got) = refused(gw).await;
    assert!(e.to_string().contains("not one KeyUpdate"), "{e}");
    assert!(got.is_empty());
}

/// Every suite the gateways offer works in the record layer, through a
/// KeyUpdate from the peer (AES-256-GCM's schedule runs on SHA-384).
#[tokio::test]
async fn every_offered_suite_carries_records_through_a_key_update() {
    for suite in [
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let mut provider = (*crate::tls::provider()).clone();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        assert_eq!(provider.cipher_suites.len(), 1, "{suite:?} is offered");
        let gw = inbound().await;
        let (mut tcp, mut key, mut schedule) =
            proven_client_with(gw.tunnel, Arc::new(provider)).await;
        let mut wire = record(&mut key, APPLICATION_DATA, b"before ");
        wire.extend(record(&mut key, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0]));
        let mut key = RecordKey::next(schedule.next_tx_key()).unwrap();
        wire.extend(record(&mut key, APPLICATION_DATA, b"after"));
        wire.extend(record(&mut key, ALERT, &[1, 0]));
        tcp.write_all(&wire).await.unwrap();
        tcp.shutdown().await.unwrap();
        let relay = tokio::time::timeout(Duration::from_secs(10), gw.relay)
            .await
            .unwrap()
            .unwrap();
        relay.unwrap_or_else(|e| panic!("{suite:?}: {e}"));
        assert_eq!(gw.producer.await.unwrap(), b"before after", "{suite:?}");
    }
}
