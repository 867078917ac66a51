//! DNS names as Kubernetes checks them (`k8s.io/apimachinery/pkg/util/validation`): RFC 1123 labels (namespaces;
//! in Trellis also node and workload names) and subdomains (object names). [`check_dns1123_label`] is the one label
//! check of the workspace: policy validation, the control plane and the proxy's configuration all call it.

/// The longest RFC 1123 label.
pub const DNS1123_LABEL_MAX_LEN: usize = 63;

/// Why a string is not an RFC 1123 label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDnsLabel {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most 63 characters, found {0}")]
    TooLong(usize),
    #[error("must be lowercase letters, digits and '-', starting and ending with a letter or digit")]
    Characters,
}

/// Kubernetes' DNS-1123 label: 1 to 63 characters of `a-z`, `0-9` and `-`, starting and ending with a letter or
/// digit (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`).
pub fn check_dns1123_label(s: &str) -> Result<(), InvalidDnsLabel> {
    let b = s.as_bytes();
    let (Some(first), Some(last)) = (b.first(), b.last()) else { return Err(InvalidDnsLabel::Empty) };
    if b.len() > DNS1123_LABEL_MAX_LEN {
        return Err(InvalidDnsLabel::TooLong(b.len()));
    }
    let allowed = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    if !b.iter().all(allowed) || *first == b'-' || *last == b'-' {
        return Err(InvalidDnsLabel::Characters);
    }
    Ok(())
}

/// RFC 1123 subdomain: what Kubernetes requires of most object names. Each dot-separated part is a label (a part
/// longer than 63 characters is refused, as it was before this check moved here).
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|label| check_dns1123_label(label).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "0", "a0", "0a", "istio-system", "a--b", "123", &"a".repeat(63)] {
            assert_eq!(check_dns1123_label(ok), Ok(()), "{ok}");
        }
        let refused = [
            ("", InvalidDnsLabel::Empty),
            (&*"a".repeat(64), InvalidDnsLabel::TooLong(64)),
            ("-a", InvalidDnsLabel::Characters),
            ("a-", InvalidDnsLabel::Characters),
            ("-", InvalidDnsLabel::Characters),
            ("Abc", InvalidDnsLabel::Characters),
            ("aBc", InvalidDnsLabel::Characters),
            ("a.b", InvalidDnsLabel::Characters),
            ("a_b", InvalidDnsLabel::Characters),
            ("a b", InvalidDnsLabel::Characters),
            ("é", InvalidDnsLabel::Characters),
        ];
        for (bad, why) in refused {
            assert_eq!(check_dns1123_label(bad), Err(why), "{bad}");
        }
        assert_eq!(InvalidDnsLabel::Empty.to_string(), "must not be empty");
        assert_eq!(InvalidDnsLabel::TooLong(64).to_string(), "must be at most 63 characters, found 64");
    }

    #[test]
    fn subdomains() {
        for ok in ["a", "deny-all", "a.b-c.d", "x1", &"a".repeat(63), &["a".repeat(63), "b".repeat(63)].join(".")] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in
            ["", "A", "-a", "a-", "a..b", ".a", "a.", "a_b", "a b", &"a".repeat(64), &format!("{}ab", "a.".repeat(126))]
        {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }
}
