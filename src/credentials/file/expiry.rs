//! Reads a token's expiry from the `expires_on` value of a token document: unix seconds as a
//! number or a numeric string (what IMDS, MSAL and `az account get-access-token` print), or an
//! RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`). Parsed by hand: the crate
//! takes no date-time dependency for one field.
//!
//! Errors describe what is wrong with the value but never repeat it: a misconfigured path may
//! point at the token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::json_path::kind;

/// 9999-12-31T23:59:59Z. Later values are taken for a mistake (typically milliseconds given
/// for seconds) rather than a token that practically never expires.
pub(super) const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

/// The expiry `value` denotes; the error completes a sentence that starts with the path.
pub(super) fn parse(value: &Value) -> Result<SystemTime, String> {
    match value {
        Value::Number(n) => {
            if let Some(secs) = n.as_u64() {
                unix(Duration::from_secs(secs))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 => Duration::try_from_secs_f64(f)
                        .map_err(|_| out_of_range())
                        .and_then(unix),
                    _ => Err("is a negative number; expected unix seconds".to_owned()),
                }
            }
        }
        Value::String(s) => {
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                unix_decimal(s).and_then(unix)
            } else {
                rfc3339(s).map_err(|why| {
                    format!("is neither unix seconds nor an RFC 3339 timestamp ({why})")
                })
            }
        }
        other => Err(format!(
            "is {}; expected unix seconds or an RFC 3339 timestamp",
            kind(other)
        )),
    }
}

fn out_of_range() -> String {
    format!("is after 9999-12-31 (unix {MAX_UNIX_SECONDS}); milliseconds instead of seconds?")
}

fn unix(since_epoch: Duration) -> Result<SystemTime, String> {
    if since_epoch.as_secs() > MAX_UNIX_SECONDS {
        return Err(out_of_range());
    }
    UNIX_EPOCH.checked_add(since_epoch).ok_or_else(out_of_range)
}

/// `1700000000` or `1700000000.25`; `s` holds only ASCII digits and dots.
fn unix_decimal(s: &str) -> Result<Duration, String> {
    let bad = || "is a malformed number of unix seconds".to_owned();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || frac.contains('.') || (s.contains('.') && frac.is_empty()) {
        return Err(bad());
    }
    let secs: u64 = whole.parse().map_err(|_| out_of_range())?;
    Ok(Duration::new(secs, fraction_nanos(frac.as_bytes())))
}

/// Nanoseconds from the digits after a decimal point; digits past the ninth are dropped.
fn fraction_nanos(digits: &[u8]) -> u32 {
    let mut nanos = 0u32;
    for i in 0..9 {
        let d = digits
            .get(i)
            .map_or(0, |b| u32::from(b.wrapping_sub(b'0')) % 10);
        nanos = nanos * 10 + d;
    }
    nanos
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; `T` may also be `t` or a space, `Z` may be
/// `z` (RFC 3339 section 5.6 and its note on the space). A leap second (`:60`) counts as the
/// next second.
pub(super) fn rfc3339(s: &str) -> Result<SystemTime, &'static str> {
    let mut c = Cursor {
        b: s.as_bytes(),
        i: 0,
    };
    let year = c.digits(4)?;
    c.literal(b'-')?;
    let month = c.digits(2)?;
    c.literal(b'-')?;
    let day = c.digits(2)?;
    match c.next() {
        Some(b'T' | b't' | b' ') => {}
        _ => return Err("expected `T` between the date and the time"),
    }
    let hour = c.digits(2)?;
    c.literal(b':')?;
    let minute = c.digits(2)?;
    c.literal(b':')?;
    let second = c.digits(2)?;
    let mut nanos = 0;
    if c.peek() == Some(b'.') {
        c.i += 1;
        let start = c.i;
        while c.peek().is_some_and(|b| b.is_ascii_digit()) {
            c.i += 1;
        }
        let digits = c.b.get(start..c.i).unwrap_or_default();
        if digits.is_empty() {
            return Err("expected digits after the decimal point");
        }
        nanos = fraction_nanos(digits);
    }
    let offset: i64 = match c.next() {
        Some(b'Z' | b'z') => 0,
        Some(sign @ (b'+' | b'-')) => {
            let h = c.digits(2)?;
            c.literal(b':')?;
            let m = c.digits(2)?;
            if h > 23 || m > 59 {
                return Err("time zone offset out of range");
            }
            let secs = i64::from(h * 3600 + m * 60);
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        None => return Err("missing time zone: expected `Z` or `±HH:MM`"),
        Some(_) => return Err("expected `Z` or `±HH:MM` after the time"),
    };
    if c.i != c.b.len() {
        return Err("unexpected text after the time zone");
    }
    if !(1..=12).contains(&month) {
        return Err("month out of range");
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err("day out of range for the month");
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err("time of day out of range");
    }
    let days = days_from_civil(i64::from(year), i64::from(month), i64::from(day));
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
        - offset;
    let secs = u64::try_from(secs).map_err(|_| "before 1970")?;
    UNIX_EPOCH
        .checked_add(Duration::new(secs, nanos))
        .ok_or("out of range")
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    /// Exactly `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Result<u32, &'static str> {
        let mut v = 0u32;
        for _ in 0..n {
            match self.next() {
                Some(b) if b.is_ascii_digit() => v = v * 10 + u32::from(b - b'0'),
                _ => return Err("expected `YYYY-MM-DDTHH:MM:SS` followed by `Z` or `±HH:MM`"),
            }
        }
        Ok(v)
    }

    fn literal(&mut self, want: u8) -> Result<(), &'static str> {
        match self.next() {
            Some(b) if b == want => Ok(()),
            _ => Err("expected `YYYY-MM-DDTHH:MM:SS` followed by `Z` or `±HH:MM`"),
        }
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn rfc3339_valid() {
        let cases = [
            ("epoch", "1970-01-01T00:00:00Z", at(0, 0)),
            ("leap day", "2000-02-29T12:00:00Z", at(951_825_600, 0)),
            ("year 3000", "3000-01-01T00:00:00Z", at(32_503_680_000, 0)),
            ("lower case", "3000-01-01t00:00:00z", at(32_503_680_000, 0)),
            ("space", "3000-01-01 00:00:00Z", at(32_503_680_000, 0)),
            (
                "plus offset",
                "3000-01-01T01:30:00+01:30",
                at(32_503_680_000, 0),
            ),
            (
                "minus offset",
                "2999-12-31T22:00:00-02:00",
                at(32_503_680_000, 0),
            ),
            (
                "millis",
                "3000-01-01T00:00:00.250Z",
                at(32_503_680_000, 250_000_000),
            ),
            (
                "nanos",
                "2024-05-06T07:08:09.123456789Z",
                at(1_714_979_289, 123_456_789),
            ),
            (
                "too many digits",
                "2024-05-06T07:08:09.1234567891Z",
                at(1_714_979_289, 123_456_789),
            ),
            ("leap second", "2016-12-31T23:59:60Z", at(1_483_228_800, 0)),
            (
                "end of 9999",
                "9999-12-31T23:59:59Z",
                at(MAX_UNIX_SECONDS, 0),
            ),
        ];
        for (name, text, want) in cases {
            assert_eq!(rfc3339(text), Ok(want), "{name}");
        }
    }

    #[test]
    fn rfc3339_invalid() {
        let cases = [
            (
                "not a leap year",
                "2023-02-29T00:00:00Z",
                "day out of range",
            ),
            (
                "century not leap",
                "1900-02-29T00:00:00Z",
                "day out of range",
            ),
            ("month 13", "2024-13-01T00:00:00Z", "month out of range"),
            ("month 0", "2024-00-01T00:00:00Z", "month out of range"),
            ("day 0", "2024-01-00T00:00:00Z", "day out of range"),
            ("hour 24", "2024-01-01T24:00:00Z", "time of day"),
            ("no zone", "2024-01-01T00:00:00", "missing time zone"),
            ("bad zone", "2024-01-01T00:00:00UTC", "expected `Z`"),
            (
                "offset without colon",
                "2024-01-01T00:00:00+0100",
                "expected `YYYY",
            ),
            (
                "offset out of range",
                "2024-01-01T00:00:00+24:00",
                "offset out of range",
            ),
            ("trailing", "2024-01-01T00:00:00Zjunk", "unexpected text"),
            ("date only", "2024-01-01", "expected `T`"),
            ("short year", "24-01-01T00:00:00Z", "expected `YYYY"),
            ("empty fraction", "2024-01-01T00:00:00.Z", "digits after"),
            ("before 1970", "1969-12-31T23:59:59Z", "before 1970"),
            (
                "offset before 1970",
                "1970-01-01T00:00:00+00:01",
                "before 1970",
            ),
            ("empty", "", "expected `YYYY"),
            ("multibyte", "２０２４-01-01T00:00:00Z", "expected `YYYY"),
        ];
        for (name, text, want) in cases {
            let err = rfc3339(text).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn values() {
        let ok = [
            ("number", json!(32_503_680_000u64), at(32_503_680_000, 0)),
            (
                "float",
                json!(32_503_680_000.5),
                at(32_503_680_000, 500_000_000),
            ),
            (
                "numeric string",
                json!("32503680000"),
                at(32_503_680_000, 0),
            ),
            (
                "padded string",
                json!(" 32503680000 "),
                at(32_503_680_000, 0),
            ),
            (
                "decimal string",
                json!("32503680000.25"),
                at(32_503_680_000, 250_000_000),
            ),
            (
                "rfc 3339",
                json!("3000-01-01T00:00:00Z"),
                at(32_503_680_000, 0),
            ),
        ];
        for (name, v, want) in ok {
            assert_eq!(parse(&v), Ok(want), "{name}");
        }
        let bad = [
            ("negative", json!(-5), "negative"),
            ("milliseconds", json!(32_503_680_000_000u64), "milliseconds"),
            ("huge float", json!(1e300), "milliseconds"),
            (
                "huge string",
                json!("99999999999999999999999"),
                "after 9999",
            ),
            ("two dots", json!("1.2.3"), "malformed"),
            ("trailing dot", json!("12."), "malformed"),
            ("leading dot", json!(".5"), "malformed"),
            ("word", json!("soon"), "neither unix seconds nor"),
            ("empty string", json!(""), "neither unix seconds nor"),
            ("bool", json!(true), "is a boolean"),
            ("null", json!(null), "is null"),
            ("object", json!({"secs": 1}), "is an object"),
        ];
        for (name, v, want) in bad {
            let err = parse(&v).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
        }
    }
}
