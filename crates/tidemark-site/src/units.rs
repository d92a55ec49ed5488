//! Sizes and durations as operators write them (`10GiB`, `24h`), in config files and API bodies.
//!
//! Both accept either a bare number in the base unit (bytes, seconds) or a string with a unit,
//! so `journal_max = 21474836480` and `journal_max = "20GiB"` mean the same.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Why a size or duration could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    /// The text is not a size.
    #[error(
        "invalid size {input:?}: {reason} (expected bytes, or a number with a unit like 512KiB, 10GiB, 1TB)"
    )]
    Size {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The text is not a duration.
    #[error(
        "invalid duration {input:?}: {reason} (expected seconds, or a duration like 90s, 30m, 24h, 7days)"
    )]
    Duration {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parse a size such as `4096`, `512KiB`, `10GiB` or `1.5TB` into bytes.
///
/// `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024; `KB`, `MB`, `GB`, `TB` powers of 1000.
pub fn parse_size_bytes(text: &str) -> Result<u64, UnitError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Size { input: text.to_string(), reason: "it is empty".into() });
    }
    parse_size::parse_size(trimmed)
        .map_err(|e| UnitError::Size { input: text.to_string(), reason: e.to_string() })
}

/// Parse a duration such as `90s`, `24h` or `7days`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let trimmed = text.trim();
    if let Ok(seconds) = trimmed.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| UnitError::Duration { input: text.to_string(), reason: e.to_string() })
}

/// Format bytes for people: `10 GiB`, `1.5 MiB`, `512 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.1} {unit}")
    }
}

/// A size in bytes that deserializes from a number of bytes or a string with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes as a whole number, or a string like \"10GiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: it is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size_bytes(v).map(ByteSize).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration that deserializes from a number of seconds or a string like `"24h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: seconds as a whole number, or a string like \"24h\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|s| HumanDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: it is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!(parse_size_bytes("4096"), Ok(4096));
        assert_eq!(parse_size_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size_bytes(" 20 GiB "), Ok(20 << 30));
        assert_eq!(parse_size_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size_bytes("1.5KiB"), Ok(1536));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_input() {
        for bad in ["", "ten", "10XB", "-1", "GiB"] {
            let err = parse_size_bytes(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn durations_parse_units_and_bare_seconds() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn byte_size_deserializes_from_number_or_string() {
        let n: ByteSize = serde_json::from_str("1048576").expect("number");
        assert_eq!(n, ByteSize(1 << 20));
        let s: ByteSize = serde_json::from_str("\"1MiB\"").expect("string");
        assert_eq!(s, ByteSize(1 << 20));
        let neg = serde_json::from_str::<ByteSize>("-5").expect_err("negative");
        assert!(neg.to_string().contains("negative"), "{neg}");
        let bad = serde_json::from_str::<ByteSize>("\"lots\"").expect_err("text");
        assert!(bad.to_string().contains(r#"invalid size "lots""#), "{bad}");
        assert!(serde_json::from_str::<ByteSize>("true").is_err());
    }

    #[test]
    fn format_bytes_uses_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1 KiB");
        assert_eq!(format_bytes(10 << 30), "10 GiB");
        assert_eq!(format_bytes(1536 << 20), "1.5 GiB");
    }
}
