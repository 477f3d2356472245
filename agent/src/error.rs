//! The agent's errors and how each maps to a gRPC status code.

use thiserror::Error;

/// An error from an API call, carrying what the client needs to fix it.
#[derive(Debug, Error)]
pub enum AgentError {
    /// A request field is wrong.
    #[error("{field}: {why}")]
    InvalidArgument {
        /// The field's path in the request, e.g. `spec.vcpus`.
        field: String,
        /// What is wrong with it.
        why: String,
    },
    /// No VM has this id.
    #[error("vm_id: no VM with id {0:?}")]
    NotFound(String),
    /// No snapshot has this id.
    #[error("snapshot_id: no snapshot with id {0:?}")]
    SnapshotNotFound(String),
    /// The id or name is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The VM's state does not allow the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The node's limits would be exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller may not do this (its role, or a path outside the image directories).
    #[error("{0}")]
    PermissionDenied(String),
    /// The VMM cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error("state store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Anything else on the agent's side.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// An INVALID_ARGUMENT error on `field`.
    pub fn invalid(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            why: why.into(),
        }
    }

    /// A short name of the gRPC code (for logs and metrics).
    pub fn code(&self) -> tonic::Code {
        match self {
            AgentError::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            AgentError::NotFound(_) | AgentError::SnapshotNotFound(_) => tonic::Code::NotFound,
            AgentError::AlreadyExists(_) => tonic::Code::AlreadyExists,
            AgentError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            AgentError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            AgentError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            AgentError::Unavailable(_) => tonic::Code::Unavailable,
            AgentError::Store(_) | AgentError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<AgentError> for tonic::Status {
    /// The code and a message naming the field; an INVALID_ARGUMENT also carries the
    /// standard `google.rpc.BadRequest` detail (field path and description), which gRPC
    /// clients in every language decode from the `grpc-status-details-bin` trailer.
    fn from(e: AgentError) -> Self {
        use tonic_types::{ErrorDetails, StatusExt};
        match &e {
            AgentError::InvalidArgument { field, why } => tonic::Status::with_error_details(
                e.code(),
                e.to_string(),
                ErrorDetails::with_bad_request_violation(field.clone(), why.clone()),
            ),
            _ => tonic::Status::new(e.code(), e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let s: tonic::Status = AgentError::invalid("spec.vcpus", "must be 1-254, got 0").into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "spec.vcpus: must be 1-254, got 0");
        use tonic_types::StatusExt;
        let bad = s.get_details_bad_request().expect("a BadRequest detail");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "spec.vcpus");
        assert_eq!(bad.field_violations[0].description, "must be 1-254, got 0");
        let s: tonic::Status = AgentError::NotFound("x".into()).into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.get_details_bad_request().is_none());
        assert!(s.message().contains("\"x\""));
        let s: tonic::Status = AgentError::ResourceExhausted("vcpus".into()).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    }
}
