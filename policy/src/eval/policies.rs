//! The compiled configuration (`CompiledPolicies`, built once per config change) and the subset that applies to
//! one destination workload (`WorkloadPolicies`, built once per workload per config change, pre-split by action
//! so that a check only walks lists).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::authz::Action;
use crate::common::WorkloadSelector;
use crate::kind::ResourceKey;
use crate::mtls::{EffectiveMtls, PeerAuthnSet, WorkloadMtls};
use crate::peer_authn::MtlsMode;
use crate::request_authn::{JwtRule, RequestAuthentication};
use crate::resource::{Resource, Spec};

use super::compile::{CompileError, CompiledPolicy, compile_policy};
use super::index::PolicyList;

/// Settings for [`CompiledPolicies::compile_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    /// Selector-less policies here apply mesh-wide; selectors here match workloads in every namespace.
    pub root_namespace: String,
    /// The mesh trust domain followed by its aliases. When set, an exact-form principal
    /// `<td>/ns/<ns>/sa/<sa>` whose `<td>` is one of these or the literal `cluster.local` matches the identity in
    /// every one of them (istiod's trust-domain migration for sidecars), and a `trustDomains` value naming one of
    /// them matches all of them. Empty: principals compare verbatim.
    pub trust_domains: Vec<String>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { root_namespace: crate::DEFAULT_ROOT_NAMESPACE.to_string(), trust_domains: Vec::new() }
    }
}

/// A resource that was understood but never applies to a Trellis proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredPolicy {
    pub key: ResourceKey,
    pub reason: IgnoreReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IgnoreReason {
    /// `targetRef`/`targetRefs` attach a policy to gateways and waypoints only (istiod `ShouldAttachPolicy`).
    TargetRefs,
    /// A PeerAuthentication with a workload selector in the root namespace (Istio ignores these).
    RootNamespaceSelector,
}

impl IgnoreReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            IgnoreReason::TargetRefs => {
                "uses targetRef/targetRefs, which attach it to gateways and waypoints only; it never applies to \
                 workload proxies"
            }
            IgnoreReason::RootNamespaceSelector => {
                "PeerAuthentication with a workload selector in the root namespace is ignored (Istio semantics)"
            }
        }
    }
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for IgnoredPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ignored: {}", self.key, self.reason)
    }
}

/// `spaceDelimitedClaims` of one RequestAuthentication JWT rule, with the policy's scope.
#[derive(Debug, Clone)]
struct SpaceDelimitedRule {
    namespace: String,
    selector: Option<WorkloadSelector>,
    issuer: String,
    claims: Vec<String>,
}

/// One resource compiled on its own: what [`CompiledPolicies::assemble`] puts together, each paired with the resource
/// it was compiled from (the only way to make one is [`CompiledResource::compile`]). Keep it beside its resource and
/// compile it again only when the resource changes. Only AuthorizationPolicies that apply to workloads carry
/// anything; the other kinds are read when the set is assembled.
#[derive(Debug, Clone)]
pub struct CompiledResource {
    authz: Option<Arc<CompiledPolicy>>,
}

impl CompiledResource {
    /// Compiles `resource` with `options` (use the same options to assemble). The error names the policy.
    pub fn compile(resource: &Resource, options: &CompileOptions) -> Result<CompiledResource, CompileError> {
        let (ns, name) = (resource.metadata.namespace.as_str(), resource.metadata.name.as_str());
        let authz = match &resource.spec {
            Spec::AuthorizationPolicy(p) if !p.has_target_refs() => {
                Some(Arc::new(compile_policy(ns, name, resource.dry_run(), p, &options.trust_domains)?))
            }
            _ => None,
        };
        Ok(CompiledResource { authz })
    }
}

/// Every security policy of a configuration, compiled. Immutable; share it (e.g. behind an `Arc`) between
/// threads.
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicies {
    root_namespace: String,
    /// Sorted by (namespace, name) so results do not depend on input order.
    authz: Vec<Arc<CompiledPolicy>>,
    space_delimited: Vec<SpaceDelimitedRule>,
    /// RequestAuthentications that can apply to workloads: (namespace, policy), sorted by (namespace, name).
    request_authn: Vec<(String, String, Arc<RequestAuthentication>)>,
    peer_authn: PeerAuthnSet,
    ignored: Vec<IgnoredPolicy>,
}

impl CompiledPolicies {
    /// Compiles AuthorizationPolicies (and reads PeerAuthentication / RequestAuthentication) with `root_namespace`
    /// as the mesh-wide namespace. Never fails for validated resources; otherwise the error names the policy.
    pub fn compile(resources: &[Resource], root_namespace: &str) -> Result<CompiledPolicies, CompileError> {
        let options = CompileOptions { root_namespace: root_namespace.to_string(), ..CompileOptions::default() };
        Self::compile_with(resources, &options)
    }

    pub fn compile_with(resources: &[Resource], options: &CompileOptions) -> Result<CompiledPolicies, CompileError> {
        let compiled =
            resources.iter().map(|r| CompiledResource::compile(r, options)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::assemble(resources.iter().zip(&compiled), options))
    }

    /// Puts a configuration together from resources compiled one by one ([`CompiledResource::compile`], with the
    /// same `options`): the cheap part of [`compile_with`](Self::compile_with), which never compiles a policy, so
    /// a change that touches one resource costs one compilation, not one per resource of the configuration.
    pub fn assemble<'a>(
        parts: impl IntoIterator<Item = (&'a Resource, &'a CompiledResource)>,
        options: &CompileOptions,
    ) -> CompiledPolicies {
        let root = options.root_namespace.as_str();
        let mut out = CompiledPolicies {
            root_namespace: root.to_string(),
            peer_authn: PeerAuthnSet::new(root),
            ..CompiledPolicies::default()
        };
        for (r, compiled) in parts {
            // Compiled exactly when it is an AuthorizationPolicy without targetRefs (`CompiledResource::compile`).
            if let Some(policy) = &compiled.authz {
                out.authz.push(policy.clone());
                continue;
            }
            let (ns, name) = (r.metadata.namespace.as_str(), r.metadata.name.as_str());
            let ignore = |reason| IgnoredPolicy { key: r.key(), reason };
            match &r.spec {
                Spec::AuthorizationPolicy(_) => out.ignored.push(ignore(IgnoreReason::TargetRefs)),
                Spec::RequestAuthentication(p) if p.has_target_refs() => {
                    out.ignored.push(ignore(IgnoreReason::TargetRefs))
                }
                Spec::RequestAuthentication(p) => {
                    out.request_authn.push((ns.to_string(), name.to_string(), Arc::new(p.clone())));
                    let rules = p.jwt_rules.iter().filter(|rule| !rule.space_delimited_claims.is_empty());
                    out.space_delimited.extend(rules.map(|rule| SpaceDelimitedRule {
                        namespace: ns.to_string(),
                        selector: p.selector.clone(),
                        issuer: rule.issuer.clone(),
                        claims: rule.space_delimited_claims.clone(),
                    }));
                }
                Spec::PeerAuthentication(p) => {
                    if !out.peer_authn.add(ns, name, p) {
                        out.ignored.push(ignore(IgnoreReason::RootNamespaceSelector));
                    }
                }
            }
        }
        out.authz.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out.ignored.sort_by(|a, b| a.key.cmp(&b.key));
        out.request_authn.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Resources that never apply to Trellis proxies, with the reason (for status reporting).
    pub fn ignored(&self) -> &[IgnoredPolicy] {
        &self.ignored
    }

    /// Number of AuthorizationPolicies that can apply to workloads.
    pub fn authorization_policy_count(&self) -> usize {
        self.authz.len()
    }

    /// Istio's selection (`ListAuthorizationPolicies`): policies of the root namespace and of the workload's
    /// namespace whose selector is unset/empty or matches `labels`.
    fn applies(
        &self,
        policy_ns: &str,
        selector: Option<&WorkloadSelector>,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        (policy_ns == ns || policy_ns == self.root_namespace) && selector.is_none_or(|s| s.matches(labels))
    }

    /// The policies that apply to the destination workload with `labels` in `namespace`.
    pub fn for_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> WorkloadPolicies {
        let [mut deny, mut allow, mut audit, mut dry_run_deny, mut dry_run_allow] = Default::default();
        for p in self.authz.iter().filter(|p| self.applies(&p.namespace, p.selector.as_ref(), namespace, labels)) {
            let list: &mut Vec<_> = match (p.action, p.dry_run) {
                (Action::Deny, false) => &mut deny,
                (Action::Allow, false) => &mut allow,
                (Action::Deny, true) => &mut dry_run_deny,
                (Action::Allow, true) => &mut dry_run_allow,
                // AUDIT never enforces, so a dry-run annotation on it changes nothing.
                (Action::Audit, _) => &mut audit,
                // Rejected by compile_policy.
                (Action::Custom, _) => continue,
            };
            list.push(Arc::clone(p));
        }
        let space_delimited = (self.space_delimited.iter())
            .filter(|r| self.applies(&r.namespace, r.selector.as_ref(), namespace, labels))
            .map(|rule| (rule.issuer.clone(), rule.claims.clone()))
            .collect();
        WorkloadPolicies {
            namespace: namespace.to_string(),
            deny: PolicyList::new(deny),
            allow: PolicyList::new(allow),
            audit: PolicyList::new(audit),
            dry_run_deny: PolicyList::new(dry_run_deny),
            dry_run_allow: PolicyList::new(dry_run_allow),
            space_delimited,
            mtls: self.peer_authn.for_workload(namespace, labels),
        }
    }

    /// The JWT rules of every RequestAuthentication that applies to the workload (Istio combines them as one).
    pub fn jwt_rules_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<&JwtRule> {
        (self.request_authn.iter())
            .filter(|(ns, _, p)| self.applies(ns, p.selector.as_ref(), namespace, labels))
            .flat_map(|(_, _, p)| &p.jwt_rules)
            .collect()
    }

    /// Every `jwksUri` named by a RequestAuthentication that can apply to a workload.
    pub fn jwks_uris(&self) -> BTreeSet<&str> {
        (self.request_authn.iter())
            .flat_map(|(_, _, p)| &p.jwt_rules)
            .filter(|r| r.jwks.is_empty() && !r.jwks_uri.is_empty())
            .map(|r| r.jwks_uri.as_str())
            .collect()
    }

    /// Effective PeerAuthentication mode (never `Unset`) of `port` on the workload.
    pub fn effective_mtls_mode(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> MtlsMode {
        self.effective_mtls(namespace, labels, port).mode
    }

    /// [`CompiledPolicies::effective_mtls_mode`] with the deciding PeerAuthentication.
    pub fn effective_mtls(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> EffectiveMtls {
        self.peer_authn.for_workload(namespace, labels).port(port).clone()
    }
}

/// Everything that applies to one destination workload. [`WorkloadPolicies::evaluate`] checks a request.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies {
    pub(crate) namespace: String,
    pub(crate) deny: PolicyList,
    pub(crate) allow: PolicyList,
    pub(crate) audit: PolicyList,
    pub(crate) dry_run_deny: PolicyList,
    pub(crate) dry_run_allow: PolicyList,
    /// `(issuer, claims)` from RequestAuthentication `spaceDelimitedClaims` (in addition to `scope`/`permission`).
    pub(crate) space_delimited: Vec<(String, Vec<String>)>,
    pub(crate) mtls: WorkloadMtls,
}

impl WorkloadPolicies {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// PeerAuthentication settings of the workload.
    pub fn mtls(&self) -> &WorkloadMtls {
        &self.mtls
    }

    /// No AuthorizationPolicy applies: every request is allowed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of AuthorizationPolicies that apply (all actions, dry-run included).
    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len() + self.audit.len() + self.dry_run_deny.len() + self.dry_run_allow.len()
    }

    /// `(indexed rules, all rules)` of every list.
    #[cfg(test)]
    pub(crate) fn indexed_rules(&self) -> (usize, usize) {
        [&self.deny, &self.allow, &self.audit, &self.dry_run_deny, &self.dry_run_allow]
            .into_iter()
            .map(|list| list.indexed_rules())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    /// `(namespace, name, action, dry_run)` of every applying policy: enforced DENY, ALLOW, AUDIT, then dry-run
    /// DENY and ALLOW.
    pub fn policies(&self) -> impl Iterator<Item = (&str, &str, Action, bool)> {
        [&self.deny, &self.allow, &self.audit, &self.dry_run_deny, &self.dry_run_allow]
            .into_iter()
            .flat_map(|list| &list.policies)
            .map(|p| (p.namespace.as_str(), p.name.as_str(), p.action, p.dry_run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str) -> Resource {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: ns}}\n\
             spec: {{action: DENY, rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns/sa/{name}]}}}}]}}]}}\n"
        );
        crate::parse_documents(&yaml).unwrap().remove(0)
    }

    /// Assembling never compiles again: the set holds the very policy each part compiled, so a change that adds one
    /// resource costs one compilation, however many resources the configuration already has.
    #[test]
    fn assemble_shares_each_part_compiled_once() {
        let options = CompileOptions::default();
        let (a, b) = (resource("a"), resource("b"));
        let (pa, pb) =
            (CompiledResource::compile(&a, &options).unwrap(), CompiledResource::compile(&b, &options).unwrap());
        let first = CompiledPolicies::assemble([(&a, &pa)], &options);
        let second = CompiledPolicies::assemble([(&b, &pb), (&a, &pa)], &options);
        let pa_policy = pa.authz.as_ref().unwrap();
        assert!(Arc::ptr_eq(&first.authz[0], pa_policy));
        assert_eq!(second.authz.len(), 2);
        assert!(Arc::ptr_eq(&second.authz[0], pa_policy), "sorted by name: a first, the same compiled policy");
        assert!(Arc::ptr_eq(&second.authz[1], pb.authz.as_ref().unwrap()));
    }
}
