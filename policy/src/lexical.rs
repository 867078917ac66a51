//! How Istio (in Go) reads scalar values out of text: ports, durations, booleans. Leaf module: the runtime types
//! (`authz`, `request_authn`, `resource`) read their values with these, and validation reports what they refuse.

use std::time::Duration;

/// Parses an Istio port value: decimal digits only (Go `ParseUint`), 0..65535.
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().and_then(|p| u16::try_from(p).ok())
}

/// Go `strconv.ParseBool`, which is how Istio reads `istio.io/dry-run`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A value [`parse_go_duration`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {problem}")]
pub struct InvalidDuration {
    pub input: String,
    pub problem: &'static str,
}

/// Go `time.ParseDuration` syntax (what Kubernetes' CRD `duration()` accepts), e.g. `5s`, `1.5m`, `1h30m`, `300ms`.
pub fn parse_go_duration(input: &str) -> Result<Duration, InvalidDuration> {
    let bad = |problem: &'static str| InvalidDuration { input: input.to_owned(), problem };
    let (negative, mut s) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        s = rest;
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            (frac_part, s) = rest.split_at(frac_len);
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad("expected a number"));
        }
        let unit_len = s.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(s.len());
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(bad("missing unit (use ns, us, ms, s, m or h)")),
            _ => return Err(bad("unknown unit (use ns, us, ms, s, m or h)")),
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            match int_part.parse() {
                Ok(v) => v,
                Err(_) => return Err(bad("out of range")),
            }
        };
        let mut part = int.checked_mul(unit_ns).ok_or_else(|| bad("out of range"))?;
        if !frac_part.is_empty() {
            // Nanosecond resolution needs at most 18 fractional digits for the largest unit.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| bad("expected a number"))?;
            part = part.saturating_add(frac * unit_ns / 10u128.pow(digits.len() as u32));
        }
        total = total.checked_add(part).ok_or_else(|| bad("out of range"))?;
    }
    if total > u128::from(u64::MAX) {
        return Err(bad("out of range"));
    }
    if negative && total != 0 {
        return Err(bad("must not be negative"));
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        for ok in ["0", "80", "8080", "65535", "0080"] {
            assert!(parse_port(ok).is_some(), "{ok}");
        }
        for bad in ["", "65536", "70000", "abc", "-1", "+80", " 80", "80 ", "8o", "99999999999", "1.5"] {
            assert!(parse_port(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("1.5s", Duration::from_millis(1500)),
            ("300ms", Duration::from_millis(300)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("2us", Duration::from_micros(2)),
            ("2µs", Duration::from_micros(2)),
            ("10ns", Duration::from_nanos(10)),
            (".5s", Duration::from_millis(500)),
            ("+1s", Duration::from_secs(1)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_go_duration(input), Ok(*want), "{input}");
        }
        for bad in ["", "5", "s", "5x", "1..5s", "-1s", "1s5", "abc", "99999999999999999999999h"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_bools() {
        for (input, want) in [("1", true), ("t", true), ("TRUE", true), ("True", true), ("0", false), ("F", false)] {
            assert_eq!(parse_go_bool(input), Some(want), "{input}");
        }
        for bad in ["", "yes", "tRUE", " true", "2"] {
            assert_eq!(parse_go_bool(bad), None, "{bad}");
        }
    }
}
