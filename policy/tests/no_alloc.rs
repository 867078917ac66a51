//! `WorkloadPolicies::evaluate` must not allocate on the hot path: a counting global allocator proves it for TCP
//! checks (and plain HTTP checks) against 100 policies using every connection-level field.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_policy::{CompiledPolicies, HttpRequest, Request, parse_documents};

struct Counting;

thread_local! {
    /// Allocations made by this thread while counting is on (other test threads are not counted).
    static COUNT: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note_allocation() {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = COUNT.try_with(|c| {
        if let Some(n) = c.get() {
            c.set(Some(n + 1));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(Some(0)));
    f();
    COUNT.with(|c| c.replace(None)).unwrap()
}

/// 100 policies in the workload's namespace and the root namespace: DENY and ALLOW, every connection-level field
/// with its `not` form, HTTP-only fields (removed or dropped on TCP), and none of them matching the checked peer
/// except the last ALLOW, so every check walks all of them.
fn policies() -> String {
    let mut docs = Vec::new();
    for i in 0..100 {
        let ns = if i % 10 == 0 { "trellis-system" } else { "foo" };
        let spec = match i % 5 {
            0 => format!(
                "{{action: DENY, rules: [{{from: [{{source: {{principals: [cluster.local/ns/x{i}/sa/a, '*/sa/b{i}'], \
                 notNamespaces: ['*']}}}}], to: [{{operation: {{ports: ['{p}'], methods: [GET]}}}}]}}]}}",
                p = 1000 + i
            ),
            1 => format!(
                "{{action: DENY, rules: [{{from: [{{source: {{ipBlocks: [192.168.{i}.0/24, '2001:db8:{i:x}::/48']}}}}], \
                 when: [{{key: destination.port, notValues: ['8080']}}, {{key: 'request.headers[x-{i}]', values: ['*']}}]}}]}}"
            ),
            2 => format!(
                "{{selector: {{matchLabels: {{app: httpbin}}}}, rules: [{{from: [{{source: {{namespaces: [ns{i}*]}}}}, \
                 {{source: {{serviceAccounts: [sa{i}]}}}}]}}, {{to: [{{operation: {{paths: [/p{i}/*], hosts: ['*.example.com']}}}}]}}]}}"
            ),
            3 => format!(
                "{{rules: [{{from: [{{source: {{trustDomains: [td{i}.example], remoteIpBlocks: [172.16.{i}.0/24]}}}}], \
                 when: [{{key: source.principal, values: ['cluster.local/ns/z{i}/*']}}, {{key: connection.sni, values: ['*.svc']}}]}}]}}"
            ),
            _ => format!(
                "{{action: DENY, rules: [{{from: [{{source: {{notIpBlocks: [0.0.0.0/0, '::/0'], requestPrincipals: ['*']}}}}], \
                 when: [{{key: destination.ip, values: [10.{i}.0.0/16]}}, {{key: 'request.auth.claims[groups]', values: [g{i}]}}]}}]}}"
            ),
        };
        docs.push(format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i:03}, namespace: {ns}}}\nspec: {spec}\n"
        ));
    }
    docs.push(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: zz-allow, namespace: foo}\n\
         spec: {rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}], to: [{operation: {ports: ['8080']}}]}]}\n"
            .to_string(),
    );
    docs.join("---\n")
}

#[test]
fn evaluate_does_not_allocate() {
    let resources = parse_documents(&policies()).unwrap();
    assert_eq!(resources.len(), 101);
    let compiled = CompiledPolicies::compile(&resources, "trellis-system").unwrap();
    let labels: BTreeMap<String, String> = [("app".to_string(), "httpbin".to_string())].into();
    let workload = compiled.for_workload("foo", &labels);
    assert_eq!(workload.len(), 101);

    let src: IpAddr = "10.0.0.1".parse().unwrap();
    let dst: IpAddr = "10.0.0.2".parse().unwrap();
    let mtls = Request::tcp(Some("cluster.local/ns/foo/sa/sleep"), src, dst, 8080);
    let plaintext = Request::tcp(None, src, dst, 8080);
    let v6 = Request::tcp(Some("cluster.local/ns/foo/sa/sleep"), "2001:db8:ff::1".parse().unwrap(), dst, 8080);
    let headers = [("user-agent", "curl"), ("x-other", "1")];
    let http = mtls.with_http(HttpRequest::new("POST", "/ip?x=1").with_host("httpbin.foo").with_headers(&headers));

    // Warm up (lazy statics, thread-locals) before counting.
    assert!(workload.evaluate(&mtls).allowed);

    let mut results = Vec::with_capacity(8);
    let n = allocations(|| {
        for _ in 0..100 {
            let allowed = workload.evaluate(&mtls).allowed;
            let denied_plaintext = !workload.evaluate(&plaintext).allowed;
            let v6_allowed = workload.evaluate(&v6).allowed;
            let http_allowed = workload.evaluate(&http).allowed;
            std::hint::black_box((allowed, denied_plaintext, v6_allowed, http_allowed));
        }
    });
    results.extend([
        workload.evaluate(&mtls).to_string(),
        workload.evaluate(&plaintext).to_string(),
        workload.evaluate(&v6).to_string(),
        workload.evaluate(&http).to_string(),
    ]);
    assert_eq!(n, 0, "evaluate allocated {n} times");
    assert_eq!(
        results,
        [
            "allowed by ALLOW policy foo/zz-allow rule 0",
            "denied: no ALLOW policy matched",
            "allowed by ALLOW policy foo/zz-allow rule 0",
            "allowed by ALLOW policy foo/zz-allow rule 0",
        ]
    );
}

#[test]
fn the_counter_sees_allocations() {
    assert_eq!(allocations(|| drop(std::hint::black_box(vec![1u8; 16]))), 1);
}
