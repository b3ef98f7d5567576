//! Memory a control call holds before it is decoded (and so before its token
//! is checked): a request message still arriving is charged to its
//! connection's budget and to the server's, and must be whole within
//! `--control_body_timeout`. A message that arrives whole in one frame, as
//! every real client sends it, is never charged, so a flood of partial
//! messages cannot crowd out real callers. Also here: `req` calls waiting
//! for their hello may take only half of a connection's streams, so the
//! hellos that complete them always find one.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Bytes;
use tonic::Status;

use super::conn::ConnInfo;

/// gRPC's length-prefixed message header: a flag byte and a u32 length.
const GRPC_HEADER: usize = 5;
const REQ_PATH: &str = "/scistream.Control/req";

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub body_timeout: Duration,
    /// Bytes of incomplete messages one connection may hold.
    pub per_connection: usize,
    /// Bytes of incomplete messages all connections together may hold.
    pub total: usize,
    /// `req` calls in flight on one connection (the rest of its streams
    /// stay free for hellos and the other calls).
    pub pending_reqs: usize,
}

#[derive(Clone)]
pub struct PreAuth<S> {
    inner: S,
    limits: Limits,
    total: Arc<AtomicUsize>,
}

impl<S> PreAuth<S> {
    pub fn new(inner: S, limits: Limits) -> Self {
        Self {
            inner,
            limits,
            total: Arc::default(),
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for PreAuth<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<Request<Body>> for PreAuth<S>
where
    S: tonic::codegen::Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let pending_req = if req.uri().path() == REQ_PATH {
            match conn.as_ref().map(|c| c.begin_req(self.limits.pending_reqs)) {
                Some(None) => {
                    let refused = Status::resource_exhausted(format!(
                        "{} req calls already wait for their hello on this connection; send the hellos or open another connection",
                        self.limits.pending_reqs
                    ));
                    return Box::pin(async move { Ok(refused.into_http()) });
                }
                Some(Some(g)) => Some(g),
                None => None,
            }
        } else {
            None
        };
        let mut req = req;
        if let Some(c) = &conn {
            req.extensions_mut()
                .insert(crate::control::auth::CallerAddr(
                    c.peer().ip().to_canonical(),
                ));
        }
        let budgets = Budgets {
            conn,
            total: self.total.clone(),
            limits: self.limits,
        };
        let req = req.map(|b| Body::new(Bounded::new(b, budgets)));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(pending_req);
            r
        })
    }
}

struct Budgets {
    conn: Option<ConnInfo>,
    total: Arc<AtomicUsize>,
    limits: Limits,
}

impl Budgets {
    /// Charges `n` more bytes to both budgets, or neither.
    fn charge(&self, n: usize) -> Result<(), Status> {
        let total_ok = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t + n <= self.limits.total).then_some(t + n)
            })
            .is_ok();
        if !total_ok {
            return Err(Status::resource_exhausted(format!(
                "s2cs holds its limit of {} KiB of request messages not yet whole; send each message whole",
                self.limits.total / 1024
            )));
        }
        if let Some(c) = &self.conn {
            if !c.charge(n, self.limits.per_connection) {
                self.total.fetch_sub(n, Ordering::AcqRel);
                return Err(Status::resource_exhausted(format!(
                    "this connection holds its limit of {} KiB of request messages not yet whole",
                    self.limits.per_connection / 1024
                )));
            }
        }
        Ok(())
    }

    fn refund(&self, n: usize) {
        if n > 0 {
            self.total.fetch_sub(n, Ordering::AcqRel);
            if let Some(c) = &self.conn {
                c.refund(n);
            }
        }
    }
}

/// A request body that counts its first message's bytes until it is whole.
struct Bounded {
    inner: Body,
    budgets: Budgets,
    /// The first message's header bytes, until all 5 are in.
    header: Vec<u8>,
    seen: usize,
    /// Header plus payload, once the header is in.
    needed: Option<usize>,
    charged: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Bounded {
    fn new(inner: Body, budgets: Budgets) -> Self {
        Self {
            inner,
            budgets,
            header: Vec::with_capacity(GRPC_HEADER),
            seen: 0,
            needed: None,
            charged: 0,
            deadline: None,
        }
    }

    fn whole(&self) -> bool {
        self.needed.is_some_and(|n| self.seen >= n)
    }

    /// Accounts a data frame; an error ends the call.
    fn account(&mut self, data: &Bytes) -> Result<(), Status> {
        if self.whole() {
            return Ok(());
        }
        if self.header.len() < GRPC_HEADER {
            let take = (GRPC_HEADER - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..take]);
            if self.header.len() == GRPC_HEADER {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.needed = Some(GRPC_HEADER.saturating_add(len));
            }
        }
        self.seen = self.seen.saturating_add(data.len());
        if self.whole() {
            // Decoded right away: what was held is released.
            self.budgets.refund(std::mem::take(&mut self.charged));
            self.deadline = None;
            return Ok(());
        }
        let more = self.seen - self.charged;
        self.budgets.charge(more)?;
        self.charged += more;
        Ok(())
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        self.budgets.refund(self.charged);
    }
}

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if !this.whole() && this.deadline.is_none() {
            this.deadline = Some(Box::pin(tokio::time::sleep(
                this.budgets.limits.body_timeout,
            )));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(e) = this.account(data) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                            "request message not whole within {} s (--control_body_timeout)",
                            this.budgets.limits.body_timeout.as_secs()
                        )))));
                    }
                }
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(total: usize) -> Budgets {
        Budgets {
            conn: None,
            total: Arc::new(AtomicUsize::new(0)),
            limits: Limits {
                body_timeout: Duration::from_secs(1),
                per_connection: total,
                total,
                pending_reqs: 1,
            },
        }
    }

    fn message(len: u32, have: usize) -> Bytes {
        let mut v = vec![0u8];
        v.extend(len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, have));
        Bytes::from(v)
    }

    #[test]
    fn a_whole_message_is_never_charged_and_a_partial_one_is_until_it_completes() {
        let total = budgets(1 << 20).total.clone();
        let mut b = Bounded::new(
            Body::empty(),
            Budgets {
                total: total.clone(),
                ..budgets(1 << 20)
            },
        );
        b.account(&message(100, 100)).unwrap();
        assert_eq!(total.load(Ordering::Acquire), 0);

        let mut b = Bounded::new(
            Body::empty(),
            Budgets {
                total: total.clone(),
                ..budgets(1 << 20)
            },
        );
        b.account(&message(65_535, 1000)).unwrap();
        assert_eq!(total.load(Ordering::Acquire), 1005);
        b.account(&Bytes::from(vec![0u8; 64_535])).unwrap();
        assert_eq!(total.load(Ordering::Acquire), 0, "whole: refunded");
        let mut c = Bounded::new(
            Body::empty(),
            Budgets {
                total: total.clone(),
                ..budgets(1 << 20)
            },
        );
        c.account(&message(65_535, 3)).unwrap();
        drop(c);
        assert_eq!(
            total.load(Ordering::Acquire),
            0,
            "a dropped partial body refunds"
        );
    }

    #[test]
    fn partial_messages_past_the_budget_are_refused() {
        let total = Arc::new(AtomicUsize::new(0));
        let mk = || {
            Bounded::new(
                Body::empty(),
                Budgets {
                    total: total.clone(),
                    ..budgets(10_000)
                },
            )
        };
        let mut a = mk();
        a.account(&message(65_535, 6000)).unwrap();
        let mut b = mk();
        let e = b.account(&message(65_535, 6000)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            total.load(Ordering::Acquire),
            6005,
            "the refused charge was not kept"
        );
    }
}
