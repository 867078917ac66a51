//! `trellisctl apply` text as the control plane reads it: the limits scan, the YAML parser, every field's
//! validation, then compilation for evaluation (what a proxy does with an accepted set). Parsing must never panic,
//! and what parses must also parse back from its canonical JSON (the form the store keeps and proxies receive).
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_policy::{CompiledPolicies, DEFAULT_ROOT_NAMESPACE, Resource, parse_documents, parse_keys};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_keys(text);
    let Ok(resources) = parse_documents(text) else { return };
    for resource in &resources {
        let json = resource.to_json();
        Resource::from_json(&json).expect("a parsed resource's canonical JSON parses again");
    }
    let _ = CompiledPolicies::compile(&resources, DEFAULT_ROOT_NAMESPACE);
});
