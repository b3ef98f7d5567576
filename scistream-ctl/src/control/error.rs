//! Control-plane errors, mapped once to gRPC status codes.

use tonic::{Code, Status};

use super::auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no session with uid {0}")]
    NotFound(String),
    #[error("a session with uid {0} already exists")]
    AlreadyExists(String),
    #[error("port range {range} exhausted: {wanted} ports wanted, {free} free")]
    PortsExhausted {
        range: String,
        wanted: usize,
        free: usize,
    },
    #[error("no hello for session {uid} within {secs} s; the session was released")]
    HelloTimeout { uid: String, secs: u64 },
    #[error("session {0} was released while the request waited for its hello")]
    Released(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    DataPlane(#[from] crate::dataplane::DataPlaneError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("session {uid} belongs to another identity")]
    NotOwner { uid: String },
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    /// A bounded table is full; the client may retry later.
    #[error("{0}")]
    Busy(String),
}

impl ControlError {
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::PortsExhausted { .. } => Code::ResourceExhausted,
            Self::HelloTimeout { .. } => Code::DeadlineExceeded,
            Self::Released(_) => Code::Aborted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::DataPlane(_) => Code::Internal,
            Self::Auth(AuthError::Missing { .. } | AuthError::Rejected { .. }) => {
                Code::Unauthenticated
            }
            // A token that could not be checked is refused, but as a server
            // fault the client may retry, not as a bad token.
            Self::Auth(AuthError::Unavailable { .. }) => Code::Unavailable,
            Self::NotOwner { .. } => Code::PermissionDenied,
            Self::Store(_) => Code::Internal,
            Self::Busy(_) => Code::ResourceExhausted,
        }
    }
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
