//! The small JSON path dialect that locates the fields of a token document: `$` followed by
//! `.key`, `['key']` / `["key"]` (for keys with dots, brackets or quotes) and `[N]` (array
//! indices). No wildcards, filters or slices: a token field is one value at one place.
//!
//! Paths come from configuration and may be quoted in errors; the values they find may be
//! tokens and never are.

use std::fmt;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JsonPath {
    segments: Vec<Segment>,
}

impl JsonPath {
    /// Parses `text`; the error says what is wrong and at which byte.
    pub(super) fn parse(text: &str) -> Result<JsonPath, String> {
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| "must start with `$`".to_owned())?;
        let mut chars = rest.char_indices().peekable();
        let mut segments = Vec::new();
        // Byte offsets in messages count from the start of `text`, `$` included.
        while let Some((i, c)) = chars.next() {
            match c {
                '.' => {
                    let mut key = String::new();
                    while let Some(&(_, c)) = chars.peek() {
                        if c == '.' || c == '[' {
                            break;
                        }
                        key.push(c);
                        chars.next();
                    }
                    if key.is_empty() {
                        return Err(format!("empty key after `.` at byte {}", i + 1));
                    }
                    segments.push(Segment::Key(key));
                }
                '[' => {
                    let segment = match chars.peek().map(|&(_, c)| c) {
                        Some(quote @ ('\'' | '"')) => {
                            chars.next();
                            let mut key = String::new();
                            loop {
                                match chars.next() {
                                    Some((_, '\\')) if chars.peek().is_some() => {
                                        if let Some((_, c)) = chars.next() {
                                            key.push(c);
                                        }
                                    }
                                    Some((_, c)) if c == quote => {
                                        expect_close(chars.next(), i + 1)?;
                                        break;
                                    }
                                    Some((_, c)) if c != '\\' => key.push(c),
                                    _ => {
                                        return Err(format!(
                                            "unterminated quoted key starting at byte {}",
                                            i + 1
                                        ))
                                    }
                                }
                            }
                            Segment::Key(key)
                        }
                        Some(d) if d.is_ascii_digit() => {
                            let mut digits = String::new();
                            while let Some(&(_, c)) = chars.peek() {
                                if !c.is_ascii_digit() {
                                    break;
                                }
                                digits.push(c);
                                chars.next();
                            }
                            let index = digits.parse::<usize>().map_err(|_| {
                                format!("array index at byte {} is too large", i + 2)
                            })?;
                            expect_close(chars.next(), i + 1)?;
                            Segment::Index(index)
                        }
                        _ => {
                            return Err(format!(
                                "expected a quoted key or an array index after `[` at byte {}",
                                i + 1
                            ))
                        }
                    };
                    segments.push(segment);
                }
                other => {
                    return Err(format!(
                        "unexpected `{other}` at byte {}; expected `.` or `[`",
                        i + 1
                    ))
                }
            }
        }
        Ok(JsonPath { segments })
    }

    /// The value at this path in `root`, mutable so that the caller can move a token out
    /// rather than copy it. The error names how far the path matched, never a value.
    pub(super) fn lookup_mut<'v>(&self, root: &'v mut Value) -> Result<&'v mut Value, String> {
        let mut value = root;
        for (depth, segment) in self.segments.iter().enumerate() {
            let here = Prefix(self.segments.get(..depth).unwrap_or_default());
            value = match (segment, value) {
                (Segment::Key(key), Value::Object(map)) => match map.get_mut(key) {
                    Some(v) => v,
                    None => return Err(format!("{here} has no key {:?}", key)),
                },
                (Segment::Index(index), Value::Array(items)) => {
                    let len = items.len();
                    match items.get_mut(*index) {
                        Some(v) => v,
                        None => {
                            return Err(format!("{here} has {len} element(s), so no index {index}"))
                        }
                    }
                }
                (Segment::Key(_), other) => {
                    return Err(format!("{here} is {}, not an object", kind(other)))
                }
                (Segment::Index(_), other) => {
                    return Err(format!("{here} is {}, not an array", kind(other)))
                }
            };
        }
        Ok(value)
    }
}

/// Checks that a bracketed segment ends with `]`.
fn expect_close(next: Option<(usize, char)>, open_at: usize) -> Result<(), String> {
    match next {
        Some((_, ']')) => Ok(()),
        _ => Err(format!("missing `]` for the `[` at byte {open_at}")),
    }
}

/// The kind of a JSON value, for messages that must not show the value itself.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first segments of a path, written back as a path for messages.
struct Prefix<'a>(&'a [Segment]);

impl fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`$")?;
        for segment in self.0 {
            match segment {
                Segment::Key(k) if !k.is_empty() && !k.contains(['.', '[', ']', '\'', '\\']) => {
                    write!(f, ".{k}")?
                }
                Segment::Key(k) => {
                    f.write_str("['")?;
                    for c in k.chars() {
                        if c == '\'' || c == '\\' {
                            f.write_str("\\")?;
                        }
                        write!(f, "{c}")?;
                    }
                    f.write_str("']")?
                }
                Segment::Index(i) => write!(f, "[{i}]")?,
            }
        }
        f.write_str("`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(k: &str) -> Segment {
        Segment::Key(k.to_owned())
    }

    #[test]
    fn parses_the_dialect() {
        let cases = [
            ("root", "$", vec![]),
            ("dotted", "$.a.b.c", vec![key("a"), key("b"), key("c")]),
            (
                "hyphen in dotted key",
                "$.expires-on",
                vec![key("expires-on")],
            ),
            ("single-quoted", "$['a-b']", vec![key("a-b")]),
            ("double-quoted with dot", r#"$["a.b"]"#, vec![key("a.b")]),
            ("escaped quote", r"$['it\'s']", vec![key("it's")]),
            (
                "index",
                "$.items[0].tok",
                vec![key("items"), Segment::Index(0), key("tok")],
            ),
            (
                "nested index",
                "$[1][20]",
                vec![Segment::Index(1), Segment::Index(20)],
            ),
            (
                "mixed",
                "$.a['b c'][3]",
                vec![key("a"), key("b c"), Segment::Index(3)],
            ),
        ];
        for (name, text, want) in cases {
            let got = JsonPath::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.segments, want, "{name}");
        }
    }

    #[test]
    fn rejects_malformed_paths() {
        let cases = [
            ("no dollar", "a.b", "start with `$`"),
            ("empty key", "$.a..b", "empty key"),
            ("trailing dot", "$.a.", "empty key"),
            ("unterminated quote", "$['a", "unterminated"),
            ("trailing backslash", r"$['a\", "unterminated"),
            ("missing bracket after quote", "$['a'", "missing `]`"),
            ("missing bracket after index", "$[0", "missing `]`"),
            (
                "bare word in brackets",
                "$[a]",
                "quoted key or an array index",
            ),
            ("negative index", "$[-1]", "quoted key or an array index"),
            ("huge index", "$[99999999999999999999999]", "too large"),
            ("junk after dollar", "$a", "unexpected `a`"),
            ("empty", "", "start with `$`"),
        ];
        for (name, text, want) in cases {
            let err = JsonPath::parse(text).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn lookups_explain_misses_without_values() {
        let mut doc = json!({"a": {"b": "hidden-value"}, "list": [1], "s": "hidden-value"});
        let found = JsonPath::parse("$.a.b").and_then(|p| p.lookup_mut(&mut doc).cloned());
        assert_eq!(found, Ok(json!("hidden-value")));
        let cases = [
            ("$.a.c", "`$.a` has no key \"c\""),
            ("$.list[3]", "`$.list` has 1 element(s), so no index 3"),
            ("$.s.x", "`$.s` is a string, not an object"),
            ("$.a[0]", "`$.a` is an object, not an array"),
            ("$['a']['x.y']", "`$.a` has no key \"x.y\""),
        ];
        for (path, want) in cases {
            let err = JsonPath::parse(path)
                .and_then(|p| p.lookup_mut(&mut doc).map(|_| ()))
                .expect_err(path);
            assert_eq!(err, want, "{path}");
            assert!(!err.contains("hidden"), "{path}: {err}");
        }
    }
}
