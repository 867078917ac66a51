//! The attribute names allowed in `when[].key`, parsed once so validation and evaluation share one definition.

use std::fmt;
use std::str::FromStr;

/// A supported `when` attribute (Istio "conditions" reference plus the implemented extras `remote.ip`,
/// `source.serviceAccount` and `source.trustDomain`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConditionKey {
    /// `request.headers[<name>]`; the name is kept as written (compare case-insensitively).
    RequestHeader(String),
    /// `source.ip`
    SourceIp,
    /// `remote.ip`
    RemoteIp,
    /// `source.namespace`
    SourceNamespace,
    /// `source.principal`
    SourcePrincipal,
    /// `source.serviceAccount`
    SourceServiceAccount,
    /// `source.trustDomain`
    SourceTrustDomain,
    /// `request.auth.principal`
    RequestAuthPrincipal,
    /// `request.auth.audiences`
    RequestAuthAudiences,
    /// `request.auth.presenter`
    RequestAuthPresenter,
    /// `request.auth.claims[a]` or nested `request.auth.claims[a][b]...`: the claim path.
    RequestAuthClaims(Vec<String>),
    /// `destination.ip`
    DestinationIp,
    /// `destination.port`
    DestinationPort,
    /// `connection.sni`
    ConnectionSni,
    /// `experimental.envoy.filters.<filter>[<key>]`
    EnvoyFilter { filter: String, key: String },
}

/// What the values of a condition must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Exact/prefix/suffix/presence string match.
    String,
    /// IP address or CIDR.
    IpBlock,
    /// Port number 0..65535.
    Port,
    /// `<ns>/<sa>` or `<sa>`, exact.
    ServiceAccount,
    /// Trust domain: no `/`, a single `*` only at start or end.
    TrustDomain,
}

impl ConditionKey {
    pub fn value_kind(&self) -> ValueKind {
        match self {
            ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => ValueKind::IpBlock,
            ConditionKey::DestinationPort => ValueKind::Port,
            ConditionKey::SourceServiceAccount => ValueKind::ServiceAccount,
            ConditionKey::SourceTrustDomain => ValueKind::TrustDomain,
            _ => ValueKind::String,
        }
    }

    /// Attributes that only exist for HTTP traffic (Istio reference §2.9); needed to treat TCP traffic correctly.
    pub fn is_http_only(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestAuthPrincipal
                | ConditionKey::RequestAuthAudiences
                | ConditionKey::RequestAuthPresenter
                | ConditionKey::RequestAuthClaims(_)
        )
    }
}

/// Splits `[a][b]...` into `["a", "b"]`; each bracket must be non-empty and contain no brackets.
fn bracket_groups(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let group = &inner[..end];
        if group.is_empty() || group.contains('[') {
            return None;
        }
        out.push(group.to_string());
        rest = &inner[end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

impl FromStr for ConditionKey {
    type Err = String;

    fn from_str(key: &str) -> Result<Self, String> {
        let map_key_err = || format!("bad key {key:?}: should have format a[b]");
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "source.serviceAccount" => ConditionKey::SourceServiceAccount,
            "source.trustDomain" => ConditionKey::SourceTrustDomain,
            "request.auth.principal" => ConditionKey::RequestAuthPrincipal,
            "request.auth.audiences" => ConditionKey::RequestAuthAudiences,
            "request.auth.presenter" => ConditionKey::RequestAuthPresenter,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            "destination.namespace" => {
                return Err(format!("attribute {key} is replaced by the metadata.namespace"));
            }
            "destination.name" | "destination.user" => {
                return Err(format!("deprecated attribute {key}: only supported in v1alpha1"));
            }
            _ => {
                if let Some(rest) = key.strip_prefix("request.headers") {
                    match bracket_groups(rest) {
                        Some(mut g) if g.len() == 1 => ConditionKey::RequestHeader(g.remove(0)),
                        _ => return Err(map_key_err()),
                    }
                } else if let Some(rest) = key.strip_prefix("request.auth.claims") {
                    ConditionKey::RequestAuthClaims(bracket_groups(rest).ok_or_else(map_key_err)?)
                } else if let Some(rest) = key.strip_prefix("experimental.envoy.filters.") {
                    let open = rest.find('[').ok_or_else(map_key_err)?;
                    let (filter, groups) = rest.split_at(open);
                    match bracket_groups(groups) {
                        Some(mut g) if g.len() == 1 && !filter.is_empty() => {
                            ConditionKey::EnvoyFilter { filter: format!("envoy.filters.{filter}"), key: g.remove(0) }
                        }
                        _ => return Err(map_key_err()),
                    }
                } else if key.starts_with("destination.labels") {
                    return Err(format!("attribute {key} is replaced by the workload selector"));
                } else {
                    return Err(format!("unknown attribute: {key}"));
                }
            }
        })
    }
}

impl fmt::Display for ConditionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConditionKey::RequestHeader(h) => write!(f, "request.headers[{h}]"),
            ConditionKey::SourceIp => f.write_str("source.ip"),
            ConditionKey::RemoteIp => f.write_str("remote.ip"),
            ConditionKey::SourceNamespace => f.write_str("source.namespace"),
            ConditionKey::SourcePrincipal => f.write_str("source.principal"),
            ConditionKey::SourceServiceAccount => f.write_str("source.serviceAccount"),
            ConditionKey::SourceTrustDomain => f.write_str("source.trustDomain"),
            ConditionKey::RequestAuthPrincipal => f.write_str("request.auth.principal"),
            ConditionKey::RequestAuthAudiences => f.write_str("request.auth.audiences"),
            ConditionKey::RequestAuthPresenter => f.write_str("request.auth.presenter"),
            ConditionKey::RequestAuthClaims(path) => {
                f.write_str("request.auth.claims")?;
                path.iter().try_for_each(|p| write!(f, "[{p}]"))
            }
            ConditionKey::DestinationIp => f.write_str("destination.ip"),
            ConditionKey::DestinationPort => f.write_str("destination.port"),
            ConditionKey::ConnectionSni => f.write_str("connection.sni"),
            ConditionKey::EnvoyFilter { filter, key } => write!(f, "experimental.{filter}[{key}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_keys_round_trip() {
        let cases: &[(&str, ConditionKey)] = &[
            ("request.headers[User-Agent]", ConditionKey::RequestHeader("User-Agent".into())),
            ("source.ip", ConditionKey::SourceIp),
            ("remote.ip", ConditionKey::RemoteIp),
            ("source.namespace", ConditionKey::SourceNamespace),
            ("source.principal", ConditionKey::SourcePrincipal),
            ("source.serviceAccount", ConditionKey::SourceServiceAccount),
            ("source.trustDomain", ConditionKey::SourceTrustDomain),
            ("request.auth.principal", ConditionKey::RequestAuthPrincipal),
            ("request.auth.audiences", ConditionKey::RequestAuthAudiences),
            ("request.auth.presenter", ConditionKey::RequestAuthPresenter),
            ("request.auth.claims[groups]", ConditionKey::RequestAuthClaims(vec!["groups".into()])),
            (
                "request.auth.claims[nested][key1]",
                ConditionKey::RequestAuthClaims(vec!["nested".into(), "key1".into()]),
            ),
            ("request.auth.claims[foo.com/name]", ConditionKey::RequestAuthClaims(vec!["foo.com/name".into()])),
            ("destination.ip", ConditionKey::DestinationIp),
            ("destination.port", ConditionKey::DestinationPort),
            ("connection.sni", ConditionKey::ConnectionSni),
            (
                "experimental.envoy.filters.network.mysql_proxy[db.table]",
                ConditionKey::EnvoyFilter {
                    filter: "envoy.filters.network.mysql_proxy".into(),
                    key: "db.table".into(),
                },
            ),
        ];
        for (input, want) in cases {
            let got: ConditionKey = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&got, want, "{input}");
            assert_eq!(got.to_string(), *input);
        }
    }

    #[test]
    fn rejected_keys() {
        let cases: &[(&str, &str)] = &[
            ("", "unknown attribute"),
            ("source.ips", "unknown attribute"),
            ("request.headers", "should have format a[b]"),
            ("request.headers[]", "should have format a[b]"),
            ("request.headers[a][b]", "should have format a[b]"),
            ("request.headers[a", "should have format a[b]"),
            ("request.headersx[a]", "should have format a[b]"),
            ("request.auth.claims", "should have format a[b]"),
            ("request.auth.claims[]", "should have format a[b]"),
            ("request.auth.claims[a]b", "should have format a[b]"),
            ("request.auth.claims.groups", "should have format a[b]"),
            ("experimental.envoy.filters.[a]", "should have format a[b]"),
            ("experimental.envoy.filters.x", "should have format a[b]"),
            ("destination.namespace", "replaced by the metadata.namespace"),
            ("destination.labels[app]", "replaced by the workload selector"),
            ("destination.name", "only supported in v1alpha1"),
            ("destination.user", "only supported in v1alpha1"),
            ("Source.IP", "unknown attribute"),
        ];
        for (input, want) in cases {
            let err = input.parse::<ConditionKey>().unwrap_err();
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    #[test]
    fn value_kinds_and_http_only() {
        assert_eq!(ConditionKey::DestinationPort.value_kind(), ValueKind::Port);
        assert_eq!(ConditionKey::RemoteIp.value_kind(), ValueKind::IpBlock);
        assert_eq!(ConditionKey::SourceNamespace.value_kind(), ValueKind::String);
        assert!(ConditionKey::RequestAuthClaims(vec!["a".into()]).is_http_only());
        assert!(!ConditionKey::SourceIp.is_http_only());
        assert!(!ConditionKey::RemoteIp.is_http_only());
    }
}
