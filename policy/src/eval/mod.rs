//! Authorization evaluation with Istio's semantics (sidecar / API behaviour), in ztunnel's compiled style:
//!
//! 1. [`CompiledPolicies::compile`] once per configuration change: every value is parsed into a matcher.
//! 2. [`CompiledPolicies::for_workload`] once per destination workload: the applying policies, split by action,
//!    their rules indexed by the exact peer principal or port they require.
//! 3. [`WorkloadPolicies::evaluate`] per connection (TCP) or request (HTTP): comparisons only — no parsing, no
//!    regex, no locks, no allocation (unless an AUDIT policy matches) — on the rules the index leaves.
//!
//! HTTP-only attributes on TCP traffic follow Istio's sidecar rule (§2.9 of the reference): an ALLOW rule using
//! one is dropped; in DENY/AUDIT rules the attribute is removed (treated as matching), so a `from`/`to` element
//! or a rule made only of HTTP attributes matches all TCP traffic in scope.

mod compile;
mod decision;
mod evaluate;
mod index;
mod index_key;
mod matchers;
mod policies;
mod request;

#[cfg(test)]
mod tests;

pub use compile::CompileError;
pub use decision::{Decision, DryRunOutcome, PolicyRef, Reason};
pub use policies::{CompileOptions, CompiledPolicies, CompiledResource, IgnoreReason, IgnoredPolicy, WorkloadPolicies};
pub use request::{Headers, HttpRequest, NoHeaders, Protocol, Request};
