//! Starting `s2cs`: identity, backend, registry, and the gRPC server with a
//! clean shutdown that releases every session.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tonic::transport::Server;

use super::auth::{AuthConfig, Authenticator};
use super::guard::PortGuard;
use super::ports::PortAllocator;
use super::service::ControlService;
use super::session::Registry;
use super::store::{Store, StoredSession};
use crate::config::ServerArgs;
use crate::proto::control_server::ControlServer;
use crate::{dataplane, tls};

/// Bytes of request messages not yet whole that one connection may hold:
/// eight messages of the largest size.
const PARTIAL_BYTES_PER_CONNECTION: usize = 8 * MAX_MESSAGE_BYTES;
/// HTTP/2 flow-control windows: what a connection's peer may send ahead of
/// what s2cs has read. One largest message per stream, four per connection.
const STREAM_WINDOW: u32 = MAX_MESSAGE_BYTES as u32;
const CONNECTION_WINDOW: u32 = 4 * MAX_MESSAGE_BYTES as u32;
/// Largest HTTP/2 header list accepted (hyper's default, said here).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Largest request message accepted. The biggest legitimate one, a hello or
/// update naming MAX_NUM_CONN (128) `[ipv6]:port` listeners, is under 7 KiB;
/// tonic's default of 4 MiB would let every stream buffer 600 times that.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

mod conn;
mod preauth;

/// Serves until `shutdown` resolves, then releases every session.
pub async fn run(
    args: ServerArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let auth = match AuthConfig::from_args(&args).context("authentication")? {
        Some(cfg) => Some(Arc::new(Authenticator::new(cfg).context("authentication")?)),
        None => {
            tracing::warn!("authentication is OFF (no --client_secret): any client may create, update and release sessions");
            None
        }
    };
    let state_dir = args.state_dir();
    // Before anything in the directory is touched (certificates, store, pins).
    let _state_lock = super::statelock::StateLock::acquire(&state_dir)?;
    // Private before anything is written in it (uids, keys, PSKs live there).
    crate::state_dir::secure(&state_dir)
        .with_context(|| format!("securing the state directory {}", state_dir.display()))?;
    let identity = tls::server_identity(
        args.server_crt.as_deref(),
        args.server_key.as_deref(),
        &state_dir,
        args.listener_ip,
    )
    .context("loading the server certificate")?;
    if identity.generated {
        println!(
            "s2cs: generated a self-signed certificate for {}: {} (key {}); give it to clients as --server_cert",
            args.listener_ip,
            identity.cert_path.display(),
            identity.key_path.display()
        );
    }
    // The store first, read once: a backend with kernel state left by an
    // earlier run (xdp) keeps what belongs to the sessions coming back, and
    // the registry restores them.
    let store = Arc::new(Store::open(&state_dir)?);
    let stored = store.load_raw()?;
    let backend = dataplane::from_args(&args, &identity, &forwarding_of(&stored))
        .context("starting the data plane")?;
    let ports = PortAllocator::new(args.port_range, args.listener_ip);
    let guard = PortGuard::start(&args).map(Arc::new);
    let registry = Registry::with_store(
        ports,
        backend,
        args.listener_ip,
        args.hello_timeout(),
        guard.clone(),
        Some(store.clone()),
    );
    registry.set_target_policy(super::targets::TargetPolicy::from_args(&args));
    // Before the control port opens: no new session can take a stored one's port.
    let (restored, failed) = registry.restore(stored);
    if restored + failed > 0 {
        println!(
            "s2cs: restored {restored} stored sessions from {}{}",
            store.path().display(),
            if failed > 0 {
                format!(", {failed} could not come back (see the log)")
            } else {
                String::new()
            }
        );
    }
    let lease = (args.session_ttl > 0)
        .then(|| super::lease::spawn(&registry, std::time::Duration::from_secs(args.session_ttl)));

    let addr = SocketAddr::new(args.control_ip, args.port);
    // Few streams per connection: a pending `req` holds one until its hello,
    // but may take only half of them (preauth.rs), so hellos always find one.
    let mut builder = Server::builder()
        .max_concurrent_streams(args.max_control_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let preauth = preauth::Limits {
        body_timeout: args.control_body_timeout(),
        per_connection: PARTIAL_BYTES_PER_CONNECTION,
        total: args.control_buffer_mib as usize * 1024 * 1024,
        pending_reqs: (args.max_control_streams / 2) as usize,
    };
    // TLS is ours, not tonic's: the connection cap must act before the
    // handshake, and the preface and idle deadlines need the plaintext.
    let tls = if args.ssl {
        Some(control_tls(&identity).context("control channel TLS")?)
    } else {
        tracing::warn!("--ssl false: the control channel is NOT encrypted");
        None
    };
    if args.session_ttl > 0 && args.backend == crate::config::BackendKind::StunnelSubprocess {
        tracing::warn!("--session_ttl cannot see traffic through stunnel (it has no counters): StunnelSubprocess sessions never expire");
    }
    let metrics = match args.metrics_addr {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding --metrics_addr {a}"))?;
            println!("s2cs: metrics at http://{a}/metrics");
            let reg = registry.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = super::metrics::serve(l, reg).await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            }))
        }
        None => None,
    };
    let listener =
        bind_control(addr).with_context(|| format!("binding the control port {addr}"))?;
    println!(
        "s2cs: serving scistream.Control on {addr} ({}), certificate {}, backend {}, listener_ip {}, ports {}",
        if args.ssl { "TLS" } else { "plaintext" },
        identity.cert_path.display(),
        registry.backend_name(),
        args.listener_ip,
        args.port_range,
    );
    if let Some(a) = &auth {
        println!(
            "s2cs: authentication on: tokens need scope {}, checked at {}",
            a.required_scope(),
            a.introspect_url()
        );
    }
    let limits = conn::Limits {
        max_connections: args.max_control_connections as usize,
        preface: args.control_timeout(),
        idle: args.control_idle_timeout(),
    };
    let incoming = conn::incoming(listener, tls, limits);
    let pending = registry.clone();
    let shutdown = async move {
        shutdown.await;
        pending.release_pending().await;
    };
    let reg = registry.clone();
    builder
        .add_service(CountsCalls(preauth::PreAuth::new(
            OversizeIsResourceExhausted(
                ControlServer::new(ControlService::new(registry.clone(), auth))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            ),
            preauth,
        )))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("control server")?;
    tracing::info!(
        keep_sessions = args.keep_sessions,
        "shutting down: releasing {} sessions",
        reg.len()
    );
    for task in [metrics, lease].into_iter().flatten() {
        task.abort();
    }
    reg.shutdown(args.keep_sessions).await;
    if let Some(g) = guard {
        g.detach();
    }
    Ok(())
}

/// The control port binds dual-stack when given `::`, like SciStream's `[::]:port`.
fn bind_control(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// The control channel's TLS: what tonic would configure (ring, TLS 1.2 and
/// 1.3, ALPN h2), so SciStream 1.2's Python clients still connect.
fn control_tls(identity: &tls::Identity) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = tls::load_certs(&identity.cert_path)?;
    let key = tls::load_key(&identity.key_path)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Marks each call in flight on its connection, so the idle timeout closes
/// only connections with nothing pending (a `req` may wait minutes for its hello).
#[derive(Clone)]
struct CountsCalls<S>(S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountsCalls<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for CountsCalls<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<conn::ConnInfo>()
            .map(conn::ConnInfo::begin_call);
        let fut = self.0.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(guard);
            r
        })
    }
}

/// tonic refuses a request over [`MAX_MESSAGE_BYTES`] with OUT_OF_RANGE, but
/// gRPC's status table (and grpc-go, grpc-java, Python's grpcio) says
/// RESOURCE_EXHAUSTED for a message over the limit; this rewrites that answer.
#[derive(Clone)]
struct OversizeIsResourceExhausted<S>(S);

type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S: tonic::server::NamedService> tonic::server::NamedService
    for OversizeIsResourceExhausted<S>
{
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>>
    for OversizeIsResourceExhausted<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>, Response = HttpResponse>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(HttpResponse) -> HttpResponse>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        use futures::TryFutureExt;
        self.0
            .call(req)
            .map_ok(oversize_to_resource_exhausted as fn(HttpResponse) -> HttpResponse)
    }
}

fn oversize_to_resource_exhausted(resp: HttpResponse) -> HttpResponse {
    match tonic::Status::from_header_map(resp.headers()) {
        Some(s)
            if s.code() == tonic::Code::OutOfRange
                && s.message().contains("message length too large") =>
        {
            tonic::Status::resource_exhausted(format!(
                "request message larger than the {MAX_MESSAGE_BYTES} bytes s2cs accepts ({})",
                s.message()
            ))
            .into_http()
        }
        _ => resp,
    }
}

/// The stored sessions as the data plane sees them (unreadable records,
/// which the registry drops, are left out).
fn forwarding_of(stored: &[(String, Option<StoredSession>)]) -> Vec<dataplane::StoredForwarding> {
    stored
        .iter()
        .filter_map(|(_, r)| r.as_ref())
        .map(|r| dataplane::StoredForwarding {
            uid: r.uid.clone(),
            backend: r.backend.clone(),
            listener_ports: r.listeners.iter().map(|l| l.port()).collect(),
            forwarding: !r.targets.is_empty(),
        })
        .collect()
}
