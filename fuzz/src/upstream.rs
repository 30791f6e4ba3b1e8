//! Checks of what the session core writes upstream, for the `session_core` target: whole
//! multibulk commands only (nothing malformed, inline or empty is forwarded as it came), every
//! `AUTH` the proxy's own and no more of them than the core may write, no `HELLO` carrying a
//! client's `AUTH` pair.

use redis_entra_proxy::credentials::Credentials;
use redis_entra_proxy::resp::request::{frame_args, Frame, RequestParser};

/// Reads the upstream stream as the server would, as it grows.
#[derive(Debug)]
pub struct UpstreamCheck {
    parser: RequestParser,
    /// Bytes of the stream already framed (always whole commands).
    framed: usize,
    /// (username, token) of every credential handed to the core.
    given: Vec<(Vec<u8>, Vec<u8>)>,
    auths: usize,
    /// AUTHs the core may have written: the first, then one per new generation, per
    /// `retry_reauth` and per forwarded `RESET`.
    allowance: usize,
    /// Bytes of the AUTHs written: they grow with the token's size, not with the input.
    pub auth_bytes: usize,
}

impl UpstreamCheck {
    /// For a core created with `creds`.
    pub fn new(creds: &Credentials) -> Self {
        let mut check = UpstreamCheck {
            parser: RequestParser::new(),
            framed: 0,
            given: Vec::new(),
            auths: 0,
            allowance: 1,
            auth_bytes: 0,
        };
        check.give(creds);
        check
    }

    /// Credentials handed to the core (a new generation or not).
    pub fn give(&mut self, creds: &Credentials) {
        self.given.push((
            creds.username.clone().into_bytes(),
            creds.token.expose().as_bytes().to_vec(),
        ));
    }

    /// One more AUTH may follow (a new generation, a `retry_reauth`).
    pub fn allow_auth(&mut self) {
        self.allowance += 1;
    }

    /// Frames what was added to the stream `written` followed by `queued` since the last call.
    pub fn check(&mut self, written: &[u8], queued: &[u8]) {
        let from = self.framed;
        let tail = if from <= written.len() {
            [&written[from..], queued].concat()
        } else {
            queued[from - written.len()..].to_vec()
        };
        let mut rest = &tail[..];
        loop {
            let frame = match self.parser.parse(rest) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    let partial = String::from_utf8_lossy(rest);
                    assert!(rest.is_empty(), "a partial command upstream: {partial:?}");
                    return;
                }
                Err(e) => panic!(
                    "malformed bytes upstream ({e}): {:?}",
                    String::from_utf8_lossy(rest)
                ),
            };
            let Frame::Multibulk { len, .. } = frame else {
                panic!("forwarded upstream as is: {frame:?}");
            };
            self.command(&frame_args(&rest[..len]), len);
            self.framed += len;
            rest = &rest[len..];
        }
    }

    fn command(&mut self, args: &[&[u8]], len: usize) {
        let name = args[0];
        if name.eq_ignore_ascii_case(b"auth") {
            let ours = args.len() == 3
                && name == b"AUTH"
                && self
                    .given
                    .iter()
                    .any(|(u, t)| args[1] == &u[..] && args[2] == &t[..]);
            assert!(ours, "an AUTH that is not the proxy's went upstream");
            self.auths += 1;
            self.auth_bytes += len;
            assert!(
                self.auths <= self.allowance,
                "{} AUTHs for an allowance of {}",
                self.auths,
                self.allowance
            );
        }
        if name.eq_ignore_ascii_case(b"reset") {
            // RESET de-authenticates: the core writes an AUTH right behind it.
            self.allowance += 1;
        }
        if name.eq_ignore_ascii_case(b"hello") {
            let auth_pair = args
                .iter()
                .enumerate()
                .skip(2)
                .any(|(i, a)| a.eq_ignore_ascii_case(b"auth") && i + 2 < args.len());
            assert!(!auth_pair, "HELLO with an AUTH pair went upstream");
        }
    }
}
