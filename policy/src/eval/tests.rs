//! Table tests of the evaluator (in the style of ztunnel's `rbac.rs` tests): each case is a set of policies, one
//! request and the expected decision with the deciding policy. Workload: namespace `foo`, labels
//! `app=httpbin, version=v1`; default peer `cluster.local/ns/foo/sa/sleep` from 10.0.0.1 to 10.0.0.2:8080.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use crate::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;
const SLEEP: &str = "cluster.local/ns/foo/sa/sleep";

fn doc(kind: &str, ns: &str, name: &str, extra_meta: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {ns}\n{extra_meta}\
         spec: {spec}\n"
    )
}

/// An AuthorizationPolicy; `spec` is one line of YAML flow style.
fn ap(ns: &str, name: &str, spec: &str) -> String {
    doc("AuthorizationPolicy", ns, name, "", spec)
}

fn ap_dry(ns: &str, name: &str, spec: &str) -> String {
    doc("AuthorizationPolicy", ns, name, "  annotations: {istio.io/dry-run: 'true'}\n", spec)
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    doc("PeerAuthentication", ns, name, "", spec)
}

fn ra(ns: &str, name: &str, spec: &str) -> String {
    doc("RequestAuthentication", ns, name, "", spec)
}

fn parse(docs: &[String]) -> Vec<Resource> {
    parse_documents(&docs.join("---\n"))
        .unwrap_or_else(|e| panic!("policies do not parse:\n{e}\n{}", docs.join("---\n")))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn jwt() -> Value {
    json!({
        "iss": "https://accounts.example.com",
        "sub": "alice",
        "aud": ["web", "mobile"],
        "azp": "frontend",
        "groups": ["admin", "dev"],
        "nested": {"key1": "value1", "list": ["x", "y"]},
        "scope": "read write",
        "permission": "p1 p2",
        "roles": "r1 r2",
        "n": 7,
        "verified": true
    })
}

/// An owned request description; [`Req::request`] borrows it as the evaluator's `Request`.
#[derive(Clone)]
struct Req {
    ns: String,
    labels: BTreeMap<String, String>,
    principal: Option<String>,
    src: IpAddr,
    remote: Option<IpAddr>,
    dst: IpAddr,
    port: u16,
    sni: Option<String>,
    metadata: Option<Value>,
    http: Option<Http>,
}

#[derive(Clone)]
struct Http {
    method: String,
    path: String,
    host: Option<String>,
    headers: Vec<(String, String)>,
    jwt: Option<Value>,
}

fn tcp() -> Req {
    Req {
        ns: "foo".into(),
        labels: [("app".to_string(), "httpbin".to_string()), ("version".to_string(), "v1".to_string())].into(),
        principal: Some(SLEEP.into()),
        src: ip("10.0.0.1"),
        remote: None,
        dst: ip("10.0.0.2"),
        port: 8080,
        sni: None,
        metadata: None,
        http: None,
    }
}

fn http(method: &str, path: &str) -> Req {
    let http =
        Http { method: method.into(), path: path.into(), host: Some("httpbin.foo".into()), headers: vec![], jwt: None };
    Req { http: Some(http), ..tcp() }
}

fn get() -> Req {
    http("GET", "/ip")
}

impl Req {
    fn principal(mut self, p: &str) -> Req {
        self.principal = Some(p.into());
        self
    }
    fn plaintext(mut self) -> Req {
        self.principal = None;
        self
    }
    fn src(mut self, s: &str) -> Req {
        self.src = ip(s);
        self
    }
    fn remote(mut self, s: &str) -> Req {
        self.remote = Some(ip(s));
        self
    }
    fn dst(mut self, s: &str) -> Req {
        self.dst = ip(s);
        self
    }
    fn port(mut self, p: u16) -> Req {
        self.port = p;
        self
    }
    fn ns(mut self, ns: &str) -> Req {
        self.ns = ns.into();
        self
    }
    fn labels(mut self, labels: &[(&str, &str)]) -> Req {
        self.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self
    }
    fn sni(mut self, s: &str) -> Req {
        self.sni = Some(s.into());
        self
    }
    fn metadata(mut self, m: Value) -> Req {
        self.metadata = Some(m);
        self
    }
    fn h(mut self, f: impl FnOnce(&mut Http)) -> Req {
        f(self.http.as_mut().expect("an HTTP request"));
        self
    }
    fn host(self, host: &str) -> Req {
        self.h(|h| h.host = Some(host.into()))
    }
    fn no_host(self) -> Req {
        self.h(|h| h.host = None)
    }
    fn header(self, k: &str, v: &str) -> Req {
        self.h(|h| h.headers.push((k.into(), v.into())))
    }
    fn jwt(self, j: Value) -> Req {
        self.h(|h| h.jwt = Some(j))
    }

    fn request(&self) -> Request<'_> {
        let mut r = Request::tcp(self.principal.as_deref(), self.src, self.dst, self.port)
            .with_remote_ip(self.remote.unwrap_or(self.src));
        r.sni = self.sni.as_deref();
        r.filter_metadata = self.metadata.as_ref();
        if let Some(h) = &self.http {
            let mut hr = HttpRequest::new(&h.method, &h.path).with_headers(&h.headers);
            hr.host = h.host.as_deref();
            hr.jwt = h.jwt.as_ref();
            r = r.with_http(hr);
        }
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Allowed by this ALLOW policy, or (None) because no ALLOW policy applies.
    Allow(Option<&'static str>),
    /// Denied by this DENY policy, or (None) because no ALLOW policy matched.
    Deny(Option<&'static str>),
}

fn allow(name: &'static str) -> Want {
    Want::Allow(Some(name))
}
fn deny(name: &'static str) -> Want {
    Want::Deny(Some(name))
}
const ALLOW_NO_POLICY: Want = Want::Allow(None);
const DENY_NO_MATCH: Want = Want::Deny(None);

struct Case {
    name: &'static str,
    policies: Vec<String>,
    req: Req,
    want: Want,
}

fn c(name: &'static str, policies: &[String], req: Req, want: Want) -> Case {
    Case { name, policies: policies.to_vec(), req, want }
}

/// `(allowed, deciding policy name)` of a decision, comparable with a [`Want`].
fn outcome(d: &Decision<'_>) -> (bool, Option<String>) {
    (d.allowed, d.deciding.map(|p| p.name.to_string()))
}

fn wanted(w: Want) -> (bool, Option<String>) {
    match w {
        Want::Allow(name) => (true, name.map(String::from)),
        Want::Deny(name) => (false, name.map(String::from)),
    }
}

fn check(case: &Case) -> Result<(), String> {
    let resources = parse(&case.policies);
    let compiled = CompiledPolicies::compile(&resources, ROOT).map_err(|e| e.to_string())?;
    let workload = compiled.for_workload(&case.req.ns, &case.req.labels);
    let d = workload.evaluate(&case.req.request());
    let expected_reason = match case.want {
        Want::Allow(Some(_)) => Reason::AllowedByPolicy,
        Want::Allow(None) => Reason::NoAllowPolicies,
        Want::Deny(Some(_)) => Reason::DeniedByPolicy,
        Want::Deny(None) => Reason::NoAllowMatched,
    };
    if outcome(&d) != wanted(case.want) || d.reason != expected_reason {
        return Err(format!("want {:?} ({expected_reason}), got: {d}", case.want));
    }
    Ok(())
}

fn cases() -> Vec<Case> {
    let allow_all = || ap("foo", "allow-all", "{rules: [{}]}");
    let deny_all = || ap("foo", "deny-all", "{action: DENY, rules: [{}]}");
    let allow_nothing = || ap("foo", "allow-nothing", "{}");
    let allow_from = |src: &str| ap("foo", "allow", &format!("{{rules: [{{from: [{{source: {src}}}]}}]}}"));
    let deny_from = |src: &str| ap("foo", "deny", &format!("{{action: DENY, rules: [{{from: [{{source: {src}}}]}}]}}"));
    let allow_to = |op: &str| ap("foo", "allow", &format!("{{rules: [{{to: [{{operation: {op}}}]}}]}}"));
    let deny_to = |op: &str| ap("foo", "deny", &format!("{{action: DENY, rules: [{{to: [{{operation: {op}}}]}}]}}"));
    let allow_when = |cond: &str| ap("foo", "allow", &format!("{{rules: [{{when: [{cond}]}}]}}"));
    let deny_when = |cond: &str| ap("foo", "deny", &format!("{{action: DENY, rules: [{{when: [{cond}]}}]}}"));
    let bar_peer = "cluster.local/ns/bar/sa/client";

    vec![
        // ---- Special policies and the algorithm (reference §2.8, §5.15)
        c("no policies: allow", &[], tcp(), ALLOW_NO_POLICY),
        c("spec {} (allow-nothing) denies", &[allow_nothing()], get(), DENY_NO_MATCH),
        c("spec {} denies TCP too", &[allow_nothing()], tcp(), DENY_NO_MATCH),
        c("rules [{}] (allow-all) allows", &[allow_all()], get(), allow("allow-all")),
        c("deny-all denies", &[deny_all()], tcp(), deny("deny-all")),
        c("DENY beats ALLOW", &[allow_all(), deny_all()], get(), deny("deny-all")),
        c("allow-all makes allow-nothing useless", &[allow_nothing(), allow_all()], get(), allow("allow-all")),
        c(
            "non-matching DENY and no ALLOW: allow",
            &[deny_from(&format!("{{principals: [{bar_peer}]}}"))],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c("non-matching ALLOW: deny", &[allow_from(&format!("{{principals: [{bar_peer}]}}"))], tcp(), DENY_NO_MATCH),
        c(
            "second ALLOW policy matches",
            &[
                ap("foo", "a-other", &format!("{{rules: [{{from: [{{source: {{principals: [{bar_peer}]}}}}]}}]}}")),
                allow_all(),
            ],
            tcp(),
            allow("allow-all"),
        ),
        c(
            "from AND to: from matches, to does not",
            &[ap(
                "foo",
                "p",
                &format!(
                    "{{rules: [{{from: [{{source: {{principals: [{SLEEP}]}}}}], to: [{{operation: {{methods: [POST]}}}}]}}]}}"
                ),
            )],
            get(),
            DENY_NO_MATCH,
        ),
        c(
            "from AND to both match",
            &[ap(
                "foo",
                "p",
                &format!(
                    "{{rules: [{{from: [{{source: {{principals: [{SLEEP}]}}}}], to: [{{operation: {{methods: [GET]}}}}]}}]}}"
                ),
            )],
            get(),
            allow("p"),
        ),
        c(
            "from elements are ORed",
            &[ap(
                "foo",
                "p",
                &format!(
                    "{{rules: [{{from: [{{source: {{principals: [{bar_peer}]}}}}, {{source: {{namespaces: [foo]}}}}]}}]}}"
                ),
            )],
            tcp(),
            allow("p"),
        ),
        c(
            "to elements are ORed",
            &[ap("foo", "p", "{rules: [{to: [{operation: {methods: [POST]}}, {operation: {paths: [/ip]}}]}]}")],
            get(),
            allow("p"),
        ),
        c(
            "fields of one source are ANDed",
            &[allow_from("{namespaces: [foo], ipBlocks: [192.168.0.0/16]}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "when conditions are ANDed",
            &[ap(
                "foo",
                "p",
                "{rules: [{when: [{key: source.namespace, values: [foo]}, {key: destination.port, values: ['9090']}]}]}",
            )],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "AUDIT never changes the decision (allow)",
            &[ap("foo", "audit", "{action: AUDIT, rules: [{}]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "AUDIT never changes the decision (deny)",
            &[ap("foo", "audit", "{action: AUDIT, rules: [{}]}"), allow_nothing()],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "AUDIT without rules is accepted and inert",
            &[ap("foo", "audit", "{action: AUDIT}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        // ---- Dry-run (§2.1, §5.13): evaluated, never enforced
        c(
            "dry-run DENY is not enforced",
            &[ap_dry("foo", "dry-deny", "{action: DENY, rules: [{}]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c("dry-run ALLOW-nothing alone: no ALLOW policy", &[ap_dry("foo", "dry-allow", "{}")], tcp(), ALLOW_NO_POLICY),
        c(
            "dry-run ALLOW does not allow",
            &[ap_dry("foo", "dry-allow", "{rules: [{}]}"), allow_nothing()],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "enforced DENY still denies next to dry-run ALLOW",
            &[ap_dry("foo", "dry-allow", "{rules: [{}]}"), deny_all()],
            tcp(),
            deny("deny-all"),
        ),
        // ---- Scope (§2.7)
        c(
            "root namespace without selector applies mesh-wide",
            &[ap(ROOT, "mesh-deny", "{action: DENY, rules: [{}]}")],
            tcp(),
            deny("mesh-deny"),
        ),
        c(
            "root namespace selector matches in every namespace",
            &[ap(ROOT, "mesh-sel", "{selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{}]}")],
            tcp(),
            deny("mesh-sel"),
        ),
        c(
            "root namespace selector that does not match",
            &[ap(ROOT, "mesh-sel", "{selector: {matchLabels: {app: other}}, action: DENY, rules: [{}]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "other namespace's policy does not apply",
            &[ap("bar", "bar-deny", "{action: DENY, rules: [{}]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "namespace selector matches",
            &[ap("foo", "sel", "{selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{}]}")],
            tcp(),
            deny("sel"),
        ),
        c(
            "namespace selector does not match",
            &[ap("foo", "sel", "{selector: {matchLabels: {app: productpage}}, action: DENY, rules: [{}]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "all selector labels must match",
            &[ap("foo", "sel", "{selector: {matchLabels: {app: httpbin, version: v2}}, action: DENY, rules: [{}]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "empty selector selects all",
            &[ap("foo", "sel", "{selector: {}, action: DENY, rules: [{}]}")],
            tcp(),
            deny("sel"),
        ),
        c("selector-less policy applies to unlabeled workloads", &[deny_all()], tcp().labels(&[]), deny("deny-all")),
        c(
            "targetRefs policies never apply to proxies",
            &[ap(
                "foo",
                "waypoint",
                "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], action: DENY, rules: [{}]}",
            )],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "root-namespace ALLOW for another app does not make this workload default-deny",
            &[ap(ROOT, "other-app", "{selector: {matchLabels: {app: other}}, rules: [{}]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "workload in the root namespace",
            &[ap(ROOT, "root-sel", "{selector: {matchLabels: {app: ctl}}, action: DENY, rules: [{}]}")],
            tcp().ns(ROOT).labels(&[("app", "ctl")]),
            deny("root-sel"),
        ),
        c(
            "root and namespace ALLOW policies are additive",
            &[
                ap(ROOT, "mesh-allow", &format!("{{rules: [{{from: [{{source: {{principals: [{bar_peer}]}}}}]}}]}}")),
                allow_from("{namespaces: [foo]}"),
            ],
            tcp().principal(bar_peer),
            allow("mesh-allow"),
        ),
        // ---- principals (§1.2)
        c("principals exact", &[allow_from(&format!("{{principals: [{SLEEP}]}}"))], tcp(), allow("allow")),
        c(
            "principals exact mismatch",
            &[allow_from("{principals: [cluster.local/ns/foo/sa/other]}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c("principals prefix", &[allow_from("{principals: [cluster.local/ns/foo/*]}")], tcp(), allow("allow")),
        c("principals suffix", &[allow_from("{principals: ['*/sa/sleep']}")], tcp(), allow("allow")),
        c("principals '*' with mTLS", &[allow_from("{principals: ['*']}")], tcp(), allow("allow")),
        c("principals '*' plaintext", &[allow_from("{principals: ['*']}")], tcp().plaintext(), DENY_NO_MATCH),
        c(
            "principals are not written with spiffe://",
            &[allow_from("{principals: ['spiffe://cluster.local/ns/foo/sa/sleep']}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "a middle '*' is a literal",
            &[allow_from("{principals: [cluster.local/ns/*/sa/sleep]}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "notPrincipals in ALLOW excludes the peer",
            &[allow_from(&format!("{{principals: ['*'], notPrincipals: [{SLEEP}]}}"))],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "DENY notPrincipals '*' denies plaintext",
            &[deny_from("{notPrincipals: ['*']}")],
            tcp().plaintext(),
            deny("deny"),
        ),
        c("DENY notPrincipals '*' lets mTLS through", &[deny_from("{notPrincipals: ['*']}")], tcp(), ALLOW_NO_POLICY),
        c(
            "DENY principals is bypassed by plaintext",
            &[deny_from(&format!("{{principals: [{SLEEP}]}}"))],
            tcp().plaintext(),
            ALLOW_NO_POLICY,
        ),
        c("DENY principals matches the peer", &[deny_from(&format!("{{principals: [{SLEEP}]}}"))], tcp(), deny("deny")),
        // ---- namespaces
        c("namespaces exact", &[allow_from("{namespaces: [foo]}")], tcp(), allow("allow")),
        c("namespaces mismatch", &[allow_from("{namespaces: [bar]}")], tcp(), DENY_NO_MATCH),
        c("namespaces prefix", &[allow_from("{namespaces: [fo*]}")], tcp(), allow("allow")),
        c("namespaces suffix", &[allow_from("{namespaces: ['*oo']}")], tcp(), allow("allow")),
        c("namespaces '*' plaintext", &[allow_from("{namespaces: ['*']}")], tcp().plaintext(), DENY_NO_MATCH),
        c(
            "DENY notNamespaces from another namespace",
            &[deny_from("{notNamespaces: [foo]}")],
            tcp().principal(bar_peer),
            deny("deny"),
        ),
        c("DENY notNamespaces plaintext", &[deny_from("{notNamespaces: [foo]}")], tcp().plaintext(), deny("deny")),
        c("DENY notNamespaces same namespace", &[deny_from("{notNamespaces: [foo]}")], tcp(), ALLOW_NO_POLICY),
        c(
            "namespace of a non-SPIFFE principal is absent",
            &[allow_from("{namespaces: ['*']}")],
            tcp().principal("opaque-id"),
            DENY_NO_MATCH,
        ),
        // ---- serviceAccounts
        c(
            "serviceAccounts short form = policy namespace",
            &[allow_from("{serviceAccounts: [sleep]}")],
            tcp(),
            allow("allow"),
        ),
        c("serviceAccounts ns/sa mismatch", &[allow_from("{serviceAccounts: [bar/sleep]}")], tcp(), DENY_NO_MATCH),
        c(
            "serviceAccounts any trust domain",
            &[allow_from("{serviceAccounts: [foo/sleep]}")],
            tcp().principal("example.org/ns/foo/sa/sleep"),
            allow("allow"),
        ),
        c(
            "serviceAccounts short form in the root namespace means the root namespace",
            &[ap(ROOT, "root-sa", "{rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "DENY notServiceAccounts",
            &[deny_from("{notServiceAccounts: [foo/sleep]}")],
            tcp().principal("cluster.local/ns/foo/sa/other"),
            deny("deny"),
        ),
        c("serviceAccounts plaintext", &[allow_from("{serviceAccounts: [sleep]}")], tcp().plaintext(), DENY_NO_MATCH),
        c(
            "serviceAccounts does not prefix-match",
            &[allow_from("{serviceAccounts: [sleep]}")],
            tcp().principal("cluster.local/ns/foo/sa/sleepy"),
            DENY_NO_MATCH,
        ),
        // ---- trustDomains
        c("trustDomains exact", &[allow_from("{trustDomains: [cluster.local]}")], tcp(), allow("allow")),
        c("trustDomains mismatch", &[allow_from("{trustDomains: [example.org]}")], tcp(), DENY_NO_MATCH),
        c("trustDomains '*' plaintext", &[allow_from("{trustDomains: ['*']}")], tcp().plaintext(), DENY_NO_MATCH),
        c("trustDomains '*' mTLS", &[allow_from("{trustDomains: ['*']}")], tcp(), allow("allow")),
        c("trustDomains prefix", &[allow_from("{trustDomains: [cluster*]}")], tcp(), allow("allow")),
        c(
            "DENY notTrustDomains",
            &[deny_from("{notTrustDomains: [cluster.local]}")],
            tcp().principal("example.org/ns/foo/sa/sleep"),
            deny("deny"),
        ),
        // ---- ipBlocks / remoteIpBlocks (IPv4 and IPv6)
        c("ipBlocks CIDR", &[allow_from("{ipBlocks: [10.0.0.0/24]}")], tcp(), allow("allow")),
        c("ipBlocks CIDR mismatch", &[allow_from("{ipBlocks: [10.1.0.0/16]}")], tcp(), DENY_NO_MATCH),
        c("ipBlocks single address", &[allow_from("{ipBlocks: [10.0.0.1]}")], tcp(), allow("allow")),
        c("DENY notIpBlocks", &[deny_from("{notIpBlocks: [10.0.0.0/8]}")], tcp().src("192.168.1.1"), deny("deny")),
        c("ipBlocks IPv6", &[allow_from("{ipBlocks: ['2001:db8::/32']}")], tcp().src("2001:db8::1"), allow("allow")),
        c("ipBlocks IPv6 does not match IPv4", &[allow_from("{ipBlocks: ['2001:db8::/32']}")], tcp(), DENY_NO_MATCH),
        c(
            "ipBlocks IPv4-mapped IPv6 peer",
            &[allow_from("{ipBlocks: [10.0.0.0/8]}")],
            tcp().src("::ffff:10.0.0.1"),
            allow("allow"),
        ),
        c(
            "ipBlocks use the peer address, not remote",
            &[allow_from("{ipBlocks: [10.0.0.1]}")],
            tcp().src("192.168.0.1").remote("10.0.0.1"),
            DENY_NO_MATCH,
        ),
        c(
            "remoteIpBlocks use the original client",
            &[allow_from("{remoteIpBlocks: [203.0.113.0/24]}")],
            get().remote("203.0.113.7"),
            allow("allow"),
        ),
        c(
            "remoteIpBlocks default to the peer address",
            &[allow_from("{remoteIpBlocks: [10.0.0.1]}")],
            tcp(),
            allow("allow"),
        ),
        c(
            "DENY notRemoteIpBlocks IPv6 inside",
            &[deny_from("{notRemoteIpBlocks: ['2001:db8::/64']}")],
            get().remote("2001:db8::5"),
            ALLOW_NO_POLICY,
        ),
        c(
            "DENY notRemoteIpBlocks IPv6 outside",
            &[deny_from("{notRemoteIpBlocks: ['2001:db8::/64']}")],
            get().remote("2001:db9::5"),
            deny("deny"),
        ),
        // ---- ports
        c("ports", &[allow_to("{ports: ['8080']}")], tcp(), allow("allow")),
        c("ports mismatch", &[allow_to("{ports: ['9090']}")], tcp(), DENY_NO_MATCH),
        c("DENY notPorts other port", &[deny_to("{notPorts: ['8080']}")], tcp().port(9090), deny("deny")),
        c("DENY notPorts same port", &[deny_to("{notPorts: ['8080']}")], tcp(), ALLOW_NO_POLICY),
        c("ports compare numerically", &[allow_to("{ports: ['08080']}")], tcp(), allow("allow")),
        // ---- hosts (case-insensitive, whole authority)
        c("hosts case-insensitive", &[allow_to("{hosts: [httpbin.foo]}")], get().host("HTTPBIN.Foo"), allow("allow")),
        c(
            "hosts exact does not match host:port",
            &[allow_to("{hosts: [httpbin.foo]}")],
            get().host("httpbin.foo:8000"),
            DENY_NO_MATCH,
        ),
        c(
            "hosts with port wildcard",
            &[allow_to("{hosts: [httpbin.foo, 'httpbin.foo:*']}")],
            get().host("httpbin.foo:8000"),
            allow("allow"),
        ),
        c(
            "hosts suffix case-insensitive",
            &[allow_to("{hosts: ['*.example.com']}")],
            get().host("API.Example.COM"),
            allow("allow"),
        ),
        c("hosts prefix with upper-case pattern", &[allow_to("{hosts: [HttpBin*]}")], get(), allow("allow")),
        c("hosts '*' needs an authority", &[allow_to("{hosts: ['*']}")], get().no_host(), DENY_NO_MATCH),
        c("DENY notHosts", &[deny_to("{notHosts: ['*.internal']}")], get(), deny("deny")),
        // ---- methods (case-sensitive)
        c("methods", &[allow_to("{methods: [GET]}")], get(), allow("allow")),
        c("methods are case-sensitive", &[allow_to("{methods: [GET]}")], http("get", "/ip"), DENY_NO_MATCH),
        c("methods prefix", &[allow_to("{methods: [P*]}")], http("POST", "/ip"), allow("allow")),
        c("DENY notMethods", &[deny_to("{notMethods: [GET, HEAD]}")], http("POST", "/ip"), deny("deny")),
        // ---- paths
        c("paths ignore the query", &[allow_to("{paths: [/ip]}")], http("GET", "/ip?x=1&y=2"), allow("allow")),
        c("paths ignore the fragment", &[allow_to("{paths: [/ip]}")], http("GET", "/ip#top"), allow("allow")),
        c("paths exact", &[allow_to("{paths: [/ip]}")], http("GET", "/ip/"), DENY_NO_MATCH),
        c("paths prefix", &[allow_to("{paths: [/api/*]}")], http("GET", "/api/v1/users"), allow("allow")),
        c("paths suffix", &[allow_to("{paths: ['*.png']}")], http("GET", "/img/a.png?v=2"), allow("allow")),
        c("paths '*'", &[allow_to("{paths: ['*']}")], get(), allow("allow")),
        c("paths template {*}", &[allow_to("{paths: ['/foo/{*}']}")], http("GET", "/foo/bar"), allow("allow")),
        c(
            "paths template {*} is one segment",
            &[allow_to("{paths: ['/foo/{*}']}")],
            http("GET", "/foo/bar/baz"),
            DENY_NO_MATCH,
        ),
        c("paths template {**}", &[allow_to("{paths: ['/foo/{**}']}")], http("GET", "/foo/a/b?q"), allow("allow")),
        c(
            "paths template {*} then {**}",
            &[allow_to("{paths: ['/foo/{*}/bar/{**}']}")],
            http("GET", "/foo/x/bar/y/z"),
            allow("allow"),
        ),
        c(
            "paths template trailing slash",
            &[allow_to("{paths: ['/foo/{**}/']}")],
            http("GET", "/foo/bar"),
            DENY_NO_MATCH,
        ),
        c("DENY notPaths", &[deny_to("{notPaths: [/public/*]}")], http("GET", "/admin"), deny("deny")),
        c(
            "paths with notPaths",
            &[allow_to("{paths: [/api/*], notPaths: [/api/private]}")],
            http("GET", "/api/private"),
            DENY_NO_MATCH,
        ),
        // ---- when: connection attributes
        c("when source.ip", &[allow_when("{key: source.ip, values: [10.0.0.0/8]}")], tcp(), allow("allow")),
        c("when source.ip notValues", &[allow_when("{key: source.ip, notValues: [10.0.0.1]}")], tcp(), DENY_NO_MATCH),
        c(
            "when remote.ip",
            &[allow_when("{key: remote.ip, values: ['2001:db8::1']}")],
            get().remote("2001:db8::1"),
            allow("allow"),
        ),
        c("when source.namespace", &[allow_when("{key: source.namespace, values: [foo]}")], tcp(), allow("allow")),
        c(
            "when source.namespace plaintext",
            &[allow_when("{key: source.namespace, values: [foo]}")],
            tcp().plaintext(),
            DENY_NO_MATCH,
        ),
        c(
            "when source.principal",
            &[allow_when(&format!("{{key: source.principal, values: [{SLEEP}]}}"))],
            tcp(),
            allow("allow"),
        ),
        c(
            "DENY when source.principal notValues '*' plaintext",
            &[deny_when("{key: source.principal, notValues: ['*']}")],
            tcp().plaintext(),
            deny("deny"),
        ),
        c(
            "when source.serviceAccount",
            &[allow_when("{key: source.serviceAccount, values: [sleep]}")],
            tcp(),
            allow("allow"),
        ),
        c(
            "when source.trustDomain",
            &[allow_when("{key: source.trustDomain, values: [cluster.local]}")],
            tcp(),
            allow("allow"),
        ),
        c("when destination.ip", &[allow_when("{key: destination.ip, values: [10.0.0.2]}")], tcp(), allow("allow")),
        c(
            "when destination.ip IPv6",
            &[allow_when("{key: destination.ip, values: ['fd00::/8']}")],
            tcp().dst("fd00::2"),
            allow("allow"),
        ),
        c("when destination.port", &[allow_when("{key: destination.port, values: ['8080']}")], tcp(), allow("allow")),
        c(
            "when destination.port notValues",
            &[allow_when("{key: destination.port, notValues: ['8080']}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "when connection.sni",
            &[allow_when("{key: connection.sni, values: ['*.foo.svc.cluster.local']}")],
            tcp().sni("httpbin.foo.svc.cluster.local"),
            allow("allow"),
        ),
        c("when connection.sni absent", &[allow_when("{key: connection.sni, values: ['*']}")], tcp(), DENY_NO_MATCH),
        c(
            "when experimental filter metadata absent",
            &[allow_when("{key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', values: [x]}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "DENY when experimental filter notValues absent",
            &[deny_when("{key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', notValues: [x]}")],
            tcp(),
            deny("deny"),
        ),
        c(
            "when experimental filter metadata list",
            &[allow_when("{key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', values: ['[orders]']}")],
            tcp().metadata(json!({"envoy.filters.network.mysql_proxy": {"db.table": ["orders", "users"]}})),
            allow("allow"),
        ),
        // ---- when: HTTP attributes
        c(
            "when request.headers",
            &[allow_when("{key: 'request.headers[x-token]', values: [abc]}")],
            get().header("X-Token", "abc"),
            allow("allow"),
        ),
        c(
            "when request.headers name case-insensitive",
            &[allow_when("{key: 'request.headers[X-Token]', values: [abc]}")],
            get().header("x-token", "abc"),
            allow("allow"),
        ),
        c(
            "when request.headers prefix",
            &[allow_when("{key: 'request.headers[authorization]', values: ['Bearer *']}")],
            get().header("Authorization", "Bearer xyz"),
            allow("allow"),
        ),
        c(
            "when request.headers presence accepts an empty value",
            &[allow_when("{key: 'request.headers[x-flag]', values: ['*']}")],
            get().header("x-flag", ""),
            allow("allow"),
        ),
        c(
            "DENY when request.headers notValues on a missing header",
            &[deny_when("{key: 'request.headers[x-token]', notValues: [abc]}")],
            get(),
            deny("deny"),
        ),
        c(
            "when request.headers repeated values are joined",
            &[allow_when("{key: 'request.headers[x-a]', values: ['a,b']}")],
            get().header("x-a", "a").header("X-A", "b"),
            allow("allow"),
        ),
        c(
            "when request.headers[:method] pseudo-header",
            &[allow_when("{key: 'request.headers[:method]', values: [GET]}")],
            get(),
            allow("allow"),
        ),
        c(
            "when request.auth.principal",
            &[allow_when("{key: request.auth.principal, values: ['https://accounts.example.com/alice']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when request.auth.audiences list",
            &[allow_when("{key: request.auth.audiences, values: [mobile]}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when request.auth.audiences string",
            &[allow_when("{key: request.auth.audiences, values: [web]}")],
            get().jwt(json!({"iss": "i", "sub": "s", "aud": "web"})),
            allow("allow"),
        ),
        c(
            "when request.auth.presenter",
            &[allow_when("{key: request.auth.presenter, values: [front*]}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when claims list-valued",
            &[allow_when("{key: 'request.auth.claims[groups]', values: [dev]}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when claims nested",
            &[allow_when("{key: 'request.auth.claims[nested][key1]', values: [value1]}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when claims nested list",
            &[allow_when("{key: 'request.auth.claims[nested][list]', values: [y]}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when claims missing",
            &[allow_when("{key: 'request.auth.claims[missing]', values: ['*']}")],
            get().jwt(jwt()),
            DENY_NO_MATCH,
        ),
        c(
            "DENY when claims notValues without a token",
            &[deny_when("{key: 'request.auth.claims[groups]', notValues: [admin]}")],
            get(),
            deny("deny"),
        ),
        c(
            "when claims scope is space-delimited",
            &[allow_when("{key: 'request.auth.claims[scope]', values: [write]}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when claims permission is space-delimited",
            &[allow_when("{key: 'request.auth.claims[permission]', values: [p2]}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "when claims other strings are not split",
            &[allow_when("{key: 'request.auth.claims[roles]', values: [r2]}")],
            get().jwt(jwt()),
            DENY_NO_MATCH,
        ),
        c(
            "when claims split per RequestAuthentication spaceDelimitedClaims",
            &[
                allow_when("{key: 'request.auth.claims[roles]', values: [r2]}"),
                ra(
                    "foo",
                    "jwt",
                    "{jwtRules: [{issuer: 'https://accounts.example.com', spaceDelimitedClaims: [roles]}]}",
                ),
            ],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "spaceDelimitedClaims only for that issuer",
            &[
                allow_when("{key: 'request.auth.claims[roles]', values: [r2]}"),
                ra("foo", "jwt", "{jwtRules: [{issuer: 'https://other.example.com', spaceDelimitedClaims: [roles]}]}"),
            ],
            get().jwt(jwt()),
            DENY_NO_MATCH,
        ),
        c(
            "when claims number never matches a string",
            &[allow_when("{key: 'request.auth.claims[n]', values: ['7']}")],
            get().jwt(jwt()),
            DENY_NO_MATCH,
        ),
        // ---- requestPrincipals (split at the last '/', §2.3, §5.4)
        c(
            "requestPrincipals '*' with a token",
            &[allow_from("{requestPrincipals: ['*']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c("requestPrincipals '*' without a token", &[allow_from("{requestPrincipals: ['*']}")], get(), DENY_NO_MATCH),
        c(
            "requestPrincipals '*' needs sub",
            &[allow_from("{requestPrincipals: ['*']}")],
            get().jwt(json!({"iss": "i"})),
            DENY_NO_MATCH,
        ),
        c(
            "DENY notRequestPrincipals '*' without a token",
            &[deny_from("{notRequestPrincipals: ['*']}")],
            get(),
            deny("deny"),
        ),
        c(
            "DENY notRequestPrincipals '*' with a token",
            &[deny_from("{notRequestPrincipals: ['*']}")],
            get().jwt(jwt()),
            ALLOW_NO_POLICY,
        ),
        c(
            "requestPrincipals exact with URL issuer",
            &[allow_from("{requestPrincipals: ['https://accounts.example.com/alice']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "requestPrincipals any issuer",
            &[allow_from("{requestPrincipals: ['*/alice']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "requestPrincipals issuer suffix",
            &[allow_from("{requestPrincipals: ['*example.com/alice']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "requestPrincipals any subject",
            &[allow_from("{requestPrincipals: ['https://accounts.example.com/*']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "requestPrincipals subject prefix",
            &[allow_from("{requestPrincipals: ['https://accounts.example.com/al*']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "requestPrincipals 'https://*' is not a string prefix",
            &[allow_from("{requestPrincipals: ['https://*']}")],
            get().jwt(jwt()),
            DENY_NO_MATCH,
        ),
        c(
            "requestPrincipals without '/' never matches a token",
            &[allow_from("{requestPrincipals: [alice]}")],
            get().jwt(jwt()),
            DENY_NO_MATCH,
        ),
        c(
            "requestPrincipals prefix without '/' is an issuer prefix",
            &[allow_from("{requestPrincipals: ['https:*']}")],
            get().jwt(jwt()),
            allow("allow"),
        ),
        c(
            "requestPrincipals wrong subject",
            &[allow_from("{requestPrincipals: ['https://accounts.example.com/bob']}")],
            get().jwt(jwt()),
            DENY_NO_MATCH,
        ),
        // ---- HTTP-only attributes on TCP (§2.9, §5.1, §5.2)
        c("TCP: ALLOW rule with methods is dropped", &[allow_to("{methods: [GET]}")], tcp(), DENY_NO_MATCH),
        c(
            "TCP: only the pure-TCP ALLOW rule survives",
            &[ap(
                "foo",
                "mixed",
                "{rules: [{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: ['8080']}}]}]}",
            )],
            tcp(),
            allow("mixed"),
        ),
        c(
            "TCP: ALLOW rule dropped although its from is TCP-compatible",
            &[ap(
                "foo",
                "p",
                &format!(
                    "{{rules: [{{from: [{{source: {{principals: [{SLEEP}]}}}}], to: [{{operation: {{methods: [GET]}}}}]}}]}}"
                ),
            )],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "TCP: ALLOW rule dropped for an HTTP element in another from",
            &[ap(
                "foo",
                "p",
                "{rules: [{from: [{source: {namespaces: [foo]}}, {source: {requestPrincipals: ['*']}}]}]}",
            )],
            tcp(),
            DENY_NO_MATCH,
        ),
        c(
            "TCP: ALLOW rule with a header condition is dropped",
            &[allow_when("{key: 'request.headers[x-a]', values: [a]}")],
            tcp(),
            DENY_NO_MATCH,
        ),
        c("HTTP: the same ALLOW rule applies", &[allow_to("{methods: [GET]}")], get(), allow("allow")),
        c("TCP: DENY with only methods denies all TCP", &[deny_to("{methods: [GET]}")], tcp(), deny("deny")),
        c("HTTP: DENY methods does not match POST", &[deny_to("{methods: [GET]}")], http("POST", "/"), ALLOW_NO_POLICY),
        c(
            "TCP: DENY keeps its TCP fields (other port)",
            &[deny_to("{methods: [GET], ports: ['9090']}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "TCP: DENY keeps its TCP fields (same port)",
            &[deny_to("{methods: [GET], ports: ['8080']}")],
            tcp(),
            deny("deny"),
        ),
        c(
            "TCP: DENY requestPrincipals + ports = anyone to that port",
            &[ap(
                "foo",
                "deny",
                "{action: DENY, rules: [{from: [{source: {requestPrincipals: [x/y]}}], to: [{operation: {ports: ['8080']}}]}]}",
            )],
            tcp().plaintext(),
            deny("deny"),
        ),
        c(
            "TCP: DENY namespaces + methods keeps the namespace (peer elsewhere)",
            &[ap(
                "foo",
                "deny",
                "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {methods: [GET]}}]}]}",
            )],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "TCP: DENY namespaces + methods keeps the namespace (peer in that ns)",
            &[ap(
                "foo",
                "deny",
                "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {methods: [GET]}}]}]}",
            )],
            tcp().principal(bar_peer),
            deny("deny"),
        ),
        c(
            "TCP: DENY notRequestPrincipals '*' denies all TCP",
            &[deny_from("{notRequestPrincipals: ['*']}")],
            tcp(),
            deny("deny"),
        ),
        c(
            "TCP: DENY claims condition denies all TCP",
            &[deny_when("{key: 'request.auth.claims[groups]', values: [admin]}")],
            tcp(),
            deny("deny"),
        ),
        c(
            "TCP: an HTTP-only from element becomes match-any",
            &[ap(
                "foo",
                "deny",
                "{action: DENY, rules: [{from: [{source: {requestPrincipals: [x/y]}}, {source: {namespaces: [bar]}}]}]}",
            )],
            tcp(),
            deny("deny"),
        ),
        c(
            "TCP: HTTP and TCP fields in one DENY source",
            &[deny_from("{requestPrincipals: [x/y], ipBlocks: [192.168.0.0/16]}")],
            tcp(),
            ALLOW_NO_POLICY,
        ),
        c(
            "TCP: remoteIpBlocks is not HTTP-only",
            &[allow_from("{remoteIpBlocks: [10.0.0.0/8]}")],
            tcp(),
            allow("allow"),
        ),
        c(
            "TCP: connection.sni is not HTTP-only",
            &[allow_when("{key: connection.sni, values: [a.b]}")],
            tcp().sni("a.b"),
            allow("allow"),
        ),
        c(
            "TCP: ALLOW with dropped rule still makes the workload default-deny",
            &[allow_to("{paths: [/ip]}"), deny_to("{ports: ['1']}")],
            tcp(),
            DENY_NO_MATCH,
        ),
    ]
}

#[test]
fn decision_table() {
    let cases = cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    let failures: Vec<String> = cases
        .iter()
        .inspect(|c| assert!(names.insert(c.name), "duplicate case name {:?}", c.name))
        .filter_map(|c| check(c).err().map(|e| format!("{}: {e}", c.name)))
        .collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// The Display of the decision for `policies` and `req`.
fn shown(policies: &[String], req: &Req) -> String {
    let resources = parse(policies);
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    compiled.for_workload(&req.ns, &req.labels).evaluate(&req.request()).to_string()
}

#[test]
fn rule_index_and_display() {
    let policies = [ap(
        "foo",
        "multi",
        "{action: DENY, rules: [{to: [{operation: {ports: ['1']}}]}, {from: [{source: {namespaces: [foo]}}]}]}",
    )];
    let resources = parse(&policies);
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    let req = tcp();
    let w = compiled.for_workload(&req.ns, &req.labels);
    let d = w.evaluate(&req.request());
    let p = d.deciding.unwrap();
    assert_eq!((p.namespace, p.name, p.action, p.rule_index, p.dry_run), ("foo", "multi", Action::Deny, 1, false));
    assert_eq!(d.to_string(), "denied by DENY policy foo/multi rule 1");

    assert_eq!(shown(&[ap("foo", "a", "{}")], &tcp()), "denied: no ALLOW policy matched");
    assert_eq!(shown(&[ap("foo", "a", "{rules: [{}]}")], &tcp()), "allowed by ALLOW policy foo/a rule 0");
    assert_eq!(shown(&[], &tcp()), "allowed: no ALLOW policy applies");
}

#[test]
fn audit_is_reported_without_changing_the_decision() {
    let policies = [
        ap(
            "foo",
            "audit-get",
            "{action: AUDIT, rules: [{to: [{operation: {methods: [POST]}}]}, {to: [{operation: {methods: [GET]}}]}]}",
        ),
        ap(ROOT, "audit-all", "{action: AUDIT, rules: [{}]}"),
        ap("foo", "audit-never", "{action: AUDIT, rules: [{from: [{source: {namespaces: [nowhere]}}]}]}"),
        ap("foo", "allow-all", "{rules: [{}]}"),
    ];
    let resources = parse(&policies);
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    let req = get();
    let w = compiled.for_workload(&req.ns, &req.labels);
    let d = w.evaluate(&req.request());
    assert!(d.allowed);
    let audited: Vec<_> = d.audit.iter().map(|p| (p.namespace, p.name, p.rule_index)).collect();
    assert_eq!(audited, [("foo", "audit-get", 1), (ROOT, "audit-all", 0)]);
    assert_eq!(
        d.to_string(),
        "allowed by ALLOW policy foo/allow-all rule 0; audited by AUDIT policy foo/audit-get rule 1, \
         AUDIT policy trellis-system/audit-all rule 0"
    );
    // On TCP the AUDIT rule's HTTP fields are removed: both rules match, the first is reported.
    let req = tcp();
    let d = w.evaluate(&req.request());
    assert_eq!(
        d.audit.iter().map(|p| (p.name, p.rule_index)).collect::<Vec<_>>(),
        [("audit-get", 0), ("audit-all", 0)]
    );
}

#[test]
fn dry_run_outcomes() {
    let deny_dry = ap_dry("foo", "dry-deny", "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}");
    let allow_dry = ap_dry("foo", "dry-allow", "{rules: [{to: [{operation: {methods: [GET]}}]}]}");
    let resources = parse(&[deny_dry, allow_dry]);
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    let w = compiled.for_workload("foo", &tcp().labels);

    let req = http("GET", "/admin");
    let d = w.evaluate(&req.request());
    assert!(d.allowed && d.reason == Reason::NoAllowPolicies);
    let dr = d.dry_run.unwrap();
    assert!(!dr.allowed);
    assert_eq!(dr.deciding.map(|p| (p.name, p.dry_run)), Some(("dry-deny", true)));
    assert_eq!(
        d.to_string(),
        "allowed: no ALLOW policy applies; dry-run: would deny (DENY policy foo/dry-deny rule 0 [dry-run])"
    );

    let req = http("POST", "/");
    let d = w.evaluate(&req.request());
    assert!(d.allowed);
    let dr = d.dry_run.unwrap();
    assert_eq!((dr.allowed, dr.reason, dr.deciding), (false, Reason::NoAllowMatched, None));
    assert_eq!(d.to_string(), "allowed: no ALLOW policy applies; dry-run: would deny (no ALLOW policy matched)");

    let req = get();
    let dr = w.evaluate(&req.request()).dry_run.unwrap();
    assert_eq!((dr.allowed, dr.deciding.map(|p| p.name)), (true, Some("dry-allow")));

    // No dry-run policies: no outcome.
    let resources = parse(&[ap("foo", "allow-all", "{rules: [{}]}")]);
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    let w = compiled.for_workload("foo", &tcp().labels);
    assert!(w.evaluate(&tcp().request()).dry_run.is_none());
}

#[test]
fn ignored_policies_are_reported() {
    let resources = parse(&[
        ap("foo", "waypoint", "{targetRefs: [{kind: Service, name: httpbin}], rules: [{}]}"),
        ap("foo", "single", "{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}, rules: [{}]}"),
        ra(
            "foo",
            "gw-jwt",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}], jwtRules: [{issuer: x}]}",
        ),
        pa(ROOT, "root-sel", "{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}"),
        ap("foo", "kept", "{rules: [{}]}"),
    ]);
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    let ignored: Vec<_> = compiled.ignored().iter().map(|i| (i.key.to_string(), i.reason)).collect();
    assert_eq!(
        ignored,
        [
            ("AuthorizationPolicy/foo/single".to_string(), IgnoreReason::TargetRefs),
            ("AuthorizationPolicy/foo/waypoint".to_string(), IgnoreReason::TargetRefs),
            ("PeerAuthentication/trellis-system/root-sel".to_string(), IgnoreReason::RootNamespaceSelector),
            ("RequestAuthentication/foo/gw-jwt".to_string(), IgnoreReason::TargetRefs),
        ]
    );
    assert!(compiled.ignored()[0].to_string().contains("gateways and waypoints"));
    assert_eq!(compiled.authorization_policy_count(), 1);
    let w = compiled.for_workload("foo", &BTreeMap::new());
    assert_eq!(w.policies().collect::<Vec<_>>(), [("foo", "kept", Action::Allow, false)]);
}

#[test]
fn custom_root_namespace() {
    let resources = parse(&[
        ap("istio-system", "mesh-deny", "{action: DENY, rules: [{}]}"),
        ap(ROOT, "not-root-here", "{action: DENY, rules: [{}]}"),
    ]);
    let compiled = CompiledPolicies::compile(&resources, "istio-system").unwrap();
    assert_eq!(compiled.root_namespace(), "istio-system");
    let req = tcp();
    let w = compiled.for_workload(&req.ns, &req.labels);
    assert_eq!(w.evaluate(&req.request()).deciding.map(|p| p.name), Some("mesh-deny"));
    let w = compiled.for_workload("bar", &req.labels);
    assert_eq!(w.len(), 1);
}

#[test]
fn trust_domain_aliases() {
    let resources = parse(&[
        ap("foo", "allow", "{rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]}"),
        ap(
            "foo",
            "allow-td",
            "{rules: [{from: [{source: {trustDomains: [old.example]}}], to: [{operation: {ports: ['1']}}]}]}",
        ),
    ]);
    let options =
        CompileOptions { root_namespace: ROOT.into(), trust_domains: vec!["new.example".into(), "old.example".into()] };
    let compiled = CompiledPolicies::compile_with(&resources, &options).unwrap();
    let w = compiled.for_workload("foo", &tcp().labels);
    for (principal, port, want) in [
        ("new.example/ns/foo/sa/sleep", 8080, Some("allow")),
        ("old.example/ns/foo/sa/sleep", 8080, Some("allow")),
        ("other.example/ns/foo/sa/sleep", 8080, None),
        ("new.example/ns/foo/sa/other", 1, Some("allow-td")),
    ] {
        let req = tcp().principal(principal).port(port);
        assert_eq!(w.evaluate(&req.request()).deciding.map(|p| p.name), want, "{principal}");
    }
    // Without aliases principals compare verbatim.
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    let w = compiled.for_workload("foo", &tcp().labels);
    assert!(!w.evaluate(&tcp().principal("new.example/ns/foo/sa/sleep").request()).allowed);
}

#[test]
fn compile_errors_name_the_policy() {
    let mut resources = parse(&[ap("foo", "bad", "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}")]);
    if let Spec::AuthorizationPolicy(p) = &mut resources[0].spec {
        p.rules[0].from[0].source.ip_blocks.push("10.0.0.300".into());
    }
    let err = CompiledPolicies::compile(&resources, ROOT).unwrap_err();
    assert_eq!(err.field, "spec.rules[0].from[0].source.ipBlocks[1]");
    assert_eq!(
        err.to_string(),
        "AuthorizationPolicy foo/bad: spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.300\" is not an IP address or CIDR"
    );

    let mut bad_port = parse(&[ap("foo", "p", "{rules: [{to: [{operation: {notPorts: ['80']}}]}]}")]);
    if let Spec::AuthorizationPolicy(p) = &mut bad_port[0].spec {
        p.rules[0].to[0].operation.not_ports.push("http".into());
    }
    let err = CompiledPolicies::compile(&bad_port, ROOT).unwrap_err();
    assert_eq!((err.field.as_str(), err.name.as_str()), ("spec.rules[0].to[0].operation.notPorts[1]", "p"));

    let mut custom = parse(&[ap("foo", "ext", "{rules: [{}]}")]);
    if let Spec::AuthorizationPolicy(p) = &mut custom[0].spec {
        p.action = Action::Custom;
    }
    assert!(CompiledPolicies::compile(&custom, ROOT).unwrap_err().reason.contains("CUSTOM"));

    let mut bad_key = parse(&[ap("foo", "k", "{rules: [{when: [{key: source.ip, values: [10.0.0.1]}]}]}")]);
    if let Spec::AuthorizationPolicy(p) = &mut bad_key[0].spec {
        p.rules[0].when[0].key = "destination.namespace".into();
    }
    assert_eq!(CompiledPolicies::compile(&bad_key, ROOT).unwrap_err().field, "spec.rules[0].when[0].key");
}

#[test]
fn headers_from_a_hash_map() {
    let resources =
        parse(&[ap("foo", "allow", "{rules: [{when: [{key: 'request.headers[x-user]', values: [alice]}]}]}")]);
    let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
    let w = compiled.for_workload("foo", &BTreeMap::new());
    let headers: std::collections::HashMap<String, String> = [("X-User".to_string(), "alice".to_string())].into();
    let req = Request::tcp(None, ip("10.0.0.1"), ip("10.0.0.2"), 80)
        .with_http(HttpRequest::new("GET", "/").with_headers(&headers));
    assert!(w.evaluate(&req).allowed);
    assert!(req.is_http());
}

// -------------------------------------------------------------------------------------------------------------------
// The rule index changes no decision: indexed evaluation == trying every rule (`evaluate_by_scan`).

/// Every field of both decisions (allowed, reason, deciding policy and rule, audit list, dry-run outcome).
fn assert_same_as_scan(w: &WorkloadPolicies, req: &Request<'_>, what: &dyn Fn() -> String) {
    let (indexed, scanned) = (w.evaluate(req), w.evaluate_by_scan(req));
    assert_eq!(indexed, scanned, "{}\nrequest: {req:?}", what());
}

#[test]
fn index_agrees_with_scan_on_the_decision_table() {
    for case in cases() {
        let compiled = CompiledPolicies::compile(&parse(&case.policies), ROOT).unwrap();
        let w = compiled.for_workload(&case.req.ns, &case.req.labels);
        assert_same_as_scan(&w, &case.req.request(), &|| format!("case {:?}", case.name));
        // The same policies seen by other peers and on other ports.
        for principal in [None, Some("cluster.local/ns/bar/sa/client"), Some("cluster.local/ns/foo/sa/other")] {
            for port in [80, 8080, 9090] {
                let mut req = case.req.clone().port(port);
                req.principal = principal.map(String::from);
                assert_same_as_scan(&w, &req.request(), &|| format!("case {:?}, variant", case.name));
            }
        }
    }
}

/// xorshift64: deterministic pseudo-random choices without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    /// 1 to `max` picks (repeats allowed, as a policy may list a value twice).
    fn some(&mut self, items: &[&str], max: usize) -> Vec<String> {
        (0..1 + self.below(max)).map(|_| self.pick(items).to_string()).collect()
    }
}

const PEERS: [&str; 5] = [
    "cluster.local/ns/foo/sa/sleep",
    "cluster.local/ns/foo/sa/web",
    "cluster.local/ns/bar/sa/client",
    "other.td/ns/foo/sa/sleep",
    "opaque-id",
];
const PRINCIPAL_PATTERNS: [&str; 4] = ["cluster.local/ns/foo/*", "*/sa/sleep", "*", "*client"];
const PORTS: [&str; 3] = ["8080", "9090", "80"];

/// Principal values: mostly exact (indexable), sometimes mixed with a prefix / suffix / presence pattern.
fn principal_values(rng: &mut Rng) -> Vec<String> {
    let mut values = rng.some(&PEERS, 3);
    if rng.percent(25) {
        let at = rng.below(values.len() + 1);
        values.insert(at, rng.pick(&PRINCIPAL_PATTERNS).to_string());
    }
    values
}

fn random_source(rng: &mut Rng) -> Value {
    let mut source = serde_json::Map::new();
    for _ in 0..1 + rng.below(2) {
        let (key, values) = match rng.below(10) {
            0..=3 => ("principals", principal_values(rng)),
            4 => ("notPrincipals", principal_values(rng)),
            5 => ("namespaces", rng.some(&["foo", "bar", "b*", "*"], 2)),
            6 => ("notNamespaces", rng.some(&["foo", "bar"], 1)),
            7 => ("ipBlocks", rng.some(&["10.0.0.0/24", "10.0.1.0/24", "192.168.0.1"], 2)),
            8 => ("notIpBlocks", rng.some(&["10.0.1.0/24", "192.168.0.0/16"], 1)),
            _ => ("requestPrincipals", rng.some(&["*", "https://accounts.example.com/alice"], 1)),
        };
        source.insert(key.into(), json!(values));
    }
    json!({ "source": source })
}

fn random_operation(rng: &mut Rng) -> Value {
    let mut operation = serde_json::Map::new();
    for _ in 0..1 + rng.below(2) {
        let (key, values) = match rng.below(6) {
            0..=2 => ("ports", rng.some(&PORTS, 2)),
            3 => ("notPorts", rng.some(&PORTS, 1)),
            4 => ("methods", rng.some(&["GET", "POST"], 1)),
            _ => ("paths", rng.some(&["/ip", "/admin*"], 1)),
        };
        operation.insert(key.into(), json!(values));
    }
    json!({ "operation": operation })
}

fn random_condition(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => json!({"key": "source.principal", "values": principal_values(rng)}),
        1 => json!({"key": "source.principal", "notValues": rng.some(&PEERS, 2)}),
        2 => json!({"key": "destination.port", "values": rng.some(&PORTS, 2)}),
        3 => json!({"key": "destination.port", "notValues": rng.some(&PORTS, 1)}),
        4 => json!({"key": "source.namespace", "values": rng.some(&["foo", "bar"], 1)}),
        _ => json!({"key": "request.headers[x-a]", "values": ["1"]}),
    }
}

fn random_rule(rng: &mut Rng) -> Value {
    let mut rule = serde_json::Map::new();
    let (from, to, when) = (rng.below(4).min(2), rng.below(3), rng.below(4).saturating_sub(2));
    if from > 0 {
        rule.insert("from".into(), (0..from).map(|_| random_source(rng)).collect());
    }
    if to > 0 {
        rule.insert("to".into(), (0..to).map(|_| random_operation(rng)).collect());
    }
    if when > 0 {
        rule.insert("when".into(), (0..when).map(|_| random_condition(rng)).collect());
    }
    Value::Object(rule)
}

/// 1 to 8 policies of every action, in the workload's namespace, the root namespace or elsewhere, some dry-run.
/// Built directly: parsing and validating them would take most of the test's time (the test validates a sample).
fn random_policies(rng: &mut Rng) -> Vec<Resource> {
    (0..1 + rng.below(8))
        .map(|i| {
            let action = rng.pick(&["ALLOW", "DENY", "AUDIT"]);
            // Validation allows an empty rule list for ALLOW only (allow-nothing).
            let at_least = usize::from(action != "ALLOW" || rng.percent(90));
            let rules: Vec<Value> = (0..rng.below(5).min(3) + at_least).map(|_| random_rule(rng)).collect();
            let mut metadata = Metadata {
                name: format!("p{}", rng.below(100) * 10 + i),
                namespace: rng.pick(&["foo", "foo", ROOT, "bar"]).to_string(),
                ..Metadata::default()
            };
            // Validation allows dry-run on ALLOW and DENY only.
            if action != "AUDIT" && rng.percent(20) {
                metadata.annotations.insert(DRY_RUN_ANNOTATION.into(), "true".into());
            }
            let spec = serde_json::from_value(json!({"action": action, "rules": rules})).unwrap();
            Resource {
                api_version: API_VERSIONS[0].into(),
                kind: Kind::AuthorizationPolicy,
                metadata,
                spec: Spec::AuthorizationPolicy(spec),
            }
        })
        .collect()
}

fn random_request(rng: &mut Rng) -> Req {
    let mut req = match rng.below(3) {
        0 => tcp(),
        1 => get(),
        _ => http("POST", "/admin/x").header("x-a", "1"),
    };
    req.principal = if rng.percent(15) { None } else { Some(rng.pick(&PEERS).to_string()) };
    req.port(rng.pick(&[8080, 9090, 80, 443])).src(rng.pick(&["10.0.0.1", "10.0.1.5", "192.168.0.1"]))
}

#[test]
fn index_agrees_with_scan_on_random_policies() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (sets, requests_per_set) = (3000, 12);
    // What the generated cases covered, so that the comparison is known not to be vacuous.
    let mut reasons = std::collections::HashMap::new();
    let (mut later_rule, mut audited, mut dry_run_decided, mut indexed_rules, mut all_rules) = (0, 0, 0, 0, 0);
    for set in 0..sets {
        let policies = random_policies(&mut rng);
        let trust_domains = if rng.percent(25) { vec!["cluster.local".into(), "other.td".into()] } else { vec![] };
        let options = CompileOptions { root_namespace: ROOT.into(), trust_domains };
        if set % 20 == 0 {
            for p in &policies {
                assert_eq!(&Resource::from_json(&p.to_json()).unwrap(), p, "generated policies are valid");
            }
        }
        let compiled = CompiledPolicies::compile_with(&policies, &options).unwrap();
        let w = compiled.for_workload("foo", &tcp().labels);
        let (indexed, all) = w.indexed_rules();
        (indexed_rules, all_rules) = (indexed_rules + indexed, all_rules + all);
        for _ in 0..requests_per_set {
            let req = random_request(&mut rng);
            assert_same_as_scan(&w, &req.request(), &|| {
                format!("policy set {set}: {}", policies.iter().map(Resource::to_json).collect::<Vec<_>>().join("\n"))
            });
            let d = w.evaluate(&req.request());
            *reasons.entry(d.reason).or_insert(0) += 1;
            later_rule += usize::from(d.deciding.is_some_and(|p| p.rule_index > 0));
            audited += usize::from(!d.audit.is_empty());
            dry_run_decided += usize::from(d.dry_run.is_some_and(|o| o.deciding.is_some_and(|p| p.dry_run)));
        }
    }
    let total = sets * requests_per_set;
    assert!(reasons.len() == 4 && reasons.values().all(|n| *n > total / 50), "{reasons:?}");
    assert!(later_rule > total / 50 && audited > total / 20 && dry_run_decided > total / 50);
    assert!(
        indexed_rules * 3 > all_rules && indexed_rules * 3 < all_rules * 2,
        "{indexed_rules} of {all_rules} indexed"
    );
}

/// Which rules a check looks at.
#[test]
fn index_candidates() {
    let policies = [
        ap(
            "foo",
            "a",
            "{action: DENY, rules: [\
             {from: [{source: {principals: [cluster.local/ns/bar/sa/x, cluster.local/ns/bar/sa/x]}}]},\
             {from: [{source: {principals: ['cluster.local/ns/bar/*']}}]},\
             {to: [{operation: {ports: ['80', '81']}}]},\
             {when: [{key: source.principal, values: [cluster.local/ns/bar/sa/y]}], \
              to: [{operation: {ports: ['80']}}]},\
             {from: [{source: {principals: [cluster.local/ns/bar/sa/x]}}, {source: {namespaces: [bar]}}]},\
             {from: [{source: {notPrincipals: [cluster.local/ns/bar/sa/x]}}]}]}",
        ),
        ap(
            "foo",
            "b",
            "{action: DENY, rules: [\
             {from: [{source: {principals: [cluster.local/ns/bar/sa/y]}}, \
                     {source: {principals: [cluster.local/ns/bar/sa/x], namespaces: [bar]}}]},\
             {to: [{operation: {ports: ['80']}}, {operation: {methods: [GET]}}]},\
             {when: [{key: destination.port, values: ['81']}]}]}",
        ),
    ];
    let compiled = CompiledPolicies::compile(&parse(&policies), ROOT).unwrap();
    let w = compiled.for_workload("foo", &BTreeMap::new());
    let candidates = |principal: Option<&str>, port: u16| -> Vec<(u32, u32)> {
        w.deny
            .candidates(|| principal.map(super::index_key::principal_hash), port)
            .map(|r| (r.policy, r.rule))
            .collect()
    };
    let always = [(0, 1), (0, 4), (0, 5), (1, 1)];
    let with = |extra: &[(u32, u32)]| {
        let mut all: Vec<_> = always.iter().chain(extra).copied().collect();
        all.sort();
        all
    };
    assert_eq!(candidates(None, 443), always);
    assert_eq!(candidates(Some("cluster.local/ns/bar/sa/z"), 443), always);
    assert_eq!(candidates(Some("cluster.local/ns/bar/sa/x"), 443), with(&[(0, 0), (1, 0)]));
    assert_eq!(candidates(Some("cluster.local/ns/bar/sa/y"), 80), with(&[(0, 2), (0, 3), (1, 0)]));
    assert_eq!(candidates(None, 81), with(&[(0, 2), (1, 2)]));
    assert_eq!(w.deny.indexed_rules(), (5, 9));
}

// -------------------------------------------------------------------------------------------------------------------
// PeerAuthentication

struct MtlsCase {
    name: &'static str,
    policies: Vec<String>,
    ns: &'static str,
    labels: &'static [(&'static str, &'static str)],
    port: u16,
    mode: MtlsMode,
    level: MtlsLevel,
    policy: Option<&'static str>,
}

#[allow(clippy::too_many_arguments)]
fn m(
    name: &'static str,
    policies: &[String],
    ns: &'static str,
    labels: &'static [(&'static str, &'static str)],
    port: u16,
    mode: MtlsMode,
    level: MtlsLevel,
    policy: Option<&'static str>,
) -> MtlsCase {
    MtlsCase { name, policies: policies.to_vec(), ns, labels, port, mode, level, policy }
}

#[test]
fn effective_mtls_table() {
    use MtlsLevel::*;
    use MtlsMode::*;
    const HTTPBIN: &[(&str, &str)] = &[("app", "httpbin")];
    let mesh = |mode: &str| pa(ROOT, "default", &format!("{{mtls: {{mode: {mode}}}}}"));
    let ns = |name: &str, mode: &str| pa("foo", name, &format!("{{mtls: {{mode: {mode}}}}}"));
    let wl =
        |name: &str, spec: &str| pa("foo", name, &format!("{{selector: {{matchLabels: {{app: httpbin}}}}, {spec}}}"));
    let cases = vec![
        m("nothing: PERMISSIVE", &[], "foo", HTTPBIN, 80, Permissive, Default, None),
        m("mesh STRICT", &[mesh("STRICT")], "foo", HTTPBIN, 80, Strict, Mesh, Some("trellis-system/default")),
        m("mesh UNSET inherits the default", &[mesh("UNSET")], "foo", HTTPBIN, 80, Permissive, Default, None),
        m(
            "namespace overrides mesh",
            &[mesh("STRICT"), ns("ns", "PERMISSIVE")],
            "foo",
            HTTPBIN,
            80,
            Permissive,
            Namespace,
            Some("foo/ns"),
        ),
        m(
            "namespace UNSET inherits mesh",
            &[mesh("STRICT"), pa("foo", "ns", "{mtls: {}}")],
            "foo",
            HTTPBIN,
            80,
            Strict,
            Mesh,
            Some("trellis-system/default"),
        ),
        m(
            "namespace without mtls inherits mesh",
            &[mesh("STRICT"), pa("foo", "ns", "{}")],
            "foo",
            HTTPBIN,
            80,
            Strict,
            Mesh,
            Some("trellis-system/default"),
        ),
        m(
            "namespace policy of another namespace",
            &[mesh("STRICT"), pa("bar", "ns", "{mtls: {mode: DISABLE}}")],
            "foo",
            HTTPBIN,
            80,
            Strict,
            Mesh,
            Some("trellis-system/default"),
        ),
        m(
            "workload overrides namespace",
            &[ns("ns", "STRICT"), wl("wl", "mtls: {mode: DISABLE}")],
            "foo",
            HTTPBIN,
            80,
            Disable,
            Workload,
            Some("foo/wl"),
        ),
        m(
            "workload selector not matching",
            &[ns("ns", "STRICT"), wl("wl", "mtls: {mode: DISABLE}")],
            "foo",
            &[("app", "other")],
            80,
            Strict,
            Namespace,
            Some("foo/ns"),
        ),
        m(
            "workload UNSET inherits namespace",
            &[ns("ns", "STRICT"), wl("wl", "mtls: {}")],
            "foo",
            HTTPBIN,
            80,
            Strict,
            Namespace,
            Some("foo/ns"),
        ),
        m(
            "port-level overrides",
            &[wl("wl", "mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}")],
            "foo",
            HTTPBIN,
            8080,
            Disable,
            Port,
            Some("foo/wl"),
        ),
        m(
            "other ports keep the workload mode",
            &[wl("wl", "mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}")],
            "foo",
            HTTPBIN,
            9090,
            Strict,
            Workload,
            Some("foo/wl"),
        ),
        m(
            "port-level UNSET inherits the workload",
            &[ns("ns", "PERMISSIVE"), wl("wl", "mtls: {mode: STRICT}, portLevelMtls: {8080: {}}")],
            "foo",
            HTTPBIN,
            8080,
            Strict,
            Workload,
            Some("foo/wl"),
        ),
        m(
            "port-level UNSET inherits through an UNSET workload",
            &[mesh("STRICT"), wl("wl", "portLevelMtls: {8080: {mode: UNSET}}")],
            "foo",
            HTTPBIN,
            8080,
            Strict,
            Mesh,
            Some("trellis-system/default"),
        ),
        m(
            "port-level STRICT on a PERMISSIVE namespace",
            &[ns("ns", "PERMISSIVE"), wl("wl", "portLevelMtls: {8080: {mode: STRICT}}")],
            "foo",
            HTTPBIN,
            8080,
            Strict,
            Port,
            Some("foo/wl"),
        ),
        m(
            "root-namespace selector is ignored",
            &[pa(ROOT, "sel", "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}")],
            "foo",
            HTTPBIN,
            80,
            Permissive,
            Default,
            None,
        ),
        m(
            "root-namespace selector is ignored in the root namespace too",
            &[pa(ROOT, "sel", "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}")],
            ROOT,
            HTTPBIN,
            80,
            Permissive,
            Default,
            None,
        ),
        m(
            "root-namespace workload uses the mesh policy",
            &[mesh("STRICT")],
            ROOT,
            HTTPBIN,
            80,
            Strict,
            Mesh,
            Some("trellis-system/default"),
        ),
        m(
            "empty selector is namespace-wide",
            &[pa("foo", "ns", "{selector: {}, mtls: {mode: STRICT}}")],
            "foo",
            &[],
            80,
            Strict,
            Namespace,
            Some("foo/ns"),
        ),
        m(
            "two mesh policies: smallest name wins",
            &[pa(ROOT, "b", "{mtls: {mode: DISABLE}}"), pa(ROOT, "a", "{mtls: {mode: STRICT}}")],
            "foo",
            HTTPBIN,
            80,
            Strict,
            Mesh,
            Some("trellis-system/a"),
        ),
        m(
            "two namespace policies: smallest name wins",
            &[ns("z", "STRICT"), ns("m", "DISABLE")],
            "foo",
            HTTPBIN,
            80,
            Disable,
            Namespace,
            Some("foo/m"),
        ),
        m(
            "two workload policies: smallest name wins",
            &[wl("w2", "mtls: {mode: STRICT}"), wl("w1", "mtls: {mode: DISABLE}")],
            "foo",
            HTTPBIN,
            80,
            Disable,
            Workload,
            Some("foo/w1"),
        ),
        m(
            "the tie winner's UNSET is not skipped",
            &[wl("w1", "mtls: {}"), wl("w2", "mtls: {mode: STRICT}")],
            "foo",
            HTTPBIN,
            80,
            Permissive,
            Default,
            None,
        ),
        m(
            "mesh DISABLE inherited",
            &[mesh("DISABLE"), ns("ns", "UNSET")],
            "foo",
            HTTPBIN,
            80,
            Disable,
            Mesh,
            Some("trellis-system/default"),
        ),
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let resources = parse(&case.policies);
        let labels: BTreeMap<String, String> =
            case.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let compiled = CompiledPolicies::compile(&resources, ROOT).unwrap();
        let got = compiled.effective_mtls(case.ns, &labels, case.port);
        let free = effective_mtls(&resources, ROOT, case.ns, &labels, case.port);
        let policy = got.policy.as_ref().map(|k| format!("{}/{}", k.namespace, k.name));
        if (got.mode, got.level, policy.as_deref()) != (case.mode, case.level, case.policy) || free != got {
            failures.push(format!("{}: want {} {:?} {:?}, got {got}", case.name, case.mode, case.level, case.policy));
        }
        assert_eq!(compiled.effective_mtls_mode(case.ns, &labels, case.port), got.mode);
        assert_eq!(effective_mtls_mode(&resources, ROOT, case.ns, &labels, case.port), got.mode);
        assert_eq!(compiled.for_workload(case.ns, &labels).mtls().mode(case.port), got.mode);
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn effective_mtls_display() {
    let resources = parse(&[pa("foo", "strict", "{mtls: {mode: STRICT}}")]);
    let got = effective_mtls(&resources, ROOT, "foo", &BTreeMap::new(), 80);
    assert_eq!(got.to_string(), "STRICT (namespace-level PeerAuthentication foo/strict)");
    assert_eq!(effective_mtls(&[], ROOT, "foo", &BTreeMap::new(), 80).to_string(), "PERMISSIVE (default)");
}

/// A proxy compiles each resource when it arrives and assembles the set on every change: that decides every case
/// of the table exactly as compiling the whole set at once, whatever the order the parts come in.
#[test]
fn assembled_from_parts_decides_as_compiled_whole() {
    let options = CompileOptions { root_namespace: ROOT.into(), ..CompileOptions::default() };
    for case in cases() {
        let resources = parse(&case.policies);
        let Ok(whole) = CompiledPolicies::compile_with(&resources, &options) else { continue };
        let parts: Vec<CompiledResource> =
            resources.iter().rev().map(|r| CompiledResource::compile(r, &options).unwrap()).collect();
        let assembled = CompiledPolicies::assemble(resources.iter().rev().zip(&parts), &options);
        let req = case.req.request();
        let (a, b) = (
            whole.for_workload(&case.req.ns, &case.req.labels),
            assembled.for_workload(&case.req.ns, &case.req.labels),
        );
        assert_eq!(format!("{}", a.evaluate(&req)), format!("{}", b.evaluate(&req)), "{}", case.name);
        assert_eq!(whole.ignored(), assembled.ignored(), "{}", case.name);
    }
}
