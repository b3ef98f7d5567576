//! scistream-rs user space. A request flows `control/` (gRPC service, session
//! registry, port allocator) -> `dataplane/<backend>/` (moves the bytes) ->
//! `ebpf/` (kernel programs); `client/` is the s2uc side of the same protocol.
//! Dependencies point down that chain only; `host`, `config`, `tls` and
//! `trust` are leaves every layer may use.

pub mod addr;
pub mod client;
pub mod config;
pub mod config_file;
pub mod control;
pub mod dataplane;
pub mod ebpf;
pub mod host;
pub mod oauth;
pub mod state_dir;
pub mod tls;
pub mod trust;

pub mod proto {
    //! Generated from `proto/scistream.proto` (SciStream 1.2 wire contract).
    tonic::include_proto!("scistream");
}

/// Locks `m`, also after a thread panicked while holding it: no value behind
/// our mutexes is left half-updated across a statement that can panic, so
/// the data is still good, and one panic must not take the daemon down.
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
