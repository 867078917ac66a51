//! One AuthorizationPolicy → its compiled form. Every value is parsed here, once per config change (CIDRs, ports,
//! string matchers, path templates, JWT principal splits, trust-domain aliases), so evaluation only compares.

use crate::authz::{Action, AuthorizationPolicy, Condition, Operation, Rule, Source};
use crate::cidr::Cidr;
use crate::common::WorkloadSelector;
use crate::condition::ConditionKey;
use crate::lexical::parse_port;
use crate::matcher::StringMatch;

use super::index_key::{IndexKey, principal_hash};
use super::matchers::{
    Field, FilterValueMatch, HeaderMatch, HostMatch, JwtPrincipalMatch, PathMatch, ServiceAccountMatch,
};

/// Istio's placeholder for "the local trust domain" in principals (istiod `constants.DefaultClusterLocalDomain`).
const CLUSTER_LOCAL: &str = "cluster.local";

/// A policy that cannot be compiled (only possible for resources that bypassed validation). The proxy should
/// reject (NACK) the whole configuration, naming the policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AuthorizationPolicy {namespace}/{name}: {field}: {reason}")]
pub struct CompileError {
    pub namespace: String,
    pub name: String,
    /// Path of the offending field, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
    pub field: String,
    pub reason: String,
}

#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    pub(crate) selector: Option<WorkloadSelector>,
    /// No rules: the policy never matches (for ALLOW: it still counts as present, so the workload is default-deny).
    pub(crate) rules: Vec<CompiledRule>,
    /// `(key, rule index)` for every key of every rule, in rule order: where the per-workload index files them
    /// (one list per policy, so that indexing a workload's policies reads little memory).
    pub(crate) index_keys: Vec<(IndexKey, u32)>,
}

/// `from` (OR of elements, each an AND of checks; empty = any) AND `to` (same) AND every `when` check.
#[derive(Debug)]
pub(crate) struct CompiledRule {
    pub(crate) from: Vec<Vec<Check>>,
    pub(crate) to: Vec<Vec<Check>>,
    pub(crate) when: Vec<Check>,
    /// Uses an HTTP-only attribute somewhere: on TCP an ALLOW rule like this is dropped as a whole (Istio §2.9).
    pub(crate) http_only: bool,
}

fn index_keys(rule: &CompiledRule) -> Vec<IndexKey> {
    if let Some(hashes) = required(&rule.from, &rule.when, exact_principals) {
        return hashes.into_iter().map(IndexKey::Principal).collect();
    }
    let ports = |c: &Check| match c {
        Check::DestinationPort(f) if !f.values.is_empty() => Some(f.values.clone()),
        _ => None,
    };
    match required(&rule.to, &rule.when, ports) {
        Some(ports) => ports.into_iter().map(IndexKey::Port).collect(),
        None => vec![IndexKey::Any],
    }
}

/// The values (hashed) of a positive principal check whose values are all exact (no prefix, suffix or presence).
fn exact_principals(c: &Check) -> Option<Vec<u64>> {
    let Check::Principal(f) = c else { return None };
    if f.values.is_empty() {
        return None;
    }
    (f.values.iter())
        .map(|m| match m {
            StringMatch::Exact(v) => Some(principal_hash(v)),
            _ => None,
        })
        .collect()
}

/// The values of a `when` check that `values` accepts (the rule needs it), else of one accepted check in every
/// element (the rule needs one element to hold): a matching request has one of them. `None` when neither exists.
fn required<T>(elements: &[Vec<Check>], when: &[Check], values: impl Fn(&Check) -> Option<Vec<T>>) -> Option<Vec<T>> {
    if let Some(v) = when.iter().find_map(&values) {
        return Some(v);
    }
    if elements.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for element in elements {
        out.extend(element.iter().find_map(&values)?);
    }
    Some(out)
}

/// One attribute test. HTTP-only variants hold on TCP traffic (the attribute is "removed" from DENY/AUDIT rules);
/// ALLOW rules containing them are skipped on TCP before any check runs.
#[derive(Debug)]
pub(crate) enum Check {
    Principal(Field<StringMatch>),
    Namespace(Field<StringMatch>),
    ServiceAccount(Field<ServiceAccountMatch>),
    TrustDomain(Field<StringMatch>),
    SourceIp(Field<Cidr>),
    RemoteIp(Field<Cidr>),
    DestinationIp(Field<Cidr>),
    DestinationPort(Field<u16>),
    Sni(Field<StringMatch>),
    FilterMetadata {
        filter: String,
        key: String,
        field: Field<FilterValueMatch>,
    },
    // HTTP only:
    RequestPrincipal(Field<JwtPrincipalMatch>),
    /// `request.auth.claims[...]`, and `request.auth.audiences` / `presenter` as the `aud` / `azp` claims.
    Claim {
        path: Vec<String>,
        field: Field<StringMatch>,
    },
    /// Header name lower-cased at compile time.
    Header {
        name: String,
        field: Field<HeaderMatch>,
    },
    Host(Field<HostMatch>),
    Method(Field<StringMatch>),
    Path(Field<PathMatch>),
}

impl Check {
    pub(crate) fn is_http_only(&self) -> bool {
        matches!(
            self,
            Check::RequestPrincipal(_)
                | Check::Claim { .. }
                | Check::Header { .. }
                | Check::Host(_)
                | Check::Method(_)
                | Check::Path(_)
        )
    }
}

/// Compiles one policy. `trust_domains` is the mesh trust domain and its aliases (empty: no alias expansion).
pub(crate) fn compile_policy(
    namespace: &str,
    name: &str,
    dry_run: bool,
    policy: &AuthorizationPolicy,
    trust_domains: &[String],
) -> Result<CompiledPolicy, CompileError> {
    let c = Compiler { namespace, name, trust_domains };
    if policy.action == Action::Custom {
        return Err(c.error("spec.action", "CUSTOM action is not supported"));
    }
    let rules: Vec<CompiledRule> = policy
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| c.rule(&format!("spec.rules[{i}]"), rule))
        .collect::<Result<_, _>>()?;
    let index_keys = (rules.iter().enumerate())
        .flat_map(|(i, rule)| {
            let i = u32::try_from(i).expect("fewer than 2^32 rules");
            index_keys(rule).into_iter().map(move |key| (key, i))
        })
        .collect();
    Ok(CompiledPolicy {
        namespace: namespace.to_string(),
        name: name.to_string(),
        action: policy.action,
        dry_run,
        selector: policy.selector.clone(),
        rules,
        index_keys,
    })
}

struct Compiler<'a> {
    namespace: &'a str,
    name: &'a str,
    trust_domains: &'a [String],
}

type Parse<'f, M> = &'f dyn Fn(&str) -> Result<M, String>;

impl Compiler<'_> {
    fn error(&self, field: impl Into<String>, reason: impl Into<String>) -> CompileError {
        CompileError {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn rule(&self, path: &str, rule: &Rule) -> Result<CompiledRule, CompileError> {
        let from = (rule.from.iter().enumerate())
            .map(|(j, f)| self.source(&format!("{path}.from[{j}].source"), &f.source))
            .collect::<Result<Vec<_>, _>>()?;
        let to = (rule.to.iter().enumerate())
            .map(|(j, t)| self.operation(&format!("{path}.to[{j}].operation"), &t.operation))
            .collect::<Result<Vec<_>, _>>()?;
        let when = (rule.when.iter().enumerate())
            .map(|(k, c)| self.condition(&format!("{path}.when[{k}]"), c))
            .collect::<Result<Vec<_>, _>>()?;
        let http_only = from.iter().chain(&to).flatten().chain(&when).any(Check::is_http_only);
        Ok(CompiledRule { from, to, when, http_only })
    }

    /// A `<name>`/`not<Name>` pair (`values`/`notValues` for conditions); `name` is only used in errors.
    fn field<M>(
        &self,
        path: &str,
        name: &str,
        values: &[String],
        not_values: &[String],
        parse: Parse<'_, M>,
    ) -> Result<Field<M>, CompileError> {
        let list = |negated: bool, vs: &[String]| -> Result<Vec<M>, CompileError> {
            (vs.iter().enumerate())
                .map(|(i, v)| {
                    parse(v).map_err(|reason| {
                        let field = if negated { not_name(name) } else { name.to_string() };
                        self.error(format!("{path}.{field}[{i}]"), reason)
                    })
                })
                .collect()
        };
        Ok(Field { values: list(false, values)?, not_values: list(true, not_values)? })
    }

    /// `make(field)`, or nothing when both lists are empty (an unset attribute is no check at all).
    fn check<M>(
        &self,
        path: &str,
        name: &str,
        values: &[String],
        not_values: &[String],
        parse: Parse<'_, M>,
        make: impl FnOnce(Field<M>) -> Check,
    ) -> Result<Option<Check>, CompileError> {
        if values.is_empty() && not_values.is_empty() {
            return Ok(None);
        }
        Ok(Some(make(self.field(path, name, values, not_values, parse)?)))
    }

    fn source(&self, path: &str, s: &Source) -> Result<Vec<Check>, CompileError> {
        let mut c = Vec::new();
        let (principals, not_principals) =
            (self.expand_principals(&s.principals), self.expand_principals(&s.not_principals));
        let string: Parse<'_, StringMatch> = &|v| Ok(StringMatch::parse(v));
        c.extend(self.check(path, "principals", &principals, &not_principals, string, Check::Principal)?);
        let (ns, not_ns) = (&s.namespaces, &s.not_namespaces);
        c.extend(self.check(path, "namespaces", ns, not_ns, string, Check::Namespace)?);
        let sa: Parse<'_, ServiceAccountMatch> = &|v| self.service_account(v);
        let (sas, not_sas) = (&s.service_accounts, &s.not_service_accounts);
        c.extend(self.check(path, "serviceAccounts", sas, not_sas, sa, Check::ServiceAccount)?);
        let (tds, not_tds) =
            (self.expand_trust_domains(&s.trust_domains), self.expand_trust_domains(&s.not_trust_domains));
        c.extend(self.check(path, "trustDomains", &tds, &not_tds, string, Check::TrustDomain)?);
        let cidr: Parse<'_, Cidr> = &|v| v.parse::<Cidr>().map_err(|e| e.to_string());
        let (ips, not_ips) = (&s.ip_blocks, &s.not_ip_blocks);
        c.extend(self.check(path, "ipBlocks", ips, not_ips, cidr, Check::SourceIp)?);
        let (rips, not_rips) = (&s.remote_ip_blocks, &s.not_remote_ip_blocks);
        c.extend(self.check(path, "remoteIpBlocks", rips, not_rips, cidr, Check::RemoteIp)?);
        let jwt: Parse<'_, JwtPrincipalMatch> = &|v| Ok(JwtPrincipalMatch::parse(v));
        let (rps, not_rps) = (&s.request_principals, &s.not_request_principals);
        c.extend(self.check(path, "requestPrincipals", rps, not_rps, jwt, Check::RequestPrincipal)?);
        Ok(c)
    }

    fn operation(&self, path: &str, o: &Operation) -> Result<Vec<Check>, CompileError> {
        let mut c = Vec::new();
        let host: Parse<'_, HostMatch> = &|v| Ok(HostMatch::parse(v));
        c.extend(self.check(path, "hosts", &o.hosts, &o.not_hosts, host, Check::Host)?);
        c.extend(self.check(path, "ports", &o.ports, &o.not_ports, &port, Check::DestinationPort)?);
        let string: Parse<'_, StringMatch> = &|v| Ok(StringMatch::parse(v));
        c.extend(self.check(path, "methods", &o.methods, &o.not_methods, string, Check::Method)?);
        let path_match: Parse<'_, PathMatch> = &|v| Ok(PathMatch::parse(v));
        c.extend(self.check(path, "paths", &o.paths, &o.not_paths, path_match, Check::Path)?);
        Ok(c)
    }

    fn condition(&self, path: &str, cond: &Condition) -> Result<Check, CompileError> {
        let key = cond.parsed_key().map_err(|reason| self.error(format!("{path}.key"), reason))?;
        let field_name = "values";
        let (values, not_values) = (&cond.values, &cond.not_values);
        let string: Parse<'_, StringMatch> = &|v| Ok(StringMatch::parse(v));
        let cidr: Parse<'_, Cidr> = &|v| v.parse::<Cidr>().map_err(|e| e.to_string());
        let claim = |path_elems: Vec<String>| -> Result<Check, CompileError> {
            Ok(Check::Claim { path: path_elems, field: self.field(path, field_name, values, not_values, string)? })
        };
        Ok(match key {
            ConditionKey::RequestHeader(name) => Check::Header {
                name: name.to_ascii_lowercase(),
                field: self.field(path, field_name, values, not_values, &|v| Ok(HeaderMatch::parse(v)))?,
            },
            ConditionKey::SourceIp => Check::SourceIp(self.field(path, field_name, values, not_values, cidr)?),
            ConditionKey::RemoteIp => Check::RemoteIp(self.field(path, field_name, values, not_values, cidr)?),
            ConditionKey::SourceNamespace => {
                Check::Namespace(self.field(path, field_name, values, not_values, string)?)
            }
            ConditionKey::SourcePrincipal => {
                let (v, nv) = (self.expand_principals(values), self.expand_principals(not_values));
                Check::Principal(self.field(path, field_name, &v, &nv, string)?)
            }
            ConditionKey::SourceServiceAccount => {
                Check::ServiceAccount(self.field(path, field_name, values, not_values, &|v| self.service_account(v))?)
            }
            ConditionKey::SourceTrustDomain => {
                let (v, nv) = (self.expand_trust_domains(values), self.expand_trust_domains(not_values));
                Check::TrustDomain(self.field(path, field_name, &v, &nv, string)?)
            }
            ConditionKey::RequestAuthPrincipal => {
                Check::RequestPrincipal(
                    self.field(path, field_name, values, not_values, &|v| Ok(JwtPrincipalMatch::parse(v)))?,
                )
            }
            ConditionKey::RequestAuthAudiences => claim(vec!["aud".to_string()])?,
            ConditionKey::RequestAuthPresenter => claim(vec!["azp".to_string()])?,
            ConditionKey::RequestAuthClaims(claim_path) => claim(claim_path)?,
            ConditionKey::DestinationIp => {
                Check::DestinationIp(self.field(path, field_name, values, not_values, cidr)?)
            }
            ConditionKey::DestinationPort => {
                Check::DestinationPort(self.field(path, field_name, values, not_values, &port)?)
            }
            ConditionKey::ConnectionSni => Check::Sni(self.field(path, field_name, values, not_values, string)?),
            ConditionKey::EnvoyFilter { filter, key } => Check::FilterMetadata {
                filter,
                key,
                field: self.field(path, field_name, values, not_values, &|v| Ok(FilterValueMatch::parse(v)))?,
            },
        })
    }

    /// `<ns>/<sa>`, or `<sa>` in the policy's namespace.
    fn service_account(&self, v: &str) -> Result<ServiceAccountMatch, String> {
        let (namespace, name) = v.split_once('/').unwrap_or((self.namespace, v));
        if namespace.is_empty() || name.is_empty() || name.contains('/') || v.contains('*') {
            return Err(format!("{v:?} is not of the form <namespace>/<serviceaccount> or <serviceaccount>"));
        }
        Ok(ServiceAccountMatch { namespace: namespace.to_string(), name: name.to_string() })
    }

    /// istiod's trust-domain migration: an exact-form principal `<td>/ns/<ns>/sa/<sa>` whose trust domain is one
    /// of the mesh trust domains or the literal `cluster.local` stands for the same identity in every one of them.
    fn expand_principals(&self, values: &[String]) -> Vec<String> {
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            let parts: Vec<&str> = v.split('/').collect();
            let td = parts[0];
            if self.trust_domains.is_empty()
                || parts.len() != 5
                || !(td == CLUSTER_LOCAL || self.trust_domains.iter().any(|t| t == td))
            {
                out.push(v.clone());
                continue;
            }
            for t in self.trust_domains {
                let expanded = format!("{t}/{}", parts[1..].join("/"));
                if !out.contains(&expanded) {
                    out.push(expanded);
                }
            }
        }
        out
    }

    /// `trustDomains` values naming a mesh trust domain match all of them.
    fn expand_trust_domains(&self, values: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(values.len());
        for v in values {
            let expand = self.trust_domains.iter().any(|t| t == v);
            let all = if expand { self.trust_domains } else { std::slice::from_ref(v) };
            for t in all {
                if !out.contains(t) {
                    out.push(t.clone());
                }
            }
        }
        out
    }
}

/// `ipBlocks` → `notIpBlocks`, `values` → `notValues`.
fn not_name(name: &str) -> String {
    let mut chars = name.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase()).into_iter();
    format!("not{}", first.chain(chars).collect::<String>())
}

fn port(v: &str) -> Result<u16, String> {
    parse_port(v).ok_or_else(|| format!("{v:?} is not a valid port: must be a number in 0..65535"))
}
