//! The multiplexer's unit tests: requests planned, submitted, routed and answered, with
//! routers and shared clients driven by hand.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::Ordering;

use super::client::*;
use super::commands::*;
use super::link::*;
use super::router::*;
use super::*;
use crate::resp::request::RequestParser;
use crate::secret::Secret;
use crate::session::CloseReason;
use crate::testing::Woken;

/// A router whose clients are gone (the tests hand it submissions themselves).
fn router(proto: u8, max_batches: usize) -> Router {
    Router::new(proto, max_batches, mpsc::unbounded_channel().1)
}

#[test]
fn only_plain_commands_share() {
    for name in [
        "GET", "get", "Set", "MGET", "HGETALL", "INCR", "PING", "LRANGE", "INFO",
    ] {
        assert!(shareable(name.as_bytes()), "{name}");
    }
    for name in [
        "SELECT",
        "MULTI",
        "EXEC",
        "WATCH",
        "HELLO",
        "AUTH",
        "CLIENT",
        "SUBSCRIBE",
        "SSUBSCRIBE",
        "MONITOR",
        "BLPOP",
        "BRPOP",
        "BLMOVE",
        "BZPOPMIN",
        "XREAD",
        "WAIT",
        "EVAL",
        "READONLY",
        "ASKING",
        "RESET",
        "QUIT",
        "CLUSTER",
        "CONFIG",
        "SCAN",
        "OBJECT",
        "",
        "GETGETGETGETGETGETGET",
        // Near GET and SET, which are decided before the table.
        "GE",
        "GEX",
        "SEX",
        "G\u{7}T",
        "GET\0",
    ] {
        assert!(!shareable(name.as_bytes()), "{name}");
    }
}

/// Replies arriving in any pieces reach the right clients whole, consecutive ones for
/// one client together.
#[test]
fn replies_are_routed_whole_whatever_the_pieces() {
    let stream: &[u8] = b"+OK\r\n$5\r\nhello\r\n*2\r\n:1\r\n$-1\r\n-ERR no\r\n:42\r\n";
    // Client a owes 2 replies, b 1, a again 2.
    let expect_a = b"+OK\r\n$5\r\nhello\r\n-ERR no\r\n:42\r\n".to_vec();
    let expect_b = b"*2\r\n:1\r\n$-1\r\n".to_vec();
    for split in 0..=stream.len() {
        let (a_tx, mut a_rx) = mpsc::unbounded_channel();
        let (b_tx, mut b_rx) = mpsc::unbounded_channel();
        let (a, b) = (Link::new(a_tx), Link::new(b_tx));
        let mut r = router(2, 0);
        r.routes = VecDeque::from([Route::new(a.clone(), 2), Route::new(b, 1), Route::new(a, 2)]);
        for piece in [&stream[..split], &stream[split..]] {
            r.rin.extend_from_slice(piece);
            r.deliver().unwrap();
        }
        assert!(r.routes.is_empty() && r.rin.is_empty(), "split {split}");
        assert_eq!(collect(&mut a_rx), (expect_a.clone(), 4), "split {split}");
        assert_eq!(collect(&mut b_rx), (expect_b.clone(), 1), "split {split}");
    }
}

/// A big reply goes to its client in parts as it arrives, counted once, with its last
/// part; the router never holds much more than a read of it. A big push is dropped as it
/// arrives, and the replies around them still reach the right clients.
#[test]
fn a_big_reply_is_handed_over_as_it_arrives() {
    let value = vec![b'v'; 3 * PASS_ON];
    let mut big = format!("${}\r\n", value.len()).into_bytes();
    big.extend_from_slice(&value);
    big.extend_from_slice(b"\r\n");
    let mut push = format!(">2\r\n$7\r\nmessage\r\n${}\r\n", value.len()).into_bytes();
    push.extend_from_slice(&value);
    push.extend_from_slice(b"\r\n");
    let mut stream = b"+OK\r\n".to_vec();
    stream.extend_from_slice(&big);
    stream.extend_from_slice(&push);
    stream.extend_from_slice(b":1\r\n");
    for read in [1000, 16 * 1024, PASS_ON + 1, stream.len()] {
        let (mut r, mut a_rx, mut b_rx) = two_clients();
        let (mut parts, mut got, mut count) = (0, Vec::new(), 0);
        for piece in stream.chunks(read) {
            r.rin.extend_from_slice(piece);
            r.deliver().unwrap();
            assert!(
                r.rin.len() < PASS_ON + read,
                "read {read}: {} held",
                r.rin.len()
            );
            while let Ok(Delivery::Replies(b, n)) = a_rx.try_recv() {
                parts += 1;
                if n == 0 {
                    assert!(b.len() >= PASS_ON, "read {read}: a part of {}", b.len());
                }
                got.extend_from_slice(&b);
                count += n;
            }
        }
        assert!(r.routes.is_empty() && r.rin.is_empty(), "read {read}");
        assert!(
            got == [&b"+OK\r\n"[..], &big].concat(),
            "read {read}: bytes differ"
        );
        assert_eq!(count, 2, "read {read}");
        if read < value.len() {
            assert!(parts > 1, "read {read}: the big reply came whole");
        }
        assert_eq!(collect(&mut b_rx), (b":1\r\n".to_vec(), 1), "read {read}");
    }
}

/// A RESP3 router owing client a 2 replies, then client b 1, with their receivers.
fn two_clients() -> (
    Router,
    mpsc::UnboundedReceiver<Delivery>,
    mpsc::UnboundedReceiver<Delivery>,
) {
    let (a_tx, a_rx) = mpsc::unbounded_channel();
    let (b_tx, b_rx) = mpsc::unbounded_channel();
    let mut r = router(3, 0);
    r.routes = VecDeque::from([
        Route::new(Link::new(a_tx), 2),
        Route::new(Link::new(b_tx), 1),
    ]);
    (r, a_rx, b_rx)
}

/// Writes `rest` to the router as the shared session does, 16 KiB at a time, until it is
/// all taken (`false`) or the router waits (`true`).
fn write_until_wait(r: &mut Router, cx: &mut Context<'_>, rest: &mut &[u8]) -> bool {
    while !rest.is_empty() {
        let n = rest.len().min(16 * 1024);
        match Pin::new(&mut *r).poll_write(cx, &rest[..n]) {
            Poll::Ready(Ok(n)) => *rest = &rest[n..],
            Poll::Ready(Err(e)) => panic!("{e}"),
            Poll::Pending => return true,
        }
    }
    false
}

/// `+OK`, a big bulk reply of `len` bytes, then `:1`: two replies for client a and one for
/// b of [`two_clients`].
fn big_reply_stream(len: usize) -> Vec<u8> {
    let mut stream = format!("+OK\r\n${len}\r\n").into_bytes();
    stream.resize(stream.len() + len, b'v');
    stream.extend_from_slice(b"\r\n:1\r\n");
    stream
}

/// The router hands a client no more of a big reply while more than [`PAUSE`] bytes wait
/// for it to read them, and goes on when its reading brings that down to [`RESUME`]. A
/// client that does not catch up within [`SLOW_CLIENT`] of one wait is closed, the rest of
/// its reply dropped, and the replies after it still go to their clients.
#[tokio::test(start_paused = true)]
async fn the_router_waits_for_a_client_far_behind() {
    let stream = big_reply_stream(4 * PAUSE);
    let (mut r, mut a_rx, mut b_rx) = two_clients();
    let a = r.routes[0].link.clone();
    let (woken, waker) = Woken::new();
    let mut cx = Context::from_waker(&waker);
    let mut rest = &stream[..];
    assert!(write_until_wait(&mut r, &mut cx, &mut rest), "waits for a");
    let handed = a.unsent();
    assert!(
        handed > PAUSE && handed < PAUSE + PASS_ON + 16 * 1024,
        "{handed} bytes handed to a"
    );
    tokio::time::advance(SLOW_CLIENT / 2).await;
    assert!(write_until_wait(&mut r, &mut cx, &mut rest), "still waits");
    a.written(handed - RESUME - 1);
    assert!(!woken.take(), "a is still behind");
    assert!(
        write_until_wait(&mut r, &mut cx, &mut rest),
        "waits until a is no more than RESUME behind"
    );
    a.written(1);
    assert!(woken.take(), "a caught up: the router is woken");
    assert!(write_until_wait(&mut r, &mut cx, &mut rest), "waits again");
    // The wait is timed afresh: a read its share of the one before.
    tokio::time::advance(SLOW_CLIENT / 2 + Duration::from_millis(1)).await;
    assert!(write_until_wait(&mut r, &mut cx, &mut rest), "still waits");
    assert!(!woken.take());
    tokio::time::advance(SLOW_CLIENT / 2).await;
    assert!(woken.take(), "the router is woken when its patience ends");
    assert!(!write_until_wait(&mut r, &mut cx, &mut rest), "a given up");
    assert!(r.routes.is_empty() && r.rin.is_empty());

    let mut got = 0;
    loop {
        match a_rx.try_recv() {
            Ok(Delivery::Replies(b, _)) => got += b.len(),
            Ok(Delivery::End(Outcome::Closed(CloseReason::SlowClient(d)))) => {
                assert_eq!(d, SLOW_CLIENT);
                break;
            }
            _ => panic!("a is closed for being slow"),
        }
    }
    assert!(a_rx.try_recv().is_err(), "nothing after the end");
    assert!(got < 2 * PAUSE + PASS_ON, "{got} bytes handed to a");
    assert_eq!(collect(&mut b_rx), (b":1\r\n".to_vec(), 1));
}

/// A client the router handed a reply of more than [`PAUSE`] bytes, or had to wait for,
/// pins at its next request, and only that client: its big replies then wait in the server
/// for it alone. Until then it stays where it is.
#[tokio::test]
async fn a_client_with_big_replies_or_far_behind_pins_at_its_next_request() {
    let (tx, mut submissions) = mpsc::unbounded_channel();
    let client = || SharedClient::new(Carry::default(), None, tx.clone());
    let get = "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    let mut r = router(2, 0);
    let mut ask = |c: &mut SharedClient, r: &mut Router, n: usize| {
        c.cin.extend_from_slice(get.repeat(n).as_bytes());
        c.submit();
        match submissions.try_recv() {
            Ok(s) => r.hold(s),
            Err(_) => assert!(c.pin, "only a pinned client submits nothing"),
        }
    };
    let (_, waker) = Woken::new();
    let mut cx = Context::from_waker(&waker);

    // Half a PAUSE, unread: nothing.
    let mut a = client();
    ask(&mut a, &mut r, 3);
    let stream = big_reply_stream(PAUSE / 2);
    assert!(!write_until_wait(&mut r, &mut cx, &mut &stream[..]));
    assert_eq!(a.link.pins(), None);
    assert!(a.may_move());

    // A reply of 2 PAUSEs, read as it comes: the router never waits, and the client pins.
    ask(&mut a, &mut r, 2);
    let stream = big_reply_stream(2 * PAUSE);
    let (head, tail) = stream.split_at(stream.len() - b":1\r\n".len());
    for piece in head.chunks(16 * 1024) {
        assert!(!write_until_wait(&mut r, &mut cx, &mut &piece[..]));
        a.link.written(a.link.unsent());
    }
    assert_eq!(a.link.pins(), Some("large_reply"));
    assert!(!a.pin, "pins at its next request");
    assert!(!a.may_move(), "and waits for it where it is");
    // A client of its own for the last `:1`.
    let mut b = client();
    ask(&mut b, &mut r, 1);
    assert!(!write_until_wait(&mut r, &mut cx, &mut &tail[..]));
    assert_eq!(b.link.pins(), None, "a small reply");

    // Replies of 40 KB, none in parts, 1.6 MB of them unread: the router waits.
    let mut d = client();
    ask(&mut d, &mut r, 40);
    let reply = format!("$40000\r\n{}\r\n", "v".repeat(40_000));
    assert!(write_until_wait(
        &mut r,
        &mut cx,
        &mut reply.repeat(40).as_bytes()
    ));
    assert_eq!(d.link.pins(), Some("slow_reader"));
    assert_eq!(b.link.pins(), None);

    // Their next requests: nothing more is shared.
    for (c, why) in [(&mut a, "large_reply"), (&mut d, "slow_reader")] {
        ask(c, &mut r, 1);
        assert!(c.pin && c.pinned_by == Some(why), "{why}");
        assert_eq!(&c.cin[..], get.as_bytes(), "left for its own session");
    }
    ask(&mut b, &mut r, 1);
    assert!(!b.pin);
}

/// A reply for [`replies_reach_their_readers_within_bounds`]: the `i`th of the stream, of
/// size class `class` (an integer, a short bulk, a bulk larger than [`PASS_ON`], one larger
/// than twice [`PAUSE`]), its bytes marked with `i`.
fn reply(i: usize, class: u8) -> Vec<u8> {
    let len = match class {
        0 => return b":1\r\n".to_vec(),
        1 => 100,
        2 => PASS_ON + 5000,
        _ => 2 * PAUSE + 70_000,
    };
    let mut frame = format!("${len}\r\n").into_bytes();
    frame.resize(frame.len() + len, b'a' + (i % 26) as u8);
    frame.extend_from_slice(b"\r\n");
    frame
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 256,
        ..Default::default()
    })]

    /// Three clients, each reading at its own pace, and replies of every size in any
    /// pieces: each client gets exactly its replies, in order, counted once; the router never
    /// hands a client more than [`PAUSE`], a write and a part beyond what it has read;
    /// it waits only for a client more than [`RESUME`] behind, until it is no more, and is
    /// woken then (it is polled only when woken, as by the runtime, by the client or by
    /// another).
    #[test]
    fn replies_reach_their_readers_within_bounds(
        replies in proptest::collection::vec((0usize..3, 0u8..4), 1..10),
        write in 1usize..40_000,
        paces in proptest::collection::vec(1024usize..400_000, 3),
        other_wakes in 0usize..4,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let _runtime = rt.enter();
        let mut rxs = Vec::new();
        let mut links = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = mpsc::unbounded_channel();
            rxs.push(rx);
            links.push(Link::new(tx));
        }
        let mut want = vec![(Vec::new(), 0); 3];
        let mut stream = Vec::new();
        let mut r = router(2, 0);
        for (i, &(client, class)) in replies.iter().enumerate() {
            let frame = reply(i, class);
            want[client].0.extend_from_slice(&frame);
            want[client].1 += 1;
            stream.extend_from_slice(&frame);
            r.routes.push_back(Route::new(links[client].clone(), 1));
        }
        let mut got = vec![(Vec::new(), 0); 3];
        let mut read = [0usize; 3];
        let (woken, waker) = Woken::new();
        let mut cx = Context::from_waker(&waker);
        let mut rest = &stream[..];
        let mut poll = true;
        // The client the router last waited for.
        let mut waited: Option<Arc<Link>> = None;
        let bound = PAUSE + write + PASS_ON;
        for step in 0..100_000 {
            // Other submissions wake the router too, every `other_wakes` steps (0: none).
            poll |= other_wakes > 0 && step % other_wakes == 0;
            // As the session does: writes while the router takes them, up to what its
            // buffer for the router holds.
            let mut taken = 0;
            while poll && !rest.is_empty() && taken < 256 * 1024 {
                let n = rest.len().min(write);
                let front = r.routes.front().map(|route| route.link.clone());
                let behind = front.as_ref().map_or(0, |link| link.unsent());
                match Pin::new(&mut r).poll_write(&mut cx, &rest[..n]) {
                    Poll::Ready(Ok(n)) => {
                        if let (Some(before), Some(front)) = (waited.take(), &front) {
                            proptest::prop_assert!(
                                !Arc::ptr_eq(&before, front) || behind <= RESUME,
                                "went on with the client it waited for {behind} behind",
                            );
                        }
                        rest = &rest[n..];
                        taken += n;
                    }
                    Poll::Ready(Err(e)) => panic!("{e}"),
                    Poll::Pending => {
                        poll = false;
                        let front = front.expect("waits for a client");
                        proptest::prop_assert!(front.unsent() > RESUME);
                        waited = Some(front);
                    }
                }
            }
            for c in 0..3 {
                while let Ok(d) = rxs[c].try_recv() {
                    let Delivery::Replies(bytes, n) = d else {
                        panic!("client {c} closed");
                    };
                    got[c].0.extend_from_slice(&bytes);
                    got[c].1 += n;
                }
                let unsent = links[c].unsent();
                proptest::prop_assert!(unsent <= bound, "client {c}: {unsent} unread");
                let n = paces[c].min(got[c].0.len() - read[c]);
                read[c] += n;
                links[c].written(n);
            }
            poll |= woken.take();
            if rest.is_empty() && (0..3).all(|c| read[c] == got[c].0.len()) {
                break;
            }
        }
        proptest::prop_assert!(rest.is_empty(), "{} bytes never taken", rest.len());
        proptest::prop_assert!(r.routes.is_empty());
        for c in 0..3 {
            proptest::prop_assert!(got[c] == want[c], "client {c} got other replies");
        }
    }
}

/// A client that is gone never makes the router wait; one that goes while the router
/// waits for it wakes the router.
#[tokio::test]
async fn the_router_does_not_wait_for_a_client_that_is_gone() {
    let stream = big_reply_stream(4 * PAUSE);
    let (mut r, a_rx, mut b_rx) = two_clients();
    drop(a_rx);
    let (woken, waker) = Woken::new();
    let mut cx = Context::from_waker(&waker);
    assert!(!write_until_wait(&mut r, &mut cx, &mut &stream[..]));
    assert_eq!(collect(&mut b_rx), (b":1\r\n".to_vec(), 1));

    let carry = Carry::default();
    let c = SharedClient::new(carry, None, mpsc::unbounded_channel().0);
    let link = c.link.clone();
    link.handed(2 * PAUSE);
    assert!(link.behind(&cx, false));
    drop(c);
    assert!(woken.take(), "the client going woke the router");
    assert!(!link.behind(&cx, true));
}

fn collect(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> (Vec<u8>, usize) {
    let (mut bytes, mut n) = (Vec::new(), 0);
    while let Ok(Delivery::Replies(b, k)) = rx.try_recv() {
        bytes.extend_from_slice(&b);
        n += k;
    }
    (bytes, n)
}

/// RESP3 replies (maps, nulls, doubles) are routed like any other; pushes, wherever they
/// fall and in whatever pieces they arrive, reach nobody.
#[test]
fn resp3_replies_are_routed_and_pushes_dropped() {
    let push: &[u8] = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n";
    let a1: &[u8] = b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n";
    let a2: &[u8] = b"_\r\n";
    let b1: &[u8] = b",1.5\r\n";
    // a owes 2 (a push between them), b owes 1 (a push before it and after it).
    let stream = [push, a1, push, a2, push, b1, push].concat();
    for split in 0..=stream.len() {
        for second in split..=stream.len() {
            let (mut r, mut a_rx, mut b_rx) = two_clients();
            for piece in [&stream[..split], &stream[split..second], &stream[second..]] {
                r.rin.extend_from_slice(piece);
                r.deliver().unwrap();
            }
            assert!(r.routes.is_empty(), "split {split}/{second}");
            assert!(r.rin.is_empty(), "split {split}/{second}: {:?}", r.rin);
            assert_eq!(
                collect(&mut a_rx),
                ([a1, a2].concat(), 2),
                "split {split}/{second}"
            );
            assert_eq!(
                collect(&mut b_rx),
                (b1.to_vec(), 1),
                "split {split}/{second}"
            );
        }
    }
}

/// The router as the shared session's client: the session reads the submitted requests
/// and writes replies that reach their clients; once the session shuts its end, reads
/// see the end of the stream, and a request submitted then waits for the next session
/// while the clients owed replies by the ended one are closed.
#[tokio::test]
async fn the_router_is_the_shared_sessions_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = |k: &str| format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).into_bytes();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut r = Router::new(2, 0, rx);
    let submit = |frames: Vec<u8>, replies| {
        let (to, rx) = mpsc::unbounded_channel();
        tx.send(Submit {
            frames: frames.into(),
            replies,
            plain: true,
            link: Link::new(to),
        })
        .unwrap();
        rx
    };
    let mut a = submit(get("a"), 1);
    let mut b = submit([get("b1"), get("b2")].concat(), 2);
    assert!(
        poll_fn(|cx| r.wait(cx, false)).await,
        "requests wait: a session must start"
    );
    // As the session's pump does when it starts.
    r.framing.lock().start();
    let mut buf = vec![0; 1024];
    let n = r.read(&mut buf).await.unwrap();
    assert_eq!(buf[..n], [get("a"), get("b1"), get("b2")].concat());
    // The session is told which bytes are plain requests, submission by submission.
    {
        let mut runs = r.framing.lock();
        assert_eq!(runs.plain_front(), Some((get("a").len(), 1)));
        runs.took(get("a").len());
        assert_eq!(runs.plain_front(), Some((n - get("a").len(), 2)));
        runs.took(n - get("a").len());
        assert_eq!(runs.plain_front(), None);
    }
    r.write_all(b"$2\r\nva\r\n$2\r\nvb\r\n").await.unwrap();
    assert_eq!(collect(&mut a), (b"$2\r\nva\r\n".to_vec(), 1));
    assert_eq!(collect(&mut b), (b"$2\r\nvb\r\n".to_vec(), 1));

    // The session closes (as a drained or idle session does) with b still owed a reply.
    r.shutdown().await.unwrap();
    let mut c = submit(get("c"), 1);
    assert_eq!(
        r.read(&mut buf).await.unwrap(),
        0,
        "the end, for the closing session"
    );
    r.lost(&Outcome::Drained);
    assert!(matches!(
        b.try_recv(),
        Ok(Delivery::End(Outcome::UpstreamClosed))
    ));
    // c goes to the next session, whole, read in two parts: neither is whole requests.
    assert!(poll_fn(|cx| r.wait(cx, false)).await);
    r.framing = session::Framing::default();
    r.framing.lock().start();
    let n = r.read(&mut buf[..5]).await.unwrap();
    let rest = r.read(&mut buf[n..]).await.unwrap();
    assert_eq!(buf[..n + rest], get("c"));
    assert_eq!(r.framing.lock().plain_front(), None);
    r.framing.lock().took(n + rest);
    r.write_all(b":1\r\n").await.unwrap();
    assert_eq!(collect(&mut c), (b":1\r\n".to_vec(), 1));

    // A reply nobody asked for ends the session with an error.
    assert!(r.write_all(b"+OK\r\n").await.is_err());
}

/// A submission of `frames` answered by `replies` replies, with its client's receiver.
fn submission(frames: Vec<u8>, replies: usize) -> (Submit, mpsc::UnboundedReceiver<Delivery>) {
    let (to, rx) = mpsc::unbounded_channel();
    let submit = Submit {
        frames: frames.into(),
        replies,
        plain: true,
        link: Link::new(to),
    };
    (submit, rx)
}

fn get(k: &str) -> Vec<u8> {
    format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).into_bytes()
}

/// When a shared session fails, the client whose request it had read is closed; the requests
/// it never read (held behind the owed batch) go to the next session whole and in order, and
/// are answered there, unless their client is the one closed.
#[tokio::test]
async fn requests_a_failed_shared_session_never_read_go_to_the_next() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut r = router(2, 1);
    let (a, mut a_rx) = submission(get("a"), 1);
    let link_a = a.link.clone();
    r.hold(a);
    r.framing.lock().start();
    let mut buf = vec![0; 1024];
    let n = r.read(&mut buf).await.unwrap();
    assert_eq!(buf[..n], get("a"));
    // While a's batch is owed its reply, the next requests wait: one of a's own too.
    let (b, mut b_rx) = submission(get("b"), 1);
    let (c, mut c_rx) = submission([get("c1"), get("c2")].concat(), 2);
    r.hold(b);
    r.hold(c);
    r.hold(Submit {
        frames: get("a2").into(),
        replies: 1,
        plain: true,
        link: link_a,
    });
    r.lost(&Outcome::UpstreamClosed);
    assert!(matches!(
        a_rx.try_recv(),
        Ok(Delivery::End(Outcome::UpstreamClosed))
    ));
    assert!(a_rx.try_recv().is_err(), "a gets nothing more");

    // The next session reads b's and c's requests, and answers them.
    assert!(poll_fn(|cx| r.wait(cx, false)).await);
    r.framing = session::Framing::default();
    r.framing.lock().start();
    let n = r.read(&mut buf).await.unwrap();
    assert_eq!(buf[..n], [get("b"), get("c1"), get("c2")].concat());
    r.write_all(b"$2\r\nvb\r\n$3\r\nvc1\r\n$3\r\nvc2\r\n")
        .await
        .unwrap();
    assert_eq!(collect(&mut b_rx), (b"$2\r\nvb\r\n".to_vec(), 1));
    assert_eq!(
        collect(&mut c_rx),
        (b"$3\r\nvc1\r\n$3\r\nvc2\r\n".to_vec(), 2)
    );
    assert!(r.routes.is_empty());
}

/// A session that read part of a client's requests took them all: that client is closed.
/// Requests a session that never served could not send are answered with why, as a
/// connection of the client's own would answer, and their clients closed, when the cause is
/// a configuration to fix; a client served before, and every client when the server is down,
/// is closed without a reply.
#[tokio::test]
async fn a_shared_session_that_cannot_connect_answers_each_client_why() {
    use tokio::io::AsyncReadExt;
    let mut r = router(2, 0);
    let (a, mut a_rx) = submission([get("a1"), get("a2")].concat(), 2);
    r.hold(a);
    r.framing.lock().start();
    let mut buf = vec![0; 20];
    let n = r.read(&mut buf).await.unwrap();
    assert!(n < get("a1").len() * 2, "a's requests are read in part");
    r.lost(&Outcome::UpstreamError(
        std::io::ErrorKind::ConnectionReset.into(),
    ));
    assert!(matches!(
        a_rx.try_recv(),
        Ok(Delivery::End(Outcome::UpstreamClosed))
    ));
    assert!(
        r.routes.is_empty() && r.held.is_empty(),
        "a is not sent again"
    );

    // A configuration to fix (here, a certificate refused) is said to each client.
    let (b, mut b_rx) = submission(get("b"), 1);
    let (c, mut c_rx) = submission([get("c1"), get("c2")].concat(), 2);
    r.hold(b);
    r.hold(c);
    let e = crate::upstream::ConnectError::Tls {
        addr: "cache:10000".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid peer certificate"),
    };
    r.lost(&Outcome::UpstreamConnect(e));
    let want = b"-ERR redis-entra-proxy: upstream cache:10000: TLS handshake failed: invalid peer certificate\r\n";
    for rx in [&mut b_rx, &mut c_rx] {
        assert!(matches!(rx.try_recv(), Ok(Delivery::Replies(b, 1)) if b[..] == want[..]));
        assert!(matches!(
            rx.try_recv(),
            Ok(Delivery::End(Outcome::UpstreamConnect(_)))
        ));
    }
    assert!(r.routes.is_empty() && r.held.is_empty());

    // A client served before sees its connection close without a word, as its own
    // connection would have closed with the server: libraries retry that.
    let (d, mut d_rx) = submission(get("d"), 1);
    d.link.send(Bytes::from_static(b"$1\r\nv\r\n"), 1);
    assert!(matches!(d_rx.try_recv(), Ok(Delivery::Replies(_, 1))));
    r.hold(d);
    let e = crate::upstream::ConnectError::Tls {
        addr: "cache:10000".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid peer certificate"),
    };
    r.lost(&Outcome::UpstreamConnect(e));
    assert!(matches!(
        d_rx.try_recv(),
        Ok(Delivery::End(Outcome::UpstreamConnect(_)))
    ));

    // A server that is down closes every client without a word, as a connection of its own
    // would be.
    let (f, mut f_rx) = submission(get("f"), 1);
    r.hold(f);
    let e = crate::upstream::ConnectError::Connect {
        addr: "cache:10000".into(),
        source: std::io::ErrorKind::ConnectionRefused.into(),
    };
    r.lost(&Outcome::UpstreamConnect(e));
    assert!(matches!(
        f_rx.try_recv(),
        Ok(Delivery::End(Outcome::UpstreamConnect(_)))
    ));
}

/// A submission is plain when every request in it is a multibulk command that shares;
/// an inline one, an empty one or a `HELLO` makes it not.
#[tokio::test]
async fn submissions_say_whether_their_requests_are_plain() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let carry = Carry::default();
    let mut c = SharedClient::new(carry, None, tx);
    let mut submitted = |c: &mut SharedClient, bytes: &str| {
        c.cin.extend_from_slice(bytes.as_bytes());
        c.submit();
        let mut got = Vec::new();
        while let Ok(s) = rx.try_recv() {
            got.push((
                String::from_utf8(s.frames.to_vec()).unwrap(),
                s.replies,
                s.plain,
            ));
        }
        got
    };
    let get = |k: &str| format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
    let two = format!("{}{}", get("a"), get("b"));
    assert_eq!(submitted(&mut c, &two), [(two.clone(), 2, true)]);
    let inline = format!("{}GET b\r\n", get("a"));
    assert_eq!(submitted(&mut c, &inline), [(inline.clone(), 2, false)]);
    let empty = format!("*0\r\n{}", get("a"));
    assert_eq!(submitted(&mut c, &empty), [(empty.clone(), 1, false)]);
    let hello = format!("*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n{}", get("a"));
    assert_eq!(submitted(&mut c, &hello), [(hello.clone(), 2, false)]);
    // A request the proxy answers splits the submissions; each is plain again.
    let setname = "*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$1\r\nn\r\n";
    let around = format!("{}{setname}{}", get("a"), get("b"));
    assert_eq!(
        submitted(&mut c, &around),
        [(get("a"), 1, true), (get("b"), 1, true)]
    );
}

/// With a local password, nothing a client sends is submitted before it gives the right
/// one: its first other request, a wrong password, and any later wrong one pin it, and the
/// pinned session answers them as Redis would.
#[tokio::test]
async fn with_a_local_password_only_authenticated_requests_share() {
    let client = |authenticated| {
        let (tx, rx) = mpsc::unbounded_channel();
        let carry = Carry {
            authenticated,
            ..Carry::default()
        };
        let password = Some(Arc::new(Secret::new("pw")));
        (SharedClient::new(carry, password, tx), rx)
    };
    let feed = |c: &mut SharedClient, rx: &mut mpsc::UnboundedReceiver<Submit>, s: &str| {
        c.cin.extend_from_slice(s.as_bytes());
        c.submit();
        let mut got = Vec::new();
        while let Ok(s) = rx.try_recv() {
            got.push(String::from_utf8(s.frames.to_vec()).unwrap());
        }
        got
    };
    let get = "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";

    let (mut c, mut rx) = client(false);
    assert!(feed(&mut c, &mut rx, get).is_empty());
    assert!(c.pin && !c.authenticated);
    assert_eq!(&c.cin[..], get.as_bytes(), "left for the pinned session");

    let (mut c, mut rx) = client(false);
    assert!(feed(&mut c, &mut rx, &format!("AUTH nope\r\n{get}")).is_empty());
    assert!(c.pin && !c.authenticated);

    let (mut c, mut rx) = client(false);
    assert_eq!(
        feed(&mut c, &mut rx, &format!("AUTH default pw\r\n{get}")),
        [get]
    );
    assert!(c.authenticated && !c.pin);
    assert_eq!(c.out.iter().map(|b| &b[..]).collect::<Vec<_>>(), [OK]);
    // Authenticated, a wrong password pins, and the client stays authenticated there.
    assert!(feed(&mut c, &mut rx, "AUTH x\r\n").is_empty());
    assert!(c.pin && c.authenticated);

    // HELLO … AUTH: the right pair authenticates, a wrong one pins.
    let (mut c, mut rx) = client(false);
    let hello = "HELLO 2 AUTH default pw\r\n";
    assert_eq!(feed(&mut c, &mut rx, hello), [hello]);
    assert!(c.authenticated);
    let (mut c, mut rx) = client(false);
    assert!(feed(&mut c, &mut rx, "HELLO 2 AUTH default pwx\r\n").is_empty());
    assert!(c.pin && !c.authenticated);

    // A client that moved here authenticated stays so.
    let (mut c, mut rx) = client(true);
    assert_eq!(feed(&mut c, &mut rx, get), [get]);
}

/// The label of `multiplex_pinned_total` is one of a few categories, whatever was sent.
#[test]
fn pins_are_counted_by_a_few_reasons() {
    let req = |args: &[&str]| {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        crate::devenv::encode(&args)
    };
    let cases: &[(&[u8], bool, &str)] = &[
        (&req(&["GET", "k"]), false, "auth"),
        (&req(&["AUTH", "wrong"]), true, "auth"),
        (&req(&["multi"]), true, "transaction"),
        (&req(&["WATCH", "k"]), true, "transaction"),
        (&req(&["Subscribe", "c"]), true, "pubsub"),
        (&req(&["BLPOP", "k", "0"]), true, "blocking"),
        (
            &req(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]),
            true,
            "blocking",
        ),
        (b"select 1\r\n", true, "connection"),
        (&req(&["CLIENT", "TRACKING", "on"]), true, "connection"),
        (&req(&["EVALSHA_RO", "abc", "0"]), true, "script"),
        (&req(&["SCAN", "0"]), true, "other"),
        (&req(&["A-MODULE.COMMAND-WITH-A-LONG-NAME"]), true, "other"),
        (b"*2\r\n$3\r\nGET", true, "other"),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$65536\r\nabc",
            true,
            "large_request",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$65535\r\nabc",
            true,
            "other",
        ),
        (b"*1\r\n$x\r\n", true, "malformed"),
    ];
    for (first, authenticated, want) in cases {
        assert_eq!(
            pin_reason(first, *authenticated),
            *want,
            "{:?}",
            String::from_utf8_lossy(first)
        );
    }
}

/// An idle shared client gives its buffers back, once, `IDLE_SHRINK` after its last input
/// and never while replies are owed to it; its next input starts the count again.
#[tokio::test(start_paused = true)]
async fn an_idle_shared_client_gives_its_buffers_back() {
    use tokio::io::AsyncWriteExt;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let carry = Carry::default();
    let mut c = SharedClient::new(carry, None, tx);
    let link = c.link.clone();
    let (mut app, mut client) = tokio::io::duplex(64 * 1024);
    let mut step = |c: &mut SharedClient| {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        c.poll(&mut cx, &mut client).is_pending()
    };
    let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    // More than a first read holds: the reads grow.
    app.write_all(&get.repeat(200)).await.unwrap();
    step(&mut c);
    let submitted: usize = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|s| s.replies)
        .sum();
    assert_eq!(submitted, 200);
    assert!(c.chunk > READ_START && c.cin.capacity() > 0);
    assert_eq!(c.shrink_at(), None, "replies are owed");

    link.send(Bytes::from("$-1\r\n".repeat(200)), 200);
    step(&mut c);
    assert_eq!(c.owed(), 0);
    let at = c.shrink_at().expect("idle, it will give its buffers back");
    assert_eq!(at, c.last_input + session::IDLE_SHRINK);
    tokio::time::advance(session::IDLE_SHRINK).await;
    assert!(at <= tokio::time::Instant::now());
    c.shrink();
    assert_eq!((c.cin.capacity(), c.chunk), (0, READ_START));
    assert_eq!(c.out.capacity() + c.locals.capacity(), 0);
    assert_eq!(c.shrink_at(), None, "once");
    // Waiting for input again takes a first-size buffer only, and starts no timer.
    step(&mut c);
    assert_eq!(c.cin.capacity(), READ_START);
    assert_eq!(c.shrink_at(), None);

    // New input: shared as before, and idle again later.
    app.write_all(get).await.unwrap();
    step(&mut c);
    assert_eq!(rx.try_recv().unwrap().replies, 1);
    link.send(Bytes::from_static(b"$-1\r\n"), 1);
    step(&mut c);
    assert_eq!(
        c.shrink_at(),
        Some(tokio::time::Instant::now() + session::IDLE_SHRINK)
    );
}

/// With `--multiplex-max-batches 1`, requests held while a batch is owed go once it is
/// answered, but in a later poll of the session's task than the one that answered it
/// (after the clients it woke have run), all together.
#[tokio::test]
async fn held_requests_go_in_a_later_poll_than_their_batch_is_answered() {
    use tokio::io::AsyncWriteExt;
    let get = |k: &str| format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).into_bytes();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut r = Router::new(2, 1, rx);
    let submit = |frames: Vec<u8>| {
        let (to, rx) = mpsc::unbounded_channel();
        tx.send(Submit {
            frames: frames.into(),
            replies: 1,
            plain: true,
            link: Link::new(to),
        })
        .unwrap();
        rx
    };
    // One read, as the session's poll makes it: the bytes, or None for Pending.
    let read_now = |r: &mut Router| {
        let mut bytes = vec![0; 1024];
        let mut buf = ReadBuf::new(&mut bytes);
        let waker = std::task::Waker::noop();
        match Pin::new(r).poll_read(&mut Context::from_waker(waker), &mut buf) {
            Poll::Ready(result) => {
                result.unwrap();
                Some(buf.filled().to_vec())
            }
            Poll::Pending => None,
        }
    };
    let next_poll = |r: &Router| r.polls.fetch_add(1, Ordering::Relaxed);

    let _a = submit(get("a"));
    assert_eq!(read_now(&mut r), Some(get("a")));
    let _b = submit(get("b"));
    assert_eq!(read_now(&mut r), None, "held while a's batch is owed");
    next_poll(&r);
    r.write_all(b":1\r\n").await.unwrap();
    assert_eq!(
        read_now(&mut r),
        None,
        "not in the poll that answered the batch"
    );
    let _c = submit(get("c"));
    next_poll(&r);
    assert_eq!(read_now(&mut r), Some([get("b"), get("c")].concat()));
}

/// `f` of the request made of `args`, parsed.
fn with_command<T>(args: &[&[u8]], f: impl FnOnce(&crate::resp::request::Command<'_>) -> T) -> T {
    let bytes = crate::devenv::encode(args);
    let mut parser = RequestParser::new();
    let frame = parser.parse(&bytes).unwrap().unwrap();
    f(&parser.command(&bytes, &frame))
}

#[test]
fn hello_moves_a_shared_client_only_without_options() {
    let parse = |args: &[&[u8]], current| {
        with_command(args, |cmd| hello(cmd, current).map(|h| (h.proto, h.name)))
    };
    let named = |n: &'static [u8]| Some(Some(Bytes::from_static(n)));
    assert_eq!(parse(&[b"HELLO"], 2), Some((2, None)));
    assert_eq!(parse(&[b"HELLO"], 3), Some((3, None)));
    assert_eq!(parse(&[b"hello", b"3"], 2), Some((3, None)));
    assert_eq!(parse(&[b"HELLO", b"2"], 3), Some((2, None)));
    assert_eq!(
        parse(&[b"HELLO", b"3", b"auth", b"u", b"p"], 2),
        Some((3, None))
    );
    assert_eq!(
        parse(&[b"HELLO", b"3", b"SETNAME", b"svc-1"], 2),
        Some((3, named(b"svc-1")))
    );
    // go-redis v9's order, and the other one; an empty name removes the name.
    assert_eq!(
        parse(&[b"HELLO", b"3", b"AUTH", b"u", b"p", b"setname", b"x"], 2),
        Some((3, named(b"x")))
    );
    assert_eq!(
        parse(&[b"HELLO", b"2", b"SETNAME", b"x", b"AUTH", b"u", b"p"], 2),
        Some((2, named(b"x")))
    );
    assert_eq!(
        parse(&[b"HELLO", b"3", b"SETNAME", b""], 3),
        Some((3, Some(None)))
    );
    for args in [
        &[&b"HELLO"[..], b"4"][..],
        &[b"HELLO", b"03"],
        &[b"HELLO", b"SETNAME", b"x"],
        &[b"HELLO", b"3", b"SETNAME", b"a b"],
        &[b"HELLO", b"3", b"SETNAME"],
        &[b"HELLO", b"3", b"AUTH", b"u"],
        &[b"HELLO", b"3", b"AUTH", b"u", b"p", b"SETNAME"],
        &[b"HELLO", b"3", b"x", b"u", b"p"],
        &[b"GET", b"3"],
    ] {
        assert_eq!(parse(args, 2), None, "{args:?}");
    }
}

/// `CLIENT SETNAME` is the proxy's to answer only with a name Redis accepts; any other
/// form is the server's (the client pins, and gets the server's reply or error).
#[test]
fn client_setname_only_with_a_name_redis_accepts() {
    let setname =
        |args: &[&[u8]]| with_command(args, |cmd| (client_setname(cmd), client_getname(cmd)));
    assert_eq!(
        setname(&[b"CLIENT", b"SETNAME", b"billing-7"]),
        (Some(Some(Bytes::from_static(b"billing-7"))), false)
    );
    assert_eq!(
        setname(&[b"client", b"setname", b"!~"]),
        (Some(Some(Bytes::from_static(b"!~"))), false)
    );
    // Empty: the name is removed.
    assert_eq!(setname(&[b"CLIENT", b"SETNAME", b""]), (Some(None), false));
    assert_eq!(setname(&[b"client", b"GetName"]), (None, true));
    for args in [
        &[&b"CLIENT"[..], b"SETNAME", b"a b"][..],
        &[b"CLIENT", b"SETNAME", b"a\nb"],
        &[b"CLIENT", b"SETNAME", "é".as_bytes()],
        &[b"CLIENT", b"SETNAME"],
        &[b"CLIENT", b"SETNAME", b"a", b"b"],
        &[b"CLIENT", b"GETNAME", b"x"],
        &[b"CLIENT", b"NAME", b"x"],
    ] {
        assert_eq!(setname(args), (None, false), "{args:?}");
    }
}

#[test]
fn credentials_of_auth_and_hello() {
    let creds = |args: &[&[u8]]| {
        with_command(args, |cmd| {
            credentials(cmd).map(|(u, p)| (u.to_vec(), p.to_vec()))
        })
    };
    let pair = |u: &[u8], p: &[u8]| Some((u.to_vec(), p.to_vec()));
    assert_eq!(creds(&[b"AUTH", b"pw"]), pair(b"default", b"pw"));
    assert_eq!(creds(&[b"auth", b"u", b"pw"]), pair(b"u", b"pw"));
    assert_eq!(
        creds(&[b"HELLO", b"3", b"AUTH", b"default", b"pw"]),
        pair(b"default", b"pw")
    );
    assert_eq!(
        creds(&[b"hello", b"2", b"SETNAME", b"n", b"auth", b"u", b"pw"]),
        pair(b"u", b"pw")
    );
    // A name that reads "auth" is a name.
    assert_eq!(
        creds(&[b"HELLO", b"3", b"SETNAME", b"auth", b"AUTH", b"u", b"pw"]),
        pair(b"u", b"pw")
    );
    for args in [
        &[&b"AUTH"[..]][..],
        &[b"AUTH", b"a", b"b", b"c"],
        &[b"HELLO", b"3"],
        &[b"HELLO", b"3", b"AUTH", b"u"],
        &[b"HELLO", b"3", b"SETNAME", b"auth"],
        &[b"GET", b"auth"],
    ] {
        assert_eq!(creds(args), None, "{args:?}");
    }
}

/// `--multiplex-max-batches 1`: requests arriving while a batch is owed its replies wait,
/// and go as one batch once its last reply is delivered; held requests of 16 KiB or more
/// go at once; with no limit every submission goes as it comes.
#[test]
fn with_a_batch_limit_requests_wait_for_the_owed_batch() {
    let submit = |r: &mut Router, frames: Vec<u8>, replies| {
        let (to, rx) = mpsc::unbounded_channel();
        r.hold(Submit {
            frames: frames.into(),
            replies,
            plain: true,
            link: Link::new(to),
        });
        r.release_due();
        rx
    };
    let get = |k: &str| format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).into_bytes();
    let written =
        |r: &mut Router| -> Vec<u8> { r.out.drain(..).flat_map(|b| b.0.to_vec()).collect() };

    let mut r = router(2, 1);
    let mut a = submit(&mut r, get("a"), 1);
    assert_eq!(written(&mut r), get("a"), "the first batch goes at once");
    let mut b = submit(&mut r, get("b"), 1);
    let mut c = submit(&mut r, [get("c1"), get("c2")].concat(), 2);
    assert!(
        r.out.is_empty(),
        "held while the first batch is owed its reply"
    );
    assert_eq!((r.held.len(), r.held_replies), (2, 3));

    // The first batch's reply releases the held requests, in order, as one batch.
    r.rin.extend_from_slice(b"$2\r\nva\r\n");
    r.deliver().unwrap();
    assert_eq!(collect(&mut a), (b"$2\r\nva\r\n".to_vec(), 1));
    r.release_due();
    assert_eq!(written(&mut r), [get("b"), get("c1"), get("c2")].concat());
    assert_eq!(r.batches, [3]);

    // A large request does not wait.
    let big = format!(
        "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{}\r\n",
        HOLD_BYTES,
        "x".repeat(HOLD_BYTES)
    );
    let _d = submit(&mut r, big.clone().into_bytes(), 1);
    assert_eq!(written(&mut r), big.into_bytes());
    assert_eq!(r.batches, [3, 1]);

    // Replies in pieces: the next small request waits until both batches are answered.
    let mut e = submit(&mut r, get("e"), 1);
    r.rin.extend_from_slice(b"$2\r\nvb\r\n$3\r\nvc1\r\n");
    r.deliver().unwrap();
    r.release_due();
    assert!(r.out.is_empty());
    r.rin.extend_from_slice(b"$-1\r\n+OK\r\n");
    r.deliver().unwrap();
    r.release_due();
    assert_eq!(written(&mut r), get("e"));
    assert_eq!(collect(&mut b), (b"$2\r\nvb\r\n".to_vec(), 1));
    assert_eq!(collect(&mut c), (b"$3\r\nvc1\r\n$-1\r\n".to_vec(), 2));
    r.rin.extend_from_slice(b":1\r\n");
    r.deliver().unwrap();
    assert_eq!(collect(&mut e), (b":1\r\n".to_vec(), 1));
    assert!(r.batches.is_empty() && r.routes.is_empty());

    // No limit: every submission is its own batch, at once.
    let mut r = router(2, 0);
    let _a = submit(&mut r, get("a"), 1);
    let _b = submit(&mut r, get("b"), 1);
    assert_eq!(written(&mut r), [get("a"), get("b")].concat());
    assert_eq!(r.batches, [1, 1]);
}
