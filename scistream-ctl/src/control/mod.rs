//! The control plane: the `scistream.Control` gRPC service, its session
//! registry and port allocator, token checking (`auth`), and the server that ties them to a backend.

pub mod auth;
pub mod error;
pub mod guard;
pub mod lease;
pub mod metrics;
pub mod offload;
pub mod ports;
pub mod server;
pub mod service;
pub mod session;
pub mod statelock;
pub mod store;
pub mod targets;
pub mod tunnel_key;

pub use error::ControlError;
pub use session::Registry;
