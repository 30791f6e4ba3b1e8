//! Framing and error cases of the request parser, each checked against what Redis 7.0 does.

use super::*;

fn parse_all(input: &[u8]) -> (Vec<Vec<Vec<u8>>>, Option<ProtocolError>) {
    let mut p = RequestParser::new();
    let mut buf = input.to_vec();
    let mut out = Vec::new();
    loop {
        match p.parse(&buf) {
            Ok(Some(frame)) => {
                let cmd = p.command(&buf, &frame);
                if !frame.is_empty() {
                    out.push(cmd.args().map(<[u8]>::to_vec).collect());
                }
                buf.drain(..frame.len());
            }
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn reply(e: ProtocolError) -> String {
    let mut v = Vec::new();
    e.write_reply(&mut v);
    String::from_utf8_lossy(&v).into_owned()
}

#[test]
fn frames_multibulk_and_inline() {
    let (cmds, err) =
        parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\nset a \"b c\"\n*0\r\n*-1\r\n\r\n   \r\n*1\r\n$4\r\nPING\r\n");
    assert_eq!(err, None);
    let want: Vec<Vec<&[u8]>> = vec![
        vec![b"GET", b"k"],
        vec![b"PING"],
        vec![b"set", b"a", b"b c"],
        vec![b"PING"],
    ];
    assert_eq!(cmds, want);
}

#[test]
fn resumes_across_every_split_point() {
    let input = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nva\r\nl\r\nINFO server\r\n";
    for cut in 0..input.len() {
        let mut p = RequestParser::new();
        let mut buf = input[..cut].to_vec();
        let mut got = Vec::new();
        for chunk in [&input[cut..], &b""[..]] {
            while let Some(frame) = p.parse(&buf).expect("valid input") {
                got.push(
                    p.command(&buf, &frame)
                        .args()
                        .map(<[u8]>::to_vec)
                        .collect::<Vec<_>>(),
                );
                buf.drain(..frame.len());
            }
            buf.extend_from_slice(chunk);
        }
        assert_eq!(got.len(), 2, "cut at {cut}");
        assert_eq!(got[0][2], b"va\r\nl", "cut at {cut}");
        assert_eq!(got[1], vec![b"INFO".to_vec(), b"server".to_vec()]);
    }
}

#[test]
fn protocol_errors_have_redis_texts() {
    let big = vec![b'a'; INLINE_MAX + 1];
    let mut big_mbulk = b"*".to_vec();
    big_mbulk.extend(vec![b'1'; INLINE_MAX + 1]);
    let mut big_bulk = b"*1\r\n$".to_vec();
    big_bulk.extend(vec![b'1'; INLINE_MAX + 1]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "inline too big",
            big,
            "-ERR Protocol error: too big inline request\r\n",
        ),
        (
            "quotes",
            b"set k \"v\r\n".to_vec(),
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
        (
            "mbulk not a number",
            b"*x\r\n".to_vec(),
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            "mbulk leading zero",
            b"*01\r\n".to_vec(),
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            "mbulk over int max",
            b"*2147483648\r\n".to_vec(),
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            "mbulk header too long",
            big_mbulk,
            "-ERR Protocol error: too big mbulk count string\r\n",
        ),
        (
            "expected dollar",
            b"*1\r\n:1\r\n".to_vec(),
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            "negative bulk",
            b"*1\r\n$-1\r\n".to_vec(),
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            "bulk over 512MiB",
            b"*1\r\n$536870913\r\n".to_vec(),
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            "bulk header too long",
            big_bulk,
            "-ERR Protocol error: too big bulk count string\r\n",
        ),
    ];
    for (name, input, want) in cases {
        let (_, err) = parse_all(&input);
        let err = err.unwrap_or_else(|| panic!("{name}: no error"));
        assert_eq!(reply(err), want, "{name}");
    }
}

#[test]
fn accepts_limits_exactly() {
    assert_eq!(parse_all(b"*2147483647\r\n").1, None);
    assert_eq!(parse_all(b"*1\r\n$536870912\r\n").1, None);
    let mut line = vec![b'a'; INLINE_MAX];
    assert_eq!(
        parse_all(&line).1,
        None,
        "exactly 64 KiB without newline is still waiting"
    );
    line.push(b'\n');
    assert_eq!(parse_all(&line).0.len(), 1);
}

#[test]
fn unauthenticated_limits() {
    let mut p = RequestParser::new();
    p.set_auth_required(true);
    assert_eq!(
        p.parse(b"*11\r\n"),
        Err(ProtocolError::UnauthenticatedMultibulkLength)
    );
    let mut p = RequestParser::new();
    p.set_auth_required(true);
    assert_eq!(
        p.parse(b"*1\r\n$16385\r\n"),
        Err(ProtocolError::UnauthenticatedBulkLength)
    );
    let mut p = RequestParser::new();
    p.set_auth_required(true);
    assert_eq!(p.parse(b"*10\r\n$16384\r\n"), Ok(None));
}

#[test]
fn skips_bytes_after_bulk_like_redis() {
    // Redis does not check the two bytes after a bulk payload.
    let (cmds, err) = parse_all(b"*1\r\n$4\r\nPINGxx*1\r\n$4\r\nPING\r\n");
    assert_eq!(err, None);
    assert_eq!(cmds.len(), 2);
}

#[test]
fn nul_before_terminator_waits() {
    assert_eq!(parse_all(b"PI\0NG\r\n"), (vec![], None));
    assert_eq!(parse_all(b"*1\0\r\n"), (vec![], None));
}

#[test]
fn keeps_only_first_args() {
    let mut input = format!("*{}\r\n", KEPT_ARGS + 4).into_bytes();
    for i in 0..KEPT_ARGS + 4 {
        input.extend(format!("$1\r\n{}\r\n", i % 10).bytes());
    }
    let mut p = RequestParser::new();
    let frame = p.parse(&input).unwrap().unwrap();
    let cmd = p.command(&input, &frame);
    assert_eq!(cmd.argc(), KEPT_ARGS + 4);
    assert!(!cmd.complete());
    assert_eq!(cmd.arg(KEPT_ARGS), None);
    assert_eq!(frame.len(), input.len());
}

#[test]
fn string2ll_matches_redis() {
    for (s, want) in [
        ("0", Some(0)),
        ("-1", Some(-1)),
        ("12", Some(12)),
        ("9223372036854775807", Some(i64::MAX)),
        ("-9223372036854775808", Some(i64::MIN)),
        ("9223372036854775808", None),
        ("", None),
        ("-", None),
        ("-0", None),
        ("01", None),
        ("+1", None),
        (" 1", None),
        ("1 ", None),
    ] {
        assert_eq!(string2ll(s.as_bytes()), want, "{s:?}");
    }
}

/// Feeds `input` in reads of `chunk` bytes, releasing every settled byte of a request once
/// its big argument is being read (what the session core does); returns the bytes released
/// and returned as frames, in order, and the error, if any.
fn parse_releasing(input: &[u8], chunk: usize) -> (Vec<u8>, Option<ProtocolError>) {
    let mut p = RequestParser::new();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut streaming = false;
    for part in input.chunks(chunk) {
        buf.extend_from_slice(part);
        loop {
            match p.parse(&buf) {
                Ok(Some(frame)) => {
                    out.extend(buf.drain(..frame.len()));
                    streaming = false;
                }
                Ok(None) => {
                    streaming |= p.big_bulk();
                    if streaming {
                        let n = p.settled(buf.len());
                        out.extend(buf.drain(..n));
                        p.release(n);
                    }
                    break;
                }
                Err(e) => return (out, Some(e)),
            }
        }
    }
    assert!(p.at_start() && buf.is_empty(), "input left over");
    (out, None)
}

/// Released in pieces, a request with big arguments still ends where Redis ends it (the two
/// bytes after a payload skipped unseen, whatever they are), and a bad header after a big
/// argument is still the error Redis gives.
#[test]
fn a_released_request_ends_and_fails_where_redis_does() {
    let big = vec![b'v'; STREAM_MIN + 3];
    let mut input = Vec::new();
    input.extend_from_slice(format!("*5\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n", big.len()).as_bytes());
    input.extend_from_slice(&big);
    input.extend_from_slice(b"xy$2\r\nEX\r\n$");
    input.extend_from_slice(format!("{}\r\n", big.len()).as_bytes());
    input.extend_from_slice(&big);
    input.extend_from_slice(b"\r\n*1\r\n$4\r\nPING\r\n");
    for chunk in [1, 2, 3, 1000, 4096, 65_536, input.len()] {
        let (out, err) = parse_releasing(&input, chunk);
        assert_eq!(err, None, "chunk {chunk}");
        assert!(out == input, "chunk {chunk}: bytes differ");
    }
    let mut bad = format!("*4\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n", big.len()).into_bytes();
    bad.extend_from_slice(&big);
    bad.extend_from_slice(b"\r\n$x\r\n");
    let bad_header = bad.len() - 4;
    for chunk in [1, 4096, bad.len()] {
        let (out, err) = parse_releasing(&bad, chunk);
        assert_eq!(err, Some(ProtocolError::InvalidBulkLength), "chunk {chunk}");
        assert!(
            out.len() <= bad_header,
            "chunk {chunk}: the bad header was released"
        );
    }
}
