//! The `tls` tunnel in user space between two real pumps over loopback:
//! forced re-keys mid-stream keep every byte, and a proven peer that floods
//! KeyUpdates is cut off without a byte reaching the producer while another
//! connection of the session streams on.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::dataplane::test_support::{half_close_exchange, pair};

const UID: &str = "3f2a9c1e-8b7d-4e6f-a5c4-1d2e3f4a5b6c";

/// One generated identity for every test of this process (tests run in
/// parallel and would race generating it).
fn identity() -> &'static crate::tls::Identity {
    static ID: std::sync::OnceLock<crate::tls::Identity> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ss-tls-pump-{}", std::process::id()));
        crate::tls::server_identity(None, None, &dir, "127.0.0.1".parse().unwrap())
            .expect("identity")
    })
}

fn pump(rekey_every: Option<u64>) -> Arc<TlsPump> {
    pump_with(rekey_every, true)
}

/// `user_records`: after the proof, the user-space record layer (else
/// rustls' buffered stream carries the tunnel).
fn pump_with(rekey_every: Option<u64>, user_records: bool) -> Arc<TlsPump> {
    let mut p = TlsPump::new(identity(), None, Duration::from_secs(5)).expect("pump");
    // The host has no kernel TLS; pin user space so the test means the same everywhere.
    p.tier = Tier::Rustls {
        reason: "test".into(),
    };
    p.rekey_every = rekey_every;
    p.user_records = user_records;
    Arc::new(p)
}

fn spec(side: Side) -> Arc<SessionSpec> {
    Arc::new(SessionSpec::new(UID, side))
}

/// consumer app <-> outbound pump ==TLS== inbound pump <-> producer app:
/// the consumer sends `data` and half-closes, the producer reads it to EOF
/// and answers "ack". Returns what the producer got.
async fn stream_through(outbound: Arc<TlsPump>, inbound: Arc<TlsPump>, data: Vec<u8>) -> Vec<u8> {
    let tunnel_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel_addr = tunnel_listener.local_addr().unwrap();
    let producer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let producer_addr = producer.local_addr().unwrap();
    let inbound_side = async move {
        let (s, _) = tunnel_listener.accept().await.unwrap();
        inbound
            .relay(
                spec(Side::Inbound),
                s,
                producer_addr,
                Arc::new(Stats::default()),
            )
            .await
    };
    let (consumer, relay_end) = pair().await;
    let outbound_side = outbound.relay(
        spec(Side::Outbound),
        relay_end,
        tunnel_addr,
        Arc::new(Stats::default()),
    );
    let apps = async move {
        let (app_b, _) = producer.accept().await.unwrap();
        half_close_exchange(consumer, app_b, data).await
    };
    let (i, o, (reply, got)) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(inbound_side, outbound_side, apps)
    })
    .await
    .expect("the stream finished");
    i.expect("inbound relay");
    o.expect("outbound relay");
    assert_eq!(reply, b"ack");
    got
}

#[tokio::test]
async fn forced_rekeys_mid_stream_keep_every_byte() {
    let (outbound, inbound) = (pump(Some(256 * 1024)), pump(Some(256 * 1024)));
    let data: Vec<u8> = (0..8_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let got = stream_through(outbound.clone(), inbound.clone(), data.clone()).await;
    assert!(got == data, "bytes differ after re-keys");
    // 8 MB at one update per 256 KiB sent.
    let rekeys = outbound.rekeys.load(Ordering::Relaxed);
    assert!(rekeys >= 25, "only {rekeys} key updates were sent");
}

/// The record layer against rustls itself, each side forcing KeyUpdates
/// (rustls asks the peer to answer each one), in both placements.
#[tokio::test]
async fn user_space_records_and_rustls_interoperate_through_key_updates() {
    let data: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2246822519) >> 24) as u8)
        .collect();
    for records_outbound in [true, false] {
        let outbound = pump_with(Some(200 * 1024), records_outbound);
        let inbound = pump_with(Some(300 * 1024), !records_outbound);
        let got = stream_through(outbound.clone(), inbound.clone(), data.clone()).await;
        assert!(
            got == data,
            "bytes differ (records outbound: {records_outbound})"
        );
        // One update per 200 KiB sent, at a boundary of up to 64 KiB (a batch).
        let rekeys = outbound.rekeys.load(Ordering::Relaxed);
        let want = data.len() as u64 / (264 * 1024);
        assert!(rekeys >= want, "only {rekeys} of {want} key updates from the sender (records outbound: {records_outbound})");
    }
}

/// A peer that knows the session secret (so passes the proof), then sends
/// KeyUpdates without any data: each one costs the gateway a key derivation.
async fn keyupdate_storm(tunnel: SocketAddr) -> std::io::Result<u64> {
    let connector = tokio_rustls::TlsConnector::from(
        crate::tls::tunnel_client_config(None).expect("client config"),
    );
    let tcp = TcpStream::connect(tunnel).await?;
    let name = ServerName::IpAddress(tunnel.ip().into());
    let mut tls = connector.connect(name, tcp).await?;
    session_auth::prove(
        &mut tls,
        &SessionSecret::derive(UID, None),
        session_auth::Role::Client,
    )
    .await?;
    for _ in 0..200 {
        tls.get_mut()
            .1
            .refresh_traffic_keys()
            .map_err(std::io::Error::other)?;
        if tls.flush().await.is_err() {
            break;
        }
    }
    // The gateway must hang up: EOF or an error, never data.
    let mut buf = [0u8; 1024];
    let mut got = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Err(_) => panic!("the gateway kept a KeyUpdate flooder connected"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got += n as u64,
        }
    }
}

#[tokio::test]
async fn keyupdate_storm_is_cut_off_while_another_connection_streams() {
    let inbound = pump(None);
    let producer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let producer_addr = producer.local_addr().unwrap();
    let tunnel_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel_addr = tunnel_listener.local_addr().unwrap();
    let stats = Arc::new(Stats::default());

    // The flooder's connection, relayed by the inbound pump like any other.
    let gateway = {
        let (inbound, stats) = (inbound.clone(), stats.clone());
        tokio::spawn(async move {
            let (s, _) = tunnel_listener.accept().await.unwrap();
            inbound
                .relay(spec(Side::Inbound), s, producer_addr, stats)
                .await
        })
    };
    // The producer end of the flooder's connection counts what reaches it.
    let producer_side = tokio::spawn(async move {
        let (mut s, _) = producer.accept().await.unwrap();
        let mut n = 0u64;
        let mut buf = [0u8; 4096];
        while let Ok(k) = s.read(&mut buf).await {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    // Meanwhile a legitimate connection streams through another pair of pumps.
    let honest = tokio::spawn(stream_through(
        pump(None),
        inbound.clone(),
        vec![9u8; 4_000_000],
    ));

    let echoed = keyupdate_storm(tunnel_addr)
        .await
        .expect("the flooder passes the proof");
    assert_eq!(echoed, 0, "the gateway answered the flooder with data");
    let result = tokio::time::timeout(Duration::from_secs(10), gateway)
        .await
        .expect("relay ended")
        .unwrap();
    let e = result.expect_err("the flooder's connection must end in an error");
    assert!(
        e.to_string().to_lowercase().contains("keyupdate") || e.to_string().contains("key update"),
        "{e}"
    );
    assert_eq!(
        producer_side.await.unwrap(),
        0,
        "bytes reached the producer"
    );
    assert_eq!(
        honest.await.unwrap(),
        vec![9u8; 4_000_000],
        "the other connection kept streaming"
    );
}
