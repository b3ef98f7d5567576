//! The tunnel's session-proof preamble: the first 32 bytes a peer gateway
//! sends after the TLS handshake, before anything reaches the producer.
//! Drives the real `prove()` over an in-memory channel whose peer says
//! whatever the fuzzer wants, with a fixed exporter standing in for TLS.
#![no_main]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use scistream_ctl::dataplane::tls::session_auth::{prove, Exporter, Role, SessionSecret, LEN};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    uid: &'a str,
    extra_key: Option<&'a [u8]>,
    exporter_seed: [u8; LEN],
    server: bool,
    peer: &'a [u8],
    /// Replay the genuine proof with this byte flipped (index, xor mask).
    flip: (u8, u8),
}

/// One side of a channel: reads come from `peer` (then EOF), writes are kept.
struct Channel<'a> {
    seed: [u8; LEN],
    peer: &'a [u8],
    written: Vec<u8>,
}

impl Exporter for Channel<'_> {
    fn export(&self, label: &[u8]) -> io::Result<[u8; LEN]> {
        // Distinct per label, the same on both ends: all prove() needs of TLS.
        let mut out = self.seed;
        for (i, b) in out.iter_mut().enumerate() {
            *b ^= label[i % label.len()].wrapping_add(label[label.len() - 1 - i % label.len()]);
        }
        Ok(out)
    }
}

impl AsyncRead for Channel<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.peer.len());
        buf.put_slice(&self.peer[..n]);
        self.peer = &self.peer[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Channel<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn run(
    seed: [u8; LEN],
    secret: &SessionSecret,
    role: Role,
    peer: &[u8],
) -> (io::Result<()>, Vec<u8>) {
    let mut ch = Channel {
        seed,
        peer,
        written: Vec::new(),
    };
    // The channel is always ready, so prove() must finish in a single poll.
    let r = {
        let fut = std::pin::pin!(prove(&mut ch, secret, role));
        let Poll::Ready(r) = fut.poll(&mut Context::from_waker(std::task::Waker::noop())) else {
            panic!("prove() waited on a channel that is always ready");
        };
        r
    };
    (r, ch.written)
}

fuzz_target!(|input: Input| {
    let secret = SessionSecret::derive(input.uid, input.extra_key);
    let seed = input.exporter_seed;
    // The genuine proofs of this channel, as an honest peer would send them.
    let (_, client_proof) = run(seed, &secret, Role::Client, &[]);
    assert_eq!(
        client_proof.len(),
        LEN,
        "the client proves first, whatever comes back"
    );
    let (r, server_proof) = run(seed, &secret, Role::Server, &client_proof);
    assert!(r.is_ok(), "the genuine client proof was refused: {r:?}");
    assert_eq!(server_proof.len(), LEN);

    let (role, genuine) = if input.server {
        (Role::Server, &client_proof)
    } else {
        (Role::Client, &server_proof)
    };
    let (r, written) = run(seed, &secret, role, input.peer);
    let accepted = input.peer.len() >= LEN && input.peer[..LEN] == genuine[..];
    match &r {
        Ok(()) => assert!(accepted, "{role:?} accepted a wrong proof {:?}", input.peer),
        Err(e) => {
            assert!(!accepted, "{role:?} refused the genuine proof: {e}");
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        }
    }
    match role {
        // A prober without the secret learns nothing from the server.
        Role::Server => assert_eq!(written.len(), if accepted { LEN } else { 0 }),
        Role::Client => assert_eq!(written, client_proof),
    }

    // The genuine proof with one bit pattern flipped is refused.
    let mut forged = genuine.clone();
    let (at, mask) = (usize::from(input.flip.0) % LEN, input.flip.1);
    forged[at] ^= mask;
    let (r, _) = run(seed, &secret, role, &forged);
    assert_eq!(r.is_ok(), mask == 0, "{role:?} with byte {at} ^ {mask:#x}");
});
