//! Table-driven tests over whole documents: every rejection rule with its expected field path and reason, Istio's
//! documentation examples as accepted cases, round trips and multi-document behaviour.

use crate::*;

/// Wraps a spec (written at column 0) into a full document of the given kind in namespace `foo`.
fn doc(kind: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: test\n  namespace: foo\nspec:\n{spec}")
}

fn ap(spec: &str) -> String {
    doc("AuthorizationPolicy", spec)
}

fn pa(spec: &str) -> String {
    doc("PeerAuthentication", spec)
}

fn ra(spec: &str) -> String {
    doc("RequestAuthentication", spec)
}

fn parse_one(text: &str) -> Result<Resource, ParseError> {
    parse_documents(text).map(|mut v| {
        assert_eq!(v.len(), 1, "expected exactly one resource");
        v.remove(0)
    })
}

// -------------------------------------------------------------------------------------------------------------------
// Rejections

struct Reject {
    name: &'static str,
    text: String,
    field: &'static str,
    reason: &'static str,
}

fn reject(name: &'static str, text: String, field: &'static str, reason: &'static str) -> Reject {
    Reject { name, text, field, reason }
}

fn rejection_cases() -> Vec<Reject> {
    vec![
        // --- document level
        reject(
            "wrong apiVersion",
            ap("{}").replace("security.istio.io/v1", "networking.istio.io/v1"),
            "apiVersion",
            "unsupported apiVersion \"networking.istio.io/v1\"",
        ),
        reject(
            "v1alpha1 apiVersion",
            ap("{}").replace("security.istio.io/v1", "security.istio.io/v1alpha1"),
            "apiVersion",
            "unsupported apiVersion",
        ),
        reject(
            "missing apiVersion",
            ap("{}").replace("apiVersion: security.istio.io/v1\n", ""),
            "apiVersion",
            "is required",
        ),
        reject("unsupported kind", doc("VirtualService", "{}"), "kind", "unsupported kind \"VirtualService\""),
        reject("kind is case-sensitive in manifests", doc("authorizationpolicy", "{}"), "kind", "unsupported kind"),
        reject("missing kind", ap("{}").replace("kind: AuthorizationPolicy\n", ""), "kind", "is required"),
        reject("unknown top-level field", format!("{}extra: 1\n", ap("{}")), "extra", "unknown field `extra`"),
        reject(
            "missing metadata",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nspec: {}\n".to_string(),
            "metadata",
            "is required",
        ),
        reject("missing metadata.name", ap("{}").replace("  name: test\n", ""), "metadata.name", "is required"),
        reject("invalid name", ap("{}").replace("name: test", "name: Deny_All"), "metadata.name", "not a valid name"),
        reject(
            "invalid namespace",
            ap("{}").replace("namespace: foo", "namespace: Foo.bar"),
            "metadata.namespace",
            "not a valid namespace",
        ),
        reject(
            "unknown metadata field",
            ap("{}").replace("  namespace: foo\n", "  namespace: foo\n  generateName: x-\n"),
            "metadata.generateName",
            "unknown field `generateName`",
        ),
        reject(
            "non-string annotation",
            ap("{}").replace("  namespace: foo\n", "  namespace: foo\n  annotations:\n    a: true\n"),
            "metadata.annotations.a",
            "invalid type: boolean `true`, expected a string",
        ),
        reject("spec is a list", ap("[]"), "spec", "invalid type: sequence, expected struct AuthorizationPolicy"),
        reject(
            "metadata is a list",
            ap("{}").replace("metadata:\n  name: test\n  namespace: foo\n", "metadata: [test, foo]\n"),
            "metadata",
            "invalid type: sequence",
        ),
        reject(
            "source as a list",
            ap("rules:\n- from:\n  - source: [[a]]"),
            "spec.rules[0].from[0].source",
            "invalid type: sequence, expected struct Source",
        ),
        // --- AuthorizationPolicy: structure
        reject("unknown spec field", ap("selectr: {}"), "spec.selectr", "unknown field `selectr`"),
        reject(
            "unknown source field",
            ap("rules:\n- from:\n  - source:\n      principal: [a]"),
            "spec.rules[0].from[0].source.principal",
            "unknown field `principal`",
        ),
        reject(
            "snake_case field name",
            ap("rules:\n- to:\n  - operation:\n      not_paths: [/a]"),
            "spec.rules[0].to[0].operation.not_paths",
            "unknown field `not_paths`",
        ),
        reject(
            "hosts under source (invalid doc example)",
            ap("rules:\n- from:\n  - source:\n      hosts: [example.com]"),
            "spec.rules[0].from[0].source.hosts",
            "unknown field `hosts`",
        ),
        reject("bad action enum", ap("action: PERMIT\nrules: [{}]"), "spec.action", "unknown variant `PERMIT`"),
        reject("lowercase action", ap("action: deny\nrules: [{}]"), "spec.action", "unknown variant `deny`"),
        reject("numeric action", ap("action: 1\nrules: [{}]"), "spec.action", "invalid type"),
        reject("rules not a list", ap("rules: {}"), "spec.rules", "invalid type: map"),
        reject("null rule", ap("rules: [null]"), "spec.rules[0]", "invalid type: null"),
        reject(
            "from entry without source",
            ap("rules:\n- from:\n  - {}"),
            "spec.rules[0].from[0]",
            "missing field `source`",
        ),
        reject(
            "to entry without operation",
            ap("rules:\n- to:\n  - {}"),
            "spec.rules[0].to[0]",
            "missing field `operation`",
        ),
        reject(
            "port as integer",
            ap("rules:\n- to:\n  - operation:\n      ports: [8080]"),
            "spec.rules[0].to[0].operation.ports[0]",
            "invalid type: integer `8080`, expected a string",
        ),
        // --- AuthorizationPolicy: semantics
        reject("DENY without rules", ap("action: DENY"), "spec.rules", "DENY action without `rules` is meaningless"),
        reject("DENY with empty rules", ap("action: DENY\nrules: []"), "spec.rules", "DENY action without `rules`"),
        reject(
            "CUSTOM action",
            ap("action: CUSTOM\nprovider:\n  name: my-authz\nrules: [{}]"),
            "spec.action",
            "CUSTOM action is not supported",
        ),
        reject(
            "provider with ALLOW",
            ap("provider:\n  name: my-authz\nrules: [{}]"),
            "spec.provider",
            "`provider` must only be used with the CUSTOM action, found ALLOW",
        ),
        reject(
            "provider with DENY",
            ap("action: DENY\nprovider:\n  name: x\nrules: [{}]"),
            "spec.provider",
            "found DENY",
        ),
        reject(
            "selector with targetRefs",
            ap(
                "selector:\n  matchLabels: {app: a}\ntargetRefs:\n- kind: Gateway\n  group: gateway.networking.k8s.io\n  name: gw",
            ),
            "spec",
            "only one of selector, targetRef or targetRefs",
        ),
        reject(
            "selector with targetRef",
            ap("selector: {}\ntargetRef:\n  kind: Service\n  name: svc"),
            "spec",
            "only one of",
        ),
        reject(
            "targetRef with targetRefs",
            ap("targetRef:\n  kind: Service\n  name: a\ntargetRefs:\n- kind: Service\n  name: b"),
            "spec",
            "only one of",
        ),
        reject(
            "selector wildcard value",
            ap("selector:\n  matchLabels:\n    app: \"*\""),
            "spec.selector.matchLabels[app]",
            "wildcard is not supported in selector",
        ),
        reject(
            "selector wildcard key",
            ap("selector:\n  matchLabels:\n    \"ap*\": x"),
            "spec.selector.matchLabels[ap*]",
            "wildcard is not supported",
        ),
        reject(
            "selector empty key",
            ap("selector:\n  matchLabels:\n    \"\": x"),
            "spec.selector.matchLabels",
            "empty key is not supported",
        ),
        reject(
            "targetRef unsupported kind",
            ap("targetRefs:\n- kind: Deployment\n  group: apps\n  name: x"),
            "spec.targetRefs[0].kind",
            "unsupported target \"apps/Deployment\"",
        ),
        reject(
            "targetRef wrong group",
            ap("targetRefs:\n- kind: Gateway\n  name: x"),
            "spec.targetRefs[0].kind",
            "unsupported target",
        ),
        reject(
            "targetRef cross namespace",
            ap("targetRefs:\n- kind: Service\n  name: x\n  namespace: other"),
            "spec.targetRefs[0].namespace",
            "cross-namespace references are not supported",
        ),
        reject("targetRef missing name", ap("targetRef:\n  kind: Service"), "spec.targetRef", "missing field `name`"),
        reject(
            "targetRef empty name",
            ap("targetRefs:\n- kind: Service\n  name: \"\""),
            "spec.targetRefs[0].name",
            "name must be set",
        ),
        reject(
            "too many targetRefs",
            ap(&format!("targetRefs:\n{}", "- kind: Service\n  name: s\n".repeat(17))),
            "spec.targetRefs",
            "at most 16",
        ),
        reject("empty from list", ap("rules:\n- from: []"), "spec.rules[0].from", "`from` must not be empty"),
        reject("empty to list", ap("rules:\n- to: []"), "spec.rules[0].to", "`to` must not be empty"),
        reject(
            "empty source",
            ap("rules:\n- from:\n  - source: {}"),
            "spec.rules[0].from[0].source",
            "`source` must not be empty",
        ),
        reject(
            "source with only empty lists",
            ap("rules:\n- from:\n  - source:\n      principals: []"),
            "spec.rules[0].from[0].source",
            "must not be empty",
        ),
        reject(
            "empty operation",
            ap("rules:\n- to:\n  - operation: {}"),
            "spec.rules[0].to[0].operation",
            "`operation` must not be empty",
        ),
        reject(
            "empty principal",
            ap("rules:\n- from:\n  - source:\n      principals: [\"a\", \"\"]"),
            "spec.rules[0].from[0].source.principals[1]",
            "empty value is not allowed",
        ),
        reject(
            "empty method",
            ap("rules:\n- to:\n  - operation:\n      methods: [\"\"]"),
            "spec.rules[0].to[0].operation.methods[0]",
            "empty value",
        ),
        reject(
            "empty notHosts",
            ap("rules:\n- to:\n  - operation:\n      notHosts: [\"\"]"),
            "spec.rules[0].to[0].operation.notHosts[0]",
            "empty value",
        ),
        reject(
            "bad CIDR",
            ap("rules:\n- from:\n  - source:\n      ipBlocks: [\"10.0.0.1\", \"10.0.0.300/8\"]"),
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "\"10.0.0.300/8\" is not an IP address or CIDR",
        ),
        reject(
            "wildcard IP",
            ap("rules:\n- from:\n  - source:\n      notIpBlocks: [\"10.0.0.*\"]"),
            "spec.rules[0].from[0].source.notIpBlocks[0]",
            "is not an IP address or CIDR",
        ),
        reject(
            "bad prefix length",
            ap("rules:\n- from:\n  - source:\n      remoteIpBlocks: [\"10.0.0.0/33\"]"),
            "spec.rules[0].from[0].source.remoteIpBlocks[0]",
            "not an IP address or CIDR",
        ),
        reject(
            "hostname as IP",
            ap("rules:\n- from:\n  - source:\n      notRemoteIpBlocks: [example.com]"),
            "spec.rules[0].from[0].source.notRemoteIpBlocks[0]",
            "not an IP address",
        ),
        reject(
            "port out of range",
            ap("rules:\n- to:\n  - operation:\n      ports: [\"80\", \"70000\"]"),
            "spec.rules[0].to[0].operation.ports[1]",
            "\"70000\" is not a valid port",
        ),
        reject(
            "port not a number",
            ap("rules:\n- to:\n  - operation:\n      notPorts: [\"abc\"]"),
            "spec.rules[0].to[0].operation.notPorts[0]",
            "\"abc\" is not a valid port",
        ),
        reject(
            "port wildcard",
            ap("rules:\n- to:\n  - operation:\n      ports: [\"80*\"]"),
            "spec.rules[0].to[0].operation.ports[0]",
            "not a valid port",
        ),
        reject(
            "negative port",
            ap("rules:\n- to:\n  - operation:\n      ports: [\"-1\"]"),
            "spec.rules[0].to[0].operation.ports[0]",
            "not a valid port",
        ),
        reject(
            "path template {** } not last",
            ap("rules:\n- to:\n  - operation:\n      paths: [\"/foo/{**}/{*}\"]"),
            "spec.rules[0].to[0].operation.paths[0]",
            "invalid or unsupported path template",
        ),
        reject(
            "named path variable",
            ap("rules:\n- to:\n  - operation:\n      notPaths: [\"/foo/{bar}/{*}\"]"),
            "spec.rules[0].to[0].operation.notPaths[0]",
            "path template",
        ),
        reject(
            "mixed template segment",
            ap("rules:\n- to:\n  - operation:\n      paths: [\"/foo/{*}.txt\"]"),
            "spec.rules[0].to[0].operation.paths[0]",
            "path template",
        ),
        reject(
            "bare * in template",
            ap("rules:\n- to:\n  - operation:\n      paths: [\"/foo/{*}/*\"]"),
            "spec.rules[0].to[0].operation.paths[0]",
            "path template",
        ),
        reject(
            "serviceAccounts with principals",
            ap(
                "rules:\n- from:\n  - source:\n      serviceAccounts: [default/sleep]\n      principals: [cluster.local/ns/default/sa/sleep]",
            ),
            "spec.rules[0].from[0].source",
            "cannot be combined with principals",
        ),
        reject(
            "notServiceAccounts with namespaces",
            ap("rules:\n- from:\n  - source:\n      notServiceAccounts: [default/sleep]\n      namespaces: [prod]"),
            "spec.rules[0].from[0].source",
            "cannot be combined",
        ),
        reject(
            "serviceAccounts wildcard",
            ap("rules:\n- from:\n  - source:\n      serviceAccounts: [\"default/*\"]"),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "wildcards are not supported",
        ),
        reject(
            "serviceAccounts bad form",
            ap("rules:\n- from:\n  - source:\n      serviceAccounts: [a/b/c]"),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "not of the form",
        ),
        reject(
            "too many serviceAccounts",
            ap(&format!("rules:\n- from:\n  - source:\n      serviceAccounts: [{}]", vec!["sa"; 17].join(", "))),
            "spec.rules[0].from[0].source.serviceAccounts",
            "at most 16",
        ),
        reject(
            "trustDomains middle wildcard",
            ap("rules:\n- from:\n  - source:\n      trustDomains: [\"td*.local*\"]"),
            "spec.rules[0].from[0].source.trustDomains[0]",
            "wildcard '*' is only supported once",
        ),
        reject(
            "trustDomains slash",
            ap("rules:\n- from:\n  - source:\n      notTrustDomains: [\"a/b\"]"),
            "spec.rules[0].from[0].source.notTrustDomains[0]",
            "must not contain '/'",
        ),
        reject(
            "when empty key",
            ap("rules:\n- when:\n  - key: \"\"\n    values: [a]"),
            "spec.rules[0].when[0].key",
            "`key` must not be empty",
        ),
        reject(
            "when missing key",
            ap("rules:\n- when:\n  - values: [a]"),
            "spec.rules[0].when[0]",
            "missing field `key`",
        ),
        reject(
            "when without values",
            ap("rules:\n- when:\n  - key: source.ip"),
            "spec.rules[0].when[0]",
            "at least one of `values` or `notValues` must be set for key source.ip",
        ),
        reject(
            "when unknown key",
            ap("rules:\n- when:\n  - key: request.foo\n    values: [a]"),
            "spec.rules[0].when[0].key",
            "unknown attribute: request.foo",
        ),
        reject(
            "when destination.namespace",
            ap("rules:\n- when:\n  - key: destination.namespace\n    values: [a]"),
            "spec.rules[0].when[0].key",
            "replaced by the metadata.namespace",
        ),
        reject(
            "when destination.labels",
            ap("rules:\n- when:\n  - key: destination.labels[app]\n    values: [a]"),
            "spec.rules[0].when[0].key",
            "replaced by the workload selector",
        ),
        reject(
            "when destination.user",
            ap("rules:\n- when:\n  - key: destination.user\n    values: [a]"),
            "spec.rules[0].when[0].key",
            "only supported in v1alpha1",
        ),
        reject(
            "when header without name",
            ap("rules:\n- when:\n  - key: request.headers[]\n    values: [a]"),
            "spec.rules[0].when[0].key",
            "should have format a[b]",
        ),
        reject(
            "when claims without brackets",
            ap("rules:\n- when:\n  - key: request.auth.claims.groups\n    values: [a]"),
            "spec.rules[0].when[0].key",
            "should have format a[b]",
        ),
        reject(
            "when bad source.ip",
            ap("rules:\n- when:\n  - key: source.ip\n    values: [\"10.0.0.0/8\", \"1.2.3\"]"),
            "spec.rules[0].when[0].values[1]",
            "\"1.2.3\" is not an IP address or CIDR",
        ),
        reject(
            "when bad destination.port",
            ap("rules:\n- when:\n  - key: destination.port\n    notValues: [\"abc\"]"),
            "spec.rules[0].when[0].notValues[0]",
            "not a valid port",
        ),
        reject(
            "when empty value",
            ap("rules:\n- when:\n  - key: request.headers[x-token]\n    values: [\"\"]"),
            "spec.rules[0].when[0].values[0]",
            "empty value",
        ),
        reject(
            "when bad serviceAccount",
            ap("rules:\n- when:\n  - key: source.serviceAccount\n    values: [\"ns/*\"]"),
            "spec.rules[0].when[0].values[0]",
            "wildcards are not supported",
        ),
        reject(
            "when bad trustDomain",
            ap("rules:\n- when:\n  - key: source.trustDomain\n    values: [\"a/b\"]"),
            "spec.rules[0].when[0].values[0]",
            "must not contain '/'",
        ),
        reject(
            "dry-run not a bool",
            ap("rules: [{}]")
                .replace("  namespace: foo\n", "  namespace: foo\n  annotations:\n    istio.io/dry-run: \"yes\"\n"),
            "metadata.annotations[istio.io/dry-run]",
            "invalid value \"yes\"",
        ),
        reject(
            "dry-run with AUDIT",
            ap("action: AUDIT\nrules: [{}]")
                .replace("  namespace: foo\n", "  namespace: foo\n  annotations:\n    istio.io/dry-run: \"true\"\n"),
            "metadata.annotations[istio.io/dry-run]",
            "only supports action ALLOW or DENY, found AUDIT",
        ),
        // --- PeerAuthentication
        reject(
            "bad mTLS mode",
            pa("mtls:\n  mode: PERMIT"),
            "spec.mtls.mode",
            "unknown variant `PERMIT`, expected one of `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`",
        ),
        reject("lowercase mTLS mode", pa("mtls:\n  mode: strict"), "spec.mtls.mode", "unknown variant `strict`"),
        reject("unknown mtls field", pa("mtls:\n  mode: STRICT\n  tls: true"), "spec.mtls.tls", "unknown field `tls`"),
        reject(
            "portLevelMtls without selector",
            pa("mtls:\n  mode: STRICT\nportLevelMtls:\n  8080:\n    mode: DISABLE"),
            "spec.portLevelMtls",
            "portLevelMtls requires a workload selector",
        ),
        reject(
            "portLevelMtls with empty selector",
            pa("selector: {}\nportLevelMtls:\n  8080:\n    mode: DISABLE"),
            "spec.portLevelMtls",
            "requires a workload selector",
        ),
        reject(
            "portLevelMtls port 0",
            pa("selector:\n  matchLabels: {app: a}\nportLevelMtls:\n  0:\n    mode: DISABLE"),
            "spec.portLevelMtls[0]",
            "port must be in range 1..65535",
        ),
        reject(
            "portLevelMtls port 70000",
            pa("selector:\n  matchLabels: {app: a}\nportLevelMtls:\n  70000:\n    mode: DISABLE"),
            "spec.portLevelMtls[70000]",
            "port must be in range 1..65535",
        ),
        reject(
            "portLevelMtls non-numeric port",
            pa("selector:\n  matchLabels: {app: a}\nportLevelMtls:\n  http:\n    mode: DISABLE"),
            "spec.portLevelMtls[http]",
            "port \"http\" is not a number",
        ),
        reject(
            "portLevelMtls empty",
            pa("selector:\n  matchLabels: {app: a}\nportLevelMtls: {}"),
            "spec.portLevelMtls",
            "must have at least one element",
        ),
        reject(
            "PeerAuthentication selector wildcard",
            pa("selector:\n  matchLabels: {app: \"*\"}"),
            "spec.selector.matchLabels[app]",
            "wildcard",
        ),
        reject(
            "PeerAuthentication has no targetRefs",
            pa("targetRefs:\n- kind: Service\n  name: x"),
            "spec.targetRefs",
            "unknown field `targetRefs`",
        ),
        reject(
            "dry-run on PeerAuthentication",
            pa("mtls:\n  mode: STRICT")
                .replace("  namespace: foo\n", "  namespace: foo\n  annotations:\n    istio.io/dry-run: \"true\"\n"),
            "metadata.annotations[istio.io/dry-run]",
            "only supported on AuthorizationPolicy",
        ),
        // --- RequestAuthentication
        reject(
            "issuer missing",
            ra("jwtRules:\n- jwksUri: https://example.com/jwks.json"),
            "spec.jwtRules[0].issuer",
            "issuer must be set",
        ),
        reject(
            "jwks and jwksUri",
            ra("jwtRules:\n- issuer: a\n  jwksUri: https://example.com/jwks.json\n  jwks: '{\"keys\":[]}'"),
            "spec.jwtRules[0]",
            "only one of jwksUri or jwks can be set",
        ),
        reject(
            "jwksUri bad scheme",
            ra("jwtRules:\n- issuer: a\n  jwksUri: ftp://example.com/jwks.json"),
            "spec.jwtRules[0].jwksUri",
            "URI scheme \"ftp\" is not supported",
        ),
        reject(
            "jwksUri not a URL",
            ra("jwtRules:\n- issuer: a\n  jwksUri: example.com/jwks.json"),
            "spec.jwtRules[0].jwksUri",
            "not a valid http(s) URL",
        ),
        reject(
            "jwksUri bad port",
            ra("jwtRules:\n- issuer: a\n  jwksUri: https://example.com:99999/jwks.json"),
            "spec.jwtRules[0].jwksUri",
            "invalid port",
        ),
        reject(
            "jwks not JSON",
            ra("jwtRules:\n- issuer: a\n  jwks: not-json"),
            "spec.jwtRules[0].jwks",
            "jwks parse error",
        ),
        reject(
            "jwks key without kty",
            ra("jwtRules:\n- issuer: a\n  jwks: '{\"keys\":[{\"n\":\"x\"}]}'"),
            "spec.jwtRules[0].jwks",
            "kty",
        ),
        reject(
            "empty audience",
            ra("jwtRules:\n- issuer: a\n  audiences: [\"\"]"),
            "spec.jwtRules[0].audiences[0]",
            "empty value",
        ),
        reject(
            "fromHeaders without name",
            ra("jwtRules:\n- issuer: a\n  fromHeaders:\n  - prefix: \"Bearer \""),
            "spec.jwtRules[0].fromHeaders[0].name",
            "location header name must be set",
        ),
        reject(
            "fromHeaders bad name",
            ra("jwtRules:\n- issuer: a\n  fromHeaders:\n  - name: \"x jwt\""),
            "spec.jwtRules[0].fromHeaders[0].name",
            "not a valid HTTP header name",
        ),
        reject(
            "fromParams empty",
            ra("jwtRules:\n- issuer: a\n  fromParams: [\"\"]"),
            "spec.jwtRules[0].fromParams[0]",
            "empty value",
        ),
        reject(
            "fromCookies empty",
            ra("jwtRules:\n- issuer: a\n  fromCookies: [session, \"\"]"),
            "spec.jwtRules[0].fromCookies[1]",
            "empty value",
        ),
        reject(
            "outputPayloadToHeader bad",
            ra("jwtRules:\n- issuer: a\n  outputPayloadToHeader: \"x payload\""),
            "spec.jwtRules[0].outputPayloadToHeader",
            "not a valid HTTP header name",
        ),
        reject(
            "outputClaimToHeaders bad header",
            ra("jwtRules:\n- issuer: a\n  outputClaimToHeaders:\n  - header: \"x:group\"\n    claim: group"),
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "is not a valid header name",
        ),
        reject(
            "outputClaimToHeaders missing claim",
            ra("jwtRules:\n- issuer: a\n  outputClaimToHeaders:\n  - header: x-group"),
            "spec.jwtRules[0].outputClaimToHeaders[0].claim",
            "claim must be set",
        ),
        reject(
            "outputClaimToHeaders missing header",
            ra("jwtRules:\n- issuer: a\n  outputClaimToHeaders:\n  - claim: group"),
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "header must be set",
        ),
        reject(
            "timeout without unit",
            ra("jwtRules:\n- issuer: a\n  timeout: \"5\""),
            "spec.jwtRules[0].timeout",
            "missing unit",
        ),
        reject(
            "timeout too small",
            ra("jwtRules:\n- issuer: a\n  timeout: 100us"),
            "spec.jwtRules[0].timeout",
            "at least 1ms",
        ),
        reject(
            "timeout sub-millisecond precision",
            ra("jwtRules:\n- issuer: a\n  timeout: 1500us"),
            "spec.jwtRules[0].timeout",
            "millisecond precision",
        ),
        reject(
            "forwardOriginalToken not a bool",
            ra("jwtRules:\n- issuer: a\n  forwardOriginalToken: \"yes\""),
            "spec.jwtRules[0].forwardOriginalToken",
            "invalid type: string \"yes\", expected a boolean",
        ),
        reject(
            "snake_case jwks_uri",
            ra("jwtRules:\n- issuer: a\n  jwks_uri: https://example.com/jwks"),
            "spec.jwtRules[0].jwks_uri",
            "unknown field `jwks_uri`",
        ),
        reject(
            "empty spaceDelimitedClaims",
            ra("jwtRules:\n- issuer: a\n  spaceDelimitedClaims: [\"\"]"),
            "spec.jwtRules[0].spaceDelimitedClaims[0]",
            "empty value",
        ),
        reject(
            "RequestAuthentication selector with targetRefs",
            ra("selector:\n  matchLabels: {app: a}\ntargetRefs:\n- kind: Service\n  name: x"),
            "spec",
            "only one of",
        ),
        reject(
            "RequestAuthentication targetRef kind",
            ra("targetRef:\n  kind: Pod\n  name: x"),
            "spec.targetRef.kind",
            "unsupported target",
        ),
    ]
}

#[test]
fn rejections() {
    let mut failures = Vec::new();
    for case in rejection_cases() {
        match parse_documents(&case.text) {
            Ok(_) => failures.push(format!("{}: accepted, expected rejection", case.name)),
            Err(err) => {
                let found = err.errors.iter().any(|e| e.field == case.field && e.reason.contains(case.reason));
                if !found {
                    failures.push(format!("{}: want `{}`: ..{}.., got:\n{}", case.name, case.field, case.reason, err));
                }
                for e in &err.errors {
                    assert_eq!(e.document, 0, "{}", case.name);
                }
            }
        }
        // from_json must agree with the YAML path.
        if let Ok(v) = serde_yaml_ng::from_str::<serde_json::Value>(&case.text) {
            let json = serde_json::to_string(&v).unwrap();
            if Resource::from_json(&json).is_ok() {
                failures.push(format!("{}: from_json accepted", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn all_errors_of_a_document_are_reported() {
    let text = ap(
        "action: DENY\nrules:\n- from:\n  - source:\n      ipBlocks: [bad, \"1.2.3.4/40\"]\n  to:\n  - operation:\n      ports: [\"70000\"]\n  when:\n  - key: nope\n    values: [x]",
    );
    let err = parse_documents(&text).unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "spec.rules[0].to[0].operation.ports[0]",
            "spec.rules[0].when[0].key",
        ]
    );
    assert_eq!(err.to_string().lines().count(), 4);
    assert!(err.to_string().starts_with(
        "document 1 (AuthorizationPolicy foo/test): spec.rules[0].from[0].source.ipBlocks[0]: \"bad\" is not an IP"
    ));
}

#[test]
fn error_display_example() {
    let good = ap("rules: [{}]");
    let bad = ap("action: DENY\nrules:\n- from:\n  - source:\n      ipBlocks: [\"10.0.0.1\", \"10.0.0.300/8\"]")
        .replace("name: test", "name: deny-all");
    let text = format!("{good}---\n{}---\n{bad}", good.replace("name: test", "name: other"));
    let err = parse_documents(&text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "document 3 (AuthorizationPolicy foo/deny-all): spec.rules[0].from[0].source.ipBlocks[1]: \
         \"10.0.0.300/8\" is not an IP address or CIDR"
    );
}

// -------------------------------------------------------------------------------------------------------------------
// Acceptance (Istio documentation examples and every field)

const ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: foo
spec: {}
";

const DENY_ALL: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: foo
spec:
  action: DENY
  rules:
  - {}
";

const ALLOW_ALL: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: foo
spec:
  action: ALLOW
  rules:
  - {}
";

const HTTPBIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#;

const HTTPBIN_JWT_GROUPS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
    when:
    - key: request.auth.claims[groups]
      values: ["group1"]
"#;

const DENY_NOT_FOO: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-method-get
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["foo"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/get"]
    when:
    - key: request.headers[x-token]
      notValues: ["admin"]
"#;

const IP_BLOCKS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ingress-policy
  namespace: istio-system
spec:
  selector:
    matchLabels:
      app: istio-ingressgateway
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["1.2.3.4", "5.6.7.0/24", "2001:db8::/32", "10.1.2.3/8"]
        notIpBlocks: ["5.6.7.8"]
  - from:
    - source:
        remoteIpBlocks: ["203.0.113.4"]
        notRemoteIpBlocks: ["::1"]
"#;

const TCP_PORTS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: tcp-policy
  namespace: foo
spec:
  selector:
    matchLabels:
      app: tcp-echo
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["9000", "9001"]
        notPorts: ["0"]
"#;

const AUDIT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-headers
  namespace: foo
spec:
  action: AUDIT
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"#;

const EVERY_AUTHZ_FIELD: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: every-field
  namespace: foo
  labels:
    team: security
  annotations:
    istio.io/dry-run: "true"
    note: anything
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep", "*"]
        notPrincipals: ["*/ns/foo/sa/bar"]
        requestPrincipals: ["https://accounts.google.com/*"]
        notRequestPrincipals: ["*"]
        namespaces: ["prod*"]
        notNamespaces: ["*-test"]
        ipBlocks: ["10.0.0.0/8"]
        notIpBlocks: ["10.0.0.1"]
        remoteIpBlocks: ["192.168.0.0/16"]
        notRemoteIpBlocks: ["192.168.1.1"]
        trustDomains: ["cluster.local", "td-*", "*"]
        notTrustDomains: ["*.example"]
    - source:
        serviceAccounts: ["default/sleep", "curl"]
        notServiceAccounts: ["default/legacy"]
    to:
    - operation:
        hosts: ["example.com", "example.com:*", "*.example.com"]
        notHosts: ["admin.example.com"]
        ports: ["8080"]
        notPorts: ["15000"]
        methods: ["GET", "HEAD"]
        notMethods: ["DELETE"]
        paths: ["/api/*", "/foo/{*}/bar", "/static/{**}", "/a*b"]
        notPaths: ["*/admin", "/x/{*}/{**}"]
    when:
    - key: request.headers[User-Agent]
      values: ["Mozilla/*"]
    - key: source.ip
      values: ["10.0.0.0/8"]
      notValues: ["10.0.0.1"]
    - key: remote.ip
      values: ["203.0.113.0/24"]
    - key: source.namespace
      values: ["foo"]
    - key: source.principal
      values: ["cluster.local/ns/foo/sa/bar"]
    - key: source.serviceAccount
      values: ["foo/bar", "baz"]
    - key: source.trustDomain
      values: ["cluster.local"]
    - key: request.auth.principal
      values: ["issuer.example.com/subject"]
    - key: request.auth.audiences
      values: ["aud1"]
    - key: request.auth.presenter
      values: ["presenter.example.com"]
    - key: request.auth.claims[nested][key1]
      values: ["value1"]
    - key: request.auth.claims[foo.com/name]
      values: ["*"]
    - key: destination.ip
      values: ["2001:db8::1"]
    - key: destination.port
      values: ["443"]
      notValues: ["80"]
    - key: connection.sni
      values: ["www.example.com"]
    - key: experimental.envoy.filters.network.mysql_proxy[db.table]
      values: ["[update]"]
  - {}
"#;

const WAYPOINT_TARGET_REFS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: waypoint-policy
  namespace: foo
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  - kind: Service
    group: ""
    name: httpbin
  - kind: ServiceEntry
    group: networking.istio.io
    name: external
    namespace: foo
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/curl"]
"#;

const TARGET_REF_SINGLE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: gateway-class
  namespace: trellis-system
spec:
  targetRef:
    kind: GatewayClass
    group: gateway.networking.k8s.io
    name: istio-waypoint
  rules: [{}]
"#;

const JWT_RA: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt-example
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  jwtRules:
  - issuer: "testing@secure.istio.io"
    jwksUri: "https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json"
    fromHeaders:
    - name: x-jwt-assertion
      prefix: "Bearer "
"#;

const EVERY_RA_FIELD: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: every-field
  namespace: foo
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: ingress
  jwtRules:
  - issuer: "issuer-foo"
    audiences: ["bookstore_android.apps.example.com", "bookstore_web.apps.example.com"]
    jwksUri: "http://jwks.example.com:8080/keys"
    fromHeaders:
    - name: Authorization
      prefix: "Bearer "
    - name: x-goog-iap-jwt-assertion
    fromParams: ["my_token", "access_token"]
    fromCookies: ["session"]
    outputPayloadToHeader: x-jwt-payload
    forwardOriginalToken: true
    outputClaimToHeaders:
    - header: x-jwt-claim-group
      claim: nested.key.group
    timeout: 1m30s
    spaceDelimitedClaims: ["roles", "custom_scope"]
  - issuer: "issuer-inline"
    jwks: '{"keys":[{"kty":"RSA","e":"AQAB","n":"xyz","kid":"k1"}]}'
    timeout: 500ms
"#;

const PA_MESH_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"#;

const PA_PORT_LEVEL: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
    "9090":
      mode: PERMISSIVE
    65535: {}
"#;

const PA_NO_MODE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: unset
spec:
  mtls: {}
"#;

/// `kubectl get -o yaml` output: server-populated metadata and status must be tolerated.
const KUBECTL_GET_OUTPUT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"annotations":{},"name":"deny-all","namespace":"foo"},"spec":{"action":"DENY","rules":[{}]}}
  creationTimestamp: "2024-05-01T10:00:00Z"
  generation: 1
  managedFields:
  - apiVersion: security.istio.io/v1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2024-05-01T10:00:00Z"
  name: deny-all
  namespace: foo
  resourceVersion: "12345"
  uid: 5f7c3b8e-0000-4000-8000-000000000000
spec:
  action: DENY
  rules:
  - {}
status:
  conditions:
  - type: Reconciled
    status: "True"
"#;

const NULLS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: nulls
  namespace: foo
  labels: null
spec:
  selector: null
  rules:
  - from:
    - source:
        principals: ["a"]
        namespaces: null
    to: null
"#;

const JSON_DOC: &str = r#"{
	"apiVersion": "security.istio.io/v1",
	"kind": "PeerAuthentication",
	"metadata": {"name": "json", "namespace": "bar"},
	"spec": {"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}
}"#;

fn accepted_documents() -> Vec<(&'static str, &'static str)> {
    vec![
        ("allow-nothing", ALLOW_NOTHING),
        ("deny-all", DENY_ALL),
        ("allow-all", ALLOW_ALL),
        ("httpbin", HTTPBIN),
        ("httpbin jwt groups", HTTPBIN_JWT_GROUPS),
        ("deny not foo", DENY_NOT_FOO),
        ("ip blocks", IP_BLOCKS),
        ("tcp ports", TCP_PORTS),
        ("audit", AUDIT),
        ("every authz field", EVERY_AUTHZ_FIELD),
        ("waypoint targetRefs", WAYPOINT_TARGET_REFS),
        ("single targetRef", TARGET_REF_SINGLE),
        ("jwt request authentication", JWT_RA),
        ("every RA field", EVERY_RA_FIELD),
        ("mesh-wide STRICT", PA_MESH_STRICT),
        ("port-level mTLS", PA_PORT_LEVEL),
        ("no mode", PA_NO_MODE),
        ("kubectl get output", KUBECTL_GET_OUTPUT),
        ("nulls", NULLS),
        ("json", JSON_DOC),
    ]
}

#[test]
fn accepted_documents_parse() {
    for (name, text) in accepted_documents() {
        if let Err(e) = parse_one(text) {
            panic!("{name} rejected:\n{e}");
        }
    }
}

#[test]
fn special_policies_have_expected_shape() {
    let nothing = parse_one(ALLOW_NOTHING).unwrap();
    let p = nothing.authorization_policy().unwrap();
    assert_eq!(p.action, Action::Allow);
    assert!(p.rules.is_empty());
    assert_eq!(nothing.key(), ResourceKey::new(Kind::AuthorizationPolicy, "foo", "allow-nothing"));
    assert_eq!(nothing.key().to_string(), "AuthorizationPolicy/foo/allow-nothing");

    let deny = parse_one(DENY_ALL).unwrap();
    let p = deny.authorization_policy().unwrap();
    assert_eq!(p.action, Action::Deny);
    assert_eq!(p.rules, vec![Rule::default()]);

    let all = parse_one(ALLOW_ALL).unwrap();
    assert_eq!(all.authorization_policy().unwrap().rules.len(), 1);
}

#[test]
fn httpbin_fields_are_typed() {
    let r = parse_one(HTTPBIN).unwrap();
    assert_eq!(r.api_version, "security.istio.io/v1");
    assert_eq!(r.kind, Kind::AuthorizationPolicy);
    let p = r.authorization_policy().unwrap();
    let sel = p.selector.as_ref().unwrap();
    assert_eq!(sel.match_labels.get("version").map(String::as_str), Some("v1"));
    let rule = &p.rules[0];
    assert_eq!(rule.from.len(), 2);
    assert_eq!(rule.from[0].source.principals, ["cluster.local/ns/default/sa/sleep"]);
    assert_eq!(rule.from[1].source.namespaces, ["dev"]);
    assert_eq!(rule.to[1].operation.methods, ["POST"]);
    assert_eq!(rule.when[0].parsed_key().unwrap(), ConditionKey::RequestAuthClaims(vec!["iss".into()]));
    assert!(rule.to[0].operation.has_http_only_fields());
    assert!(!r.dry_run());
}

#[test]
fn every_field_is_kept() {
    let r = parse_one(EVERY_AUTHZ_FIELD).unwrap();
    assert!(r.dry_run());
    assert_eq!(r.metadata.labels.get("team").map(String::as_str), Some("security"));
    let p = r.authorization_policy().unwrap();
    let s = &p.rules[0].from[0].source;
    assert_eq!(s.fields().iter().filter(|(_, v)| !v.is_empty()).count(), 12);
    let s2 = &p.rules[0].from[1].source;
    assert_eq!(s2.service_accounts, ["default/sleep", "curl"]);
    assert_eq!(s2.not_service_accounts, ["default/legacy"]);
    let op = &p.rules[0].to[0].operation;
    assert!(op.fields().iter().all(|(_, v)| !v.is_empty()));
    assert_eq!(op.port_numbers(), [8080]);
    assert_eq!(op.not_port_numbers(), [15000]);
    assert_eq!(p.rules[0].when.len(), 16);
    assert!(p.rules[0].when.iter().all(|c| c.parsed_key().is_ok()));

    let ra = parse_one(EVERY_RA_FIELD).unwrap();
    let spec = ra.request_authentication().unwrap();
    let rule = &spec.jwt_rules[0];
    assert_eq!(rule.audiences.len(), 2);
    assert_eq!(rule.from_headers[0], JwtHeader { name: "Authorization".into(), prefix: "Bearer ".into() });
    assert_eq!(rule.from_headers[1].prefix, "");
    assert_eq!(rule.from_params, ["my_token", "access_token"]);
    assert_eq!(rule.from_cookies, ["session"]);
    assert_eq!(rule.output_payload_to_header, "x-jwt-payload");
    assert!(rule.forward_original_token);
    assert_eq!(rule.output_claim_to_headers[0].claim, "nested.key.group");
    assert_eq!(rule.timeout_duration(), std::time::Duration::from_secs(90));
    assert_eq!(rule.all_space_delimited_claims(), ["scope", "permission", "roles", "custom_scope"]);
    assert_eq!(spec.jwt_rules[1].timeout_duration(), std::time::Duration::from_millis(500));
    assert!(spec.jwt_rules[1].jwks.contains("RSA"));
    assert!(spec.has_target_refs());

    let jwt = parse_one(JWT_RA).unwrap();
    let rule = &jwt.request_authentication().unwrap().jwt_rules[0];
    assert_eq!(rule.issuer, "testing@secure.istio.io");
    assert_eq!(rule.timeout_duration(), JwtRule::DEFAULT_TIMEOUT);
    assert!(!rule.forward_original_token);
}

#[test]
fn peer_authentication_fields() {
    let mesh = parse_one(PA_MESH_STRICT).unwrap();
    let p = mesh.peer_authentication().unwrap();
    assert_eq!(p.mode(), MtlsMode::Strict);
    assert!(p.selector.is_none());
    assert_eq!(mesh.key().namespace, "istio-system");

    let port = parse_one(PA_PORT_LEVEL).unwrap();
    assert_eq!(port.api_version, "security.istio.io/v1beta1");
    let p = port.peer_authentication().unwrap();
    assert_eq!(p.port_mode(8080), Some(MtlsMode::Disable));
    assert_eq!(p.port_mode(9090), Some(MtlsMode::Permissive));
    assert_eq!(p.port_mode(65535), Some(MtlsMode::Unset));
    assert_eq!(p.port_mode(80), None);

    let unset = parse_one(PA_NO_MODE).unwrap();
    assert_eq!(unset.peer_authentication().unwrap().mode(), MtlsMode::Unset);
    assert_eq!(unset.metadata.namespace, DEFAULT_NAMESPACE, "namespace defaults to \"default\"");
}

#[test]
fn server_populated_fields_and_status_are_dropped() {
    let r = parse_one(KUBECTL_GET_OUTPUT).unwrap();
    assert_eq!(r.key().to_string(), "AuthorizationPolicy/foo/deny-all");
    assert_eq!(r.metadata.annotations.len(), 1);
    let json = r.to_json();
    for dropped in ["uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "status"] {
        assert!(!json.contains(&format!("\"{dropped}\"")), "{dropped} leaked into {json}");
    }
}

#[test]
fn nulls_mean_unset() {
    let r = parse_one(NULLS).unwrap();
    let p = r.authorization_policy().unwrap();
    assert!(p.selector.is_none());
    assert!(p.rules[0].to.is_empty());
    assert!(p.rules[0].from[0].source.namespaces.is_empty());
}

#[test]
fn missing_spec_is_an_empty_spec() {
    let r = parse_one("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n").unwrap();
    assert_eq!(r.spec, Spec::AuthorizationPolicy(AuthorizationPolicy::default()));
}

#[test]
fn dry_run_parses_like_go_parse_bool() {
    let with = |v: &str| {
        let mut r = parse_one(ALLOW_ALL).unwrap();
        r.metadata.annotations.insert(DRY_RUN_ANNOTATION.to_string(), v.to_string());
        r
    };
    for v in ["1", "t", "T", "true", "TRUE", "True"] {
        assert!(with(v).dry_run(), "{v}");
        assert!(with(v).validate().is_ok(), "{v}");
    }
    for v in ["0", "f", "F", "false", "FALSE", "False", "yes", "tRUE", "", " true"] {
        assert!(!with(v).dry_run(), "{v}");
    }
    assert!(with("yes").validate().is_err());
    assert!(!parse_one(ALLOW_ALL).unwrap().dry_run());
}

// -------------------------------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_json_and_yaml() {
    for (name, text) in accepted_documents() {
        let r = parse_one(text).unwrap();
        let json = r.to_json();
        let back =
            Resource::from_json(&json).unwrap_or_else(|e| panic!("{name}: from_json(to_json) failed: {e}\n{json}"));
        assert_eq!(back, r, "{name}: JSON round trip");
        assert_eq!(back.to_json(), json, "{name}: to_json is canonical");

        let pretty = r.to_json_pretty();
        assert_eq!(Resource::from_json(&pretty).unwrap(), r, "{name}: pretty JSON round trip");

        let yaml = r.to_yaml();
        let docs = parse_documents(&yaml).unwrap_or_else(|e| panic!("{name}: parse(to_yaml) failed: {e}\n{yaml}"));
        assert_eq!(docs, vec![r.clone()], "{name}: YAML round trip");

        let via_serde: Resource = serde_json::from_str(&json).unwrap();
        assert_eq!(via_serde, r, "{name}: serde Deserialize");
        assert_eq!(serde_json::to_string(&r).unwrap(), json);
        assert!(r.validate().is_ok(), "{name}: validate");
    }
}

#[test]
fn canonical_json_looks_like_what_users_write() {
    let r = parse_one(ALLOW_NOTHING).unwrap();
    assert_eq!(
        r.to_json(),
        r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"allow-nothing","namespace":"foo"},"spec":{}}"#
    );
    let r = parse_one(DENY_ALL).unwrap();
    assert_eq!(
        r.to_json(),
        r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"deny-all","namespace":"foo"},"spec":{"action":"DENY","rules":[{}]}}"#
    );
    let r = parse_one(PA_PORT_LEVEL).unwrap();
    assert_eq!(
        r.to_json(),
        r#"{"apiVersion":"security.istio.io/v1beta1","kind":"PeerAuthentication","metadata":{"name":"finance","namespace":"foo"},"spec":{"selector":{"matchLabels":{"app":"finance"}},"mtls":{"mode":"STRICT"},"portLevelMtls":{"8080":{"mode":"DISABLE"},"9090":{"mode":"PERMISSIVE"},"65535":{}}}}"#
    );
    let yaml = parse_one(TCP_PORTS).unwrap().to_yaml();
    assert!(yaml.contains("- '9000'") || yaml.contains("- \"9000\""), "ports stay strings in YAML:\n{yaml}");
}

#[test]
fn deserialize_from_yaml_directly() {
    let r: Resource = serde_yaml_ng::from_str(PA_PORT_LEVEL).unwrap();
    assert_eq!(r, parse_one(PA_PORT_LEVEL).unwrap());
    assert!(serde_yaml_ng::from_str::<Resource>(&pa("portLevelMtls: {80: {}}")).is_err());
}

#[test]
fn yaml_anchors_and_merge_keys() {
    let text = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: anchors, namespace: foo}
spec:
  rules:
  - from:
    - source: &src
        principals: [a]
    to:
    - operation:
        <<: {methods: [GET]}
        paths: [/x]
  - from:
    - source: *src
";
    let r = parse_one(text).unwrap();
    let p = r.authorization_policy().unwrap();
    assert_eq!(p.rules[1].from[0].source.principals, ["a"]);
    assert_eq!(p.rules[0].to[0].operation.methods, ["GET"]);
}

#[test]
fn audit_without_rules_is_accepted_like_istio() {
    // Istio's webhook only rejects DENY (and CUSTOM) without rules.
    assert!(parse_one(&ap("action: AUDIT")).is_ok());
    assert!(parse_one(&ap("action: ALLOW")).is_ok());
}

#[test]
fn deserialize_validates() {
    let bad = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"x"},"spec":{"action":"DENY"}}"#;
    let err = serde_json::from_str::<Resource>(bad).unwrap_err();
    assert!(err.to_string().contains("DENY action without `rules`"), "{err}");
    let err = Resource::from_json("{not json").unwrap_err();
    assert!(err.errors[0].reason.starts_with("invalid JSON"), "{err}");
    let err = Resource::from_json("[]").unwrap_err();
    assert!(err.errors[0].reason.contains("expected a Kubernetes object"), "{err}");
}

#[test]
fn validate_catches_code_built_mistakes() {
    let mut r = parse_one(ALLOW_ALL).unwrap();
    assert!(r.validate().is_ok());
    r.api_version = "v1".into();
    r.kind = Kind::PeerAuthentication;
    r.metadata.name = "Bad Name".into();
    let err = r.validate().unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["apiVersion", "spec", "metadata.name"]);
}

// -------------------------------------------------------------------------------------------------------------------
// Multi-document texts

#[test]
fn multi_document_all_good() {
    let text =
        format!("{ALLOW_NOTHING}---\n{DENY_ALL}\n---\n# just a comment\n---\n{PA_MESH_STRICT}---\n{JWT_RA}---\n");
    let docs = parse_documents(&text).unwrap();
    let keys: Vec<String> = docs.iter().map(|r| r.key().to_string()).collect();
    assert_eq!(
        keys,
        [
            "AuthorizationPolicy/foo/allow-nothing",
            "AuthorizationPolicy/foo/deny-all",
            "PeerAuthentication/istio-system/default",
            "RequestAuthentication/istio-system/jwt-example",
        ]
    );
    assert_eq!(parse_documents("").unwrap(), vec![]);
    assert_eq!(parse_documents("---\n---\n# nothing\n").unwrap(), vec![]);
}

#[test]
fn one_bad_document_among_good_ones() {
    let bad = ap("action: PERMIT\nrules: [{}]").replace("name: test", "name: bad");
    let text = format!("{ALLOW_NOTHING}---\n{bad}---\n{DENY_ALL}");
    let err = parse_documents(&text).unwrap_err();
    assert_eq!(err.errors.len(), 1, "{err}");
    let e = &err.errors[0];
    assert_eq!(e.document, 1, "the index of the second document");
    assert_eq!(e.kind.as_deref(), Some("AuthorizationPolicy"));
    assert_eq!(e.name.as_deref(), Some("bad"));
    assert_eq!(e.namespace.as_deref(), Some("foo"));
    assert_eq!(e.field, "spec.action");
    assert!(e.reason.contains("unknown variant `PERMIT`"));
    // Messages count documents from 1, as users do.
    assert!(err.to_string().starts_with("document 2 (AuthorizationPolicy foo/bad): spec.action: unknown variant"));
}

#[test]
fn two_bad_documents_are_both_reported() {
    let bad_cidr =
        ap("rules:\n- from:\n  - source:\n      ipBlocks: [\"10.0.0.300/8\"]").replace("name: test", "name: cidr");
    let bad_port = ap("rules:\n- to:\n  - operation:\n      ports: [\"70000\"]").replace("name: test", "name: port");
    let bad_api = PA_MESH_STRICT.replace("security.istio.io/v1", "security.istio.io/v2");
    let text = format!("{ALLOW_ALL}---\n{bad_cidr}---\n{HTTPBIN}---\n{bad_port}---\n{bad_api}");
    let err = parse_documents(&text).unwrap_err();
    let docs: Vec<usize> = err.errors.iter().map(|e| e.document).collect();
    assert!(docs.contains(&1) && docs.contains(&3) && docs.contains(&4), "{err}");
    assert!(!docs.contains(&0) && !docs.contains(&2), "{err}");
    assert!(err.errors.iter().any(|e| e.document == 3 && e.field == "spec.rules[0].to[0].operation.ports[0]"));
    assert!(err.errors.iter().any(|e| e.document == 4 && e.field == "apiVersion"));
}

#[test]
fn yaml_syntax_error_does_not_hide_other_documents() {
    let text = format!("{ALLOW_ALL}---\nkind: [unterminated\n---\n{}", ap("action: DENY"));
    let err = parse_documents(&text).unwrap_err();
    assert_eq!(err.errors.len(), 2, "{err}");
    assert_eq!(err.errors[0].document, 1);
    assert!(err.errors[0].reason.starts_with("invalid YAML"), "{err}");
    assert_eq!(err.errors[1].document, 2);
    assert_eq!(err.errors[1].field, "spec.rules");
}

#[test]
fn empty_documents_count_for_numbering() {
    let text = format!("---\n---\n{}", ap("action: DENY"));
    let err = parse_documents(&text).unwrap_err();
    assert_eq!(err.errors[0].document, 1);
}

#[test]
fn non_object_documents_are_rejected() {
    let err = parse_documents("- a\n- b\n---\njust a string\n").unwrap_err();
    assert_eq!(err.errors.len(), 2);
    assert!(err.errors.iter().all(|e| e.reason.contains("expected a Kubernetes object")), "{err}");
}

#[test]
fn duplicate_keys_are_an_error() {
    let text = format!("{DENY_ALL}---\n{ALLOW_ALL}---\n{}", DENY_ALL.replace("action: DENY", "action: AUDIT"));
    let err = parse_documents(&text).unwrap_err();
    assert_eq!(err.errors.len(), 1, "{err}");
    assert_eq!(err.errors[0].document, 2);
    assert_eq!(err.errors[0].field, "metadata.name");
    assert!(err.errors[0].reason.contains("duplicate resource AuthorizationPolicy/foo/deny-all"), "{err}");
    assert!(err.errors[0].reason.contains("already defined in document 1"), "{err}");

    // Same name in another namespace or of another kind is fine; the default namespace counts as "default".
    let a = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {}\n";
    let b = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: default}\n";
    let c = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: x}\n";
    assert!(parse_documents(&format!("{a}---\n{c}")).is_ok());
    assert!(parse_documents(&format!("{a}---\n{b}")).is_err());
}

#[test]
fn kubernetes_list_is_expanded() {
    let text = r#"
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: a, namespace: foo}
  spec: {}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: b, namespace: foo}
  spec: {mtls: {mode: STRICT}}
"#;
    let docs = parse_documents(text).unwrap();
    assert_eq!(docs.len(), 2);
    let bad = text.replace("mode: STRICT", "mode: NOPE");
    let err = parse_documents(&bad).unwrap_err();
    assert_eq!(err.errors[0].document, 0);
    assert_eq!(err.errors[0].field, "items[1].spec.mtls.mode");
    assert_eq!(parse_keys(text).unwrap().len(), 2);
}

#[test]
fn parse_keys_reads_identity_only() {
    // The spec is not validated (and may be garbage) for deletes.
    let text = format!(
        "{}---\n{}---\n{}",
        ap("action: PERMIT\nbogus: 1"),
        PA_MESH_STRICT,
        "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata:\n  name: r\n"
    );
    let keys = parse_keys(&text).unwrap();
    assert_eq!(
        keys,
        [
            ResourceKey::new(Kind::AuthorizationPolicy, "foo", "test"),
            ResourceKey::new(Kind::PeerAuthentication, "istio-system", "default"),
            ResourceKey::new(Kind::RequestAuthentication, "default", "r"),
        ]
    );
    // Listing the same key twice deletes it once.
    assert_eq!(parse_keys(&format!("{PA_MESH_STRICT}---\n{PA_MESH_STRICT}")).unwrap().len(), 1);

    let bad = format!(
        "{PA_MESH_STRICT}---\n{}---\n{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{}}\n",
        PA_MESH_STRICT.replace("security.istio.io/v1", "networking.istio.io/v1"),
        doc("Gateway", "{}"),
    );
    let err = parse_keys(&bad).unwrap_err();
    let summary: Vec<(usize, &str)> = err.errors.iter().map(|e| (e.document, e.field.as_str())).collect();
    assert_eq!(summary, [(1, "apiVersion"), (2, "kind"), (3, "metadata.name")], "{err}");
}
