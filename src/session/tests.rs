//! The driver over in-memory pipes, with a fake upstream whose pace the test controls: the
//! cases that need a server that stops reading, which a real Redis never does on loopback.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::credentials::Credentials;
use crate::resp::request::RequestParser;

fn shared(creds: Arc<Credentials>) -> Shared {
    let (tx, rx) = watch::channel(Some(creds));
    // The sender lives as long as the test: a closed channel is a different case.
    std::mem::forget(tx);
    Shared {
        connector: Connector::new("127.0.0.1:1".into(), None, Duration::from_secs(1)),
        // No test here rotates the token: the groups never need to be told of a change.
        fanout: crate::credentials::fanout::Fanout::new(rx.clone()).0,
        credentials: rx,
        local_password: None,
        shutdown: CancellationToken::new(),
        reauth_window: Duration::ZERO,
        client_idle_timeout: None,
        partial_request_timeout: None,
        health: Arc::new(Health::default()),
    }
}

fn creds() -> Arc<Credentials> {
    Arc::new(Credentials {
        username: "oid".into(),
        token: Secret::new(String::from("token")),
        expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
        generation: 1,
    })
}

/// Answers `+OK` to every request (the proxy's AUTH included), once `start` fires.
async fn fake_upstream(mut conn: DuplexStream, start: tokio::sync::oneshot::Receiver<()>) {
    let _ = start.await;
    let mut parser = RequestParser::new();
    let mut buf = BytesMut::new();
    loop {
        match conn.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut replies = Vec::new();
        while let Ok(Some(frame)) = parser.parse(&buf) {
            buf.advance(frame.len());
            replies.extend_from_slice(b"+OK\r\n");
        }
        if conn.write_all(&replies).await.is_err() {
            return;
        }
    }
}

/// A pipeline that fills the proxy's upstream-side buffer while the server does not read
/// leaves complete requests in the proxy's client buffer; when the server catches up they
/// must be served although the client sends nothing more (it waits for its replies).
#[tokio::test]
async fn requests_held_back_while_the_upstream_stalls_are_served_without_more_input() {
    let (mut app, proxy_side) = tokio::io::duplex(1 << 20);
    let (proxy_up, server) = tokio::io::duplex(16 * 1024);
    let (start, started) = tokio::sync::oneshot::channel();
    tokio::spawn(fake_upstream(server, started));
    let shared = shared(creds());
    let session = tokio::spawn(async move {
        let mut client = proxy_side;
        let mut upstream = proxy_up;
        let mut core = Core::new(creds(), None);
        let mut io = Io::new(&shared, READ_CHUNK, None);
        pump(&mut client, &mut upstream, &mut core, &shared, &mut io).await
    });

    // Well past the upstream-side high-water mark, written at once, then nothing more.
    let cmd = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
    let n = 3 * core::UPSTREAM_OUT_HIGH_WATER / cmd.len();
    app.write_all(&cmd.repeat(n)).await.expect("write pipeline");
    tokio::time::sleep(Duration::from_millis(200)).await;
    start.send(()).expect("upstream starts");

    let want = b"+OK\r\n".repeat(n);
    let mut got = vec![0; want.len()];
    tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut got))
        .await
        .expect("every reply without further input")
        .expect("read");
    assert!(got == want);
    drop(app);
    let outcome = tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .expect("session ends")
        .expect("session task");
    assert!(matches!(outcome, Outcome::ClientClosed), "{outcome}");
}

/// Every client connection is one task whose size is this future's: keep it small (it was
/// 5 KiB when a 4 KiB linger buffer and a timer per deadline lived in it).
#[test]
fn a_session_task_stays_small() {
    let shared = shared(creds());
    let target = Target {
        connector: shared.connector.clone(),
        pool: None,
        rewriter: None,
        clients: Default::default(),
        mux: None,
        in_topology: None,
    };
    let (client, _app) = tokio::io::duplex(64);
    let session = serve(client, &shared, &target);
    let size = std::mem::size_of_val(&session);
    assert!(size <= 3 * 1024, "a session future takes {size} bytes");
}

/// A big reply streaming through a session lets the other tasks of its thread run after every
/// [`YIELD_AFTER`] bytes or more read from the upstream (the session wakes itself and returns
/// `Pending`), and nothing of it is lost or reordered. Polled by hand, outside a runtime, so
/// that tokio's own budget does not interrupt it.
#[test]
fn a_session_lets_its_thread_go_after_reading_enough_in_one_poll() {
    use std::task::{Context, Poll};
    let (woken, waker) = crate::testing::Woken::new();
    let mut cx = Context::from_waker(&waker);

    let value = vec![b'v'; 1 << 20];
    let mut reply = format!("${}\r\n", value.len()).into_bytes();
    reply.extend_from_slice(&value);
    reply.extend_from_slice(b"\r\n");
    let (mut app, mut client) = tokio::io::duplex(4 << 20);
    let (mut upstream, mut server) = tokio::io::duplex(4 << 20);
    let write = |s: &mut DuplexStream, cx: &mut Context<'_>, bytes: &[u8]| {
        let Poll::Ready(Ok(n)) = std::pin::Pin::new(s).poll_write(cx, bytes) else {
            panic!("the pipe has room");
        };
        assert_eq!(n, bytes.len());
    };
    write(&mut app, &mut cx, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    // The server's answers to the proxy's AUTH and to the GET, all there at once.
    write(&mut server, &mut cx, b"+OK\r\n");
    write(&mut server, &mut cx, &reply);

    let shared = shared(creds());
    let mut core = Core::new(creds(), None);
    let mut io = Io::new(&shared, READ_CHUNK, None);
    let mut yields = 0;
    loop {
        let timers = io.timers(&core);
        match io.poll(
            &mut cx,
            &mut client,
            &mut upstream,
            &mut core,
            timers,
            &shared.health,
        ) {
            Poll::Ready(None) => {}
            Poll::Ready(Some(outcome)) => panic!("{outcome}"),
            // Woken at once: it yielded. Otherwise it waits for more input.
            Poll::Pending if woken.take() => {
                yields += 1;
            }
            Poll::Pending => break,
        }
    }
    // Reads take what the buffer has room for, 16 KiB or more: at least one yield, and none
    // before YIELD_AFTER bytes.
    assert!(
        (1..=reply.len() / YIELD_AFTER + 1).contains(&yields),
        "{yields} yields for {} bytes",
        reply.len()
    );
    let mut got = vec![0; reply.len()];
    let mut buf = tokio::io::ReadBuf::new(&mut got);
    while buf.remaining() > 0 {
        let before = buf.remaining();
        let _ = std::pin::Pin::new(&mut app).poll_read(&mut cx, &mut buf);
        assert!(
            buf.remaining() < before,
            "the whole reply reached the client"
        );
    }
    assert!(got == reply, "the reply as the server sent it");
}

/// Every close a session can report is registered at 0 from the start
/// ([`crate::metrics::CLOSE_LABELS`]), and so is every kind of failed connect.
#[test]
fn every_close_and_connect_error_label_is_registered_up_front() {
    use crate::resp::request::ProtocolError;
    use crate::upstream::ConnectError;
    let io = || std::io::Error::other("x");
    let addr = String::new;
    let connect_errors = [
        ConnectError::Resolve {
            addr: addr(),
            source: io(),
        },
        ConnectError::NoAddress { addr: addr() },
        ConnectError::Connect {
            addr: addr(),
            source: io(),
        },
        ConnectError::Timeout {
            addr: addr(),
            timeout: Duration::ZERO,
        },
        ConnectError::Tls {
            addr: addr(),
            source: io(),
        },
        ConnectError::NotInTopology { addr: addr() },
    ];
    for e in &connect_errors {
        assert!(
            crate::metrics::CONNECT_ERROR_KINDS.contains(&e.label()),
            "{}",
            e.label()
        );
    }
    let d = Duration::ZERO;
    let outcomes = [
        Outcome::ClientClosed,
        Outcome::ClientError(io()),
        Outcome::UpstreamClosed,
        Outcome::UpstreamError(io()),
        Outcome::Drained,
        Outcome::NoCredentials("x"),
        Outcome::UpstreamConnect(ConnectError::NoAddress { addr: addr() }),
        Outcome::Closed(CloseReason::ClientQuit),
        Outcome::Closed(CloseReason::ClientProtocol(ProtocolError::TooBigInline)),
        Outcome::Closed(CloseReason::UpstreamAuth(String::new())),
        Outcome::Closed(CloseReason::UpstreamAuthTimeout(d)),
        Outcome::Closed(CloseReason::UpstreamProtocol(String::new())),
        Outcome::Closed(CloseReason::UpstreamDesync),
        Outcome::Closed(CloseReason::TokenExpiring),
        Outcome::Closed(CloseReason::ClientIdle(d)),
        Outcome::Closed(CloseReason::PartialRequest(d)),
        Outcome::Closed(CloseReason::SlowClient(d)),
        Outcome::Closed(CloseReason::UnauthenticatedOutput),
    ];
    for o in &outcomes {
        assert!(
            crate::metrics::CLOSE_LABELS.contains(&(o.side(), o.label())),
            "({}, {})",
            o.side(),
            o.label()
        );
    }
    // One label per outcome, and the panic the metrics guard counts.
    assert_eq!(crate::metrics::CLOSE_LABELS.len(), outcomes.len() + 1);
}

/// A server that crashed or was reset reads as such in the log, not as rustls's text with a
/// link to its manual.
#[test]
fn an_upstream_gone_without_close_notify_is_said_plainly() {
    let e = std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/",
    );
    let text = Outcome::UpstreamError(e).to_string();
    assert_eq!(
        text,
        "upstream closed the connection (without a TLS close_notify)"
    );
    let other = Outcome::UpstreamError(std::io::Error::other("reset")).to_string();
    assert_eq!(other, "upstream connection failed: reset");
}
