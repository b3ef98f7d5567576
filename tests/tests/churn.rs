//! Lifecycle hygiene: a thousand sessions created and released against one
//! s2cs leave its file descriptors, threads, memory and ports where they were.

mod common;

use std::time::Duration;

use common::raw::{block_on, new_uid, RawClient};
use common::Gateway;
use testbed::netns::addr;
use testbed::{in_netns, require_root, Node, Topology};

struct Footprint {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn footprint(pid: u32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("s2cs fds")
        .count();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("s2cs threads")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("s2cs status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    Footprint {
        fds,
        threads,
        rss_kib,
    }
}

/// req + hello + update + release of `n` sessions of two ports each.
async fn churn(c: &RawClient, n: usize) {
    for i in 0..n {
        let uid = new_uid();
        let pending = tokio::spawn({
            let (c, uid) = (c.clone(), uid.clone());
            async move { c.req(&uid, "PROD", 2, 1).await }
        });
        c.hello(&uid, &["10.91.3.2:7000"], "PROD")
            .await
            .unwrap_or_else(|e| panic!("hello {i}: {e}"));
        let r = pending
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("req {i}: {e}"));
        assert_eq!(r.listeners.len(), 2);
        c.update(&uid, &["10.91.3.2:7000"], "PROD")
            .await
            .unwrap_or_else(|e| panic!("update {i}: {e}"));
        c.release(&uid)
            .await
            .unwrap_or_else(|e| panic!("release {i}: {e}"));
    }
}

#[test]
fn a_thousand_sessions_created_and_released_leave_nothing_behind() {
    if !require_root("a_thousand_sessions_created_and_released_leave_nothing_behind") {
        return;
    }
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        topo.ns(Node::InboundGw),
        addr::INBOUND_GW_WAN.into(),
        "5100-5199",
        "splice",
        &["--ssl", "false"],
    );
    let pid = gw.daemon.pid();
    let control = gw.control;
    in_netns(topo.ns(Node::InboundGw), || {
        block_on(async {
            let c = RawClient::connect(control).await;
            // Warm up allocators and the runtime's worker threads first.
            churn(&c, 50).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let before = footprint(pid);
            churn(&c, 1000).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let after = footprint(pid);
            eprintln!(
                "fds {} -> {}, threads {} -> {}, rss {} KiB -> {} KiB",
                before.fds, after.fds, before.threads, after.threads, before.rss_kib, after.rss_kib
            );
            // Margins: none for descriptors; the runtime may add a worker
            // thread; the allocator may keep a few MiB it has touched.
            assert_eq!(after.fds, before.fds, "file descriptors leaked");
            assert!(
                after.threads <= before.threads + 1,
                "threads grew: {} -> {}",
                before.threads,
                after.threads
            );
            assert!(
                after.rss_kib <= before.rss_kib + 4096,
                "RSS grew by more than 4 MiB: {} -> {} KiB",
                before.rss_kib,
                after.rss_kib
            );
            // Every port came back: the next session gets the first two again.
            let uid = new_uid();
            let pending = tokio::spawn({
                let (c, uid) = (c.clone(), uid.clone());
                async move { c.req(&uid, "PROD", 2, 1).await }
            });
            c.hello(&uid, &["10.91.3.2:7000"], "PROD")
                .await
                .expect("hello");
            let r = pending.await.expect("join").expect("req");
            assert_eq!(
                r.listeners,
                vec!["10.91.2.2:5100".to_string(), "10.91.2.2:5101".to_string()]
            );
        })
    });
}
