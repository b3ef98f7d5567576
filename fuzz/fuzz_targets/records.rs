//! The `tls` backend's user-space record layer: what a proven peer gateway
//! sends after the handshake, opened by the real `open_record` under a real
//! AES-GCM key. The stream mixes genuine records (sealed by the same key
//! schedule, as the peer would), raw bytes and genuine records with a bit
//! flipped. Nothing may panic, and every byte returned as data must be the
//! payload of the genuine record at that position: a forged, replayed,
//! malformed or truncated record never yields data.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use scistream_ctl::dataplane::tls::ktls::Cipher;
use scistream_ctl::dataplane::tls::records::{
    open_record, Record, RecordKey, ALERT, APPLICATION_DATA, HANDSHAKE, KEY_UPDATE,
};

#[derive(Arbitrary, Debug)]
enum Piece<'a> {
    /// A genuine record of this content type around these bytes.
    Genuine { kind: u8, payload: &'a [u8] },
    /// Genuine application data with byte `at` xor `mask`.
    Flipped {
        payload: &'a [u8],
        at: u16,
        mask: u8,
    },
    /// A close_notify, or a KeyUpdate without a key change behind it.
    Control { close: bool },
    /// Bytes on the wire as they are.
    Raw(&'a [u8]),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    key: [u8; 16],
    iv: [u8; 12],
    seq: u64,
    pieces: Vec<Piece<'a>>,
    /// Bytes delivered per read (0: all at once).
    chunk: u8,
}

fuzz_target!(|input: Input| {
    let key = |seq| RecordKey::new(Cipher::Aes128Gcm, &input.key, &input.iv, seq).expect("key");
    let mut sealer = key(input.seq);
    let mut wire = Vec::new();
    // What each genuine record carries, in order: Some(data) or None (not data).
    let mut genuine: Vec<Option<Vec<u8>>> = Vec::new();
    for piece in &input.pieces {
        match piece {
            Piece::Genuine { kind, payload } => {
                let payload = &payload[..payload.len().min(16 << 10)];
                // Only a key at the end of its sequence numbers refuses.
                let Ok(r) = sealer.seal_record(*kind, payload) else {
                    break;
                };
                wire.extend(r);
                let data = *kind == APPLICATION_DATA
                    || (*kind == 0
                        && payload.iter().rev().find(|b| **b != 0) == Some(&APPLICATION_DATA));
                genuine.push(data.then(|| {
                    let at = if *kind == 0 {
                        payload.iter().rposition(|b| *b != 0).expect("type")
                    } else {
                        payload.len()
                    };
                    payload[..at].to_vec()
                }));
            }
            Piece::Flipped { payload, at, mask } => {
                let payload = &payload[..payload.len().min(16 << 10)];
                let Ok(mut r) = sealer.seal_record(APPLICATION_DATA, payload) else {
                    break;
                };
                let i = usize::from(*at) % r.len();
                r[i] ^= mask;
                wire.extend(r);
                genuine.push(if *mask == 0 {
                    Some(payload.to_vec())
                } else {
                    None
                });
            }
            Piece::Control { close } => {
                let body: &[u8] = if *close {
                    &[1, 0]
                } else {
                    &[KEY_UPDATE, 0, 0, 1, 0]
                };
                let Ok(r) = sealer.seal_record(if *close { ALERT } else { HANDSHAKE }, body) else {
                    break;
                };
                wire.extend(r);
                genuine.push(None);
            }
            Piece::Raw(bytes) => wire.extend_from_slice(bytes),
        }
    }

    // The receiver, fed as a socket would: `chunk` bytes per read.
    let mut opener = key(input.seq);
    let step = if input.chunk == 0 {
        wire.len().max(1)
    } else {
        usize::from(input.chunk)
    };
    let mut buf = Vec::new();
    let (mut fed, mut start, mut index) = (0usize, 0usize, 0usize);
    'feed: while fed < wire.len() {
        let n = step.min(wire.len() - fed);
        buf.extend_from_slice(&wire[fed..fed + n]);
        fed += n;
        loop {
            match open_record(&mut opener, &mut buf[start..]) {
                Ok(None) => break,
                Err(_) => break 'feed,
                Ok(Some((record, used))) => {
                    assert!(
                        used <= buf.len() - start,
                        "used {used} of {} bytes",
                        buf.len() - start
                    );
                    match record {
                        Record::Data { at, len } => {
                            let want = genuine.get(index).cloned().flatten();
                            let got = &buf[start + at..start + at + len];
                            assert_eq!(
                                Some(got),
                                want.as_deref(),
                                "record {index} opened to data that was not sent as such"
                            );
                        }
                        Record::KeyUpdate { .. } | Record::CloseNotify => {
                            assert!(
                                matches!(genuine.get(index), Some(None)),
                                "record {index}: a control record nobody sealed"
                            );
                        }
                    }
                    index += 1;
                    start += used;
                }
            }
        }
    }
});
