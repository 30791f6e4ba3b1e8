//! The client request parser: finds command boundaries in the client's byte stream exactly
//! as Redis does (`processMultibulkBuffer` and `processInlineBuffer` in Redis 7.0
//! `networking.c`), so that the proxy frames every command the same way the server will and
//! rejects with Redis's own error text whatever Redis would reject.
//!
//! It owns framing and the protocol-error texts. It does not interpret commands: the session
//! core reads the command name and arguments through [`Command`].
//!
//! The parser is resumable: when a frame is incomplete it remembers how far it got, so a huge
//! pipeline or a frame that trickles in byte by byte is scanned once, not once per read.
//! Multibulk arguments are returned as ranges into the caller's buffer (no copy); only inline
//! commands, which need unescaping, are copied.

use std::fmt;
use std::ops::Range;

use bytes::BufMut;

use super::inline::split_args;

/// Longest inline request or `*`/`$` header line Redis accepts (`PROTO_INLINE_MAX_SIZE`).
pub const INLINE_MAX: usize = 64 * 1024;
/// Largest bulk argument Redis accepts by default (`proto-max-bulk-len`, 512 MiB).
pub const BULK_MAX: i64 = 512 * 1024 * 1024;
/// Redis refuses multibulk counts above this before the client authenticated.
pub const UNAUTH_MULTIBULK_MAX: i64 = 10;
/// Redis refuses bulk lengths above this before the client authenticated.
pub const UNAUTH_BULK_MAX: i64 = 16 * 1024;
/// Argument ranges kept per command. The session core only ever looks at the first few
/// arguments (command name, subcommand, HELLO options), and keeping them all would make a
/// million-argument `MSET` cost memory proportional to its argument count.
pub const KEPT_ARGS: usize = 16;
/// A request with a bulk argument at least this long is passed on while it arrives
/// ([`RequestParser::big_bulk`], [`RequestParser::release`]) instead of being held whole: a
/// proxy that held a 100 MB `SET` would hold it twice, once as read and once on its way
/// upstream. Redis itself switches to reading big arguments directly at 32 KiB
/// (`PROTO_MBULK_BIG_ARG`); a request this large no longer fits in one read of the proxy's.
pub const STREAM_MIN: usize = 64 * 1024;

/// A request Redis would refuse with `-ERR Protocol error: …` and then close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    TooBigInline,
    UnbalancedQuotes,
    InvalidMultibulkLength,
    UnauthenticatedMultibulkLength,
    TooBigMbulkCount,
    ExpectedDollar(u8),
    InvalidBulkLength,
    UnauthenticatedBulkLength,
    TooBigBulkCount,
}

impl ProtocolError {
    /// A short stable label, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::TooBigInline => "too_big_inline",
            ProtocolError::UnbalancedQuotes => "unbalanced_quotes",
            ProtocolError::InvalidMultibulkLength => "invalid_multibulk_length",
            ProtocolError::UnauthenticatedMultibulkLength => "unauthenticated_multibulk_length",
            ProtocolError::TooBigMbulkCount => "too_big_mbulk_count",
            ProtocolError::ExpectedDollar(_) => "expected_dollar",
            ProtocolError::InvalidBulkLength => "invalid_bulk_length",
            ProtocolError::UnauthenticatedBulkLength => "unauthenticated_bulk_length",
            ProtocolError::TooBigBulkCount => "too_big_bulk_count",
        }
    }

    /// Appends the error reply Redis sends for this error.
    pub fn write_reply(&self, out: &mut impl BufMut) {
        out.put_slice(b"-ERR ");
        match self {
            // Redis formats the byte with `%c`, raw, except that error replies never carry a
            // CR or LF: `addReplyErrorFormat` turns them into spaces.
            ProtocolError::ExpectedDollar(b) => {
                out.put_slice(b"Protocol error: expected '$', got '");
                out.put_u8(if matches!(b, b'\r' | b'\n') { b' ' } else { *b });
                out.put_slice(b"'");
            }
            other => {
                out.put_slice(b"Protocol error: ");
                out.put_slice(other.reason().as_bytes());
            }
        }
        out.put_slice(b"\r\n");
    }

    fn reason(&self) -> &'static str {
        match self {
            ProtocolError::TooBigInline => "too big inline request",
            ProtocolError::UnbalancedQuotes => "unbalanced quotes in request",
            ProtocolError::InvalidMultibulkLength => "invalid multibulk length",
            ProtocolError::UnauthenticatedMultibulkLength => "unauthenticated multibulk length",
            ProtocolError::TooBigMbulkCount => "too big mbulk count string",
            ProtocolError::ExpectedDollar(_) => "expected '$'",
            ProtocolError::InvalidBulkLength => "invalid bulk length",
            ProtocolError::UnauthenticatedBulkLength => "unauthenticated bulk length",
            ProtocolError::TooBigBulkCount => "too big bulk count string",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::ExpectedDollar(b) => {
                write!(f, "Protocol error: expected '$', got {:?}", char::from(*b))
            }
            other => write!(f, "Protocol error: {}", other.reason()),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// What the client sent, occupying the first `len` bytes of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A multibulk command whose bytes can be forwarded as they are.
    Multibulk { len: usize, argc: usize },
    /// An inline command; its unescaped arguments are held by the parser and it must be
    /// re-encoded as multibulk before forwarding.
    Inline { len: usize, argc: usize },
    /// Bytes that Redis consumes without replying: `*0`, `*-1`, or a blank inline line.
    Empty { len: usize },
}

impl Frame {
    pub fn len(&self) -> usize {
        match *self {
            Frame::Multibulk { len, .. } | Frame::Inline { len, .. } | Frame::Empty { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Frame::Empty { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing of the next frame examined yet.
    Start,
    /// Inside a multibulk frame: `remaining` arguments left, `bulk` the length of the one
    /// being read once its `$` header has been parsed.
    Multibulk {
        remaining: usize,
        bulk: Option<usize>,
    },
}

/// Resumable request framer. One per client connection.
#[derive(Debug)]
pub struct RequestParser {
    state: State,
    /// Bytes of the current frame already consumed.
    pos: usize,
    /// Where to resume searching for a line terminator (avoids rescanning a long line).
    scan_from: usize,
    argc: usize,
    /// Ranges of the first [`KEPT_ARGS`] arguments, relative to the frame start.
    ranges: Vec<Range<usize>>,
    /// Unescaped arguments of the last inline command, concatenated; `ranges` index it.
    inline: Vec<u8>,
    /// Whether Redis's stricter limits for unauthenticated clients apply.
    auth_required: bool,
    /// Bytes of the current frame were released ([`release`](Self::release)): the ranges of
    /// its arguments are gone, and no more are kept.
    released: bool,
}

impl Default for RequestParser {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestParser {
    pub fn new() -> Self {
        RequestParser {
            state: State::Start,
            pos: 0,
            scan_from: 0,
            argc: 0,
            // Empty vectors allocate nothing: the session core lends the parser out per
            // command by swapping in a fresh one.
            ranges: Vec::new(),
            inline: Vec::new(),
            auth_required: false,
            released: false,
        }
    }

    /// Releases the capacity of the argument buffers (an idle connection).
    pub fn shrink(&mut self) {
        if self.state == State::Start {
            self.ranges = Vec::new();
            self.inline = Vec::new();
        }
    }

    /// No request begun: the next byte parsed starts one.
    pub fn at_start(&self) -> bool {
        self.state == State::Start
    }

    /// Apply Redis's limits for clients that still have to authenticate (at most 10
    /// arguments, bulks of at most 16 KiB).
    pub fn set_auth_required(&mut self, required: bool) {
        self.auth_required = required;
    }

    /// Finds the next frame at the start of `buf`. `Ok(None)` means more bytes are needed; call
    /// again with the same buffer plus whatever arrived (the parser resumes where it stopped).
    /// After a frame is returned, the caller must drop its `len` bytes from the front of the
    /// buffer before the next call.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        if self.state == State::Start {
            let Some(&first) = buf.first() else {
                return Ok(None);
            };
            if first != b'*' {
                return self.parse_inline(buf);
            }
            // Redis looks for `\r` and skips two bytes after it, whatever the second is.
            let Some(cr) = self.find_line_end(buf, 0, b'\r') else {
                if buf.len() > INLINE_MAX {
                    return Err(ProtocolError::TooBigMbulkCount);
                }
                return Ok(None);
            };
            if cr + 2 > buf.len() {
                return Ok(None);
            }
            let count = match string2ll(&buf[1..cr]) {
                Some(n) if n <= i64::from(i32::MAX) => n,
                _ => return Err(ProtocolError::InvalidMultibulkLength),
            };
            if count > UNAUTH_MULTIBULK_MAX && self.auth_required {
                return Err(ProtocolError::UnauthenticatedMultibulkLength);
            }
            if count <= 0 {
                return Ok(Some(self.finish(Frame::Empty { len: cr + 2 })));
            }
            self.pos = cr + 2;
            self.scan_from = self.pos;
            self.argc = count as usize;
            self.ranges.clear();
            self.state = State::Multibulk {
                remaining: count as usize,
                bulk: None,
            };
        }
        self.parse_multibulk(buf)
    }

    /// The state lives in locals while the frame is read and goes back into `self` only when
    /// the bytes run out (the common case, a whole frame in `buf`, writes it once).
    fn parse_multibulk(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        let State::Multibulk {
            mut remaining,
            mut bulk,
        } = self.state
        else {
            return Ok(None);
        };
        let mut pos = self.pos;
        loop {
            let len = match bulk {
                Some(len) => len,
                None => {
                    self.pos = pos;
                    let Some(cr) = self.find_line_end(buf, pos, b'\r') else {
                        if buf.len() - pos > INLINE_MAX {
                            return Err(ProtocolError::TooBigBulkCount);
                        }
                        self.state = State::Multibulk { remaining, bulk };
                        return Ok(None);
                    };
                    if cr + 2 > buf.len() {
                        self.state = State::Multibulk { remaining, bulk };
                        return Ok(None);
                    }
                    if buf[pos] != b'$' {
                        return Err(ProtocolError::ExpectedDollar(buf[pos]));
                    }
                    let len = match string2ll(&buf[pos + 1..cr]) {
                        Some(n) if (0..=BULK_MAX).contains(&n) => n as usize,
                        _ => return Err(ProtocolError::InvalidBulkLength),
                    };
                    if len as i64 > UNAUTH_BULK_MAX && self.auth_required {
                        return Err(ProtocolError::UnauthenticatedBulkLength);
                    }
                    pos = cr + 2;
                    bulk = Some(len);
                    len
                }
            };
            // Redis skips the two bytes after the payload without looking at them; so must
            // we, or the two framings could disagree.
            if buf.len() - pos < len + 2 {
                self.pos = pos;
                self.state = State::Multibulk { remaining, bulk };
                return Ok(None);
            }
            if self.ranges.len() < KEPT_ARGS && !self.released {
                self.ranges.push(pos..pos + len);
            }
            pos += len + 2;
            self.scan_from = pos;
            if remaining == 1 {
                self.pos = pos;
                let frame = Frame::Multibulk {
                    len: pos,
                    argc: self.argc,
                };
                return Ok(Some(self.finish(frame)));
            }
            remaining -= 1;
            bulk = None;
        }
    }

    #[inline(never)]
    fn parse_inline(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        let Some(nl) = self.find_line_end(buf, 0, b'\n') else {
            if buf.len() > INLINE_MAX {
                return Err(ProtocolError::TooBigInline);
            }
            return Ok(None);
        };
        let end = if nl > 0 && buf[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        self.ranges.clear();
        self.inline.clear();
        let argc = split_args(&buf[..end], &mut self.inline, &mut self.ranges)
            .ok_or(ProtocolError::UnbalancedQuotes)?;
        let len = nl + 1;
        if argc == 0 {
            return Ok(Some(self.finish(Frame::Empty { len })));
        }
        self.argc = argc;
        Ok(Some(self.finish(Frame::Inline { len, argc })))
    }

    /// Redis searches with `strchr`, which also stops at a NUL byte: a NUL before the
    /// terminator means "not found yet", and Redis keeps waiting (up to the size limit).
    fn find_line_end(&mut self, buf: &[u8], start: usize, terminator: u8) -> Option<usize> {
        let from = self.scan_from.max(start);
        match super::find2(terminator, 0, &buf[from..]) {
            Some(i) if buf[from + i] == terminator => Some(from + i),
            Some(i) => {
                self.scan_from = from + i;
                None
            }
            None => {
                self.scan_from = buf.len();
                None
            }
        }
    }

    fn finish(&mut self, frame: Frame) -> Frame {
        self.state = State::Start;
        self.pos = 0;
        self.scan_from = 0;
        self.released = false;
        frame
    }

    /// Inside a multibulk request, waiting for the payload of a bulk argument of at least
    /// [`STREAM_MIN`] bytes: the request may be passed on while it arrives.
    pub fn big_bulk(&self) -> bool {
        matches!(self.state, State::Multibulk { bulk: Some(len), .. } if len >= STREAM_MIN)
    }

    /// Of the incomplete request at the front of a buffer of `buf_len` bytes, how many the
    /// parser has accepted for good: every header line parsed, and the payload bytes of the
    /// bulk being read that have arrived (not the two bytes after a payload, which Redis
    /// skips unseen and which stay for [`parse`](Self::parse) to skip likewise). 0 between
    /// requests.
    pub fn settled(&self, buf_len: usize) -> usize {
        match self.state {
            State::Start => 0,
            State::Multibulk { bulk: None, .. } => self.pos,
            State::Multibulk {
                bulk: Some(len), ..
            } => buf_len.min(self.pos + len),
        }
    }

    /// The caller passed on the first `n` bytes of the request being read ([`settled`]
    /// ones) and removed them from its buffer; parsing resumes on what follows. The ranges
    /// of the request's arguments are dropped: only the completion of the request remains to
    /// be found, and the [`Frame`] then returned covers the bytes after the released ones.
    ///
    /// [`settled`]: Self::settled
    pub fn release(&mut self, n: usize) {
        debug_assert!(n <= self.settled(usize::MAX), "released bytes not settled");
        if n > self.pos {
            if let State::Multibulk {
                bulk: Some(len), ..
            } = &mut self.state
            {
                *len -= n - self.pos;
            }
            self.pos = 0;
        } else {
            self.pos -= n;
        }
        self.scan_from = self.scan_from.saturating_sub(n);
        self.ranges.clear();
        self.released = true;
    }

    /// The arguments of the incomplete request being read, as far as they have arrived whole
    /// (the command name first, once it has); `buf` must hold the request from its start.
    pub fn partial_command<'a>(&'a self, buf: &'a [u8]) -> Command<'a> {
        Command {
            argc: self.argc,
            src: buf,
            // Empty once bytes were released: `release` clears them and none are kept after.
            ranges: &self.ranges,
        }
    }

    /// The arguments of the frame just returned by [`parse`](Self::parse); `buf` must be the
    /// same buffer, not yet advanced.
    pub fn command<'a>(&'a self, buf: &'a [u8], frame: &Frame) -> Command<'a> {
        match *frame {
            Frame::Multibulk { argc, .. } => Command {
                argc,
                src: buf,
                ranges: &self.ranges,
            },
            Frame::Inline { argc, .. } => Command {
                argc,
                src: &self.inline,
                ranges: &self.ranges,
            },
            Frame::Empty { .. } => Command {
                argc: 0,
                src: buf,
                ranges: &[],
            },
        }
    }
}

/// A parsed command's arguments, borrowed from the client buffer or the parser.
#[derive(Clone, Copy)]
pub struct Command<'a> {
    argc: usize,
    src: &'a [u8],
    ranges: &'a [Range<usize>],
}

impl<'a> Command<'a> {
    /// Number of arguments including the command name.
    pub fn argc(&self) -> usize {
        self.argc
    }

    /// Argument `i` (0 is the command name), if it is among the first [`KEPT_ARGS`].
    pub fn arg(&self, i: usize) -> Option<&'a [u8]> {
        self.ranges.get(i).map(|r| &self.src[r.clone()])
    }

    /// Whether argument `i` equals `name`, ignoring ASCII case.
    pub fn arg_is(&self, i: usize, name: &str) -> bool {
        self.arg(i)
            .is_some_and(|a| a.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Whether every argument is available through [`arg`](Self::arg).
    pub fn complete(&self) -> bool {
        self.ranges.len() == self.argc
    }

    pub fn args(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let src = self.src;
        self.ranges.iter().map(move |r| &src[r.clone()])
    }
}

impl fmt::Debug for Command<'_> {
    // Arguments may be passwords: only the command name is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("name", &self.arg(0).map(String::from_utf8_lossy))
            .field("argc", &self.argc)
            .finish_non_exhaustive()
    }
}

/// All arguments of a multibulk frame already accepted by [`RequestParser::parse`].
pub fn frame_args(frame: &[u8]) -> Vec<&[u8]> {
    let mut args = Vec::new();
    let mut pos = match memchr::memchr(b'\r', frame) {
        Some(cr) => cr + 2,
        None => return args,
    };
    while pos < frame.len() {
        let Some(cr) = memchr::memchr(b'\r', &frame[pos..]).map(|i| pos + i) else {
            break;
        };
        let Some(len) = string2ll(&frame[pos + 1..cr]).and_then(|n| usize::try_from(n).ok()) else {
            break;
        };
        let start = cr + 2;
        let Some(arg) = frame.get(start..start + len) else {
            break;
        };
        args.push(arg);
        pos = start + len + 2;
    }
    args
}

/// Redis's `string2ll`: optional `-`, no `+`, no leading zeros, no spaces, at most 20 chars.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

#[cfg(test)]
mod tests;
