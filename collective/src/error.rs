use std::io;
use std::time::Duration;

/// Why a collective operation failed. Every variant except `InvalidArgument` leaves the group
/// unusable: the worker should go back to rendezvous and form the next generation.
#[derive(thiserror::Error, Debug)]
pub enum CollectiveError {
    #[error("rank {peer} made no progress within the timeout during {op}")]
    Timeout { peer: usize, op: &'static str },
    #[error("rank {peer} closed its connection during {op}")]
    PeerClosed { peer: usize, op: &'static str },
    #[error("handshake with rank {peer} failed: {reason}")]
    Handshake { peer: usize, reason: String },
    #[error("rank {peer} broke the protocol during {op}: {reason}")]
    Protocol {
        peer: usize,
        op: &'static str,
        reason: String,
    },
    #[error("another rank abandoned {op}")]
    Aborted { op: &'static str },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the group failed in an earlier operation; rendezvous again")]
    Broken,
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// The NCCL backend cannot run in this process (no GPU seen by libtorch, no CUDA driver,
    /// no usable NCCL library). Only from creating a communicator: no group was formed.
    #[error("the NCCL backend is unavailable: {message}")]
    Unavailable { message: String },
    /// NCCL, or the CUDA driver under it, failed during `op`; the communicator was aborted.
    #[error("NCCL {op} failed: {message}")]
    Nccl { op: &'static str, message: String },
    /// A device-side operation did not complete within the group's timeout (a peer died or
    /// stalls); the NCCL communicator was aborted.
    #[error("{op} did not complete within {waited:?}; the NCCL communicator was aborted")]
    DeviceTimeout { op: &'static str, waited: Duration },
    /// The communicator was aborted through its abort handle (e.g. by a watchdog when the
    /// coordinator announced a new generation) before or during `op`.
    #[error("{op} was abandoned: the communicator was aborted through its abort handle")]
    AbortRequested { op: &'static str },
}

impl CollectiveError {
    /// Classifies an I/O error on the connection with `peer`: a socket timeout is a wedged
    /// peer, a reset/EOF/broken pipe is a dead one.
    pub(crate) fn from_socket(e: io::Error, peer: usize, op: &'static str) -> Self {
        use io::ErrorKind::*;
        match e.kind() {
            WouldBlock | TimedOut => CollectiveError::Timeout { peer, op },
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
                CollectiveError::PeerClosed { peer, op }
            }
            _ => CollectiveError::Io {
                context: format!("{op} with rank {peer}"),
                source: e,
            },
        }
    }

    /// The peer whose link this failure points at: one that made no progress within the
    /// timeout, or whose handshake never completed. A peer that closed its connection only
    /// followed a failure elsewhere, so it names none.
    pub fn suspect(&self) -> Option<usize> {
        match self {
            CollectiveError::Timeout { peer, .. } | CollectiveError::Handshake { peer, .. } => {
                Some(*peer)
            }
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        CollectiveError::Io {
            context: context.into(),
            source,
        }
    }
}
