//! TLS 1.3 record protection per 16 KiB application-data record, in memory
//! (no sockets), per AES-GCM suite: rustls' buffered connection (a client
//! sealing, a server opening; what `SCISTREAM_TLS_RECORDS=rustls` runs) and
//! the `tls` backend's own record layer (sealed and opened in place).
//!
//! `cargo bench -p scistream-benches --bench tls_records`

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    CipherSuite, ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
};

/// The largest TLS plaintext record: what a bulk stream is cut into.
const RECORD: usize = 16 << 10;

/// scistream's provider narrowed to one suite, so each run measures that cipher.
fn provider(suite: CipherSuite) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = (*scistream_ctl::tls::provider()).clone();
    p.cipher_suites.retain(|s| s.suite() == suite);
    assert_eq!(
        p.cipher_suites.len(),
        1,
        "{suite:?} is not in scistream's provider"
    );
    Arc::new(p)
}

/// A connected client/server pair after the TLS 1.3 handshake.
fn handshaken(suite: CipherSuite) -> (ClientConnection, ServerConnection) {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let cert = CertificateDer::from(key.cert.der().to_vec());
    let pkey = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_pair.serialize_der()));
    let server_cfg = ServerConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], pkey)
        .expect("server certificate");
    let mut roots = RootCertStore::empty();
    roots.add(cert).expect("root");
    let client_cfg = ClientConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(Arc::new(client_cfg), name).expect("client");
    let mut server = ServerConnection::new(Arc::new(server_cfg)).expect("server");
    while client.is_handshaking() || server.is_handshaking() {
        shuttle_client_to_server(&mut client, &mut server, &mut Vec::new());
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).expect("server write_tls");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read_tls");
            client.process_new_packets().expect("client handshake");
        }
    }
    (client, server)
}

/// Moves everything the client has queued into the server and processes it.
fn shuttle_client_to_server(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
    wire: &mut Vec<u8>,
) {
    wire.clear();
    while client.wants_write() {
        client.write_tls(wire).expect("client write_tls");
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        server.read_tls(&mut rd).expect("server read_tls");
        server.process_new_packets().expect("server decrypt");
    }
}

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("tls13_record_16KiB");
    group.throughput(Throughput::Bytes(RECORD as u64));
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    let plaintext = vec![0xa5_u8; RECORD];
    for (name, suite) in [
        ("aes128gcm", CipherSuite::TLS13_AES_128_GCM_SHA256),
        ("aes256gcm", CipherSuite::TLS13_AES_256_GCM_SHA384),
    ] {
        // Seal only: the sender's cost per record.
        let (mut client, _server) = handshaken(suite);
        let mut wire = Vec::with_capacity(2 * RECORD);
        group.bench_function(BenchmarkId::new("seal", name), |b| {
            b.iter(|| {
                client.writer().write_all(&plaintext).expect("write");
                wire.clear();
                while client.wants_write() {
                    client.write_tls(&mut wire).expect("write_tls");
                }
                std::hint::black_box(&wire);
            })
        });

        // Seal and open: one gateway encrypting, the other decrypting.
        let (mut client, mut server) = handshaken(suite);
        let mut out = vec![0_u8; RECORD];
        group.bench_function(BenchmarkId::new("seal_open", name), |b| {
            b.iter(|| {
                client.writer().write_all(&plaintext).expect("write");
                shuttle_client_to_server(&mut client, &mut server, &mut wire);
                server.reader().read_exact(&mut out).expect("plaintext");
                std::hint::black_box(&out);
            })
        });
    }

    // The `tls` backend's own record layer (dataplane/tls/records.rs), as it
    // runs after the hand-over: sealed in place in a record slot, opened in
    // place in the receive buffer; no copy.
    use scistream_ctl::dataplane::tls::ktls::Cipher;
    use scistream_ctl::dataplane::tls::records::{open_record, RecordKey, APPLICATION_DATA, SLOT};
    for (name, cipher, key_len) in [
        ("aes128gcm", Cipher::Aes128Gcm, 16),
        ("aes256gcm", Cipher::Aes256Gcm, 32),
    ] {
        let key = vec![7u8; key_len];
        let (mut sealer, mut opener) = (
            RecordKey::new(cipher, &key, &[9; 12], 0).expect("key"),
            RecordKey::new(cipher, &key, &[9; 12], 0).expect("key"),
        );
        let mut slot = vec![0u8; SLOT];
        group.bench_function(BenchmarkId::new("records_seal", name), |b| {
            b.iter(|| {
                slot[5..5 + RECORD].copy_from_slice(&plaintext);
                let n = sealer
                    .seal(&mut slot, RECORD, APPLICATION_DATA)
                    .expect("seal");
                std::hint::black_box(&slot[..n]);
            })
        });
        let mut sealer = RecordKey::new(cipher, &key, &[9; 12], 0).expect("key");
        group.bench_function(BenchmarkId::new("records_seal_open", name), |b| {
            b.iter(|| {
                slot[5..5 + RECORD].copy_from_slice(&plaintext);
                let n = sealer
                    .seal(&mut slot, RECORD, APPLICATION_DATA)
                    .expect("seal");
                let (record, used) = open_record(&mut opener, &mut slot[..n])
                    .expect("open")
                    .expect("a whole record");
                std::hint::black_box((record, used));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
