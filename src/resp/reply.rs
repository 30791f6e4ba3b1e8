//! The upstream reply scanner: finds where each top-level reply ends in the server's byte
//! stream, RESP2 and RESP3 alike (RESP3 is a superset), without decoding or copying it.
//!
//! It is incremental and streaming: [`ReplyScanner::scan`] consumes what it can of the current
//! top-level frame and says whether the frame ended. Header lines are consumed whole; bulk
//! payloads may be consumed in pieces, so a 500 MiB `GET` reply can be relayed while it
//! arrives instead of being buffered. An attribute (`|`) is scanned as part of the reply that
//! follows it, as RESP3 requires.
//!
//! [`peek_head`] looks at the start of a frame without consuming it, so the session core can
//! decide what to do with a frame (relay, swallow, classify a pub/sub message) before the
//! frame has fully arrived.

use std::fmt;

use super::request::string2ll;

/// Longest first element [`peek_head`] waits for. Pub/sub kinds (`message`, `subscribe`…) and
/// `pong` are short; a longer first element is reported as [`First::Other`] at once.
const PEEK_MAX: usize = 32;

/// The server sent bytes that are not RESP. The connection cannot be trusted after that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    UnknownType(u8),
    BadLength,
    /// RESP3 streamed strings and aggregates (`$?`, `*?`): Redis never sends them.
    Streamed,
    /// A line ended by CR without LF: Redis never sends a bare CR in a line.
    BareCr,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::UnknownType(b) => write!(f, "unknown RESP type byte 0x{b:02x}"),
            ReplyError::BadLength => f.write_str("invalid length in RESP header"),
            ReplyError::Streamed => f.write_str("streamed RESP3 types are not supported"),
            ReplyError::BareCr => f.write_str("a line ends with CR but no LF"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// Progress of one [`ReplyScanner::scan`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes at the front of the buffer that belong to the current frame; the caller drops
    /// them from its buffer before the next call.
    pub consumed: usize,
    /// The current top-level frame ended with those bytes.
    pub complete: bool,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    /// Elements still expected.
    remaining: u64,
    /// An attribute map: when it ends, the value it annotates is still to come.
    attribute: bool,
}

/// Resumable scanner of one connection's reply stream.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    /// Aggregates opened and not yet complete, innermost last.
    stack: Vec<Open>,
    /// Payload bytes (trailing CRLF included) still to skip for the current bulk.
    bulk_left: usize,
}

impl ReplyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the scanner is between two top-level frames.
    pub fn at_boundary(&self) -> bool {
        self.stack.is_empty() && self.bulk_left == 0
    }

    /// Consumes as much of the current top-level frame as `buf` holds.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Scan, ReplyError> {
        let mut pos = 0;
        loop {
            if self.bulk_left > 0 {
                let take = self.bulk_left.min(buf.len() - pos);
                pos += take;
                self.bulk_left -= take;
                if self.bulk_left > 0 {
                    return Ok(Scan {
                        consumed: pos,
                        complete: false,
                    });
                }
                if self.value_done() {
                    return Ok(Scan {
                        consumed: pos,
                        complete: true,
                    });
                }
                continue;
            }
            let Some(line_end) = find_crlf(&buf[pos..]) else {
                return Ok(Scan {
                    consumed: pos,
                    complete: false,
                });
            };
            if buf[pos + line_end + 1] != b'\n' {
                // Everything downstream (translation, counting) reads lines to their LF.
                return Err(ReplyError::BareCr);
            }
            let kind = buf[pos];
            // Empty when the line starts with its CR: an unknown type byte, refused below.
            let line = buf.get(pos + 1..pos + line_end).unwrap_or_default();
            pos += line_end + 2;
            let finished = match kind {
                b'+' | b'-' | b':' | b',' | b'#' | b'_' | b'(' => self.value_done(),
                b'$' | b'=' | b'!' => match length(line)? {
                    None => self.value_done(),
                    Some(n) => {
                        self.bulk_left = n as usize + 2;
                        false
                    }
                },
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let per = if matches!(kind, b'%' | b'|') { 2 } else { 1 };
                    match length(line)? {
                        None => self.value_done(),
                        Some(0) if kind == b'|' => false,
                        Some(0) => self.value_done(),
                        Some(n) => {
                            let remaining = n.checked_mul(per).ok_or(ReplyError::BadLength)?;
                            self.stack.push(Open {
                                remaining,
                                attribute: kind == b'|',
                            });
                            false
                        }
                    }
                }
                other => return Err(ReplyError::UnknownType(other)),
            };
            if finished {
                return Ok(Scan {
                    consumed: pos,
                    complete: true,
                });
            }
        }
    }

    /// Records that one value ended; returns whether it closed the top-level frame.
    fn value_done(&mut self) -> bool {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return true;
            };
            top.remaining -= 1;
            if top.remaining > 0 {
                return false;
            }
            let open = self.stack.pop().expect("stack is not empty");
            if open.attribute {
                // The annotated value is still to come and counts in the attribute's place.
                return false;
            }
        }
    }
}

/// A length field: `None` for the RESP2 null (`-1`), `Some(n)` otherwise.
fn length(line: &[u8]) -> Result<Option<u64>, ReplyError> {
    if line == b"?" {
        return Err(ReplyError::Streamed);
    }
    match string2ll(line) {
        Some(-1) => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        _ => Err(ReplyError::BadLength),
    }
}

/// Offset of the first CRLF. Reply lines never contain a bare CR.
fn find_crlf(buf: &[u8]) -> Option<usize> {
    let cr = super::find(b'\r', buf)?;
    (cr + 1 < buf.len()).then_some(cr)
}

/// The start of a top-level frame, enough to decide what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    /// The type byte (`+`, `-`, `*`, `>`, …). For an attribute-prefixed frame, `|`.
    pub kind: u8,
    /// The rest of the first line: the text of a simple string or error, or a length.
    pub line: &'a [u8],
    /// For a non-empty array or push, its first element when it is a short string.
    pub first: First<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First<'a> {
    /// Not an aggregate, or an empty one.
    None,
    /// A simple or bulk string of at most 32 bytes.
    Str(&'a [u8]),
    /// Anything else (a number, a nested aggregate, a long or null string).
    Other,
}

/// Looks at the frame at the start of `buf`; `None` if more bytes are needed to tell.
pub fn peek_head(buf: &[u8]) -> Option<Head<'_>> {
    let end = find_crlf(buf)?;
    let kind = buf[0];
    // Empty when the line starts with its CR (not RESP: the scanner refuses it).
    let line = buf.get(1..end).unwrap_or_default();
    let mut head = Head {
        kind,
        line,
        first: First::None,
    };
    if !matches!(kind, b'*' | b'>') || matches!(string2ll(line), Some(n) if n <= 0) {
        return Some(head);
    }
    let rest = &buf[end + 2..];
    let first_end = find_crlf(rest)?;
    let first_line = rest.get(1..first_end).unwrap_or_default();
    head.first = match rest[0] {
        b'+' if first_line.len() <= PEEK_MAX => First::Str(first_line),
        b'$' => match string2ll(first_line) {
            Some(n) if (0..=PEEK_MAX as i64).contains(&n) => {
                let data = rest.get(first_end + 2..first_end + 2 + n as usize)?;
                First::Str(data)
            }
            _ => First::Other,
        },
        _ => First::Other,
    };
    Some(head)
}

#[cfg(test)]
mod tests;
