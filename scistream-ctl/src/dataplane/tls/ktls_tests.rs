//! Unit tests of `ktls.rs`.

use super::*;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn record_bounded_reads_stop_at_each_record_end() {
    // Two records (5-byte headers with lengths 3 and 2) and a stray byte.
    let wire: &[u8] = &[
        23, 3, 3, 0, 3, b'a', b'b', b'c', 23, 3, 3, 0, 2, b'd', b'e', 9,
    ];
    let mut r = RecordBounded::new(wire);
    let mut buf = [0u8; 64];
    let mut reads = Vec::new();
    for _ in 0..4 {
        reads.push(r.read(&mut buf).await.unwrap());
    }
    assert_eq!(reads, vec![5, 3, 5, 2]);
    assert!(r.at_boundary());
    // The next read starts a new record header.
    assert_eq!(r.read(&mut buf).await.unwrap(), 1);
    assert!(!r.at_boundary());
}

/// Counts the reads that reach the wrapped stream (each one a read(2)
/// on a socket).
struct CountingReader<'a> {
    data: &'a [u8],
    reads: usize,
}

impl AsyncRead for CountingReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.reads += 1;
        let n = self.data.len().min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn unbound_reads_hand_out_every_byte_in_order_with_few_socket_reads() {
    let wire: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut r = RecordBounded::new(CountingReader {
        data: &wire,
        reads: 0,
    });
    r.unbound();
    // rustls's request size.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == wire, "bytes differ");
    // One read per READ_AHEAD bytes (plus the one that sees EOF), not
    // one per 4 KiB request.
    assert!(
        r.get_ref().reads <= wire.len() / READ_AHEAD + 2,
        "{} reads",
        r.get_ref().reads
    );
}

#[test]
fn control_records_parse_to_close_notify_key_update_or_a_clear_error() {
    use TlsGetRecordType::{Alert, ApplicationData, Handshake};
    assert_eq!(
        parse_control_record(Some(Alert), &[1, 0]).unwrap(),
        ControlRecord::CloseNotify
    );
    assert!(parse_control_record(Some(Alert), &[2, 40])
        .unwrap_err()
        .to_string()
        .contains("alert 40"));
    assert_eq!(
        parse_control_record(Some(Handshake), &[24, 0, 0, 1, 1]).unwrap(),
        ControlRecord::KeyUpdate {
            update_requested: true
        }
    );
    assert_eq!(
        parse_control_record(Some(Handshake), &[24, 0, 0, 1, 0]).unwrap(),
        ControlRecord::KeyUpdate {
            update_requested: false
        }
    );
    // A bad request_update value, two KeyUpdates in one record, a ticket.
    for bad in [
        &[24u8, 0, 0, 1, 2][..],
        &[24, 0, 0, 1, 0, 24, 0, 0, 1, 0],
        &[4, 0, 0, 0],
    ] {
        assert_eq!(
            parse_control_record(Some(Handshake), bad)
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidData,
            "{bad:?}"
        );
    }
    assert!(parse_control_record(Some(ApplicationData), b"x").is_err());
    assert!(parse_control_record(None, b"").is_err());
}

#[test]
fn detect_never_fails_and_names_a_reason_for_rustls() {
    match detect() {
        Tier::Kernel { .. } => {}
        Tier::Rustls { reason } => assert!(!reason.is_empty()),
    }
}
