//! A whole reply as a tree, for the few replies the proxy must change inside (the cluster
//! topology replies): decoded from a complete frame the reply scanner has already framed,
//! edited, and encoded again in the same RESP version. Leaves the proxy never edits (numbers,
//! nulls, booleans, errors) keep their bytes as they came.

use bytes::BufMut;

use super::encode;
use super::request::string2ll;

/// Nesting deeper than this is refused; topology replies are at most five levels deep.
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+text`.
    Simple(Vec<u8>),
    /// `$len` bulk string.
    Bulk(Vec<u8>),
    /// `=len` verbatim string: the three-letter format and the text after `fmt:`.
    Verbatim([u8; 3], Vec<u8>),
    /// `:n`.
    Int(i64),
    /// An aggregate: `*` array, `%` map (items are key, value, key, value…), `~` set, `>` push.
    Agg(u8, Vec<Value>),
    /// Any other frame, kept byte for byte (nulls, doubles, booleans, errors, big numbers).
    Raw(Vec<u8>),
}

impl Value {
    /// The text of a string of any kind.
    pub fn as_str(&self) -> Option<&[u8]> {
        match self {
            Value::Simple(s) | Value::Bulk(s) | Value::Verbatim(_, s) => Some(s),
            _ => None,
        }
    }

    /// Replaces the text of a string, keeping its kind.
    /// A null of RESP2 (`$-1`, `*-1`) or RESP3 (`_`).
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Raw(raw) if [&b"$-1\r\n"[..], b"*-1\r\n", b"_\r\n"].contains(&&raw[..]))
    }

    pub fn set_str(&mut self, text: Vec<u8>) {
        match self {
            Value::Simple(s) | Value::Bulk(s) | Value::Verbatim(_, s) => *s = text,
            _ => {}
        }
    }

    /// An integer, or a string holding one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            other => other.as_str().and_then(string2ll),
        }
    }

    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::Agg(_, items) => Some(items),
            _ => None,
        }
    }

    pub fn items_mut(&mut self) -> Option<&mut Vec<Value>> {
        match self {
            Value::Agg(_, items) => Some(items),
            _ => None,
        }
    }

    /// Decodes one complete frame at the start of `buf`; `None` if it is not one (or uses
    /// attributes, streamed types or absurd nesting, which no topology reply does).
    pub fn decode(buf: &[u8]) -> Option<(Value, usize)> {
        decode(buf, 0)
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Value::Simple(s) => {
                out.put_u8(b'+');
                out.put_slice(s);
                out.put_slice(b"\r\n");
            }
            Value::Bulk(s) => encode::bulk(out, s),
            Value::Verbatim(fmt, s) => {
                encode::header(out, b'=', s.len() + 4);
                out.put_slice(fmt);
                out.put_u8(b':');
                out.put_slice(s);
                out.put_slice(b"\r\n");
            }
            Value::Int(n) => {
                out.put_u8(b':');
                out.put_slice(n.to_string().as_bytes());
                out.put_slice(b"\r\n");
            }
            Value::Agg(kind, items) => {
                let n = if *kind == b'%' {
                    items.len() / 2
                } else {
                    items.len()
                };
                encode::header(out, *kind, n);
                for item in items {
                    item.encode(out);
                }
            }
            Value::Raw(bytes) => out.put_slice(bytes),
        }
    }
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = memchr::memchr(b'\n', buf)?;
    let text = buf.get(1..end)?.strip_suffix(b"\r")?;
    Some((text, end + 1))
}

fn decode(buf: &[u8], depth: usize) -> Option<(Value, usize)> {
    if depth > MAX_DEPTH {
        return None;
    }
    let kind = *buf.first()?;
    let (text, mut pos) = line(buf)?;
    let value = match kind {
        b'+' => Value::Simple(text.to_vec()),
        b':' => Value::Int(string2ll(text)?),
        b'-' | b',' | b'#' | b'_' | b'(' => Value::Raw(buf[..pos].to_vec()),
        b'$' | b'=' | b'!' => {
            let n = string2ll(text)?;
            if n < 0 {
                return (kind == b'$').then(|| (Value::Raw(buf[..pos].to_vec()), pos));
            }
            let n = usize::try_from(n).ok()?;
            let data = buf.get(pos..pos.checked_add(n)?)?;
            if buf.get(pos + n..pos + n + 2)? != b"\r\n" {
                return None;
            }
            let end = pos + n + 2;
            let value = match kind {
                b'$' => Value::Bulk(data.to_vec()),
                b'=' => {
                    let fmt: [u8; 3] = data.get(..3)?.try_into().ok()?;
                    if data.get(3) != Some(&b':') {
                        return None;
                    }
                    Value::Verbatim(fmt, data[4..].to_vec())
                }
                _ => Value::Raw(buf[..end].to_vec()),
            };
            return Some((value, end));
        }
        b'*' | b'%' | b'~' | b'>' => {
            let n = string2ll(text)?;
            if n < 0 {
                return (kind == b'*').then(|| (Value::Raw(buf[..pos].to_vec()), pos));
            }
            let count = usize::try_from(n)
                .ok()?
                .checked_mul(if kind == b'%' { 2 } else { 1 })?;
            // Every element takes at least three bytes: a lying count fails here, not in an
            // allocation.
            if count > buf.len() / 3 {
                return None;
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                let (item, used) = decode(&buf[pos..], depth + 1)?;
                items.push(item);
                pos += used;
            }
            Value::Agg(kind, items)
        }
        _ => return None,
    };
    Some((value, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: &[u8]) -> Value {
        let (v, used) = Value::decode(frame).expect("decodes");
        assert_eq!(used, frame.len());
        let mut out = Vec::new();
        v.encode(&mut out);
        assert_eq!(out, frame, "re-encodes byte for byte");
        v
    }

    #[test]
    fn round_trips_every_kind() {
        round_trip(b"+OK\r\n");
        round_trip(b":-42\r\n");
        round_trip(b"$5\r\nhello\r\n");
        round_trip(b"$-1\r\n");
        round_trip(b"*-1\r\n");
        round_trip(b"_\r\n");
        round_trip(b",1.5\r\n");
        round_trip(b"#t\r\n");
        round_trip(b"-ERR x\r\n");
        round_trip(b"!3\r\nerr\r\n");
        round_trip(b"=8\r\ntxt:abcd\r\n");
        round_trip(b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n");
        let v = round_trip(b"%1\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n");
        assert_eq!(v.items().unwrap().len(), 2);
        round_trip(b"~1\r\n+x\r\n");
        round_trip(b"*0\r\n");
    }

    #[test]
    fn refuses_what_is_not_one_frame() {
        for bad in [
            &b"$5\r\nhel\r\n"[..],
            b"*3\r\n:1\r\n",
            b"*99999999\r\n",
            b"?x\r\n",
            b"=2\r\nab\r\n",
            b"$2\r\nabcd",
        ] {
            assert!(Value::decode(bad).is_none(), "{bad:?}");
        }
        let deep = "*1\r\n".repeat(40) + ":1\r\n";
        assert!(Value::decode(deep.as_bytes()).is_none());
    }

    #[test]
    fn edits_strings_and_recounts_lengths() {
        let (mut v, _) = Value::decode(b"*2\r\n$9\r\n127.0.0.1\r\n=8\r\ntxt:abcd\r\n").unwrap();
        for item in v.items_mut().unwrap() {
            item.set_str(b"10.0.0.12".to_vec());
        }
        let mut out = Vec::new();
        v.encode(&mut out);
        assert_eq!(out, b"*2\r\n$9\r\n10.0.0.12\r\n=13\r\ntxt:10.0.0.12\r\n");
    }
}
