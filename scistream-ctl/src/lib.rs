//! scistream-rs user space. A request flows `control/` (gRPC service, session
//! registry, port allocator) -> `dataplane/<backend>.rs` (moves the bytes) ->
//! `ebpf/` (kernel programs); `client/` is the s2uc side of the same protocol.

pub mod addr;
pub mod client;
pub mod config;
pub mod config_file;
pub mod control;
pub mod dataplane;
pub mod ebpf;
pub mod oauth;
pub mod state_dir;
pub mod tls;
pub mod trust;

pub mod proto {
    //! Generated from `proto/scistream.proto` (SciStream 1.2 wire contract).
    tonic::include_proto!("scistream");
}

/// One line with an error and all its sources (many libraries' Display
/// hides the cause), for logs and one-line CLI errors.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}
