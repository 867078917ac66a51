//! Istio's default `BASE` path normalization (reference §2.11, Envoy `normalize_path`): the path a request is
//! authorized with is the path forwarded upstream, so `/public/../private` can never pass as `/public/...`.
//!
//! Steps, in order: reject `%00`; decode percent-encoded unreserved characters once (`%2e` → `.`, `%41` → `A`, …;
//! other escapes such as `%2F` stay as they are); `\` → `/`; remove `.` and `..` segments (RFC 3986 §5.2.4, never
//! above the root). The query is left untouched.

use std::borrow::Cow;

/// Why a request target is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error("path contains a control character or space")]
    InvalidCharacter,
    #[error("path does not start with '/'")]
    NotAbsolute,
}

/// Normalizes `path` (without the query). Borrows when nothing changes, the common case.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    if bytes.iter().any(|b| b.is_ascii_control() || *b == b' ') {
        return Err(PathError::InvalidCharacter);
    }
    let mut needs_work = bytes.contains(&b'\\');
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(decoded) = hex_pair(bytes, i + 1)
        {
            if decoded == 0 {
                return Err(PathError::EncodedNul);
            }
            needs_work |= is_unreserved(decoded);
        }
        i += 1;
    }
    needs_work |= path.split('/').any(|s| s == "." || s == "..");
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }

    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match hex_pair(bytes, i + 1).filter(|b| is_unreserved(*b) && !completes_escape(&decoded, *b)) {
                Some(b) => {
                    decoded.push(b as char);
                    i += 3;
                    continue;
                }
                None => decoded.push('%'),
            },
            b'\\' => decoded.push('/'),
            _ => {
                // Copy the whole UTF-8 character starting here.
                let len = utf8_len(bytes[i]);
                decoded.push_str(&path[i..i + len]);
                i += len;
                continue;
            }
        }
        i += 1;
    }
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Splits a request target into (path, query-with-`?`) and normalizes the path.
pub fn normalize_target(target: &str) -> Result<String, PathError> {
    let (path, query) = match target.find('?') {
        Some(i) => target.split_at(i),
        None => (target, ""),
    };
    let path = normalize_path(path)?;
    Ok(format!("{path}{query}"))
}

fn hex_pair(bytes: &[u8], at: usize) -> Option<u8> {
    let hi = (*bytes.get(at)? as char).to_digit(16)?;
    let lo = (*bytes.get(at + 1)? as char).to_digit(16)?;
    Some((hi * 16 + lo) as u8)
}

/// Whether appending the decoded `b` to `out` would complete a new percent-escape (`%%32E` → `%2E`): such an
/// escape stays encoded, so that normalizing the result again changes nothing and an upstream that decodes once
/// more cannot find a dot segment the authorized path did not have (found by `fuzz/fuzz_targets/path_normalize.rs`).
fn completes_escape(out: &str, b: u8) -> bool {
    let out = out.as_bytes();
    b.is_ascii_hexdigit()
        && (out.ends_with(b"%")
            || (out.len() >= 2 && out[out.len() - 2] == b'%' && out[out.len() - 1].is_ascii_hexdigit()))
}

/// RFC 3986 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn utf8_len(first: u8) -> usize {
    match first {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// RFC 3986 §5.2.4 on an absolute path: `.` segments vanish, `..` removes the previous segment (never the root).
/// A trailing `.` or `..` leaves a trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_normalization_table() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/public/../private", "/private"),
            ("/public/%2E%2E/private", "/private"),
            ("/public/%2e/%2e%2e/private", "/private"),
            ("/public/./x", "/public/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a\\..\\b", "/b"),
            ("/a\\b", "/a/b"),
            ("/%41%62%63%7e%5f%2d%30", "/Abc~_-0"),
            // Reserved characters stay encoded (BASE does not decode %2F or %5C), escapes keep their case.
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2f..%2fb", "/a%2f..%2fb"),
            ("/a%5C..%5Cb", "/a%5C..%5Cb"),
            ("/a%20b", "/a%20b"),
            // Decoded once only: %252e is "%2e" literally, not ".".
            ("/a/%252e%252e/b", "/a/%252e%252e/b"),
            ("/a/%2e%252e/b", "/a/.%252e/b"),
            // Not a dot segment.
            ("/a/.../b", "/a/.../b"),
            ("/a/..b/c", "/a/..b/c"),
            // Bad escapes are left alone.
            ("/a%zz", "/a%zz"),
            ("/a%", "/a%"),
            ("/a%4", "/a%4"),
            ("/é/../x", "/x"),
            // A decoded character never completes a new escape (else `%2E%2E` would reach an upstream that
            // decodes once more as `..`): fuzzing found the first.
            ("/%%32E\\be%2E1bd", "/%%32E/be.1bd"),
            ("/public/%%32E%%32E/admin", "/public/%%32E%%32E/admin"),
            ("/public/%2%45%2%45/admin", "/public/%2%45%2%45/admin"),
            ("/a/%%34%31", "/a/%%341"),
            ("//a//b", "//a//b"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for input in
            ["/%%32E\\be%2E1bd", "/public/%%32E%%32E/admin", "/p/%2%45%2E/x", "/%41%%34%31%2e%2e/b", "/a/%252e/.."]
        {
            let once = normalize_path(input).unwrap().into_owned();
            assert_eq!(normalize_path(&once).as_deref(), Ok(once.as_str()), "{input} → {once}");
        }
    }

    #[test]
    fn rejected_paths() {
        assert_eq!(normalize_path("/a%00b"), Err(PathError::EncodedNul));
        assert_eq!(normalize_path("/a/%00/../b"), Err(PathError::EncodedNul));
        assert_eq!(normalize_path("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("/a b"), Err(PathError::InvalidCharacter));
        assert_eq!(normalize_path("/a\tb"), Err(PathError::InvalidCharacter));
    }

    #[test]
    fn unchanged_paths_are_borrowed() {
        assert!(matches!(normalize_path("/api/v1/items"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/a%2Fb"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn query_is_kept_and_not_normalized() {
        assert_eq!(normalize_target("/a/../b?x=/../y&%2e").as_deref(), Ok("/b?x=/../y&%2e"));
        assert_eq!(normalize_target("/a?").as_deref(), Ok("/a?"));
        assert_eq!(normalize_target("/a%00?x"), Err(PathError::EncodedNul));
    }
}
