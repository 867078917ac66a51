//! HTTP request-target normalization (`policy/src/path.rs`), checked against its own promises: the result is
//! absolute, holds no `.` or `..` segment, and normalizing it again changes nothing (what is authorized is what is
//! forwarded, so a second pass upstream must not find another path).
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_policy::{normalize_path, normalize_target};

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    let Ok(normalized) = normalize_target(target) else { return };
    let path = normalized.split('?').next().unwrap_or_default();
    assert!(path.starts_with('/'), "{target:?} → {normalized:?}");
    assert!(!path.split('/').any(|s| s == "." || s == ".."), "{target:?} → {normalized:?}");
    let again = normalize_path(path).expect("a normalized path is valid");
    assert_eq!(again, path, "normalization is not idempotent for {target:?}");
});
