//! A four-host path in network namespaces, and running code inside one.
//!
//! ```text
//!  Consumer ──ConsumerLan── OutboundGw ──Wan── InboundGw ──ProducerLan── Producer
//!  10.91.1.2     10.91.1.1  10.91.2.1     10.91.2.2  10.91.3.1    10.91.3.2
//!  fd91:1::2    fd91:1::1   fd91:2::1     fd91:2::2  fd91:3::1    fd91:3::2
//! ```
//!
//! Every topology uses these same addresses: each lives in its own namespaces, so
//! topologies never see each other and tests may build them in parallel. The veth
//! on a link is named after the link in both namespaces (`veth-clan`, `veth-wan`,
//! `veth-plan`). The gateways forward IPv4 and IPv6 and the end hosts have default
//! routes, so consumer -> producer also works by plain kernel routing (the baseline
//! for benchmarks); `s2cs` listeners are what make the gateways matter.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::registry;

/// A host on the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// The consumer application's host.
    Consumer,
    /// The consumer-side gateway (`s2uc outbound-request`, role CONS).
    OutboundGw,
    /// The producer-side gateway (`s2uc inbound-request`, role PROD).
    InboundGw,
    /// The producer application's host.
    Producer,
}

impl Node {
    pub const ALL: [Node; 4] = [
        Node::Consumer,
        Node::OutboundGw,
        Node::InboundGw,
        Node::Producer,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn suffix(self) -> char {
        ['c', 'o', 'i', 'p'][self.index()]
    }

    /// The host number on `link` (`.1`/`::1` or `.2`/`::2`), None when not attached to it.
    fn host_on(self, link: Link) -> Option<u8> {
        match (link, self) {
            (Link::ConsumerLan, Node::OutboundGw) => Some(1),
            (Link::ConsumerLan, Node::Consumer) => Some(2),
            (Link::Wan, Node::OutboundGw) => Some(1),
            (Link::Wan, Node::InboundGw) => Some(2),
            (Link::ProducerLan, Node::InboundGw) => Some(1),
            (Link::ProducerLan, Node::Producer) => Some(2),
            _ => None,
        }
    }

    /// This node's IPv4 address on `link`, None when the node is not on that link.
    pub fn ip4(self, link: Link) -> Option<Ipv4Addr> {
        self.host_on(link)
            .map(|h| Ipv4Addr::new(10, 91, link.subnet(), h))
    }

    /// This node's IPv6 (ULA) address on `link`, None when the node is not on that link.
    pub fn ip6(self, link: Link) -> Option<Ipv6Addr> {
        self.host_on(link)
            .map(|h| Ipv6Addr::new(0xfd91, link.subnet().into(), 0, 0, 0, 0, 0, h.into()))
    }
}

/// A veth link between two neighbouring nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// Consumer <-> OutboundGw: 10.91.1.0/24, fd91:1::/64.
    ConsumerLan,
    /// OutboundGw <-> InboundGw (the tunnel between facilities): 10.91.2.0/24, fd91:2::/64.
    Wan,
    /// InboundGw <-> Producer: 10.91.3.0/24, fd91:3::/64.
    ProducerLan,
}

impl Link {
    pub const ALL: [Link; 3] = [Link::ConsumerLan, Link::Wan, Link::ProducerLan];

    fn subnet(self) -> u8 {
        match self {
            Link::ConsumerLan => 1,
            Link::Wan => 2,
            Link::ProducerLan => 3,
        }
    }

    /// Interface name of this link's veth end, the same in both namespaces it joins.
    pub fn iface(self) -> &'static str {
        match self {
            Link::ConsumerLan => "veth-clan",
            Link::Wan => "veth-wan",
            Link::ProducerLan => "veth-plan",
        }
    }

    /// The two nodes the link joins, the `.1` side first.
    pub fn ends(self) -> (Node, Node) {
        match self {
            Link::ConsumerLan => (Node::OutboundGw, Node::Consumer),
            Link::Wan => (Node::OutboundGw, Node::InboundGw),
            Link::ProducerLan => (Node::InboundGw, Node::Producer),
        }
    }
}

/// The addresses of [`Topology`] as constants, for code that reads better with names.
pub mod addr {
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub const CONSUMER: Ipv4Addr = Ipv4Addr::new(10, 91, 1, 2);
    /// The outbound gateway's address facing the consumer (where its `s2cs` listens).
    pub const OUTBOUND_GW_LAN: Ipv4Addr = Ipv4Addr::new(10, 91, 1, 1);
    pub const OUTBOUND_GW_WAN: Ipv4Addr = Ipv4Addr::new(10, 91, 2, 1);
    /// The inbound gateway's address facing the other gateway (where its `s2cs` listens).
    pub const INBOUND_GW_WAN: Ipv4Addr = Ipv4Addr::new(10, 91, 2, 2);
    pub const INBOUND_GW_LAN: Ipv4Addr = Ipv4Addr::new(10, 91, 3, 1);
    pub const PRODUCER: Ipv4Addr = Ipv4Addr::new(10, 91, 3, 2);

    pub const CONSUMER_V6: Ipv6Addr = Ipv6Addr::new(0xfd91, 1, 0, 0, 0, 0, 0, 2);
    pub const OUTBOUND_GW_LAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd91, 1, 0, 0, 0, 0, 0, 1);
    pub const OUTBOUND_GW_WAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd91, 2, 0, 0, 0, 0, 0, 1);
    pub const INBOUND_GW_WAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd91, 2, 0, 0, 0, 0, 0, 2);
    pub const INBOUND_GW_LAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd91, 3, 0, 0, 0, 0, 0, 1);
    pub const PRODUCER_V6: Ipv6Addr = Ipv6Addr::new(0xfd91, 3, 0, 0, 0, 0, 0, 2);
}

/// Four namespaces joined by veths; deleted again on drop.
#[derive(Debug)]
pub struct Topology {
    names: [String; 4],
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
// `ip netns add` sets up the shared /run/netns mount on first use; two of those
// racing in one process can stack mounts, so creation goes one at a time.
static CREATE_LOCK: Mutex<()> = Mutex::new(());
static REAP_STALE: Once = Once::new();

impl Topology {
    /// Builds the path. Takes a few hundred milliseconds (it runs `ip` about 40 times).
    pub fn new() -> Result<Topology> {
        REAP_STALE.call_once(reap_stale_namespaces);
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // "ss-<pid>-<n><node>": at most 15 bytes for any Linux pid and n < 1000.
        let names = Node::ALL.map(|node| format!("ss-{pid}-{n}{}", node.suffix()));
        let topo = Topology { names };
        // Registered before anything can fail, so a half-built path is still removed.
        {
            let _guard = CREATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            for name in &topo.names {
                registry::add_namespace(name);
                ip(&["netns", "add", name])?;
            }
        }
        topo.configure()
            .with_context(|| format!("configuring namespaces {:?}", topo.names))?;
        Ok(topo)
    }

    fn configure(&self) -> Result<()> {
        for node in Node::ALL {
            ip(&["-n", self.ns(node), "link", "set", "lo", "up"])?;
        }
        for link in Link::ALL {
            let (a, b) = link.ends();
            let dev = link.iface();
            // Created inside namespace `a` with its peer directly in `b`: the names
            // never exist in the root namespace, so parallel topologies cannot clash.
            ip(&[
                "-n",
                self.ns(a),
                "link",
                "add",
                dev,
                "type",
                "veth",
                "peer",
                "name",
                dev,
                "netns",
                self.ns(b),
            ])?;
            for node in [a, b] {
                let ns = self.ns(node);
                let v4 = format!("{}/24", self.ip4(node, link));
                let v6 = format!("{}/64", self.ip6(node, link));
                ip(&["-n", ns, "addr", "add", &v4, "dev", dev])?;
                // nodad: without it the address stays "tentative" for a second or two
                // and early connects fail with EADDRNOTAVAIL.
                ip(&["-n", ns, "-6", "addr", "add", &v6, "dev", dev, "nodad"])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
            }
        }
        let route = |node: Node, args: &[&str]| {
            let mut full = vec!["-n", self.ns(node)];
            full.extend_from_slice(args);
            ip(&full)
        };
        route(
            Node::Consumer,
            &["route", "add", "default", "via", "10.91.1.1"],
        )?;
        route(
            Node::Consumer,
            &["-6", "route", "add", "default", "via", "fd91:1::1"],
        )?;
        route(
            Node::Producer,
            &["route", "add", "default", "via", "10.91.3.1"],
        )?;
        route(
            Node::Producer,
            &["-6", "route", "add", "default", "via", "fd91:3::1"],
        )?;
        // Gateways get specific routes, not defaults, so an unknown destination
        // fails fast instead of bouncing between them until the TTL runs out.
        route(
            Node::OutboundGw,
            &["route", "add", "10.91.3.0/24", "via", "10.91.2.2"],
        )?;
        route(
            Node::OutboundGw,
            &["-6", "route", "add", "fd91:3::/64", "via", "fd91:2::2"],
        )?;
        route(
            Node::InboundGw,
            &["route", "add", "10.91.1.0/24", "via", "10.91.2.1"],
        )?;
        route(
            Node::InboundGw,
            &["-6", "route", "add", "fd91:1::/64", "via", "fd91:2::1"],
        )?;
        for gw in [Node::OutboundGw, Node::InboundGw] {
            in_netns(self.ns(gw), || -> Result<()> {
                // /proc/sys/net shows the writing thread's namespace, hence in_netns.
                for knob in [
                    "/proc/sys/net/ipv4/ip_forward",
                    "/proc/sys/net/ipv6/conf/all/forwarding",
                ] {
                    std::fs::write(knob, "1").with_context(|| format!("writing 1 to {knob}"))?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Name of `node`'s namespace, for `ip netns exec`, [`in_netns`] and friends.
    pub fn ns(&self, node: Node) -> &str {
        &self.names[node.index()]
    }

    /// All four namespace names, consumer first.
    pub fn namespaces(&self) -> [&str; 4] {
        Node::ALL.map(|n| self.ns(n))
    }

    /// `node`'s IPv4 address on `link`. Panics if the node is not on that link
    /// (e.g. the consumer on the WAN), which is a mistake in the test.
    pub fn ip4(&self, node: Node, link: Link) -> Ipv4Addr {
        node.ip4(link)
            .unwrap_or_else(|| panic!("{node:?} has no interface on {link:?}"))
    }

    /// `node`'s IPv6 address on `link`. Panics like [`Topology::ip4`].
    pub fn ip6(&self, node: Node, link: Link) -> Ipv6Addr {
        node.ip6(link)
            .unwrap_or_else(|| panic!("{node:?} has no interface on {link:?}"))
    }

    /// `ip4(node, link):port` as a socket address.
    pub fn sock4(&self, node: Node, link: Link, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4(node, link)), port)
    }

    /// `[ip6(node, link)]:port` as a socket address.
    pub fn sock6(&self, node: Node, link: Link, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6(node, link)), port)
    }

    /// Interface name of `node`'s end of `link`. Panics if the node is not on that link.
    pub fn iface(&self, node: Node, link: Link) -> &'static str {
        assert!(
            node.host_on(link).is_some(),
            "{node:?} has no interface on {link:?}"
        );
        link.iface()
    }

    /// Sets the MTU of both ends of every link (9000 is what data transfer
    /// nodes run; a veth starts at 1500).
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        for link in Link::ALL {
            let (a, b) = link.ends();
            for node in [a, b] {
                ip(&[
                    "-n",
                    self.ns(node),
                    "link",
                    "set",
                    "dev",
                    link.iface(),
                    "mtu",
                    &mtu,
                ])
                .with_context(|| format!("MTU {mtu} on {} in {}", link.iface(), self.ns(node)))?;
            }
        }
        Ok(())
    }

    /// Turns GRO on for every veth end. XDP_REDIRECT into a veth only delivers when
    /// the receiving end has NAPI (GRO or an XDP program), see docs/toolchain.md. Needs `ethtool`.
    pub fn enable_gro(&self) -> Result<()> {
        self.ethtool_all("gro", "on")
    }

    /// Makes every veth end send complete TCP/UDP checksums, as frames off a real
    /// wire have. By default a veth passes the sender's checksum unfinished
    /// (CHECKSUM_PARTIAL): a NAT in XDP, which sees only the bytes, would update
    /// a value that is not yet the checksum and the receiver would drop the segment.
    pub fn complete_checksums(&self) -> Result<()> {
        self.ethtool_all("tx", "off")
    }

    /// `ethtool -K <veth> <setting> <value>` on both ends of every link.
    pub fn ethtool_all(&self, setting: &str, value: &str) -> Result<()> {
        for link in Link::ALL {
            let (a, b) = link.ends();
            for node in [a, b] {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        self.ns(node),
                        "ethtool",
                        "-K",
                        link.iface(),
                        setting,
                        value,
                    ])
                    .output()
                    .context("running ethtool (Debian package `ethtool`)")?;
                if !out.status.success() {
                    bail!(
                        "ethtool -K {} {setting} {value} in {}: {}",
                        link.iface(),
                        self.ns(node),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for name in &self.names {
            if registry::remove_namespace(name) {
                delete_namespace(name);
            }
        }
    }
}

/// Kills what still runs in the namespace, then `ip netns del`; best effort, used
/// from Drop and from the Ctrl-C path. A process left inside would keep the
/// namespace (and its ports) alive after the name is gone.
pub(crate) fn delete_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        let me = std::process::id();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            match pid.parse::<i32>() {
                Ok(pid) if pid as u32 != me => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                _ => {}
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

/// Removes `ss-<pid>-*` namespaces whose process is gone: a test run killed by
/// SIGKILL or Ctrl-C never ran its Drops, and its namespaces would pile up.
fn reap_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ss-") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_namespace(&name);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_path(ns: &str) -> PathBuf {
    // An absolute path lets callers name a namespace outside /run/netns (e.g. /proc/<pid>/ns/net).
    if ns.starts_with('/') {
        PathBuf::from(ns)
    } else {
        PathBuf::from("/run/netns").join(ns)
    }
}

/// Moves the calling thread into `ns`. Namespaces are per thread, so this never
/// affects the rest of the process.
fn enter(ns: &str) {
    let path = netns_path(ns);
    let file = File::open(&path)
        .unwrap_or_else(|e| panic!("opening network namespace {}: {e}", path.display()));
    setns(&file, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result.
/// Sockets `f` creates belong to `ns` for their whole life, whichever thread uses them
/// later. A panic in `f` is passed on to the caller.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, || {
                enter(ns);
                f()
            })
            .expect("spawning a thread");
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Like [`in_netns`] but in the background: the thread enters `ns` and runs `f`.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            enter(&ns);
            f()
        })
        .expect("spawning a thread")
}
