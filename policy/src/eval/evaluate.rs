//! Checking a request against a workload's policies: Istio's order (DENY, then ALLOW presence, then ALLOW match)
//! over the pre-compiled checks of the rules the workload's index leaves. Allocation-free unless an AUDIT policy
//! matches.

use std::cell::OnceCell;

use crate::authz::Action;
use crate::matcher::StringMatch;

use super::compile::{Check, CompiledPolicy, CompiledRule};
use super::decision::{Decision, DryRunOutcome, PolicyRef, Reason};
use super::index::PolicyList;
use super::index_key::principal_hash;
use super::matchers::{claim, claim_matches};
use super::policies::WorkloadPolicies;
use super::request::{Headers, HttpRequest, Peer, Protocol, Request};

/// JWT claims Envoy always splits on whitespace before matching (istiod `buildSpaceDelimitedClaims`).
const ALWAYS_SPACE_DELIMITED: [&str; 2] = ["scope", "permission"];

/// Request attributes derived once per check.
struct Ctx<'r> {
    req: &'r Request<'r>,
    /// Parts of the peer principal, parsed when a check first needs them.
    peer: OnceCell<Peer<'r>>,
    http: Option<HttpCtx<'r>>,
    space_delimited: &'r [(String, Vec<String>)],
    /// [`principal_hash`] of the peer principal, computed when an index first needs it.
    principal_hash: OnceCell<Option<u64>>,
}

struct HttpCtx<'r> {
    method: &'r str,
    /// Request target as received (`:path`).
    raw_path: &'r str,
    /// Without `?query` / `#fragment`: what `paths` match.
    path: &'r str,
    host: Option<&'r str>,
    headers: &'r dyn Headers,
    jwt: Option<&'r serde_json::Value>,
    iss: Option<&'r str>,
    sub: Option<&'r str>,
}

impl<'r> HttpCtx<'r> {
    fn new(h: &HttpRequest<'r>) -> HttpCtx<'r> {
        let path = h.path.split(['?', '#']).next().unwrap_or(h.path);
        let claim_str = |name: &str| h.jwt.and_then(|j| j.get(name)).and_then(serde_json::Value::as_str);
        HttpCtx {
            method: h.method,
            raw_path: h.path,
            path,
            host: h.host,
            headers: h.headers,
            jwt: h.jwt,
            iss: claim_str("iss"),
            sub: claim_str("sub"),
        }
    }
}

impl<'r> Ctx<'r> {
    fn new(req: &'r Request<'r>, space_delimited: &'r [(String, Vec<String>)]) -> Ctx<'r> {
        let http = match &req.protocol {
            Protocol::Http(h) => Some(HttpCtx::new(h)),
            Protocol::Tcp => None,
        };
        Ctx { req, peer: OnceCell::new(), http, space_delimited, principal_hash: OnceCell::new() }
    }

    fn peer(&self) -> &Peer<'r> {
        self.peer.get_or_init(|| Peer::parse(self.req.source_principal))
    }

    fn principal_hash(&self) -> Option<u64> {
        *self.principal_hash.get_or_init(|| self.req.source_principal.map(principal_hash))
    }

    fn is_space_delimited(&self, claim_path: &[String], iss: Option<&str>) -> bool {
        let [name] = claim_path else { return false };
        ALWAYS_SPACE_DELIMITED.contains(&name.as_str())
            || self.space_delimited.iter().any(|(issuer, claims)| Some(issuer.as_str()) == iss && claims.contains(name))
    }
}

impl Check {
    fn holds(&self, ctx: &Ctx<'_>) -> bool {
        let req = ctx.req;
        match self {
            Check::Principal(f) => f.matches(|m| req.source_principal.is_some_and(|p| m.matches(p))),
            // Matched on the namespace segment, as documented (and as ztunnel does). istiod's `.*/ns/<v>/.*` regex
            // can also span the `/sa/` that follows (sidecar `*a` matches every peer); that artifact is not copied.
            // `*` means "has a namespace", like the regex.
            Check::Namespace(f) => f.matches(|m| {
                ctx.peer().namespace.is_some_and(|ns| matches!(m, StringMatch::Presence) || m.matches(ns))
            }),
            Check::ServiceAccount(f) => f.matches(|sa| {
                let peer = ctx.peer();
                peer.namespace == Some(sa.namespace.as_str()) && peer.service_account == Some(sa.name.as_str())
            }),
            // istiod: `*` is "any SPIFFE peer"; other values match the text before the first `/`.
            Check::TrustDomain(f) => f.matches(|m| match m {
                StringMatch::Presence => req.source_principal.is_some(),
                _ => ctx.peer().trust_domain.is_some_and(|td| m.matches(td)),
            }),
            Check::SourceIp(f) => f.matches(|c| c.contains(&req.source_ip)),
            Check::RemoteIp(f) => f.matches(|c| c.contains(&req.remote_ip)),
            Check::DestinationIp(f) => f.matches(|c| c.contains(&req.destination_ip)),
            Check::DestinationPort(f) => f.matches(|p| *p == req.destination_port),
            Check::Sni(f) => f.matches(|m| req.sni.is_some_and(|s| m.matches(s))),
            Check::FilterMetadata { filter, key, field } => {
                let value = req.filter_metadata.and_then(|md| md.get(filter.as_str())?.get(key.as_str()));
                field.matches(|m| value.is_some_and(|v| m.matches(v)))
            }
            // HTTP-only attributes: on TCP only DENY/AUDIT rules get here, and for them the attribute is removed
            // from the rule, i.e. holds.
            _ => {
                let Some(h) = &ctx.http else { return true };
                self.holds_http(ctx, h)
            }
        }
    }

    fn holds_http(&self, ctx: &Ctx<'_>, h: &HttpCtx<'_>) -> bool {
        match self {
            Check::RequestPrincipal(f) => f.matches(|m| m.matches(h.iss, h.sub)),
            Check::Claim { path, field } => {
                let value = h.jwt.and_then(|j| claim(j, path));
                let split = value.is_some() && ctx.is_space_delimited(path, h.iss);
                field.matches(|m| value.is_some_and(|v| claim_matches(v, m, split)))
            }
            Check::Header { name, field } => field.matches(|m| match name.as_str() {
                // Pseudo-headers the proxy holds as request fields.
                ":method" => m.matches_single(Some(h.method)),
                ":path" => m.matches_single(Some(h.raw_path)),
                ":authority" => m.matches_single(h.host),
                _ => m.matches_headers(h.headers, name),
            }),
            Check::Host(f) => f.matches(|m| m.matches(h.host)),
            // `*` is Envoy's `present_match` on `:method`, which every request has.
            Check::Method(f) => f.matches(|m| matches!(m, StringMatch::Presence) || m.matches(h.method)),
            Check::Path(f) => f.matches(|m| m.matches(h.path)),
            _ => unreachable!("connection attributes are handled by Check::holds"),
        }
    }
}

impl CompiledRule {
    fn matches(&self, ctx: &Ctx<'_>, action: Action) -> bool {
        // Istio §2.9: on TCP an ALLOW rule that uses any HTTP-only attribute is dropped as a whole.
        if self.http_only && ctx.http.is_none() && action == Action::Allow {
            return false;
        }
        let all = |checks: &[Check]| checks.iter().all(|c| c.holds(ctx));
        (self.from.is_empty() || self.from.iter().any(|checks| all(checks)))
            && (self.to.is_empty() || self.to.iter().any(|checks| all(checks)))
            && all(&self.when)
    }
}

impl CompiledPolicy {
    fn policy_ref(&self, rule_index: usize) -> PolicyRef<'_> {
        PolicyRef {
            namespace: &self.namespace,
            name: &self.name,
            action: self.action,
            rule_index,
            dry_run: self.dry_run,
        }
    }

    /// The first matching rule, trying them all.
    fn first_match(&self, ctx: &Ctx<'_>) -> Option<PolicyRef<'_>> {
        let rule_index = self.rules.iter().position(|r| r.matches(ctx, self.action))?;
        Some(self.policy_ref(rule_index))
    }
}

impl PolicyList {
    /// Every policy with a matching rule, in order, with its first matching rule. Only the rules the index leaves
    /// are tried, in evaluation order, so the result is that of [`PolicyList::scan`].
    fn matches<'p>(&'p self, ctx: &Ctx<'_>) -> impl Iterator<Item = PolicyRef<'p>> {
        let mut matched = None;
        self.candidates(|| ctx.principal_hash(), ctx.req.destination_port).filter_map(move |r| {
            let policy = &self.policies[r.policy as usize];
            if matched == Some(r.policy) || !policy.rules[r.rule as usize].matches(ctx, policy.action) {
                return None;
            }
            matched = Some(r.policy);
            Some(policy.policy_ref(r.rule as usize))
        })
    }

    /// [`PolicyList::matches`] the straightforward way, trying every rule of every policy: the reference the
    /// index is tested against.
    fn scan<'p>(&'p self, ctx: &Ctx<'_>) -> impl Iterator<Item = PolicyRef<'p>> {
        self.policies.iter().filter_map(|p| p.first_match(ctx))
    }

    /// The first matching policy; `SCAN`: without the index.
    fn first_match<const SCAN: bool>(&self, ctx: &Ctx<'_>) -> Option<PolicyRef<'_>> {
        if SCAN { self.scan(ctx).next() } else { self.matches(ctx).next() }
    }
}

impl WorkloadPolicies {
    /// Istio's algorithm: a matching DENY denies; no ALLOW policy → allow; a matching ALLOW allows; otherwise
    /// deny. AUDIT and dry-run policies are evaluated and reported but never change the result.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision<'_> {
        self.decide::<false>(req)
    }

    /// [`WorkloadPolicies::evaluate`] without the rule index: every rule is tried.
    #[cfg(test)]
    pub(crate) fn evaluate_by_scan(&self, req: &Request<'_>) -> Decision<'_> {
        self.decide::<true>(req)
    }

    fn decide<'p, const SCAN: bool>(&'p self, req: &Request<'_>) -> Decision<'p> {
        let ctx = Ctx::new(req, &self.space_delimited);
        let first_match = |list: &'p PolicyList| list.first_match::<SCAN>(&ctx);

        let mut audit = Vec::new();
        if SCAN {
            audit.extend(self.audit.scan(&ctx));
        } else {
            audit.extend(self.audit.matches(&ctx));
        }

        let deny = first_match(&self.deny);
        let (allowed, reason, deciding) = match deny {
            Some(p) => (false, Reason::DeniedByPolicy, Some(p)),
            None if self.allow.is_empty() => (true, Reason::NoAllowPolicies, None),
            None => match first_match(&self.allow) {
                Some(p) => (true, Reason::AllowedByPolicy, Some(p)),
                None => (false, Reason::NoAllowMatched, None),
            },
        };

        let dry_run = (!self.dry_run_deny.is_empty() || !self.dry_run_allow.is_empty()).then(|| {
            // Same algorithm with the dry-run policies added; they are looked at first so that `deciding` names
            // one whenever it matched.
            match first_match(&self.dry_run_deny).or(deny) {
                Some(p) => DryRunOutcome { allowed: false, reason: Reason::DeniedByPolicy, deciding: Some(p) },
                None if self.allow.is_empty() && self.dry_run_allow.is_empty() => {
                    DryRunOutcome { allowed: true, reason: Reason::NoAllowPolicies, deciding: None }
                }
                None => match first_match(&self.dry_run_allow).or_else(|| first_match(&self.allow)) {
                    Some(p) => DryRunOutcome { allowed: true, reason: Reason::AllowedByPolicy, deciding: Some(p) },
                    None => DryRunOutcome { allowed: false, reason: Reason::NoAllowMatched, deciding: None },
                },
            }
        });

        Decision { allowed, reason, deciding, audit, dry_run }
    }
}
