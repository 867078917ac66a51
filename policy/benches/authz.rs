//! `cargo bench -p trellis-policy --bench authz`: the cost of one connection check with 1, 100 and 10,000
//! policies in scope (the last as ztunnel's benchmark: 10,000 mesh-wide DENY policies of 10 rules each, none
//! matching; then the same with the very last rule naming the caller, a scan's worst-case match), plus compile and
//! per-workload selection times. Prints a Markdown table. Every rule of the 10,000 names one exact principal, so
//! the compiled index files it under that principal and a check skips the rules naming other peers: those rows
//! measure the index lookup, not a scan of 100,000 rules.
//! Median of several runs; no external harness so the dependency tree stays small.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use trellis_policy::{CompiledPolicies, MAX_RESOURCES, Request, parse_documents};

const PRINCIPAL: &str = "cluster.local/ns/shop/sa/web";

fn allow_policy(namespace: &str, name: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n"
    )
}

/// 10 rules naming other peers; with `caller`, the last rule names it instead (and its address and port).
fn deny_policy_10_rules(namespace: &str, name: &str, caller: Option<&str>) -> String {
    let mut text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  action: DENY\n  rules:\n"
    );
    for rule in 0..10 {
        if let (Some(caller), 9) = (caller, rule) {
            text.push_str(&format!(
                "  - {{from: [{{source: {{principals: [\"{caller}\"], ipBlocks: [10.0.0.0/16]}}}}], \
                 to: [{{operation: {{ports: [\"8080\"]}}}}]}}\n"
            ));
            continue;
        }
        text.push_str(&format!(
            "  - from:\n    - source:\n        principals: [\"cluster.local/ns/other/sa/{name}-{rule}\"]\n        ipBlocks: [\"10.{}.0.0/16\"]\n    to:\n    - operation:\n        ports: [\"{}\"]\n",
            rule % 250,
            9000 + rule
        ));
    }
    text
}

struct Scenario {
    name: &'static str,
    /// YAML texts of at most [`MAX_RESOURCES`] documents each, as `trellisctl apply` takes them: the store holds
    /// every text's resources together.
    texts: Vec<String>,
}

fn scenarios() -> Vec<Scenario> {
    let mut hundred = String::new();
    for i in 0..99 {
        hundred.push_str(&allow_policy("shop", &format!("p{i}"), &format!("cluster.local/ns/x/sa/n{i}")));
        hundred.push_str("---\n");
    }
    hundred.push_str(&allow_policy("shop", "p99", PRINCIPAL));
    let ten_thousand = |caller: Option<&str>| {
        let mut texts = vec![String::new(); 10_000usize.div_ceil(MAX_RESOURCES)];
        for i in 0..10_000 {
            let caller = if i == 9_999 { caller } else { None };
            let text = &mut texts[i / MAX_RESOURCES];
            text.push_str(&deny_policy_10_rules("trellis-system", &format!("d{i}"), caller));
            text.push_str("---\n");
        }
        texts
    };
    vec![
        Scenario { name: "1 ALLOW policy (matches)", texts: vec![allow_policy("shop", "only", PRINCIPAL)] },
        Scenario { name: "100 ALLOW policies (the last matches)", texts: vec![hundred] },
        Scenario { name: "10,000 mesh-wide DENY x 10 rules (none match)", texts: ten_thousand(None) },
        Scenario {
            name: "10,000 mesh-wide DENY x 10 rules, one matches the caller",
            texts: ten_thousand(Some(PRINCIPAL)),
        },
    ]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let labels: BTreeMap<String, String> = [("app".to_owned(), "api".to_owned())].into();
    let source: IpAddr = "10.0.0.1".parse().unwrap();
    let destination: IpAddr = "10.0.0.2".parse().unwrap();
    println!("| policies in scope | compile | select for workload | check (median of 5 runs) | decision |");
    println!("| --- | --- | --- | --- | --- |");
    for scenario in scenarios() {
        let resources: Vec<_> =
            scenario.texts.iter().flat_map(|text| parse_documents(text).expect("valid policies")).collect();
        let started = Instant::now();
        let compiled = CompiledPolicies::compile(&resources, "trellis-system").expect("compiles");
        let compile = started.elapsed();
        let started = Instant::now();
        let workload = compiled.for_workload("shop", &labels);
        let select = started.elapsed();
        let request = Request::tcp(Some(PRINCIPAL), source, destination, 8080);
        let allowed = workload.evaluate(&request).allowed;
        // Enough iterations for ~100 ms per run.
        let probe = Instant::now();
        let mut probes = 0u64;
        while probe.elapsed().as_millis() < 20 {
            black_box(workload.evaluate(black_box(&request)));
            probes += 1;
        }
        let iterations = (probes * 5).max(10);
        let runs: Vec<f64> = (0..5)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..iterations {
                    black_box(workload.evaluate(black_box(&request)));
                }
                started.elapsed().as_nanos() as f64 / iterations as f64
            })
            .collect();
        let per_check = median(runs);
        let check =
            if per_check < 10_000.0 { format!("{per_check:.0} ns") } else { format!("{:.1} µs", per_check / 1000.0) };
        println!(
            "| {} | {:.1} ms | {:.1} µs | {check} | {} |",
            scenario.name,
            compile.as_secs_f64() * 1000.0,
            select.as_secs_f64() * 1e6,
            if allowed { "allow" } else { "deny" }
        );
    }
}
