//! `Identity.Join`: a join token buys a node credential.

use tonic::{Request, Response, Status};
use trellis_proto::v1 as pb;

use super::Shared;

pub struct IdentityService(pub Shared);

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.into_inner();
        let mesh = self.0.mesh.clone();
        let result =
            tokio::task::spawn_blocking(move || mesh.join(&req.token, &req.node, &req.csr_der).map(|r| (req.node, r)))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        let (node, (issued, namespaces)) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let status = Status::from(e);
                metrics::counter!("trellis_join_attempts_total", "result" => result_label(status.code())).increment(1);
                tracing::warn!(error = %status.message(), "join refused");
                return Err(status);
            }
        };
        metrics::counter!("trellis_join_attempts_total", "result" => "ok").increment(1);
        tracing::info!(%node, serial = %issued.serial_hex, "node credential issued");
        Ok(Response::new(pb::JoinResponse {
            certificate_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: Some(self.0.mesh.current().trust_bundle.clone()),
            namespaces,
        }))
    }
}

fn result_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unauthenticated => "bad_token",
        tonic::Code::PermissionDenied => "denied",
        tonic::Code::InvalidArgument => "invalid",
        _ => "error",
    }
}
