//! Why the state machine refused a request. The gRPC service maps each kind to its status
//! code; the machine itself knows nothing of gRPC.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The request is malformed whatever the job's state (a bad address, an oversized blob).
    #[error("{0}")]
    InvalidArgument(String),
    /// The worker id is not (or no longer) known: the worker should join again.
    #[error("{0}")]
    NotFound(String),
    /// Not now: the job's state does not allow it (a stale generation, a stopped job).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A step outside what the job has reached.
    #[error("{0}")]
    OutOfRange(String),
    /// The caller may not do this (a checkpoint report from a worker that is not rank 0).
    #[error("{0}")]
    PermissionDenied(String),
    /// The durable store failed: the change did not happen.
    #[error("coordinator state store failed: {0}")]
    Store(#[from] StoreError),
}

impl StateError {
    pub fn invalid_argument(message: impl Into<String>) -> StateError {
        StateError::InvalidArgument(message.into())
    }
    pub fn not_found(message: impl Into<String>) -> StateError {
        StateError::NotFound(message.into())
    }
    pub fn failed_precondition(message: impl Into<String>) -> StateError {
        StateError::FailedPrecondition(message.into())
    }
    pub fn out_of_range(message: impl Into<String>) -> StateError {
        StateError::OutOfRange(message.into())
    }
    pub fn permission_denied(message: impl Into<String>) -> StateError {
        StateError::PermissionDenied(message.into())
    }
}
