//! Fuzzes the client request parser (`RequestParser`) on arbitrary bytes.
//!
//! Input: a chunking header (see `Chunks` in fuzz/src/lib.rs), then the client's bytes.
//! Header flag bit 0 turns on Redis's limits for unauthenticated clients; flag bits 1–3, when
//! not all zero, pad the payload with a run of about 64 KiB of one byte (the next payload byte,
//! at an offset given by the one after) so that the 64 KiB line limits are reached.
//!
//! Checks, for every input:
//! - no panic, and no frame longer than the bytes buffered;
//! - chunking does not matter: the frames (kind, length, argument count, kept arguments) and
//!   the final error or leftover are the same fed in pieces as fed whole. The one allowed
//!   difference is Redis's own: a "too big" error when a line's end has not arrived yet
//!   while more than 64 KiB is buffered, where the whole feed found the line end;
//! - the kept arguments of a multibulk frame are the ones `frame_args` reads from its bytes;
//! - an inline command re-encoded as multibulk (what the session core forwards) parses back
//!   to one multibulk frame with the same arguments;
//! - memory: what the parser itself keeps allocated stays below a bound set by the longest
//!   line it can see (at most 64 KiB), never by the size of bulk payloads or of the input.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use redis_entra_proxy::resp::encode;
use redis_entra_proxy::resp::request::{
    frame_args, Frame, ProtocolError, RequestParser, INLINE_MAX, KEPT_ARGS,
};
use redis_entra_proxy_fuzz::Chunks;

/// Counts the bytes live on the heap, to measure what the parser keeps between calls.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One step of the parser's output.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Frame {
        frame: Frame,
        args: Vec<Vec<u8>>,
    },
    Error(ProtocolError),
    /// Bytes left over, waiting for more.
    Pending(usize),
}

fn too_big(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::TooBigInline
            | ProtocolError::TooBigMbulkCount
            | ProtocolError::TooBigBulkCount
    )
}

/// Feeds `chunks` in order as the session core does (append, parse until more is needed,
/// drop each frame's bytes) and records every frame and the end.
fn run(chunks: &[&[u8]], auth_required: bool) -> Vec<Item> {
    let mut parser = RequestParser::new();
    parser.set_auth_required(auth_required);
    // BytesMut, as the session core uses: dropping a frame from the front is O(1).
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    // Bytes the parser keeps allocated (its argument buffers), measured around each call.
    let mut kept: isize = 0;
    let mut longest_line = 0usize;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = LIVE.load(Ordering::Relaxed) as isize;
            let result = parser.parse(&buf);
            kept += LIVE.load(Ordering::Relaxed) as isize - before;
            // A line cannot be longer than what is buffered, and the parser gives up on
            // lines past INLINE_MAX (a frame longer than that is made of bulk payloads).
            longest_line = longest_line.max(buf.len().min(INLINE_MAX + 2));
            let bound = (40 * longest_line + 4096) as isize;
            assert!(
                kept <= bound,
                "parser keeps {kept} bytes, more than {bound} for lines of up to {longest_line}"
            );
            match result {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= buf.len() && frame.len() > 0, "{frame:?}");
                    items.push(Item::Frame {
                        frame,
                        args: check_frame(&parser, &buf, &frame),
                    });
                    buf.advance(frame.len());
                }
                Ok(None) => break,
                Err(e) => {
                    items.push(Item::Error(e));
                    return items;
                }
            }
        }
        // The session core shrinks an idle parser; it must stay usable.
        let before = LIVE.load(Ordering::Relaxed) as isize;
        parser.shrink();
        kept += LIVE.load(Ordering::Relaxed) as isize - before;
    }
    items.push(Item::Pending(buf.len()));
    items
}

/// Checks a frame's arguments against an independent reading; returns the kept ones.
fn check_frame(parser: &RequestParser, buf: &[u8], frame: &Frame) -> Vec<Vec<u8>> {
    let cmd = parser.command(buf, frame);
    let args: Vec<Vec<u8>> = cmd.args().map(<[u8]>::to_vec).collect();
    match *frame {
        Frame::Multibulk { len, argc } => {
            assert!(argc > 0);
            assert_eq!(args.len(), argc.min(KEPT_ARGS));
            assert_eq!(cmd.complete(), argc <= KEPT_ARGS);
            let all = frame_args(&buf[..len]);
            assert_eq!(
                all.len(),
                argc,
                "frame_args disagrees on the argument count"
            );
            for (i, a) in args.iter().enumerate() {
                assert_eq!(all[i], &a[..], "frame_args disagrees on argument {i}");
            }
        }
        Frame::Inline { argc, .. } => {
            assert_eq!(args.len(), argc);
            assert!(cmd.complete());
            // The core forwards an inline command re-encoded; it must frame back the same.
            let mut encoded = Vec::new();
            encode::command(
                &mut encoded,
                args.iter()
                    .map(Vec::as_slice)
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            let mut again = RequestParser::new();
            let f = again
                .parse(&encoded)
                .expect("re-encoded inline command parses");
            let Some(f @ Frame::Multibulk { len, argc: n }) = f else {
                panic!("re-encoded inline command framed as {f:?}");
            };
            assert_eq!((len, n), (encoded.len(), argc));
            let back: Vec<&[u8]> = again.command(&encoded, &f).args().collect();
            let kept: Vec<&[u8]> = args.iter().take(KEPT_ARGS).map(Vec::as_slice).collect();
            assert_eq!(back, kept);
        }
        Frame::Empty { .. } => assert!(args.is_empty()),
    }
    args
}

fuzz_target!(|data: &[u8]| {
    let (mut chunking, payload) = Chunks::parse(data);
    let auth_required = chunking.flags & 1 != 0;
    let pad = chunking.flags >> 1;
    let padded;
    let payload = if pad != 0 && payload.len() >= 2 {
        // About INLINE_MAX bytes of one byte, straddling the limit depending on `pad`.
        let (fill, at, rest) = (payload[0], usize::from(payload[1]), &payload[2..]);
        let at = at.min(rest.len());
        let n = INLINE_MAX - 32 + 8 * usize::from(pad);
        let mut v = Vec::with_capacity(rest.len() + n);
        v.extend_from_slice(&rest[..at]);
        v.resize(at + n, fill);
        v.extend_from_slice(&rest[at..]);
        padded = v;
        chunking.scale(1024);
        &padded[..]
    } else {
        payload
    };

    let whole = run(&[payload], auth_required);
    let pieces = run(&chunking.split(payload), auth_required);
    for (i, (w, p)) in whole.iter().zip(&pieces).enumerate() {
        if w == p {
            continue;
        }
        // Like Redis, a line whose end has not arrived is refused once 64 KiB are buffered.
        assert!(
            matches!(p, Item::Error(e) if too_big(e)),
            "item {i} differs with chunking: whole {w:?}, in pieces {p:?}"
        );
        return;
    }
    assert_eq!(
        whole.len(),
        pieces.len(),
        "whole {whole:?}, in pieces {pieces:?}"
    );
});
