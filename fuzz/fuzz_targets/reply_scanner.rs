//! Fuzzes the upstream reply scanner (`ReplyScanner`) and `peek_head` on arbitrary bytes.
//!
//! Input: a chunking header (see `Chunks` in fuzz/src/lib.rs), then the server's bytes.
//!
//! Checks, for every input:
//! - no panic, and no call consumes more than it was given or stops short without cause;
//! - chunking does not matter: frame boundaries, the error (if any) and the leftover are the
//!   same fed in pieces as fed whole, both as the session core drives it (nothing of a frame
//!   is scanned before `peek_head` can tell what the frame is) and scanning eagerly;
//! - the head `peek_head` first reports for a frame while it trickles in is the head it
//!   reports with the whole input: the core decides what to do with a frame from it;
//! - the boundaries and the error agree with an independent whole-buffer reader
//!   (`check_replies` in fuzz/src/lib.rs, lax rules).
#![no_main]

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use redis_entra_proxy::resp::reply::{peek_head, First, Head, ReplyError, ReplyScanner};
use redis_entra_proxy_fuzz::{check_replies, Chunks, Rules};

/// An owned [`Head`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnedHead {
    kind: u8,
    line: Vec<u8>,
    first: Option<Option<Vec<u8>>>,
}

impl From<Head<'_>> for OwnedHead {
    fn from(h: Head<'_>) -> Self {
        OwnedHead {
            kind: h.kind,
            line: h.line.to_vec(),
            first: match h.first {
                First::None => None,
                First::Str(s) => Some(Some(s.to_vec())),
                First::Other => Some(None),
            },
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    /// Absolute offsets where top-level frames end.
    ends: Vec<usize>,
    /// The head peeked at the start of each frame (gated runs only).
    heads: Vec<OwnedHead>,
    /// The error, in the frame after the last of `ends`.
    error: Option<ReplyError>,
    /// Bytes fed but not consumed (without an error).
    pending: usize,
    at_boundary: bool,
}

/// Feeds `chunks` in order. With `gated`, as the session core does: a frame is scanned only
/// once `peek_head` returns its head.
fn run(chunks: &[&[u8]], gated: bool) -> Outcome {
    let mut scanner = ReplyScanner::new();
    let mut buf = BytesMut::new();
    let mut out = Outcome::default();
    let mut offset = 0; // absolute offset of buf[0]
    let mut head_known = false;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            if gated && !head_known {
                assert!(scanner.at_boundary());
                match peek_head(&buf) {
                    Some(head) => {
                        out.heads.push(head.into());
                        head_known = true;
                    }
                    None => break,
                }
            }
            let scan = match scanner.scan(&buf) {
                Ok(scan) => scan,
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            };
            assert!(
                scan.consumed <= buf.len(),
                "{scan:?} of {} bytes",
                buf.len()
            );
            buf.advance(scan.consumed);
            offset += scan.consumed;
            if scan.complete {
                assert!(scanner.at_boundary(), "complete but not at a boundary");
                out.ends.push(offset);
                head_known = false;
            } else if scan.consumed == 0 || buf.is_empty() {
                break;
            } else {
                // Header lines are consumed whole and payloads as far as they go: an
                // incomplete scan leaves at most a partial line.
                assert!(
                    !buf.windows(2).any(|w| w[0] == b'\r'),
                    "scan stopped before a complete line: {:?}",
                    String::from_utf8_lossy(&buf)
                );
                break;
            }
        }
    }
    out.pending = buf.len();
    out.at_boundary = scanner.at_boundary();
    out
}

fuzz_target!(|data: &[u8]| {
    let (chunking, payload) = Chunks::parse(data);
    let pieces = chunking.split(payload);
    for gated in [true, false] {
        let whole = run(&[payload], gated);
        let split = run(&pieces, gated);
        assert_eq!(
            whole, split,
            "chunking changed the outcome (gated: {gated})"
        );
    }
    let eager = run(&[payload], false);
    let oracle = check_replies(payload, Rules::Lax);
    assert_eq!(
        eager.ends, oracle.ends,
        "frame boundaries differ from the oracle"
    );
    assert_eq!(
        eager.error.is_some(),
        oracle.error.is_some(),
        "scanner {:?}, oracle {:?}",
        eager.error,
        oracle.error
    );
    // Every head peeked in a gated run names the frame's type byte.
    let gated = run(&[payload], true);
    let mut start = 0;
    for (head, end) in gated.heads.iter().zip(&gated.ends) {
        assert_eq!(head.kind, payload[start]);
        start = *end;
    }
});
