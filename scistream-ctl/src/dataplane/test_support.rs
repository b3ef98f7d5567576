//! Test helpers shared by the backends' unit tests: connected socket pairs
//! and the two applications of a half-close exchange.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A connected loopback pair (client end, accepted end).
pub async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// `app_a` sends `data` and half-closes; `app_b` reads to EOF, then replies
/// "ack" and closes. Returns (what app_a got back, what app_b received).
pub async fn half_close_exchange(
    mut app_a: TcpStream,
    mut app_b: TcpStream,
    data: Vec<u8>,
) -> (Vec<u8>, Vec<u8>) {
    let writer = async {
        app_a.write_all(&data).await.unwrap();
        app_a.shutdown().await.unwrap();
        let mut reply = Vec::new();
        app_a.read_to_end(&mut reply).await.unwrap();
        reply
    };
    let reader = async {
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.unwrap();
        // The half-close reached us; our direction still works.
        app_b.write_all(b"ack").await.unwrap();
        app_b.shutdown().await.unwrap();
        got
    };
    tokio::join!(writer, reader)
}
