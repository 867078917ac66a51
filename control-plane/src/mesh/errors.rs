//! [`MeshError`]: why a mesh operation was refused or failed, and the gRPC status each reason maps to (internal
//! failures are logged here, once, as they leave for a caller).

use crate::ca::CaError;
use crate::store::StoreError;
use crate::tokens::TokenRefusal;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
}

impl From<TokenRefusal> for MeshError {
    fn from(r: TokenRefusal) -> Self {
        match r {
            TokenRefusal::WrongNode { .. } => MeshError::PermissionDenied(r.to_string()),
            _ => MeshError::Unauthenticated(r.to_string()),
        }
    }
}

/// How to check a write whose outcome is unknown, where the call does not say better ([`MeshError::status_checked`]).
const CHECK_ANY: &str = "`trellisctl get`, `trellisctl nodes`, `trellisctl revoke` or `trellisctl ca status` (what the \
                         call changes) once the store answers, before repeating it";

impl MeshError {
    /// The gRPC status, an unknown outcome naming `check` (a command, and how to read it) as the way to find out
    /// whether the write was applied.
    pub fn status_checked(self, check: &str) -> tonic::Status {
        match self {
            MeshError::Store(e @ StoreError::OutcomeUnknown { .. }) => {
                tracing::warn!(error = %e, "a write's outcome is unknown");
                tonic::Status::unknown(format!("{e}: check with {check}"))
            }
            other => other.into(),
        }
    }
}

impl From<MeshError> for tonic::Status {
    fn from(e: MeshError) -> Self {
        let msg = e.to_string();
        match e {
            MeshError::Store(StoreError::OutcomeUnknown { .. }) => e.status_checked(CHECK_ANY),
            MeshError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            MeshError::NotFound(_) => tonic::Status::not_found(msg),
            MeshError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            MeshError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            MeshError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            MeshError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            MeshError::Store(StoreError::Unavailable(_)) => tonic::Status::unavailable(msg),
            MeshError::Ca(CaError::Rcgen(_) | CaError::Io(_) | CaError::Material(_)) | MeshError::Store(_) => {
                tracing::error!(error = %msg, "internal error");
                tonic::Status::internal(msg)
            }
            MeshError::Ca(_) => tonic::Status::invalid_argument(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn refusals_map_to_grpc_codes() {
        let status = |e: MeshError| {
            let s = tonic::Status::from(e);
            (s.code(), s.message().to_owned())
        };
        let wrong_node = TokenRefusal::WrongNode { token_node: "n1".into(), node: "n2".into() };
        assert_eq!(
            status(wrong_node.into()),
            (Code::PermissionDenied, "join token is for node \"n1\", not \"n2\"".into())
        );
        assert_eq!(status(TokenRefusal::Used.into()), (Code::Unauthenticated, "join token was already used".into()));
        assert_eq!(status(CaError::Refused("no".into()).into()), (Code::InvalidArgument, "no".into()));
        assert_eq!(status(CaError::Material("bad key".into()).into()).0, Code::Internal);
        assert_eq!(status(StoreError::Backend("disk".into()).into()).0, Code::Internal);
        assert_eq!(
            status(StoreError::Unavailable("etcd: no quorum".into()).into()),
            (Code::Unavailable, "store unavailable: etcd: no quorum".into())
        );
        assert_eq!(status(MeshError::NotFound("gone".into())), (Code::NotFound, "gone".into()));
        let unknown = || StoreError::OutcomeUnknown { txn: "ab12".into(), reason: "etcd did not answer".into() };
        let (code, message) = status(unknown().into());
        assert_eq!(code, Code::Unknown);
        assert!(message.starts_with("store unavailable: outcome unknown: etcd did not answer; transaction ab12 "));
        assert!(message.ends_with(&format!("check with {CHECK_ANY}")), "{message}");
        let checked = MeshError::from(unknown()).status_checked("`trellisctl apply --dry-run -f FILE`");
        assert!(checked.message().ends_with(": check with `trellisctl apply --dry-run -f FILE`"), "{checked:?}");
    }
}
