//! Serving a client while the proxy holds no valid token (before the first one arrives, or
//! after the current one expired while refreshes fail): the proxy keeps listening and answers
//! every command with an error that names the cause, as Redis answers a client it cannot
//! serve, instead of refusing connections that would look like a crash. When a valid token
//! appears, the connection is closed between commands so the client reconnects and is served.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::credentials::refresh::CredentialsRx;
use crate::credentials::Credentials;
use crate::resp::encode;
use crate::resp::request::RequestParser;

/// A client connecting in the first moments after start-up waits this long for the first
/// token rather than getting an error straight away; identity endpoints answer in well under
/// a second when healthy.
pub const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(5);

/// The current credentials if valid, waiting up to [`FIRST_TOKEN_WAIT`] for the first ones.
pub async fn current(rx: &CredentialsRx) -> Result<Arc<Credentials>, &'static str> {
    let mut rx = rx.clone();
    let first = tokio::time::timeout(FIRST_TOKEN_WAIT, rx.wait_for(|c| c.is_some())).await;
    let creds = match first {
        Ok(Ok(c)) => c.clone(),
        _ => None,
    };
    match creds {
        None => Err("the first token has not been acquired yet"),
        Some(c) if c.is_expired(SystemTime::now()) => Err("the current token has expired"),
        Some(c) => Ok(c),
    }
}

/// Answers every command with `-ERR … no valid token: <why>` until the client leaves or a
/// valid token arrives. QUIT is answered `+OK`; malformed input gets Redis's protocol error
/// and the connection closes. A client that still owes the local password
/// (`unauthenticated`) is held to Redis's limits for such clients (10 arguments, 16 KiB
/// bulks): it could not give the password here, and must not make the proxy buffer big
/// requests.
pub async fn serve<C>(client: &mut C, rx: &CredentialsRx, why: &str, unauthenticated: bool)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut rx = rx.clone();
    rx.borrow_and_update();
    let mut error = BytesMut::new();
    encode::error(
        &mut error,
        &format!(
            "ERR redis-entra-proxy has no valid token: {why}; see the proxy's log and /readyz"
        ),
    );
    let mut parser = RequestParser::new();
    parser.set_auth_required(unauthenticated);
    let mut input = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    loop {
        let read = tokio::select! {
            r = client.read_buf(&mut input) => r,
            changed = rx.changed() => {
                let valid = changed.is_ok()
                    && rx.borrow().as_ref().is_some_and(|c| !c.is_expired(SystemTime::now()));
                if valid || changed.is_err() {
                    return;
                }
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut quit = false;
        loop {
            match parser.parse(&input) {
                Ok(Some(frame)) => {
                    if !frame.is_empty() {
                        let cmd = parser.command(&input, &frame);
                        if cmd.arg_is(0, "quit") {
                            out.extend_from_slice(b"+OK\r\n");
                            quit = true;
                        } else {
                            out.extend_from_slice(&error);
                        }
                    }
                    let _ = input.split_to(frame.len());
                    if quit {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    e.write_reply(&mut out);
                    quit = true;
                    break;
                }
            }
        }
        if client.write_all(&out).await.is_err() || quit {
            let _ = client.shutdown().await;
            return;
        }
        out.clear();
    }
}
