//! Duration and size units: literal suffixes and human-readable formatting.
//!
//! Durations are held as signed nanoseconds and sizes as signed bytes, both `i64`,
//! so arithmetic on them is exact and overflow is detected.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

/// What a unit suffix measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    Duration,
    Size,
}

pub const NS: i64 = 1;
pub const US: i64 = 1_000;
pub const MS: i64 = 1_000_000;
pub const SEC: i64 = 1_000_000_000;
pub const MIN: i64 = 60 * SEC;
pub const HOUR: i64 = 60 * MIN;
pub const DAY: i64 = 24 * HOUR;

const KIB: i64 = 1 << 10;
const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;
const TIB: i64 = 1 << 40;

/// Every suffix the lexer accepts, with its kind and factor to the base unit.
const UNITS: &[(&str, UnitKind, i64)] = &[
    ("ns", UnitKind::Duration, NS),
    ("us", UnitKind::Duration, US),
    ("ms", UnitKind::Duration, MS),
    ("s", UnitKind::Duration, SEC),
    ("m", UnitKind::Duration, MIN),
    ("h", UnitKind::Duration, HOUR),
    ("d", UnitKind::Duration, DAY),
    ("B", UnitKind::Size, 1),
    ("KB", UnitKind::Size, 1_000),
    ("MB", UnitKind::Size, 1_000_000),
    ("GB", UnitKind::Size, 1_000_000_000),
    ("TB", UnitKind::Size, 1_000_000_000_000),
    ("KiB", UnitKind::Size, KIB),
    ("MiB", UnitKind::Size, MIB),
    ("GiB", UnitKind::Size, GIB),
    ("TiB", UnitKind::Size, TIB),
];

/// Looks up a literal suffix such as `ms` or `GiB`.
pub fn lookup(suffix: &str) -> Option<(UnitKind, i64)> {
    UNITS.iter().find(|(s, _, _)| *s == suffix).map(|&(_, k, f)| (k, f))
}

/// Suggestions for a suffix that is not a unit, e.g. `kb` → `KB`, `KiB`.
pub fn suggest(suffix: &str) -> Vec<&'static str> {
    let lower = suffix.to_ascii_lowercase();
    match lower.as_str() {
        "sec" | "secs" | "second" | "seconds" => return vec!["s"],
        "min" | "mins" | "minute" | "minutes" => return vec!["m"],
        "hr" | "hrs" | "hour" | "hours" => return vec!["h"],
        "day" | "days" => return vec!["d"],
        _ => {}
    }
    // Same letters in another case (`kb` → `KB`), or the binary form (`kb` → `KiB`).
    let binary = |s: &str| s.len() == 3 && s.ends_with("iB") && lower.len() == 2 && lower.ends_with('b') && s[..1].eq_ignore_ascii_case(&lower[..1]);
    UNITS.iter().map(|(s, _, _)| *s).filter(|s| s.to_ascii_lowercase() == lower || binary(s)).collect()
}

/// All suffixes, for the help text of diagnostics.
pub fn all_suffixes() -> String {
    UNITS.iter().map(|(s, _, _)| *s).collect::<Vec<_>>().join(", ")
}

/// Formats nanoseconds the way a policy author would write them: `500ms`, `1.5s`, `2m`, `1h30m`.
pub fn format_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let a = ns.unsigned_abs();
    let (m, h, d) = (MIN as u64, HOUR as u64, DAY as u64);
    let body = if a % d == 0 {
        format!("{}d", a / d)
    } else if a >= m {
        // Compound form for a minute and more: `1h30m`, `5m10s`, `2m0.5s`.
        let mut out = String::new();
        if a >= h {
            out.push_str(&format!("{}h", a / h));
        }
        if (a % h) / m > 0 {
            out.push_str(&format!("{}m", (a % h) / m));
        }
        if a % m > 0 {
            out.push_str(&trim_decimal(a % m, SEC as u64, "s"));
        }
        out
    } else if a >= SEC as u64 {
        trim_decimal(a, SEC as u64, "s")
    } else if a >= MS as u64 {
        trim_decimal(a, MS as u64, "ms")
    } else if a >= US as u64 {
        trim_decimal(a, US as u64, "us")
    } else {
        format!("{a}ns")
    };
    format!("{sign}{body}")
}

/// Formats bytes exactly: `64MiB`, `1.5GiB` when exact to three decimals, else `12345B`.
pub fn format_size(bytes: i64) -> String {
    let sign = if bytes < 0 { "-" } else { "" };
    let a = bytes.unsigned_abs();
    for (unit, f) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        let f = f as u64;
        // Only use a binary unit when three decimals represent the value exactly.
        if a >= f && a < u64::MAX / 1000 && (a * 1000) % f == 0 {
            let milli = a * 1000 / f;
            let text = if milli % 1000 == 0 {
                format!("{}", milli / 1000)
            } else {
                format!("{}.{}", milli / 1000, format!("{:03}", milli % 1000).trim_end_matches('0'))
            };
            return format!("{sign}{text}{unit}");
        }
    }
    format!("{sign}{a}B")
}

/// `value / unit` with up to nine decimals and no trailing zeros.
fn trim_decimal(value: u64, unit: u64, suffix: &str) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return format!("{whole}{suffix}");
    }
    let digits = unit.to_string().len() - 1;
    let frac_str = format!("{frac:0digits$}");
    format!("{whole}.{}{suffix}", frac_str.trim_end_matches('0'))
}

/// Parses `12.5s`, `500ms`, `64KiB` style text (used for replay event fields).
/// Compound durations such as `1h30m` or `2m10.5s` are accepted (all parts one kind).
pub fn parse_quantity(text: &str) -> Option<(UnitKind, i64)> {
    let mut rest = text.trim();
    let (neg, body) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    rest = body;
    let mut total: Option<(UnitKind, i64)> = None;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))?;
        let (num, tail) = rest.split_at(split);
        let unit_len = tail.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(tail.len());
        let (kind, factor) = lookup(&tail[..unit_len])?;
        let part = scale(num, factor)?;
        total = match total {
            None => Some((kind, part)),
            Some((k, sum)) if k == kind => Some((k, sum.checked_add(part)?)),
            Some(_) => return None,
        };
        rest = &tail[unit_len..];
    }
    total.map(|(k, v)| (k, if neg { -v } else { v }))
}

/// `num * factor` for a decimal text `num`, exactly when possible, `None` on overflow.
pub fn scale(num: &str, factor: i64) -> Option<i64> {
    let num: String = num.chars().filter(|&c| c != '_').collect();
    let (neg, num) = match num.strip_prefix('-') {
        Some(rest) => (true, rest.to_string()),
        None => (false, num),
    };
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) => (w, f),
        None => (num.as_str(), ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    let w: i64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut total = w.checked_mul(factor)?;
    // Add the fraction digit by digit so `1.5s` is exact; digits below the base unit are dropped.
    let mut place = factor;
    for c in frac.chars() {
        let d = c.to_digit(10)? as i64;
        place /= 10;
        if place == 0 {
            break;
        }
        total = total.checked_add(d * place)?;
    }
    Some(if neg { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(format_duration(500 * MS), "500ms");
        assert_eq!(format_duration(1500 * MS), "1.5s");
        assert_eq!(format_duration(2 * MIN), "2m");
        assert_eq!(format_duration(90 * MIN), "1h30m");
        assert_eq!(format_duration(-5 * SEC), "-5s");
        assert_eq!(format_duration(310 * SEC), "5m10s");
        assert_eq!(format_duration(HOUR + 5 * SEC), "1h5s");
        assert_eq!(format_duration(25 * HOUR), "25h");
        assert_eq!(format_size(64 * MIB), "64MiB");
        assert_eq!(format_size(1536 * MIB), "1.5GiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(scale("1.5", SEC), Some(1_500_000_000));
        assert_eq!(parse_quantity("12.5s"), Some((UnitKind::Duration, 12_500 * MS)));
        assert_eq!(suggest("kb"), ["KB", "KiB"]);
        assert_eq!(suggest("secs"), ["s"]);
        assert!(suggest("xyz").is_empty());
    }
}
