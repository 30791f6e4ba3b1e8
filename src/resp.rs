//! RESP framing: the client request parser (Redis-exact, inline included) and the upstream
//! reply scanner (RESP2 and RESP3), plus the few encoders the proxy needs.
pub mod encode;
mod inline;
pub mod reply;
pub mod request;
pub mod value;

/// Bytes searched one at a time before handing the rest of a line to `memchr`. RESP header
/// lines (`*3`, `$5`, `+OK`, `:12`) are a few bytes long, where a plain loop finds the end
/// before `memchr`'s vector set-up would have; long lines (inline commands, error texts) still
/// get the vector search past this prefix.
const SHORT_LINE: usize = 16;

/// Position of the first `a` or `b` in `buf`.
#[inline]
pub(crate) fn find2(a: u8, b: u8, buf: &[u8]) -> Option<usize> {
    let head = buf.len().min(SHORT_LINE);
    match buf[..head].iter().position(|&c| c == a || c == b) {
        Some(i) => Some(i),
        None => memchr::memchr2(a, b, &buf[head..]).map(|i| head + i),
    }
}

/// Position of the first `a` in `buf`.
#[inline]
pub(crate) fn find(a: u8, buf: &[u8]) -> Option<usize> {
    let head = buf.len().min(SHORT_LINE);
    match buf[..head].iter().position(|&c| c == a) {
        Some(i) => Some(i),
        None => memchr::memchr(a, &buf[head..]).map(|i| head + i),
    }
}

#[cfg(test)]
mod search_tests {
    use super::{find, find2};

    #[test]
    fn finds_the_first_match_before_and_after_the_short_prefix() {
        for len in [0, 1, 15, 16, 17, 40, 200] {
            for at in 0..len {
                let mut buf = vec![b'x'; len];
                buf[at] = b'\r';
                if at + 1 < len {
                    buf[at + 1] = b'\r';
                }
                assert_eq!(find(b'\r', &buf), Some(at), "len {len} at {at}");
                assert_eq!(find2(b'\r', 0, &buf), Some(at), "len {len} at {at}");
                buf[at] = 0;
                assert_eq!(find2(b'\r', 0, &buf), Some(at), "NUL, len {len} at {at}");
            }
            let none = vec![b'x'; len];
            assert_eq!((find(b'\r', &none), find2(b'\r', 0, &none)), (None, None));
        }
    }
}
