//! Splitting of inline commands, byte for byte as Redis's `sdssplitargs` (Redis 7.0 `sds.c`).
//!
//! Inline commands are rare (telnet sessions, some health checks) but must be understood
//! exactly as Redis understands them, because the proxy re-encodes them as multibulk before
//! forwarding.

use std::ops::Range;

/// C's `isspace` in the "C" locale.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Splits `line` (without its line terminator) into arguments appended to `out`, recording
/// each argument's range in `ranges`. Returns the argument count, or `None` for unbalanced
/// quotes (or a closing quote followed by something other than a space).
///
/// Redis works on a NUL-terminated copy, so a NUL byte ends the line; the parser guarantees
/// none occurs before the newline, but the function treats one the same way regardless.
pub fn split_args(line: &[u8], out: &mut Vec<u8>, ranges: &mut Vec<Range<usize>>) -> Option<usize> {
    let at = |i: usize| -> u8 { line.get(i).copied().unwrap_or(0) };
    let mut p = 0;
    let mut argc = 0;
    loop {
        while at(p) != 0 && is_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Some(argc);
        }
        let start = out.len();
        let (mut in_dq, mut in_sq, mut done) = (false, false, false);
        while !done {
            let c = at(p);
            if in_dq {
                if c == b'\\' && at(p + 1) == b'x' {
                    if let (Some(h), Some(l)) = (hex(at(p + 2)), hex(at(p + 3))) {
                        out.push(h * 16 + l);
                        p += 3;
                    } else {
                        // `\x` without two hex digits: the generic escape rule below.
                        out.push(b'x');
                        p += 1;
                    }
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    out.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    out.push(c);
                }
            } else if in_sq {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    out.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    out.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    other => out.push(other),
                }
            }
            if at(p) != 0 {
                p += 1;
            }
        }
        ranges.push(start..out.len());
        argc += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(line: &str) -> Option<Vec<Vec<u8>>> {
        let (mut out, mut ranges) = (Vec::new(), Vec::new());
        split_args(line.as_bytes(), &mut out, &mut ranges)?;
        Some(ranges.into_iter().map(|r| out[r].to_vec()).collect())
    }

    fn ok(line: &str, want: &[&[u8]]) {
        let got = split(line).unwrap_or_else(|| panic!("{line:?} should split"));
        assert_eq!(
            got,
            want.iter().map(|a| a.to_vec()).collect::<Vec<_>>(),
            "{line:?}"
        );
    }

    #[test]
    fn splits_like_sdssplitargs() {
        ok("", &[]);
        ok("   \t ", &[]);
        ok("PING", &[b"PING"]);
        ok("set  key   value", &[b"set", b"key", b"value"]);
        ok(r#"set k "a b""#, &[b"set", b"k", b"a b"]);
        ok(
            r#"set k "\x41\x4a\n\r\t\b\a\\\"\q""#,
            &[b"set", b"k", b"AJ\n\r\t\x08\x07\\\"q"],
        );
        ok(r#"set k "\xZZ""#, &[b"set", b"k", b"xZZ"]);
        ok(r"set k 'it\'s \n'", &[b"set", b"k", b"it's \\n"]);
        ok(r#"a"b c" d"#, &[b"ab c", b"d"]);
        ok("k\x0bv", &[b"k\x0bv"]);
        ok("\x0bk", &[b"k"]);
        ok(r#""" ''"#, &[b"", b""]);
    }

    #[test]
    fn rejects_unbalanced_quotes() {
        for line in [
            r#"set k "abc"#,
            "set k 'abc",
            r#"set k "a"b"#,
            "set k 'a'b",
            r#"""x"#,
            r#"a"b c"d"#,
        ] {
            assert_eq!(split(line), None, "{line:?}");
        }
    }
}
