//! A SciStream control client built only from docs/protocol.md: message layouts
//! by field number, method paths by name. It shares no code with s2cs, so it
//! checks the wire contract rather than our own generated types.

use std::net::SocketAddr;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(string, tag = "2")]
    pub role: String,
    #[prost(int32, tag = "3")]
    pub num_conn: i32,
    #[prost(int32, tag = "4")]
    pub rate: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateTargets {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(string, repeated, tag = "2")]
    pub remote_listeners: Vec<String>,
    #[prost(string, tag = "3")]
    pub role: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Release {
    #[prost(string, tag = "1")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(string, repeated, tag = "2")]
    pub prod_listeners: Vec<String>,
    #[prost(string, tag = "3")]
    pub role: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    #[prost(string, repeated, tag = "1")]
    pub listeners: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub prod_listeners: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppResponse {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, repeated, tag = "2")]
    pub listeners: Vec<String>,
}

/// Plaintext client for an `s2cs --ssl false`, sending metadata as SciStream 1.2 does.
#[derive(Clone)]
pub struct RawClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connecting to s2cs");
        RawClient {
            grpc: tonic::client::Grpc::new(ch),
        }
    }

    async fn call<
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    >(
        &self,
        method: &'static str,
        msg: Q,
    ) -> Result<A, Status> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", "INVALID_TOKEN".parse().expect("ascii"));
        let path = PathAndQuery::from_static(method);
        Ok(grpc
            .unary(req, path, ProstCodec::<Q, A>::default())
            .await?
            .into_inner())
    }

    pub async fn req(
        &self,
        uid: &str,
        role: &str,
        num_conn: i32,
        rate: i32,
    ) -> Result<Response, Status> {
        self.call(
            "/scistream.Control/req",
            Request {
                uid: uid.into(),
                role: role.into(),
                num_conn,
                rate,
            },
        )
        .await
    }

    pub async fn hello(
        &self,
        uid: &str,
        prod_listeners: &[&str],
        role: &str,
    ) -> Result<AppResponse, Status> {
        let prod_listeners = prod_listeners.iter().map(|s| s.to_string()).collect();
        self.call(
            "/scistream.Control/hello",
            Hello {
                uid: uid.into(),
                prod_listeners,
                role: role.into(),
            },
        )
        .await
    }

    pub async fn update(&self, uid: &str, remote: &[&str], role: &str) -> Result<Response, Status> {
        let remote_listeners = remote.iter().map(|s| s.to_string()).collect();
        self.call(
            "/scistream.Control/update",
            UpdateTargets {
                uid: uid.into(),
                remote_listeners,
                role: role.into(),
            },
        )
        .await
    }

    pub async fn release(&self, uid: &str) -> Result<Response, Status> {
        self.call("/scistream.Control/release", Release { uid: uid.into() })
            .await
    }
}

/// Asserts a call failed with `code`, returning the message for further checks.
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code) -> String {
    match r {
        Err(s) if s.code() == code => s.message().to_string(),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A current-thread runtime: run it inside `testbed::in_netns` so sockets are
/// created in that namespace.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
