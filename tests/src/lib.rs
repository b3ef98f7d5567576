//! `testbed`: the machinery scistream-rs's integration tests, `cargo xtask demo`
//! and `cargo xtask bench` share to put the real `s2cs`/`s2uc` binaries on a
//! four-host path built from network namespaces and push verified bytes through it.
//!
//! ```no_run
//! use testbed::{netns::{Node, Link, Topology}, process, traffic};
//! use std::net::SocketAddr;
//!
//! if !testbed::require_root("direct_path_carries_bytes") { return Ok(()); }
//! let topo = Topology::new()?;
//! let prod_addr = SocketAddr::new(topo.ip4(Node::Producer, Link::ProducerLan).into(), 7000);
//! let producer = traffic::Producer::start(topo.ns(Node::Producer), prod_addr, 1 << 20)?;
//! let transfer = traffic::consume(topo.ns(Node::Consumer), prod_addr, 1 << 20, 1)?;
//! transfer.verify_with(&producer.wait_for(1, std::time::Duration::from_secs(10))?, 1 << 20)?;
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Resources clean themselves up on `Drop` (also while a test panics). Declare the
//! `Topology` before the daemons and traffic that live in it, so Rust drops those first.

pub mod netns;
pub mod privilege;
pub mod process;
mod registry;
#[cfg(test)]
mod selftest;
pub mod traffic;

pub use netns::{in_netns, spawn_in_netns, Link, Node, Topology};
pub use privilege::require_root;
pub use process::{bin, run_in, spawn_in, wait_for_tcp, Daemon};
pub use registry::cleanup_all;
pub use traffic::{
    consume, consume_parallel, expected_sha256, ConnResult, Producer, Stream, Transfer,
};
