//! The outcome of one check, borrowing names from the [`super::WorkloadPolicies`] it came from so that building
//! it copies nothing.

use std::fmt;

use crate::authz::Action;

/// The policy and rule that produced a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyRef<'p> {
    pub namespace: &'p str,
    pub name: &'p str,
    pub action: Action,
    /// Index of the first matching rule in `spec.rules`.
    pub rule_index: usize,
    /// The policy carries `istio.io/dry-run: "true"`.
    pub dry_run: bool,
}

impl fmt::Display for PolicyRef<'_> {
    /// `DENY policy foo/deny-all rule 0`, with ` [dry-run]` for shadow policies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} policy {}/{} rule {}", self.action, self.namespace, self.name, self.rule_index)?;
        if self.dry_run {
            f.write_str(" [dry-run]")?;
        }
        Ok(())
    }
}

/// Which step of Istio's algorithm decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A DENY policy matched.
    DeniedByPolicy,
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatched,
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// No ALLOW policy applies to the workload (and no DENY matched).
    NoAllowPolicies,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::DeniedByPolicy => "denied by a DENY policy",
            Reason::NoAllowMatched => "no ALLOW policy matched",
            Reason::AllowedByPolicy => "allowed by an ALLOW policy",
            Reason::NoAllowPolicies => "no ALLOW policy applies",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of [`super::WorkloadPolicies::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'p> {
    pub allowed: bool,
    pub reason: Reason,
    /// The DENY or ALLOW policy that decided; `None` for [`Reason::NoAllowMatched`] / [`Reason::NoAllowPolicies`].
    pub deciding: Option<PolicyRef<'p>>,
    /// Matching AUDIT policies (never change the decision), for the caller to log or count. Empty — and not
    /// allocated — unless one matches.
    pub audit: Vec<PolicyRef<'p>>,
    /// Present when dry-run policies apply to the workload.
    pub dry_run: Option<DryRunOutcome<'p>>,
}

/// What the decision would have been had the workload's dry-run policies been enforced along with the enforced
/// ones. `deciding` names a dry-run policy whenever one matched (they are checked first), so metrics per shadow
/// policy can be derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DryRunOutcome<'p> {
    pub allowed: bool,
    pub reason: Reason,
    pub deciding: Option<PolicyRef<'p>>,
}

impl Decision<'_> {
    pub fn denied(&self) -> bool {
        !self.allowed
    }
}

fn write_verdict(f: &mut fmt::Formatter<'_>, allowed: bool, reason: Reason, by: Option<&PolicyRef<'_>>) -> fmt::Result {
    let verb = if allowed { "allowed" } else { "denied" };
    match by {
        Some(p) => write!(f, "{verb} by {p}"),
        None => write!(f, "{verb}: {reason}"),
    }
}

impl fmt::Display for Decision<'_> {
    /// One log-friendly line, e.g. `denied by DENY policy foo/deny-all rule 0`,
    /// `denied: no ALLOW policy matched; audited by AUDIT policy foo/log rule 0`,
    /// `allowed: no ALLOW policy applies; dry-run: would deny (DENY policy foo/x rule 0 [dry-run])`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_verdict(f, self.allowed, self.reason, self.deciding.as_ref())?;
        for (i, a) in self.audit.iter().enumerate() {
            f.write_str(if i == 0 { "; audited by " } else { ", " })?;
            write!(f, "{a}")?;
        }
        if let Some(d) = &self.dry_run {
            write!(f, "; dry-run: would {} (", if d.allowed { "allow" } else { "deny" })?;
            match &d.deciding {
                Some(p) => write!(f, "{p}")?,
                None => f.write_str(d.reason.as_str())?,
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}
