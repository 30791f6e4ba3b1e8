//! Scanner cases: every RESP2/RESP3 type, nesting, attributes, and every split point.

use super::*;

/// Splits `input` into top-level frames, feeding it in chunks of `chunk` bytes.
fn frames(input: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, ReplyError> {
    let mut s = ReplyScanner::new();
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let scan = s.scan(&buf)?;
            cur.extend(buf.drain(..scan.consumed));
            if scan.complete {
                out.push(std::mem::take(&mut cur));
            } else {
                break;
            }
        }
    }
    assert!(
        buf.len() < 3 && cur.is_empty() || !s.at_boundary(),
        "leftover"
    );
    Ok(out)
}

const STREAM: &[&[u8]] = &[
    b"+OK\r\n",
    b"-ERR wrong\r\n",
    b":-12\r\n",
    b"$5\r\nhe\r\no\r\n",
    b"$-1\r\n",
    b"$0\r\n\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"*2\r\n$3\r\nfoo\r\n*2\r\n:1\r\n*0\r\n",
    b"_\r\n",
    b",3.14\r\n",
    b"#t\r\n",
    b"(12345678901234567890\r\n",
    b"=8\r\ntxt:abcd\r\n",
    b"!3\r\nerr\r\n",
    b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n%0\r\n",
    b"~2\r\n+x\r\n+y\r\n",
    b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nmsg\r\n",
    b"|1\r\n+ttl\r\n:3600\r\n$3\r\nval\r\n",
    b"*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n",
    b"|0\r\n+OK\r\n",
];

#[test]
fn splits_every_type_at_every_chunk_size() {
    let input: Vec<u8> = STREAM.concat();
    for chunk in 1..=input.len() {
        let got = frames(&input, chunk).expect("valid stream");
        let want: Vec<Vec<u8>> = STREAM.iter().map(|f| f.to_vec()).collect();
        assert_eq!(got, want, "chunk size {chunk}");
    }
}

#[test]
fn streams_large_bulk_without_waiting_for_all_of_it() {
    let mut s = ReplyScanner::new();
    assert_eq!(
        s.scan(b"$10\r\nabc").unwrap(),
        Scan {
            consumed: 8,
            complete: false
        }
    );
    assert_eq!(
        s.scan(b"defg").unwrap(),
        Scan {
            consumed: 4,
            complete: false
        }
    );
    assert_eq!(
        s.scan(b"hij\r\n+OK").unwrap(),
        Scan {
            consumed: 5,
            complete: true
        }
    );
    assert!(s.at_boundary());
}

#[test]
fn rejects_garbage() {
    for (input, want) in [
        (&b"?x\r\n"[..], ReplyError::UnknownType(b'?')),
        (b"$x\r\n", ReplyError::BadLength),
        (b"*-2\r\n", ReplyError::BadLength),
        (b"$?\r\n", ReplyError::Streamed),
    ] {
        assert_eq!(ReplyScanner::new().scan(input), Err(want), "{input:?}");
    }
}

#[test]
fn peeks_heads() {
    type Want = Option<(u8, &'static [u8], First<'static>)>;
    let cases: &[(&[u8], Want)] = &[
        (b"+OK\r\n", Some((b'+', b"OK", First::None))),
        (b"+OK\r", None),
        (b"-NOAUTH x\r\n", Some((b'-', b"NOAUTH x", First::None))),
        (
            b"*3\r\n$7\r\nmessage\r\n$1\r\na",
            Some((b'*', b"3", First::Str(b"message"))),
        ),
        (b"*3\r\n$7\r\nmess", None),
        (b"*3\r\n$7\r\n", None),
        (b">2\r\n+pong\r\n", Some((b'>', b"2", First::Str(b"pong")))),
        (b"*2\r\n:1\r\n", Some((b'*', b"2", First::Other))),
        (b"*2\r\n$100\r\n", Some((b'*', b"2", First::Other))),
        (b"*0\r\n", Some((b'*', b"0", First::None))),
        (b"*-1\r\n", Some((b'*', b"-1", First::None))),
        (b"%1\r\n+a\r\n", Some((b'%', b"1", First::None))),
    ];
    for (input, want) in cases {
        let got = peek_head(input).map(|h| (h.kind, h.line, h.first));
        assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(input));
    }
}
