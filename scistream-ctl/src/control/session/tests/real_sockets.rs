//! The registry on real sockets: a failed first `update` that must leave the
//! session's listeners as they were, and early hellos whose clients hang up.
//! Ports 27340-27359 on loopback, below the ephemeral range.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::PortRange;
use crate::dataplane::splice::SplicePump;
use crate::dataplane::{DataPlaneError, SessionSpec, TcpRelay};

/// The relay backend refusing IPv6 targets the way `xdp` does: after it was
/// handed the listeners, which it drops on the way out.
struct V4Only(TcpRelay<SplicePump>);

impl Backend for V4Only {
    fn name(&self) -> &'static str {
        "v4only"
    }
    fn start(
        &self,
        spec: SessionSpec,
        listeners: Vec<StdListener>,
        targets: Vec<SocketAddr>,
    ) -> Result<Box<dyn Forwarder>, DataPlaneError> {
        if targets.iter().any(SocketAddr::is_ipv6) {
            drop(listeners);
            return Err(DataPlaneError::Unsupported {
                backend: "v4only",
                reason: "IPv4 only".into(),
            });
        }
        self.0.start(spec, listeners, targets)
    }
}

fn registry(range: (u16, u16)) -> Arc<Registry> {
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let ports = PortAllocator::new(
        PortRange {
            start: range.0,
            end: range.1,
        },
        ip,
    );
    Registry::new(
        ports,
        Arc::new(V4Only(TcpRelay::new(SplicePump))),
        ip,
        Duration::from_secs(30),
    )
}

async fn open_session(reg: &Arc<Registry>, uid: &str) -> Vec<SocketAddr> {
    let req = tokio::spawn({
        let (reg, uid) = (reg.clone(), uid.to_string());
        async move {
            reg.request(
                &uid,
                "PROD",
                1,
                0,
                None,
                super::tunnel_key::KeyRequest::None,
            )
            .await
        }
    });
    reg.hello(uid, &["127.0.0.1:9".to_string()], None)
        .await
        .expect("hello");
    req.await.unwrap().expect("req").listeners
}

async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_update_leaves_the_session_listening_and_a_retry_forwards() {
    let reg = registry((27340, 27344));
    let uid = "0d6f4a53-3f87-4d8e-a8c2-6f3b8f0f9a11";
    let listeners = open_session(&reg, uid).await;
    let e = reg
        .update(uid, &["[::1]:7000".to_string()], None)
        .await
        .expect_err("IPv6 refused");
    assert!(e.to_string().contains("IPv4 only"), "{e}");
    assert!(
        reg.view(uid, None).unwrap().targets.is_empty(),
        "no targets after a failed update"
    );
    // The session's port still listens: the kernel completes the handshake.
    TcpStream::connect(listeners[0])
        .await
        .expect("the listener survived the failed update");
    assert!(
        StdListener::bind(listeners[0]).is_err(),
        "nobody else can take the port"
    );

    let target = echo().await;
    reg.update(uid, &[target.to_string()], None)
        .await
        .expect("retry with IPv4");
    let mut c = TcpStream::connect(listeners[0])
        .await
        .expect("connect through the session");
    c.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&got, b"still here");
    reg.release(uid, None).await.unwrap();
    assert!(
        StdListener::bind(listeners[0]).is_ok(),
        "released port is free again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_early_hello_leaves_no_entry_and_their_number_is_bounded() {
    let reg = registry((27350, 27352));
    let uid = "6c1f2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
    let waiting = tokio::spawn({
        let reg = reg.clone();
        async move { reg.hello(uid, &["127.0.0.1:9".to_string()], None).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(reg.early_hellos_waiting(), 1);
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(
        reg.early_hellos_waiting(),
        0,
        "the cancelled hello's entry stayed"
    );

    let mut all = Vec::new();
    for _ in 0..MAX_EARLY_HELLOS {
        let reg = reg.clone();
        let uid = uuid::Uuid::new_v4().to_string();
        all.push(tokio::spawn(
            async move { reg.hello(&uid, &[], None).await },
        ));
    }
    while reg.early_hellos_waiting() < MAX_EARLY_HELLOS {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let over = reg
        .hello(&uuid::Uuid::new_v4().to_string(), &[], None)
        .await
        .expect_err("over the bound");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over}");
    for t in &all {
        t.abort();
    }
    for t in all {
        let _ = t.await;
    }
    assert_eq!(reg.early_hellos_waiting(), 0);
}
