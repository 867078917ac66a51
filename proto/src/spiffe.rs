//! SPIFFE IDs as Trellis uses them (SPIFFE ID spec: `spiffe://<trust-domain>/<path>`).
//!
//! Three shapes exist in a Trellis mesh, told apart by their path:
//! - workloads: `ns/<namespace>/sa/<service-account>` (Istio's form);
//! - proxies' node credentials: `trellis/node/<node-name>`;
//! - admin credentials: `trellis/admin/<name>`.
//!
//! `trellis` is not a valid first segment of a workload path, so the shapes cannot be confused.

use std::fmt;

/// A parsed, validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// What a SPIFFE ID names in a Trellis mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject<'a> {
    Workload { namespace: &'a str, service_account: &'a str },
    Node(&'a str),
    Admin(&'a str),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {id:?}: {reason}")]
pub struct SpiffeIdError {
    pub id: String,
    pub reason: &'static str,
}

const MAX_LEN: usize = 2048;

impl SpiffeId {
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        let err = |reason| SpiffeIdError { id: id.to_owned(), reason };
        if id.len() > MAX_LEN {
            return Err(err("longer than 2048 bytes"));
        }
        let rest = id.strip_prefix("spiffe://").ok_or_else(|| err("scheme is not spiffe://"))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain).map_err(err)?;
        if path.is_empty() {
            return Err(err("path is empty (a workload ID needs a path)"));
        }
        for segment in path.split('/') {
            validate_segment(segment).map_err(err)?;
        }
        Ok(Self { trust_domain: trust_domain.to_owned(), path: path.to_owned() })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"))
    }

    pub fn node(trust_domain: &str, node: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("spiffe://{trust_domain}/trellis/node/{node}"))
    }

    pub fn admin(trust_domain: &str, name: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("spiffe://{trust_domain}/trellis/admin/{name}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Istio's principal form: the ID without `spiffe://`.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.trust_domain, self.path)
    }

    pub fn subject(&self) -> Subject<'_> {
        let parts: Vec<&str> = self.path.split('/').collect();
        match parts.as_slice() {
            ["ns", namespace, "sa", service_account] => Subject::Workload { namespace, service_account },
            ["trellis", "node", name] => Subject::Node(name),
            ["trellis", "admin", name] => Subject::Admin(name),
            _ => Subject::Other,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Trust domain: lowercase letters, digits, `.`, `-`, `_` (SPIFFE ID spec 2.1).
pub fn validate_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("trust domain is empty");
    }
    if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')) {
        return Err("trust domain may hold only lowercase letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

/// Path segment: letters, digits, `.`, `-`, `_`; not empty, not `.` or `..` (SPIFFE ID spec 2.2).
fn validate_segment(segment: &str) -> Result<(), &'static str> {
    if segment.is_empty() {
        return Err("path has an empty segment");
    }
    if segment == "." || segment == ".." {
        return Err("path has a '.' or '..' segment");
    }
    if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
        return Err("path may hold only letters, digits, '.', '-', '_' and '/'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_classifies() {
        let cases: &[(&str, Option<Subject>)] = &[
            (
                "spiffe://cluster.local/ns/foo/sa/bar",
                Some(Subject::Workload { namespace: "foo", service_account: "bar" }),
            ),
            ("spiffe://td/trellis/node/node-1", Some(Subject::Node("node-1"))),
            ("spiffe://td/trellis/admin/admin", Some(Subject::Admin("admin"))),
            ("spiffe://td/something/else", Some(Subject::Other)),
            ("spiffe://td/ns/foo/sa/bar/extra", Some(Subject::Other)),
            ("http://td/ns/foo/sa/bar", None),
            ("spiffe://TD/ns/foo/sa/bar", None),
            ("spiffe://td", None),
            ("spiffe://td/", None),
            ("spiffe://td/ns//sa/bar", None),
            ("spiffe://td/ns/../sa/bar", None),
            ("spiffe://td/ns/fo o/sa/bar", None),
            ("spiffe:///ns/foo/sa/bar", None),
        ];
        for (input, want) in cases {
            let got = SpiffeId::parse(input);
            match want {
                Some(subject) => assert_eq!(&got.expect(input).subject(), subject, "{input}"),
                None => assert!(got.is_err(), "{input} should be rejected"),
            }
        }
    }

    #[test]
    fn principal_drops_scheme() {
        let id = SpiffeId::workload("cluster.local", "ns1", "sa1").unwrap();
        assert_eq!(id.principal(), "cluster.local/ns/ns1/sa/sa1");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/ns1/sa/sa1");
    }
}
