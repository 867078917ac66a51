//! Resource kinds and the `(kind, namespace, name)` identity used as a store key.

use std::fmt;
use std::str::FromStr;

/// The three `security.istio.io` resource kinds Trellis understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::AuthorizationPolicy, Kind::PeerAuthentication, Kind::RequestAuthentication];

    /// The Kubernetes `kind` string, exactly as written in manifests.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// Lower-case plural resource name, as `kubectl get <plural>` uses it.
    pub fn plural(&self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::PeerAuthentication => "peerauthentications",
            Kind::RequestAuthentication => "requestauthentications",
        }
    }

    /// Short name (`ap`, `pa`, `ra`), as accepted by the CLI.
    pub fn short_name(&self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => "ap",
            Kind::PeerAuthentication => "pa",
            Kind::RequestAuthentication => "ra",
        }
    }

    /// Exact (case-sensitive) match of a manifest's `kind` field; manifests must use the canonical spelling.
    pub fn from_manifest_kind(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Returned when a kind name is not one of the three supported kinds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?}: expected AuthorizationPolicy (ap), PeerAuthentication (pa) or RequestAuthentication (ra)")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Lenient on purpose (CLI input): case-insensitive singular, plural or short name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| lower == k.as_str().to_ascii_lowercase() || lower == k.plural() || lower == k.short_name())
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// Identity of a resource: unique per store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ResourceKey { kind, namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// Returned when a `Kind/namespace/name` string cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource key {0:?}: expected <Kind>/<namespace>/<name>")]
pub struct InvalidResourceKey(pub String);

impl FromStr for ResourceKey {
    type Err = InvalidResourceKey;

    /// Inverse of `Display`, so keys can round-trip through logs, CLI arguments and storage.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, '/');
        let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(InvalidResourceKey(s.to_string()));
        };
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return Err(InvalidResourceKey(s.to_string()));
        }
        let kind = kind.parse::<Kind>().map_err(|_| InvalidResourceKey(s.to_string()))?;
        Ok(ResourceKey::new(kind, ns, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_str_accepts_all_spellings() {
        let cases = [
            ("AuthorizationPolicy", Kind::AuthorizationPolicy),
            ("authorizationpolicy", Kind::AuthorizationPolicy),
            ("AUTHORIZATIONPOLICIES", Kind::AuthorizationPolicy),
            ("ap", Kind::AuthorizationPolicy),
            ("AP", Kind::AuthorizationPolicy),
            ("PeerAuthentication", Kind::PeerAuthentication),
            ("peerauthentications", Kind::PeerAuthentication),
            ("pa", Kind::PeerAuthentication),
            ("requestauthentication", Kind::RequestAuthentication),
            ("RequestAuthentications", Kind::RequestAuthentication),
            ("ra", Kind::RequestAuthentication),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Kind>().unwrap(), want, "{input}");
        }
        for bad in ["", "policy", "authz", "a p", "VirtualService"] {
            assert!(bad.parse::<Kind>().is_err(), "{bad}");
        }
    }

    #[test]
    fn kind_display_and_as_str_agree() {
        for k in Kind::ALL {
            assert_eq!(k.to_string(), k.as_str());
            assert_eq!(Kind::from_manifest_kind(k.as_str()), Some(k));
            assert_eq!(k.as_str().parse::<Kind>().unwrap(), k);
        }
        assert_eq!(Kind::from_manifest_kind("authorizationpolicy"), None);
    }

    #[test]
    fn kind_serde_uses_canonical_names() {
        assert_eq!(serde_json::to_string(&Kind::PeerAuthentication).unwrap(), "\"PeerAuthentication\"");
        let k: Kind = serde_json::from_str("\"RequestAuthentication\"").unwrap();
        assert_eq!(k, Kind::RequestAuthentication);
    }

    #[test]
    fn resource_key_display_round_trips() {
        let key = ResourceKey::new(Kind::AuthorizationPolicy, "foo", "deny-all");
        assert_eq!(key.to_string(), "AuthorizationPolicy/foo/deny-all");
        assert_eq!(key.to_string().parse::<ResourceKey>().unwrap(), key);
        assert_eq!("pa/istio-system/default".parse::<ResourceKey>().unwrap().kind, Kind::PeerAuthentication);
        for bad in ["", "ap/ns", "ap//name", "ap/ns/", "ap/ns/a/b", "x/ns/name"] {
            assert!(bad.parse::<ResourceKey>().is_err(), "{bad}");
        }
    }
}
