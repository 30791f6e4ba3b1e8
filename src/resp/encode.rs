//! Encoders for the few frames the proxy writes itself: commands it injects or rewrites and
//! replies it answers locally.

use bytes::BufMut;

/// Appends `args` as a RESP multibulk command.
pub fn command<'a>(out: &mut impl BufMut, args: impl ExactSizeIterator<Item = &'a [u8]>) {
    header(out, b'*', args.len());
    for arg in args {
        bulk(out, arg);
    }
}

/// Appends `HELLO <version>` (2 or 3).
pub fn hello(out: &mut impl BufMut, version: u8) {
    command(out, [&b"HELLO"[..], &[b'0' + version]].into_iter());
}

/// Appends a bulk string.
pub fn bulk(out: &mut impl BufMut, data: &[u8]) {
    header(out, b'$', data.len());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Appends a `<kind><n>\r\n` header without allocating.
pub fn header(out: &mut impl BufMut, kind: u8, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_u8(kind);
    out.put_slice(&digits[i..]);
    out.put_slice(b"\r\n");
}

/// Appends an error reply; `msg` must hold no CR or LF (they are replaced by spaces).
pub fn error(out: &mut impl BufMut, msg: &str) {
    out.put_u8(b'-');
    for b in msg.bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes() {
        let mut v = Vec::new();
        super::command(&mut v, [&b"AUTH"[..], b"u", b""].into_iter());
        assert_eq!(v, b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$0\r\n\r\n");
        let mut v = Vec::new();
        super::error(&mut v, "ERR a\r\nb");
        assert_eq!(v, b"-ERR a  b\r\n");
    }
}
