//! Compiled value matchers. Every policy value is parsed once, at compile time, into a form that matches with
//! plain byte comparisons: no regex, no allocation, no parsing on the request path.

use serde_json::Value;

use super::request::Headers;
use crate::matcher::StringMatch;

/// One attribute of a `from`/`to` element or a `when` condition: `values` (any must match) and `notValues` (none
/// may match). An absent attribute fails the positive list and satisfies the negative one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field<M> {
    pub(crate) values: Vec<M>,
    pub(crate) not_values: Vec<M>,
}

impl<M> Field<M> {
    /// `hit(m)` says whether the request's attribute matches value `m` (false when the attribute is absent).
    #[inline]
    pub(crate) fn matches(&self, mut hit: impl FnMut(&M) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&mut hit)) && !self.not_values.iter().any(hit)
    }
}

/// `<ns>/<sa>` or `<sa>` (policy namespace); exact match on the peer's namespace and service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceAccountMatch {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

/// A `requestPrincipals` / `request.auth.principal` value: istiod splits it at the LAST `/` into matchers for
/// the JWT `iss` and `sub` claims (an issuer may be a URL), so wildcards apply to one half only. A value without
/// wildcards is compared with the whole `iss/sub` string, as Istio's `request.auth.principal` is: so the principal
/// of a JWT-SVID, whose `sub` is a SPIFFE ID with slashes of its own (`spiffe://td/spiffe://td/ns/a/sa/b`), matches
/// too, where the split at the last `/` would cut its `sub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JwtPrincipalMatch {
    pub(crate) iss: StringMatch,
    pub(crate) sub: StringMatch,
    /// Without wildcards: the whole `iss/sub`.
    pub(crate) whole: Option<String>,
}

impl JwtPrincipalMatch {
    /// Istio `requestPrincipalGenerator`: "any" is `.+` (present and non-empty), i.e. [`StringMatch::Presence`].
    pub(crate) fn parse(value: &str) -> JwtPrincipalMatch {
        let any = || StringMatch::Presence;
        let (iss, sub, found) = match value.rfind('/') {
            Some(i) => (&value[..i], &value[i + 1..], true),
            None => (value, "", false),
        };
        let mut whole = None;
        let (iss, sub) = if value == "*" {
            (any(), any())
        } else if let Some(rest) = value.strip_prefix('*') {
            if found {
                let iss = if iss == "*" { any() } else { StringMatch::Suffix(iss[1..].to_string()) };
                (iss, StringMatch::Exact(sub.to_string()))
            } else {
                (any(), StringMatch::Suffix(rest.to_string()))
            }
        } else if let Some(rest) = value.strip_suffix('*') {
            if found {
                let sub = if sub == "*" { any() } else { StringMatch::Prefix(sub[..sub.len() - 1].to_string()) };
                (StringMatch::Exact(iss.to_string()), sub)
            } else {
                (StringMatch::Prefix(rest.to_string()), any())
            }
        } else {
            // Without any `/` this is `iss == value && sub == ""`: it effectively never matches a real token.
            whole = found.then(|| value.to_string());
            (StringMatch::Exact(iss.to_string()), StringMatch::Exact(sub.to_string()))
        };
        JwtPrincipalMatch { iss, sub, whole }
    }

    pub(crate) fn matches(&self, iss: Option<&str>, sub: Option<&str>) -> bool {
        if let (Some(whole), Some(iss), Some(sub)) = (&self.whole, iss, sub) {
            return whole.len() == iss.len() + 1 + sub.len()
                && whole.starts_with(iss)
                && whole[iss.len()..].starts_with('/')
                && whole.ends_with(sub);
        }
        iss.is_some_and(|i| self.iss.matches(i)) && sub.is_some_and(|s| self.sub.matches(s))
    }
}

/// `hosts` compare case-insensitively with the whole `:authority` (port included); `*` means "header present".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostMatch {
    Present,
    /// Pattern lower-cased at compile time.
    Pattern(StringMatch),
}

impl HostMatch {
    pub(crate) fn parse(value: &str) -> HostMatch {
        match StringMatch::parse(&value.to_ascii_lowercase()) {
            StringMatch::Presence => HostMatch::Present,
            m => HostMatch::Pattern(m),
        }
    }

    pub(crate) fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (_, None) => false,
            (HostMatch::Present, Some(_)) => true,
            (HostMatch::Pattern(m), Some(h)) => m.matches_ignore_ascii_case(h),
        }
    }
}

/// `request.headers[...]` values: `*` is Envoy's `present_match` (present, even if empty); anything else is a
/// string match on the value (repeated headers joined with `,`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderMatch {
    Present,
    Value(StringMatch),
}

impl HeaderMatch {
    pub(crate) fn parse(value: &str) -> HeaderMatch {
        match StringMatch::parse(value) {
            StringMatch::Presence => HeaderMatch::Present,
            m => HeaderMatch::Value(m),
        }
    }

    /// Matches one header value (for headers the proxy derives itself, like `:method`).
    pub(crate) fn matches_single(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (HeaderMatch::Present, Some(_)) => true,
            (HeaderMatch::Value(m), Some(v)) => m.matches(v),
        }
    }

    /// Matches the header `name` (lower case) of `headers`. Several values are compared as their `,`-joined
    /// form, which is walked in place instead of being built.
    pub(crate) fn matches_headers(&self, headers: &dyn Headers, name: &str) -> bool {
        let (mut count, mut total, mut first) = (0usize, 0usize, "");
        headers.for_each_value(name, &mut |v| {
            if count == 0 {
                first = v;
            } else {
                total += 1; // the `,` separator
            }
            total += v.len();
            count += 1;
        });
        match (self, count) {
            (_, 0) => false,
            (HeaderMatch::Present, _) => true,
            (HeaderMatch::Value(m), 1) => m.matches(first),
            (HeaderMatch::Value(m), _) => match m {
                StringMatch::Presence => total > 0,
                StringMatch::Exact(v) => total == v.len() && joined_eq_at(headers, name, 0, v.as_bytes()),
                StringMatch::Prefix(v) => total >= v.len() && joined_eq_at(headers, name, 0, v.as_bytes()),
                StringMatch::Suffix(v) => {
                    total >= v.len() && joined_eq_at(headers, name, total - v.len(), v.as_bytes())
                }
            },
        }
    }
}

/// Whether the `,`-joined values of header `name` hold `expected` at byte offset `start`.
fn joined_eq_at(headers: &dyn Headers, name: &str, start: usize, expected: &[u8]) -> bool {
    let end = start + expected.len();
    let (mut pos, mut first, mut equal) = (0usize, true, true);
    let compare = |chunk: &[u8], pos: usize, equal: &mut bool| {
        // Overlap of [pos, pos + chunk.len()) with [start, end).
        let lo = pos.max(start);
        let hi = (pos + chunk.len()).min(end);
        if lo < hi && chunk[lo - pos..hi - pos] != expected[lo - start..hi - start] {
            *equal = false;
        }
    };
    headers.for_each_value(name, &mut |v| {
        if !first {
            compare(b",", pos, &mut equal);
            pos += 1;
        }
        first = false;
        compare(v.as_bytes(), pos, &mut equal);
        pos += v.len();
    });
    equal
}

/// `paths` values: a string match, or an Envoy URI template when the value contains `{*}` or `{**}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathMatch {
    String(StringMatch),
    Template(PathTemplate),
}

impl PathMatch {
    pub(crate) fn parse(value: &str) -> PathMatch {
        if value.contains("{*}") || value.contains("{**}") {
            PathMatch::Template(PathTemplate::parse(value))
        } else {
            PathMatch::String(StringMatch::parse(value))
        }
    }

    /// `path` is the URL path without query or fragment.
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::String(m) => m.matches(path),
            PathMatch::Template(t) => t.matches(path),
        }
    }
}

/// An Envoy URI template as Envoy compiles it (`uri_template_internal.cc`), matched without a regex: `{*}` is
/// `[pchar]+` (one non-empty segment), `{**}` is `[pchar/]*` (anything, may be empty) and is the last operator,
/// so everything after it is a literal tail. The whole path must match (RE2 `FullMatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathTemplate {
    head: Vec<TemplateToken>,
    /// `Some(literal)` when the template has `{**}`: the literal that must end the path after it.
    any_then: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateToken {
    Literal(String),
    OneSegment,
}

impl PathTemplate {
    /// Expects a template that passed validation (leading `/`, operators as whole segments, `{**}` last).
    pub(crate) fn parse(template: &str) -> PathTemplate {
        let mut head = Vec::new();
        let mut literal = String::from("/");
        let mut any_then: Option<String> = None;
        for (i, segment) in template.strip_prefix('/').unwrap_or(template).split('/').enumerate() {
            let target = any_then.as_mut().unwrap_or(&mut literal);
            if i > 0 {
                target.push('/');
            }
            match segment {
                "{*}" => {
                    head.push(TemplateToken::Literal(std::mem::take(&mut literal)));
                    head.push(TemplateToken::OneSegment);
                }
                "{**}" => {
                    head.push(TemplateToken::Literal(std::mem::take(&mut literal)));
                    any_then = Some(String::new());
                }
                s => target.push_str(s),
            }
        }
        if any_then.is_none() {
            head.push(TemplateToken::Literal(literal));
        }
        head.retain(|t| !matches!(t, TemplateToken::Literal(l) if l.is_empty()));
        PathTemplate { head, any_then }
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        let mut rest = path;
        for token in &self.head {
            match token {
                TemplateToken::Literal(l) => match rest.strip_prefix(l.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                },
                TemplateToken::OneSegment => {
                    let end = rest.find('/').unwrap_or(rest.len());
                    if end == 0 || !rest.as_bytes()[..end].iter().all(|b| is_pchar(*b)) {
                        return false;
                    }
                    rest = &rest[end..];
                }
            }
        }
        match &self.any_then {
            None => rest.is_empty(),
            Some(tail) => {
                rest.ends_with(tail.as_str())
                    && rest.as_bytes()[..rest.len() - tail.len()].iter().all(|b| *b == b'/' || is_pchar(*b))
            }
        }
    }
}

/// Envoy's `kLiteral` class: RFC 3986 pchar without `*` and `=` (a segment containing them never matches `{*}`).
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@".contains(&b)
}

/// Looks up a (possibly nested) claim: `claims[a][b]` is `payload["a"]["b"]`.
pub(crate) fn claim<'v>(payload: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(payload, |v, key| v.as_object()?.get(key.as_str()))
}

/// A claim matches if it is a string that matches, or a list with a string element that matches (Envoy's
/// list `oneOf` OR direct string). A space-delimited claim (`scope`, `permission`, RequestAuthentication
/// `spaceDelimitedClaims`) is a string that Envoy splits on whitespace into a list first. Numbers, booleans and
/// objects never match a string value (Envoy's string matcher does not convert them).
pub(crate) fn claim_matches(value: &Value, m: &StringMatch, space_delimited: bool) -> bool {
    match value {
        Value::String(s) if space_delimited => s.split_ascii_whitespace().any(|part| m.matches(part)),
        Value::String(s) => m.matches(s),
        Value::Array(items) => items.iter().any(|item| item.as_str().is_some_and(|s| m.matches(s))),
        _ => false,
    }
}

/// `experimental.envoy.filters.*` values: `[v]` is "list contains v", anything else a string match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FilterValueMatch {
    String(StringMatch),
    ListContains(StringMatch),
}

impl FilterValueMatch {
    pub(crate) fn parse(value: &str) -> FilterValueMatch {
        match value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
            Some(inner) => FilterValueMatch::ListContains(StringMatch::parse(inner)),
            None => FilterValueMatch::String(StringMatch::parse(value)),
        }
    }

    pub(crate) fn matches(&self, value: &Value) -> bool {
        match (self, value) {
            (FilterValueMatch::String(m), Value::String(s)) => m.matches(s),
            (FilterValueMatch::ListContains(m), Value::Array(items)) => {
                items.iter().any(|item| item.as_str().is_some_and(|s| m.matches(s)))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exact_principal_is_the_whole_iss_slash_sub() {
        let p = JwtPrincipalMatch::parse("spiffe://td/spiffe://td/ns/a/sa/b");
        assert!(p.matches(Some("spiffe://td"), Some("spiffe://td/ns/a/sa/b")), "a JWT-SVID's principal");
        assert!(!p.matches(Some("spiffe://td"), Some("spiffe://td/ns/a/sa/c")));
        assert!(!p.matches(Some("spiffe://td"), None));
        let plain = JwtPrincipalMatch::parse("https://example.com/alice");
        assert!(plain.matches(Some("https://example.com"), Some("alice")));
        assert!(!plain.matches(Some("https://example.com"), Some("bob")));
    }

    #[test]
    fn jwt_principal_split_follows_istiod() {
        let m = |v: &str| {
            let p = JwtPrincipalMatch::parse(v);
            (p.iss, p.sub)
        };
        use StringMatch::*;
        let s = |v: &str| v.to_string();
        assert_eq!(m("*"), (Presence, Presence));
        assert_eq!(m("https://example.com/alice"), (Exact(s("https://example.com")), Exact(s("alice"))));
        assert_eq!(m("*example.com/alice"), (Suffix(s("example.com")), Exact(s("alice"))));
        assert_eq!(m("*/alice"), (Presence, Exact(s("alice"))));
        assert_eq!(m("*alice"), (Presence, Suffix(s("alice"))));
        assert_eq!(m("https://example.com/*"), (Exact(s("https://example.com")), Presence));
        assert_eq!(m("https://example.com/al*"), (Exact(s("https://example.com")), Prefix(s("al"))));
        assert_eq!(m("https://*"), (Exact(s("https:/")), Presence));
        assert_eq!(m("issuer*"), (Prefix(s("issuer")), Presence));
        assert_eq!(m("alice"), (Exact(s("alice")), Exact(s(""))));
    }

    #[test]
    fn path_templates_match_like_envoy() {
        let cases: &[(&str, &str, bool)] = &[
            ("/foo/{*}", "/foo/bar", true),
            ("/foo/{*}", "/foo/bar/baz", false),
            ("/foo/{*}", "/foo/", false),
            ("/foo/{*}", "/foo", false),
            ("/foo/{*}", "/foo/a=b", false),
            ("/foo/{*}", "/foo/a%20b", true),
            ("/foo/{**}/", "/foo/bar/", true),
            ("/foo/{**}/", "/foo//", true),
            ("/foo/{**}/", "/foo/bar", false),
            ("/foo/{**}/", "/foo/bar/baz/", true),
            // Istio's API docs list this as a match, but Envoy's FullMatch of `/foo/[pchar/]*/` does not.
            ("/foo/{**}/", "/foo/bar/baz.txt", false),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar", false),
            ("/foo/{**}", "/foo/", true),
            ("/foo/{**}", "/foo/a/b/c", true),
            ("/foo/{**}", "/foo", false),
            ("/{*}/{*}", "/a/b", true),
            ("/{*}/{*}", "/a/b/", false),
            ("/foo/{**}/bar", "/foo/x/y/bar", true),
            ("/foo/{**}/bar", "/foo//bar", true),
            ("/foo/{**}/bar", "/foo/bar", false),
            ("/{**}", "/", true),
            ("/{**}", "/anything/at/all", true),
        ];
        for (template, path, want) in cases {
            assert_eq!(PathMatch::parse(template).matches(path), *want, "{template} vs {path}");
        }
    }

    #[test]
    fn joined_headers() {
        let h = [("x-a", "ab"), ("X-A", "cd"), ("other", "zz")];
        let m = |v: &str| HeaderMatch::parse(v).matches_headers(&h, "x-a");
        assert!(m("ab,cd"));
        assert!(!m("ab"));
        assert!(m("ab,*"));
        assert!(m("ab,c*"));
        assert!(m("*b,cd"));
        assert!(m("*,cd"));
        assert!(m("*d"));
        assert!(!m("*c"));
        assert!(m("*"));
        assert!(!m("ab,cde"));
        assert!(!HeaderMatch::parse("*").matches_headers(&h, "missing"));
        let empty = [("x-e", "")];
        assert!(HeaderMatch::parse("*").matches_headers(&empty, "x-e"), "present even when empty");
        assert!(!HeaderMatch::parse("a*").matches_headers(&empty, "x-e"));
    }

    #[test]
    fn claims() {
        let payload = serde_json::json!({"groups": ["a", "b"], "nested": {"key1": "v"}, "scope": "read write", "n": 1});
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let exact = |v: &str| StringMatch::Exact(v.to_string());
        assert!(claim_matches(claim(&payload, &path(&["groups"])).unwrap(), &exact("b"), false));
        assert!(claim_matches(claim(&payload, &path(&["nested", "key1"])).unwrap(), &exact("v"), false));
        assert!(claim(&payload, &path(&["nested", "missing"])).is_none());
        assert!(claim(&payload, &path(&["groups", "a"])).is_none());
        let scope = claim(&payload, &path(&["scope"])).unwrap();
        assert!(claim_matches(scope, &exact("write"), true));
        assert!(!claim_matches(scope, &exact("write"), false));
        assert!(!claim_matches(scope, &exact("read write"), true));
        assert!(!claim_matches(claim(&payload, &path(&["n"])).unwrap(), &exact("1"), false));
    }
}
