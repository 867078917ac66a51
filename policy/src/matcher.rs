//! Istio's string-value match semantics, shared by validation and (later) evaluation so both agree on what a
//! value like `*.example.com` means.

/// How a policy string value matches: Istio recognises `*` only as the whole value, a leading or a trailing
/// character; anywhere else it is a literal character.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// `abc` matches exactly `abc`.
    Exact(String),
    /// `abc*` matches values starting with `abc` (including `abc`).
    Prefix(String),
    /// `*abc` matches values ending with `abc` (including `abc`).
    Suffix(String),
    /// `*` matches any non-empty value.
    Presence,
}

impl StringMatch {
    /// Same precedence as Istio (`*`, then leading `*`, then trailing `*`), so `*abc*` is a suffix match on `abc*`.
    pub fn parse(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(rest) = value.strip_prefix('*') {
            StringMatch::Suffix(rest.to_string())
        } else if let Some(rest) = value.strip_suffix('*') {
            StringMatch::Prefix(rest.to_string())
        } else {
            StringMatch::Exact(value.to_string())
        }
    }

    pub fn matches(&self, actual: &str) -> bool {
        match self {
            StringMatch::Exact(v) => actual == v,
            StringMatch::Prefix(v) => actual.starts_with(v.as_str()),
            StringMatch::Suffix(v) => actual.ends_with(v.as_str()),
            StringMatch::Presence => !actual.is_empty(),
        }
    }

    /// For `hosts`, which Istio matches case-insensitively.
    pub fn matches_ignore_ascii_case(&self, actual: &str) -> bool {
        let a = actual.as_bytes();
        match self {
            StringMatch::Exact(v) => actual.eq_ignore_ascii_case(v),
            StringMatch::Prefix(v) => a.len() >= v.len() && a[..v.len()].eq_ignore_ascii_case(v.as_bytes()),
            StringMatch::Suffix(v) => a.len() >= v.len() && a[a.len() - v.len()..].eq_ignore_ascii_case(v.as_bytes()),
            StringMatch::Presence => !actual.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("abc*", "abc", true),
            ("abc*", "abcd", true),
            ("abc*", "xabc", false),
            ("*abc", "abc", true),
            ("*abc", "xabc", true),
            ("*abc", "abcx", false),
            ("*", "x", true),
            ("*", "", false),
            ("a*c", "a*c", true),
            ("a*c", "abc", false),
            ("*abc*", "xabc*", true),
            ("*abc*", "xabcd", false),
        ];
        for (pattern, actual, want) in cases {
            assert_eq!(StringMatch::parse(pattern).matches(actual), *want, "{pattern} vs {actual}");
        }
    }

    #[test]
    fn case_insensitive() {
        assert!(StringMatch::parse("*.Example.com").matches_ignore_ascii_case("www.example.COM"));
        assert!(StringMatch::parse("Example.com*").matches_ignore_ascii_case("example.com:8080"));
        assert!(StringMatch::parse("example.com").matches_ignore_ascii_case("EXAMPLE.com"));
        assert!(!StringMatch::parse("example.com").matches_ignore_ascii_case("example.com:80"));
        assert!(!StringMatch::parse("*.example.com").matches_ignore_ascii_case("com"));
    }
}
