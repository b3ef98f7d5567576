//! `scistream.Control` over tonic: checks the caller's token, decodes the
//! SciStream messages, calls the registry, encodes answers. No state here
//! beyond the registry and the token checker.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};

use super::auth::{Authenticator, Identity};
use super::error::ControlError;
use super::session::{Registry, Role, SessionView};
use super::tunnel_key::{KeyRequest, SecretKind};
use crate::addr::to_strings;
use crate::proto;
use crate::proto::control_server::Control;

pub struct ControlService {
    registry: Arc<Registry>,
    /// `None`: authentication off, every call accepted as in SciStream.
    auth: Option<Arc<Authenticator>>,
}

impl ControlService {
    pub fn new(registry: Arc<Registry>, auth: Option<Arc<Authenticator>>) -> Self {
        Self { registry, auth }
    }

    /// The caller's identity, checked before anything else a call does.
    /// Asynchronous (an introspection round trip), hence here and not in a
    /// tonic interceptor.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Option<Identity>, ControlError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let metadata = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        let source = request
            .extensions()
            .get::<super::auth::CallerAddr>()
            .map(|a| a.0);
        Ok(Some(auth.check_from(metadata, source).await?))
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn req(
        &self,
        request: Request<proto::Request>,
    ) -> Result<Response<proto::Response>, Status> {
        let who = self.caller(&request).await?;
        let r = request.into_inner();
        // Spans name the call and role only: a uid that keys its tunnel must
        // stay out of logs, and the registry's lines name the session safely.
        let span = info_span!("req", role = %r.role);
        self.registry.expect_peers(&r.uid, &r.allowed_peers)?;
        let key = KeyRequest::from_fields(r.want_tunnel_key, &r.tunnel_key);
        let granted = self
            .registry
            .request(&r.uid, &r.role, r.num_conn, r.rate, who.as_ref(), key)
            .instrument(span)
            .await;
        if granted.is_err() {
            let _ = self.registry.expect_peers(&r.uid, &[]); // not left for a later req of this uid
        }
        let granted = granted?;
        Ok(Response::new(proto::Response {
            listeners: to_strings(&granted.listeners),
            prod_listeners: to_strings(&granted.prod_listeners),
            tunnel_key: granted.tunnel_key.map(|k| k.to_vec()).unwrap_or_default(),
        }))
    }

    async fn update(
        &self,
        request: Request<proto::UpdateTargets>,
    ) -> Result<Response<proto::Response>, Status> {
        let who = self.caller(&request).await?;
        let r = request.into_inner();
        let span = info_span!("update", role = %r.role);
        let (listeners, targets) = self
            .registry
            .update_detached(r.uid, r.remote_listeners, who)
            .instrument(span)
            .await?;
        Ok(Response::new(proto::Response {
            listeners: to_strings(&listeners),
            prod_listeners: to_strings(&targets),
            ..Default::default()
        }))
    }

    async fn release(
        &self,
        request: Request<proto::Release>,
    ) -> Result<Response<proto::Response>, Status> {
        let who = self.caller(&request).await?;
        let r = request.into_inner();
        let span = info_span!("release");
        self.registry
            .release(&r.uid, who.as_ref())
            .instrument(span)
            .await?;
        Ok(Response::new(proto::Response::default()))
    }

    async fn hello(
        &self,
        request: Request<proto::Hello>,
    ) -> Result<Response<proto::AppResponse>, Status> {
        let who = self.caller(&request).await?;
        let r = request.into_inner();
        let span = info_span!("hello", role = %r.role);
        let (role, listeners) = self
            .registry
            .hello(&r.uid, &r.prod_listeners, who.as_ref())
            .instrument(span)
            .await?;
        let message = match role {
            Role::Prod => "Sending Prod listeners...",
            Role::Cons => "Sending listeners...",
        };
        Ok(Response::new(proto::AppResponse {
            message: message.into(),
            listeners: to_strings(&listeners),
        }))
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::SessionList>, Status> {
        let who = self.caller(&request).await?;
        let sessions = self
            .registry
            .list(who.as_ref())
            .iter()
            .map(|v| {
                let mut i = info(v, &self.registry);
                // Only a proven owner sees a uid that keys its tunnel;
                // `status` needs the uid, so it reveals nothing new.
                let proven = who.is_some() && v.owner.is_some();
                if v.secret == SecretKind::Uid && !proven {
                    i.uid = v.log_id.clone();
                }
                i
            })
            .collect();
        Ok(Response::new(proto::SessionList { sessions }))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::SessionInfo>, Status> {
        let who = self.caller(&request).await?;
        let r = request.into_inner();
        Ok(Response::new(info(
            &self.registry.view(&r.uid, who.as_ref())?,
            &self.registry,
        )))
    }
}

fn info(v: &SessionView, registry: &Registry) -> proto::SessionInfo {
    let guard_dropped = registry.guard_session_dropped(&v.uid).unwrap_or_default();
    proto::SessionInfo {
        uid: v.uid.clone(),
        role: v.role.as_str().into(),
        backend: v.backend.into(),
        listeners: to_strings(&v.listeners),
        targets: to_strings(&v.targets),
        hello_received: v.hello_received,
        rate: v.rate,
        num_conn: v.num_conn as i32,
        connections_active: v.stats.connections_active,
        connections_total: v.stats.connections_total,
        connections_failed: v.stats.connections_failed,
        bytes_forward: v.stats.bytes_forward,
        bytes_backward: v.stats.bytes_backward,
        auth_failures: v.stats.auth_failures,
        age_ms: v.age.as_millis() as u64,
        owner: v.owner.clone().unwrap_or_default(),
        guard_dropped_packets: guard_dropped.packets,
        guard_dropped_bytes: guard_dropped.bytes,
        counters_available: Some(v.counters_observable),
        tunnel_secret: v.secret.as_str().into(),
        guard_attach: registry
            .guard_hooks()
            .iter()
            .map(|(iface, hook)| format!("{iface}={hook}"))
            .collect::<Vec<_>>()
            .join(","),
    }
}
