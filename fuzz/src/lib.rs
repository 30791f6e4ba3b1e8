//! Helpers shared by the fuzz targets: how an input's first bytes choose the chunking of the
//! rest ([`Chunks`]); an independent, whole-buffer reader of RESP reply streams
//! ([`check_replies`]) the targets use as an oracle for the crate's streaming scanner and for
//! what the session core sends the client; the decoding of the `session_core` target's
//! input into operations ([`ops`]); and the checks of what the core writes upstream
//! ([`upstream`]).
//!
//! Nothing here is part of the proxy; it only builds inside the fuzz workspace.

pub mod ops;
pub mod upstream;

/// Chunk sizes read from the front of a fuzz input, so the same payload can be fed whole and
/// in pieces and the results compared.
///
/// Layout: one header byte `h`; `k = h & 0x0f` size bytes follow; the rest is the payload.
/// Chunks take sizes `size[0] + 1`, `size[1] + 1`, … cycling; with `k == 0` the payload is
/// fed one byte at a time (the harshest chunking). `h >> 4` is left to the target.
#[derive(Debug, Clone)]
pub struct Chunks {
    sizes: Vec<usize>,
    pub flags: u8,
}

impl Chunks {
    /// Splits `data` into the chunking and the payload.
    pub fn parse(data: &[u8]) -> (Chunks, &[u8]) {
        let Some((&h, rest)) = data.split_first() else {
            return (
                Chunks {
                    sizes: vec![1],
                    flags: 0,
                },
                data,
            );
        };
        let k = usize::from(h & 0x0f).min(rest.len());
        let (sizes, payload) = rest.split_at(k);
        let mut sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s) + 1).collect();
        if sizes.is_empty() {
            sizes.push(1);
        }
        (
            Chunks {
                sizes,
                flags: h >> 4,
            },
            payload,
        )
    }

    /// Multiplies every chunk size (for padded payloads, which are tens of KiB long).
    pub fn scale(&mut self, factor: usize) {
        for s in &mut self.sizes {
            *s *= factor;
        }
    }

    /// The payload cut into chunks.
    pub fn split<'a>(&self, payload: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut rest = payload;
        let mut i = 0;
        while !rest.is_empty() {
            let n = self.sizes[i % self.sizes.len()].min(rest.len());
            let (head, tail) = rest.split_at(n);
            out.push(head);
            rest = tail;
            i += 1;
        }
        out
    }
}

/// How [`check_replies`] reads lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// As the proxy's `ReplyScanner` does: a line ends at the first CR, which must be
    /// followed by LF; only type bytes, line ends and length fields are checked.
    Lax,
    /// As a strict RESP client reads: lines end with CRLF and hold no CR or LF, bulks are
    /// followed by CRLF, integers, booleans and nulls are well formed.
    Strict,
}

/// Result of reading a reply stream from its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replies {
    /// Offsets where each complete top-level frame ends.
    pub ends: Vec<usize>,
    /// `Some((offset, why))` if the bytes after the last complete frame cannot be RESP.
    pub error: Option<(usize, String)>,
}

impl Replies {
    /// Whether the stream ends exactly at a frame boundary.
    pub fn at_boundary(&self, len: usize) -> bool {
        self.error.is_none() && self.ends.last().copied().unwrap_or(0) == len
    }
}

/// [`check_replies`] over a stream that only grows, read again only from the end of its last
/// complete frame, so that checking after every operation stays linear in the stream's size.
#[derive(Debug, Clone)]
pub struct ReplyStream {
    rules: Rules,
    /// Where the last complete top-level frame ends.
    checked: usize,
}

impl ReplyStream {
    pub fn new(rules: Rules) -> Self {
        ReplyStream { rules, checked: 0 }
    }

    /// Reads the stream held by `written` followed by `queued`; returns the error, if any
    /// (offset from the stream's start), and whether the stream ends at a frame boundary.
    pub fn check(&mut self, written: &[u8], queued: &[u8]) -> (Option<(usize, String)>, bool) {
        let from = self.checked;
        let tail = if from <= written.len() {
            [&written[from..], queued].concat()
        } else {
            queued[from - written.len()..].to_vec()
        };
        let r = check_replies(&tail, self.rules);
        let at_boundary = r.at_boundary(tail.len());
        self.checked += r.ends.last().copied().unwrap_or(0);
        (r.error.map(|(at, why)| (from + at, why)), at_boundary)
    }

    /// The stream was cut back to `len` bytes, a frame boundary.
    pub fn cut(&mut self, len: usize) {
        self.checked = self.checked.min(len);
    }
}

/// Reads `buf` as a stream of top-level RESP2/RESP3 replies (an attribute belongs to the value
/// after it), with an explicit stack: nesting depth is bounded only by the input.
pub fn check_replies(buf: &[u8], rules: Rules) -> Replies {
    let mut ends = Vec::new();
    let mut pos = 0;
    // Values still expected per open aggregate, innermost last; `true` marks an attribute,
    // which is followed by the value it annotates.
    let mut stack: Vec<(u64, bool)> = Vec::new();
    let error = loop {
        if pos == buf.len() {
            break None;
        }
        let start = pos;
        let kind = buf[pos];
        let line = match read_line(buf, pos + 1, rules) {
            Ok(Some((line, next))) => {
                pos = next;
                line
            }
            Ok(None) => break None,
            Err(why) => break Some((start, why)),
        };
        let mut done = true;
        match kind {
            b'+' | b'-' => {}
            b':' | b'#' | b'_' | b',' | b'(' if rules == Rules::Lax => {}
            b':' => {
                if redis_entra_proxy::resp::request::string2ll(line).is_none() {
                    break Some((start, "bad integer".into()));
                }
            }
            b'#' if line == b"t" || line == b"f" => {}
            b'_' if line.is_empty() => {}
            b',' | b'(' if !line.is_empty() => {}
            b'#' | b'_' | b',' | b'(' => break Some((start, "malformed scalar".into())),
            b'$' | b'=' | b'!' => match length(line) {
                Err(why) => break Some((start, why)),
                Ok(None) => {}
                Ok(Some(n)) => {
                    let n = n as usize;
                    let Some(end) = pos.checked_add(n).filter(|e| e + 2 <= buf.len()) else {
                        break None;
                    };
                    if rules == Rules::Strict && &buf[end..end + 2] != b"\r\n" {
                        break Some((start, "bulk not followed by CRLF".into()));
                    }
                    pos = end + 2;
                }
            },
            b'*' | b'~' | b'>' | b'%' | b'|' => match length(line) {
                Err(why) => break Some((start, why)),
                Ok(None) => {}
                Ok(Some(0)) if kind == b'|' => done = false,
                Ok(Some(0)) => {}
                Ok(Some(n)) => {
                    let per = if matches!(kind, b'%' | b'|') { 2 } else { 1 };
                    stack.push((n * per, kind == b'|'));
                    done = false;
                }
            },
            other => break Some((start, format!("bad type byte {other:#04x}"))),
        }
        if done {
            // One value ended: close every aggregate it completes.
            loop {
                let Some(top) = stack.last_mut() else {
                    ends.push(pos);
                    break;
                };
                top.0 -= 1;
                if top.0 > 0 {
                    break;
                }
                let (_, attribute) = stack.pop().expect("not empty");
                if attribute {
                    break;
                }
            }
        }
    };
    Replies { ends, error }
}

/// The line starting at `from` and the offset after its terminator; `None` if incomplete.
fn read_line(buf: &[u8], from: usize, rules: Rules) -> Result<Option<(&[u8], usize)>, String> {
    match rules {
        Rules::Lax => {
            // The scanner searches from the type byte, which may itself be the CR.
            let line = &buf[from - 1..];
            match line.iter().position(|&b| b == b'\r') {
                Some(i) if i + 1 < line.len() && line[i + 1] != b'\n' => {
                    Err("CR without LF".into())
                }
                Some(i) if i + 1 < line.len() => match i {
                    0 => Err("empty line".into()),
                    _ => Ok(Some((&line[1..i], from + i + 1))),
                },
                _ => Ok(None),
            }
        }
        Rules::Strict => {
            let rest = &buf[from.min(buf.len())..];
            for (i, &b) in rest.iter().enumerate() {
                match b {
                    b'\n' => return Err("LF inside a line".into()),
                    b'\r' => {
                        return match rest.get(i + 1) {
                            None => Ok(None),
                            Some(b'\n') => Ok(Some((&rest[..i], from + i + 2))),
                            Some(_) => Err("CR inside a line".into()),
                        }
                    }
                    _ => {}
                }
            }
            Ok(None)
        }
    }
}

/// A length field: `None` for `-1` (null), as the proxy's scanner reads it.
fn length(line: &[u8]) -> Result<Option<u64>, String> {
    match redis_entra_proxy::resp::request::string2ll(line) {
        Some(-1) => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        _ => Err(format!("bad length {:?}", String::from_utf8_lossy(line))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_replies() {
        let s = b"+OK\r\n*2\r\n$1\r\na\r\n:1\r\n|1\r\n+k\r\n+v\r\n_\r\n>3\r\n";
        let r = check_replies(s, Rules::Strict);
        assert_eq!(r.ends, vec![5, 20, 35]);
        assert_eq!(r.error, None);
        assert!(check_replies(b"-a\rb\r\n", Rules::Strict).error.is_some());
        assert!(check_replies(b"-a\rb\r\n", Rules::Lax).error.is_some());
        assert!(check_replies(b"\r\n", Rules::Lax).error.is_some());
    }
}
