//! Regression tests for what the fuzz targets (fuzz/, run by `scripts/fuzz`) found, each
//! reduced to the few bytes that show it. A test stays `#[ignore]`d while its fix is pending,
//! so that the suite stays green; remove the attribute with the fix.
//!
//! No sockets: the parsers and the sans-IO session core are driven directly.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use redis_entra_proxy::credentials::Credentials;
use redis_entra_proxy::resp::reply::{peek_head, ReplyScanner};
use redis_entra_proxy::resp::request::ProtocolError;
use redis_entra_proxy::secret::Secret;
use redis_entra_proxy::session::Core;

fn creds(generation: u64) -> Arc<Credentials> {
    Arc::new(Credentials {
        username: format!("oid-{generation}"),
        token: Secret::new(format!("tok{generation}")),
        expires_at: Some(SystemTime::now() + Duration::from_secs(3_600)),
        generation,
    })
}

fn upstream(core: &mut Core, bytes: &[u8]) {
    core.upstream_input(&mut BytesMut::from(bytes));
}

fn client(core: &mut Core, bytes: &[u8]) {
    core.client_input(&mut BytesMut::from(bytes));
}

/// A reply line whose type byte is a CR: `find_crlf` returns 0 and `&buf[pos + 1..pos]`
/// panics ("slice index starts at 1 but ends at 0", src/resp/reply.rs, `ReplyScanner::scan`).
/// It must be an error like any other unknown type byte.
#[test]
fn scanner_refuses_a_line_starting_with_cr() {
    assert!(ReplyScanner::new().scan(b"\r\n").is_err());
    assert!(ReplyScanner::new().scan(b"*1\r\n\r\n").is_err());
}

/// Same in `peek_head`, for the frame (`&buf[1..end]`) and for its first element
/// (`&rest[1..first_end]`): it must report the head, not panic.
#[test]
fn peek_head_survives_a_line_starting_with_cr() {
    let _ = peek_head(b"\r\n");
    let _ = peek_head(b"*1\r\n\r\n");
}

/// What the two panics above mean for a session: a server that sends `\r\n` where a reply
/// starts panics the session task instead of closing the connection with an upstream
/// protocol error.
#[test]
fn core_closes_on_an_upstream_line_starting_with_cr() {
    let mut core = Core::new(creds(1), None);
    client(&mut core, b"*1\r\n$4\r\nPING\r\n");
    upstream(&mut core, b"+OK\r\n\r\n");
    assert!(core.close_reason().is_some());
}

/// Redis 7.0 writes the offending byte of `expected '$', got 'X'` with CR and LF turned into
/// spaces (`addReplyErrorFormat`; checked against redis-server 7.0.15 with `*1\r\n\r\n`).
/// The proxy writes the byte raw, so the client receives a CR inside an error line: a broken
/// reply stream (src/resp/request.rs, `ProtocolError::write_reply`).
#[test]
fn expected_dollar_error_never_holds_cr_or_lf() {
    for byte in [b'\r', b'\n'] {
        let mut out = Vec::new();
        ProtocolError::ExpectedDollar(byte).write_reply(&mut out);
        assert_eq!(out, b"-ERR Protocol error: expected '$', got ' '\r\n");
    }
    let mut core = Core::new(creds(1), None);
    client(&mut core, b"*1\r\n\r\n");
    upstream(&mut core, b"+OK\r\n");
    assert_eq!(
        &core.to_client[..],
        b"-ERR Protocol error: expected '$', got ' '\r\n"
    );
}

/// `Core` remembered one AUTH in flight, but a RESET written while an AUTH
/// is unanswered puts a second one in flight (`reauth_now`). The first reply takes the second
/// AUTH's record; the second reply finds none and records the connection as authenticated
/// with a token that never expires, so `close_deadline` is `None` and the connection is no
/// longer closed before its token expires. A client whose first command is RESET gets there.
#[test]
fn reset_during_an_auth_keeps_the_token_expiry() {
    let mut core = Core::new(creds(1), None);
    client(&mut core, b"*1\r\n$5\r\nRESET\r\n");
    // The initial AUTH, the RESET, the AUTH written behind the RESET.
    upstream(&mut core, b"+OK\r\n+RESET\r\n+OK\r\n");
    assert!(core.current() && core.idle() && core.close_reason().is_none());
    assert!(
        core.close_deadline().is_some(),
        "the token expires in an hour, yet no close deadline"
    );
}

/// The same confusion makes the core write an AUTH it already has in flight: here the reply
/// to an older AUTH takes the record of the AUTH of generation 3, and the core sends a second
/// generation-3 AUTH while the first is unanswered.
#[test]
fn reset_during_an_auth_sends_no_duplicate_auth() {
    let mut core = Core::new(creds(1), None);
    core.set_credentials(creds(2)); // AUTH 1 still in flight: no AUTH yet
    upstream(&mut core, b"+OK\r\n"); // AUTH 1 answered: AUTH 2 written
    client(&mut core, b"*1\r\n$5\r\nRESET\r\n"); // RESET and a second AUTH 2
    upstream(&mut core, b"-ERR refused\r\n+RESET\r\n"); // first AUTH 2 refused, RESET answered
    core.set_credentials(creds(3)); // AUTH 3 written
    upstream(&mut core, b"+OK\r\n"); // second AUTH 2 accepted
    let auths = core
        .to_upstream
        .windows(10)
        .filter(|w| w == b"$4\r\nAUTH\r\n")
        .count();
    assert_eq!(
        auths, 4,
        "initial, two of generation 2, one of generation 3"
    );
}

/// A reply the proxy answers itself is queued as soon as the ledger reaches it, even while an
/// unsolicited frame (a pub/sub message, a tracking invalidation) is half relayed: the client
/// receives the local reply inside the push and its reader desynchronises
/// (src/session/core.rs, `drain_local` at the end of `client_input`). Here a RESP3
/// subscriber receives a message in two reads and sends `AUTH` between them.
#[test]
fn local_reply_never_lands_inside_a_relayed_push() {
    let mut core = Core::new(creds(1), None);
    client(&mut core, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n");
    upstream(&mut core, b"+OK\r\n%1\r\n$5\r\nproto\r\n:3\r\n");
    client(&mut core, b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nc1\r\n");
    let ack = b">3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:1\r\n";
    upstream(&mut core, ack);
    core.to_client.clear();
    let message = b">3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$5\r\nhello\r\n";
    let mut uin = BytesMut::from(&message[..35]);
    core.upstream_input(&mut uin);
    client(&mut core, b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n");
    uin.extend_from_slice(&message[35..]);
    core.upstream_input(&mut uin);
    assert_eq!(
        String::from_utf8_lossy(&core.to_client),
        String::from_utf8_lossy(&[&message[..], b"+OK\r\n"].concat())
    );
}

/// The scanner ended a line at CR followed by any byte while the push translation and the
/// confirmation counting read lines to their LF: a server line with a bare CR could be cut
/// differently by the two. A bare CR is now an upstream protocol error.
#[test]
fn a_reply_line_with_a_bare_cr_is_refused() {
    assert!(ReplyScanner::new().scan(b"+OK\rX\r\n").is_err());
    assert!(ReplyScanner::new().scan(b"*1\r\n+a\rb\r\n").is_err());
    assert!(ReplyScanner::new().scan(b"+OK\r\n").is_ok());
    let mut core = Core::new(creds(1), None);
    client(&mut core, b"*1\r\n$4\r\nPING\r\n");
    upstream(&mut core, b"+OK\r\n+PO\rNG\r\n");
    assert!(core.close_reason().is_some());
}

/// A client that has not given the password and leaves its refusals unread is closed past
/// 1 KiB; decided while a push from the server is half relayed, the close cut that frame. It
/// now waits for the frame's end (and nothing more is read from the client meanwhile).
#[test]
fn the_unauthenticated_output_close_lands_between_frames() {
    let password = Some(Arc::new(Secret::new("pw")));
    let mut core = Core::new(creds(1), password);
    upstream(&mut core, b"+OK\r\n>3\r\n$7\r\nmessage\r\n");
    client(&mut core, &b"HELLO x\r\n".repeat(40));
    assert_eq!(core.close_reason(), None, "not inside the push");
    assert!(!core.wants_client_input());
    upstream(&mut core, b"$1\r\nc\r\n$1\r\nm\r\n");
    assert_eq!(
        core.close_reason(),
        Some(&redis_entra_proxy::session::CloseReason::UnauthenticatedOutput)
    );
    // The push whole, then the refusals queued behind it, every frame whole.
    let out = &core.to_client[..];
    let push = b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n";
    assert!(out.starts_with(push), "{:?}", String::from_utf8_lossy(out));
    let mut rest = &out[push.len()..];
    while !rest.is_empty() {
        let scan = ReplyScanner::new().scan(rest).expect("RESP");
        assert!(scan.complete, "{:?}", String::from_utf8_lossy(rest));
        assert!(rest.starts_with(b"-ERR Protocol version"));
        rest = &rest[scan.consumed..];
    }
}
