//! Checking a request against a workload's policies: Istio's order (DENY, then ALLOW presence, then ALLOW match)
//! over the pre-compiled checks. Allocation-free unless an AUDIT policy matches.

use std::sync::Arc;

use crate::authz::Action;
use crate::matcher::StringMatch;

use super::compile::{Check, CompiledPolicy, CompiledRule};
use super::decision::{Decision, DryRunOutcome, PolicyRef, Reason};
use super::matchers::{claim, claim_matches};
use super::policies::WorkloadPolicies;
use super::request::{Headers, HttpRequest, Peer, Protocol, Request};

/// JWT claims Envoy always splits on whitespace before matching (istiod `buildSpaceDelimitedClaims`).
const ALWAYS_SPACE_DELIMITED: [&str; 2] = ["scope", "permission"];

/// Request attributes derived once per check.
struct Ctx<'r> {
    req: &'r Request<'r>,
    peer: Peer<'r>,
    http: Option<HttpCtx<'r>>,
    space_delimited: &'r [(String, Vec<String>)],
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
        Ctx { req, peer: Peer::parse(req.source_principal), http, space_delimited }
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
        let peer = &ctx.peer;
        match self {
            Check::Principal(f) => f.matches(|m| peer.principal.is_some_and(|p| m.matches(p))),
            // Matched on the namespace segment, as documented (and as ztunnel does). istiod's `.*/ns/<v>/.*` regex
            // can also span the `/sa/` that follows (sidecar `*a` matches every peer); that artifact is not copied.
            // `*` means "has a namespace", like the regex.
            Check::Namespace(f) => {
                f.matches(|m| peer.namespace.is_some_and(|ns| matches!(m, StringMatch::Presence) || m.matches(ns)))
            }
            Check::ServiceAccount(f) => f.matches(|sa| {
                peer.namespace == Some(sa.namespace.as_str()) && peer.service_account == Some(sa.name.as_str())
            }),
            // istiod: `*` is "any SPIFFE peer"; other values match the text before the first `/`.
            Check::TrustDomain(f) => f.matches(|m| match m {
                StringMatch::Presence => peer.principal.is_some(),
                _ => peer.trust_domain.is_some_and(|td| m.matches(td)),
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
    fn first_match(&self, ctx: &Ctx<'_>) -> Option<PolicyRef<'_>> {
        let rule_index = self.rules.iter().position(|r| r.matches(ctx, self.action))?;
        Some(PolicyRef {
            namespace: &self.namespace,
            name: &self.name,
            action: self.action,
            rule_index,
            dry_run: self.dry_run,
        })
    }
}

fn first_match<'p>(policies: &'p [Arc<CompiledPolicy>], ctx: &Ctx<'_>) -> Option<PolicyRef<'p>> {
    policies.iter().find_map(|p| p.first_match(ctx))
}

impl WorkloadPolicies {
    /// Istio's algorithm: a matching DENY denies; no ALLOW policy → allow; a matching ALLOW allows; otherwise
    /// deny. AUDIT and dry-run policies are evaluated and reported but never change the result.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision<'_> {
        let ctx = Ctx::new(req, &self.space_delimited);

        let mut audit = Vec::new();
        audit.extend(self.audit.iter().filter_map(|p| p.first_match(&ctx)));

        let deny = first_match(&self.deny, &ctx);
        let (allowed, reason, deciding) = match deny {
            Some(p) => (false, Reason::DeniedByPolicy, Some(p)),
            None if self.allow.is_empty() => (true, Reason::NoAllowPolicies, None),
            None => match first_match(&self.allow, &ctx) {
                Some(p) => (true, Reason::AllowedByPolicy, Some(p)),
                None => (false, Reason::NoAllowMatched, None),
            },
        };

        let dry_run = (!self.dry_run_deny.is_empty() || !self.dry_run_allow.is_empty()).then(|| {
            // Same algorithm with the dry-run policies added; they are looked at first so that `deciding` names
            // one whenever it matched.
            match first_match(&self.dry_run_deny, &ctx).or(deny) {
                Some(p) => DryRunOutcome { allowed: false, reason: Reason::DeniedByPolicy, deciding: Some(p) },
                None if self.allow.is_empty() && self.dry_run_allow.is_empty() => {
                    DryRunOutcome { allowed: true, reason: Reason::NoAllowPolicies, deciding: None }
                }
                None => match first_match(&self.dry_run_allow, &ctx).or_else(|| first_match(&self.allow, &ctx)) {
                    Some(p) => DryRunOutcome { allowed: true, reason: Reason::AllowedByPolicy, deciding: Some(p) },
                    None => DryRunOutcome { allowed: false, reason: Reason::NoAllowMatched, deciding: None },
                },
            }
        });

        Decision { allowed, reason, deciding, audit, dry_run }
    }
}
