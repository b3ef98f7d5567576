//! `s2uc`: the client side of the SciStream control protocol. It runs the
//! call sequences of SciStream 1.2 (`req` + `hello`, then `update`) against
//! our `s2cs` or the original one.

pub mod auth;
pub mod cli;
pub mod observe;
pub mod tunnel_keys;

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::proto;
use crate::proto::control_client::ControlClient;

/// What SciStream sends when the user has no token.
pub const NO_TOKEN: &str = "INVALID_TOKEN";

/// How long `hello` keeps retrying while its `req` has not reached the server.
const HELLO_RETRY_FOR: Duration = Duration::from_secs(30);

/// A connection to one `s2cs`.
#[derive(Clone)]
pub struct Connection {
    client: ControlClient<Channel>,
    token: String,
    pub target: String,
    /// Sent in `req` (`Request.allowed_peers`); empty: any source.
    allowed_peers: Vec<String>,
    /// `Request.want_tunnel_key` (PROD) and `Request.tunnel_key` (CONS).
    want_tunnel_key: bool,
    tunnel_key: Vec<u8>,
}

/// Dials `s2cs` over TLS 1.2/1.3 with ALPN h2, verifying the server against
/// the `--server_cert` file as [`crate::trust`] describes (tonic's own TLS
/// settings can only add CA roots, which refuse the tutorial's certificates).
fn tls_connector(
    server_cert: &Path,
    host: &str,
    s2cs: &str,
) -> anyhow::Result<
    impl tower::Service<
            tonic::codegen::http::Uri,
            Response = hyper_util::rt::TokioIo<
                tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
            >,
            Error = std::io::Error,
            Future = impl Send,
        > + Send
        + Clone
        + 'static,
> {
    let provider = crate::tls::provider();
    let verifier = crate::trust::TrustFile::load(server_cert, provider.clone())
        .with_context(|| format!("--server_cert {}", server_cert.display()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS configuration")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| anyhow!("--s2cs {s2cs:?}: {host:?} is no host name or address: {e}"))?;
    let addr = s2cs.to_string();
    Ok(tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    }))
}

/// Splits `host:port` / `[v6]:port` into the host part used for certificate checking.
fn host_of(s2cs: &str) -> anyhow::Result<String> {
    if let Ok(sa) = s2cs.parse::<std::net::SocketAddr>() {
        return Ok(sa.ip().to_string());
    }
    let (host, port) = s2cs
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--s2cs {s2cs:?} is not host:port"))?;
    port.parse::<u16>()
        .map_err(|_| anyhow!("--s2cs {s2cs:?}: bad port"))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

impl Connection {
    /// Connects (TLS verified against `server_cert` unless `ssl` is false).
    pub async fn open(
        s2cs: &str,
        server_cert: Option<&Path>,
        ssl: bool,
        token: Option<String>,
        call_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let host = host_of(s2cs)?;
        let scheme = if ssl { "https" } else { "http" };
        let origin: tonic::codegen::http::Uri = format!("{scheme}://{s2cs}")
            .parse()
            .map_err(|e| anyhow!("--s2cs {s2cs:?}: {e}"))?;
        // The connector below does TLS itself, so the endpoint dials plain
        // http; requests still carry the https origin.
        let ep = Endpoint::from_shared(format!("http://{s2cs}"))
            .map_err(|e| anyhow!("--s2cs {s2cs:?}: {e}"))?
            .origin(origin)
            .connect_timeout(Duration::from_secs(5))
            .timeout(call_timeout);
        let connected = if ssl {
            let Some(path) = server_cert else {
                bail!("no --server_cert given and ./server.crt does not exist; pass the s2cs certificate (s2cs prints its path at start)");
            };
            let connector = tls_connector(path, &host, s2cs)?;
            ep.connect_with_connector(connector).await
        } else {
            ep.connect().await
        };
        let channel = connected.map_err(|e| {
            let why = crate::trust::explain(&e).unwrap_or_else(|| crate::oauth::error_chain(&e));
            anyhow!("cannot connect to s2cs at {s2cs}: {why}")
        })?;
        Ok(Self {
            client: ControlClient::new(channel),
            token: token.unwrap_or_else(|| NO_TOKEN.into()),
            target: s2cs.into(),
            allowed_peers: Vec::new(),
            want_tunnel_key: false,
            tunnel_key: Vec::new(),
        })
    }

    fn with_token<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = MetadataValue::try_from(self.token.as_str()) {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    /// Later `req`s ask the gateway to let only these sources reach the session.
    pub fn with_allowed_peers(mut self, peers: &[String]) -> Self {
        self.allowed_peers = peers.to_vec();
        self
    }

    /// Later PROD `req`s ask the gateway for a tunnel key.
    pub fn wanting_tunnel_key(mut self) -> Self {
        self.want_tunnel_key = true;
        self
    }

    /// Later CONS `req`s carry this key from the inbound gateway.
    pub fn with_tunnel_key(mut self, key: Option<&[u8]>) -> Self {
        self.tunnel_key = key.map(<[u8]>::to_vec).unwrap_or_default();
        self
    }

    pub async fn req(
        &self,
        uid: &str,
        role: &str,
        num_conn: i32,
        rate: i32,
    ) -> Result<proto::Response, Status> {
        let msg = proto::Request {
            uid: uid.into(),
            role: role.into(),
            num_conn,
            rate,
            allowed_peers: self.allowed_peers.clone(),
            want_tunnel_key: self.want_tunnel_key,
            tunnel_key: self.tunnel_key.clone(),
        };
        Ok(self
            .client
            .clone()
            .req(self.with_token(msg))
            .await?
            .into_inner())
    }

    pub async fn hello(
        &self,
        uid: &str,
        prod_listeners: &[String],
        role: &str,
    ) -> Result<proto::AppResponse, Status> {
        let msg = proto::Hello {
            uid: uid.into(),
            prod_listeners: prod_listeners.to_vec(),
            role: role.into(),
        };
        Ok(self
            .client
            .clone()
            .hello(self.with_token(msg))
            .await?
            .into_inner())
    }

    pub async fn update(
        &self,
        uid: &str,
        remote_listeners: &[String],
        role: &str,
    ) -> Result<proto::Response, Status> {
        let msg = proto::UpdateTargets {
            uid: uid.into(),
            remote_listeners: remote_listeners.to_vec(),
            role: role.into(),
        };
        Ok(self
            .client
            .clone()
            .update(self.with_token(msg))
            .await?
            .into_inner())
    }

    pub async fn list(&self) -> Result<Vec<proto::SessionInfo>, Status> {
        Ok(self
            .client
            .clone()
            .list(self.with_token(proto::ListRequest {}))
            .await?
            .into_inner()
            .sessions)
    }

    pub async fn status(&self, uid: &str) -> Result<proto::SessionInfo, Status> {
        Ok(self
            .client
            .clone()
            .status(self.with_token(proto::StatusRequest { uid: uid.into() }))
            .await?
            .into_inner())
    }

    pub async fn release(&self, uid: &str) -> Result<proto::Response, Status> {
        let msg = proto::Release { uid: uid.into() };
        Ok(self
            .client
            .clone()
            .release(self.with_token(msg))
            .await?
            .into_inner())
    }

    /// `req` and its `hello`, the hello sent right after the req and retried
    /// while the server does not know the uid yet (an original s2cs answers
    /// a hello that overtakes its req with an error).
    pub async fn req_with_hello(
        &self,
        uid: &str,
        role: &str,
        num_conn: i32,
        rate: i32,
        hello_listeners: &[String],
        hello_role: &str,
    ) -> anyhow::Result<proto::Response> {
        let req = {
            let c = self.clone();
            let (uid, role) = (uid.to_string(), role.to_string());
            tokio::spawn(async move { c.req(&uid, &role, num_conn, rate).await })
        };
        let hello = {
            let c = self.clone();
            let (uid, hl, hr) = (
                uid.to_string(),
                hello_listeners.to_vec(),
                hello_role.to_string(),
            );
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let mut backoff = Duration::from_millis(10);
                loop {
                    match c.hello(&uid, &hl, &hr).await {
                        Err(s)
                            if matches!(s.code(), Code::NotFound | Code::Unknown)
                                && start.elapsed() < HELLO_RETRY_FOR =>
                        {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(250));
                        }
                        r => return r,
                    }
                }
            })
        };
        let resp = match req.await.context("req task")? {
            Ok(r) => r,
            Err(s) => {
                hello.abort();
                return Err(status_error(&self.target, "req", &s));
            }
        };
        hello
            .await
            .context("hello task")?
            .map_err(|s| status_error(&self.target, "hello", &s))?;
        Ok(resp)
    }
}

/// One line naming the server, the call and what it said.
pub fn status_error(target: &str, call: &str, s: &Status) -> anyhow::Error {
    if s.code() == Code::Unavailable
        || s.code() == Code::Unknown && s.message().contains("transport")
    {
        return anyhow!(
            "s2cs at {target} unreachable during {call}: {}",
            s.message()
        );
    }
    anyhow!(
        "s2cs at {target} refused {call}: {:?}: {}",
        s.code(),
        s.message()
    )
}
