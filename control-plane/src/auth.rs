//! Who is calling: the TLS layer has already verified the client certificate chain against the mesh roots;
//! here its SPIFFE ID says whether the caller is a node, an admin, or neither.

use tonic::{Request, Status};
use trellis_proto::spiffe::{SpiffeId, Subject};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Node(String),
    Admin(String),
    /// A valid mesh certificate that is neither (a workload's SVID, say).
    Other(SpiffeId),
}

/// The caller's identity, or UNAUTHENTICATED when it presented no usable certificate.
pub fn caller<T>(request: &Request<T>, trust_domain: &str) -> Result<Caller, Status> {
    let certs = request
        .peer_certs()
        .filter(|certs| !certs.is_empty())
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0])
        .map_err(|_| Status::unauthenticated("client certificate cannot be parsed"))?;
    let uri = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
        })
        .ok_or_else(|| Status::unauthenticated("client certificate has no SPIFFE ID"))?;
    let id = SpiffeId::parse(&uri).map_err(|e| Status::unauthenticated(e.to_string()))?;
    if id.trust_domain() != trust_domain {
        return Err(Status::permission_denied(format!(
            "client certificate is from trust domain {}",
            id.trust_domain()
        )));
    }
    Ok(match id.subject() {
        Subject::Node(name) => Caller::Node(name.to_owned()),
        Subject::Admin(name) => Caller::Admin(name.to_owned()),
        _ => Caller::Other(id),
    })
}

pub fn require_admin<T>(request: &Request<T>, trust_domain: &str) -> Result<String, Status> {
    match caller(request, trust_domain)? {
        Caller::Admin(name) => Ok(name),
        other => Err(Status::permission_denied(format!("{} may not call the admin API", describe(&other)))),
    }
}

pub fn describe(caller: &Caller) -> String {
    match caller {
        Caller::Node(name) => format!("node {name:?}"),
        Caller::Admin(name) => format!("admin {name:?}"),
        Caller::Other(id) => id.to_string(),
    }
}
