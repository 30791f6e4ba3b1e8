//! Multiplexing (`--multiplex`): plain commands of many clients share one upstream connection
//! per session thread and protocol, so the server reads and answers them in batches.
//!
//! A client starts *shared*. Each complete request it sends is classified by its command name
//! ([`shareable`]): commands that get exactly one reply, change no connection state and never
//! block go to its thread's *router*, which writes them, in the order they arrived, to one
//! shared upstream session and hands each reply frame back to the client that sent the
//! request. RESP2 and RESP3 clients have a router each: `HELLO 2|3` moves a client to the
//! other one once every reply it is owed on the first has come. The first other command (or a
//! malformed request) *pins* the client: once every reply it is owed has been delivered, it
//! gets an upstream connection of its own, exactly as without multiplexing, and keeps it. The
//! unread bytes go to that session first, so nothing is lost or reordered, and the client's
//! own connection state starts clean, in the protocol it chose.
//!
//! With a local password (`--local-password`), a client shares only once it has given the
//! right one (see `credentials`): anything it sends before, and any wrong password, pins it, and
//! its own session answers as Redis does (NOAUTH, WRONGPASS). A client pinned after giving the
//! password starts its session authenticated.
//!
//! The shared upstream session is an ordinary session ([`session::serve_shared`]) whose client is
//! the router itself, run in the router's task: the session reads the requests from the router
//! and writes the replies to it, with no pipe or other task between them. Authentication,
//! re-authentication at every rotation, expiry, metrics and draining are the same code as for
//! every other connection.
//!
//! If the shared upstream connection fails, the clients with replies still owed are closed
//! (their commands may or may not have run, as with a connection of their own); the others
//! carry on, and the next request opens a new shared session.
//!
//! A shared client more than 1 MiB behind in reading its replies makes the shared connection
//! wait for it, as a connection of its own would: the proxy never holds much of a big reply
//! for a slow reader, and the clients behind it wait. One that does not catch up within 10 s
//! is closed (`PAUSE`, `RESUME`, `SLOW_CLIENT`). One that does, and one handed a reply of
//! more than 1 MiB, pins at its next request: the others wait behind one of its big replies
//! at most.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::gated::Gated;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{Frame, RequestParser};
use crate::secret::Secret;
use crate::session::{self, CloseReason, Outcome, Shared, Target};
use crate::workers::Workers;

mod balance;

pub use balance::Balance;

/// With `--multiplex-max-batches`, held requests go at once when they reach this size: a
/// batch this large already spreads the costs of a batch (a system call and a TLS record
/// each way, a pass of the server's event loop) thin, and holding it longer would only
/// delay it.
const HOLD_BYTES: usize = 16 * 1024;
/// A reply frame larger than this goes to its client in parts of this size or more, as it
/// arrives, rather than whole: the router would otherwise hold all of it (a `GET` of a 100 MB
/// value, 100 MB). Each part costs a hand-over and a write to the client, fewer than a
/// connection of its own makes (a write per 16 KiB read). Parts of 256 KiB, or whole replies,
/// measured no different (`benches/ab.sh 5 "-c 20 -n 4000 -d 200000 -t get"`, `--multiplex`:
/// 180, 228 and 198 µs of proxy CPU per GET, within the noise between rounds).
const PASS_ON: usize = 64 * 1024;
/// A shared client stops reading requests while this many replies are owed to it, or while
/// this many reply bytes wait for it to read them.
const MAX_OWED: usize = 1024;
const MAX_UNSENT: usize = 256 * 1024;
/// The router hands a client no more replies while this many bytes it was handed wait for it
/// to read them, and goes on once no more than [`RESUME`] do: the shared connection then waits
/// for a client that reads a big reply more slowly than the server sends it, as a connection
/// of its own would, instead of the proxy holding all of the reply. A client that keeps up
/// seldom makes it wait: its socket's buffers hold more than this.
const PAUSE: usize = 1024 * 1024;
const RESUME: usize = PAUSE / 2;
/// The shared connection waits this long at most for a client to read its replies down to
/// [`RESUME`]; then the client is closed and the rest of its replies dropped. Only a
/// client that stopped reading (stuck, or paused far longer than a garbage collection) is
/// this slow, and every other client of the connection waits while it is.
const SLOW_CLIENT: Duration = Duration::from_secs(10);
/// Reads from a shared client start at this size and double while they fill, up to 32 KiB:
/// a request with a 16 KiB value (16.4 KB with its headers) then comes in one read into one
/// allocation. With 16 KiB reads its last bytes made the buffer grow, copying the rest, and
/// 16 KiB SETs cost 8 % more proxy CPU (`benches/ab.sh`, `--multiplex`).
const READ_START: usize = 2 * 1024;
const READ_MAX: usize = 32 * 1024;

/// Commands that may share a connection: one reply each, no connection state read or
/// written, never blocking. Anything else (and any command not listed, modules' included)
/// pins the client to a connection of its own.
pub fn shareable(name: &[u8]) -> bool {
    // GET and SET, most of what most clients send, before the table (`b & !0x20` is the
    // upper case of a letter, and equals one only for that letter in either case).
    if let &[a, b, c] = name {
        let upper = [a & !0x20, b & !0x20, c & !0x20];
        if upper == *b"GET" || upper == *b"SET" {
            return true;
        }
    }
    let Some(upper) = Upper::of(name) else {
        return false;
    };
    matches!(
        &*upper,
        b"GET"
            | b"SET"
            | b"SETNX"
            | b"SETEX"
            | b"PSETEX"
            | b"GETSET"
            | b"GETDEL"
            | b"GETEX"
            | b"GETRANGE"
            | b"SETRANGE"
            | b"APPEND"
            | b"STRLEN"
            | b"INCR"
            | b"DECR"
            | b"INCRBY"
            | b"DECRBY"
            | b"INCRBYFLOAT"
            | b"MGET"
            | b"MSET"
            | b"MSETNX"
            | b"DEL"
            | b"UNLINK"
            | b"EXISTS"
            | b"EXPIRE"
            | b"PEXPIRE"
            | b"EXPIREAT"
            | b"PEXPIREAT"
            | b"EXPIRETIME"
            | b"PEXPIRETIME"
            | b"TTL"
            | b"PTTL"
            | b"PERSIST"
            | b"TYPE"
            | b"TOUCH"
            | b"HGET"
            | b"HSET"
            | b"HSETNX"
            | b"HMSET"
            | b"HMGET"
            | b"HDEL"
            | b"HEXISTS"
            | b"HLEN"
            | b"HGETALL"
            | b"HKEYS"
            | b"HVALS"
            | b"HINCRBY"
            | b"HINCRBYFLOAT"
            | b"HSTRLEN"
            | b"HRANDFIELD"
            | b"LPUSH"
            | b"RPUSH"
            | b"LPUSHX"
            | b"RPUSHX"
            | b"LPOP"
            | b"RPOP"
            | b"LLEN"
            | b"LRANGE"
            | b"LINDEX"
            | b"LSET"
            | b"LREM"
            | b"LTRIM"
            | b"LINSERT"
            | b"LPOS"
            | b"LMOVE"
            | b"RPOPLPUSH"
            | b"SADD"
            | b"SREM"
            | b"SMEMBERS"
            | b"SISMEMBER"
            | b"SMISMEMBER"
            | b"SCARD"
            | b"SPOP"
            | b"SRANDMEMBER"
            | b"SINTER"
            | b"SUNION"
            | b"SDIFF"
            | b"SMOVE"
            | b"ZADD"
            | b"ZREM"
            | b"ZSCORE"
            | b"ZMSCORE"
            | b"ZINCRBY"
            | b"ZCARD"
            | b"ZCOUNT"
            | b"ZRANGE"
            | b"ZREVRANGE"
            | b"ZRANGEBYSCORE"
            | b"ZREVRANGEBYSCORE"
            | b"ZRANK"
            | b"ZREVRANK"
            | b"ZPOPMIN"
            | b"ZPOPMAX"
            | b"ZLEXCOUNT"
            | b"ZRANGEBYLEX"
            | b"XADD"
            | b"XLEN"
            | b"XRANGE"
            | b"XREVRANGE"
            | b"XDEL"
            | b"XTRIM"
            | b"PFADD"
            | b"PFCOUNT"
            | b"SETBIT"
            | b"GETBIT"
            | b"BITCOUNT"
            | b"BITPOS"
            | b"GEOADD"
            | b"GEODIST"
            | b"GEOPOS"
            | b"GEOHASH"
            | b"PING"
            | b"ECHO"
            // Server-wide state only (ioredis sends INFO when it connects).
            | b"INFO"
            | b"DBSIZE"
            | b"TIME"
    )
}

/// What a shared client's request gets.
enum Plan {
    /// Goes over the shared connection, answered with this many replies; `plain`: a command
    /// that shares, which the shared session only forwards (see [`session::Framing`]).
    Share { replies: usize, plain: bool },
    /// Answered by the proxy.
    Local(Bytes),
    /// `HELLO` in the current protocol with `SETNAME`: the proxy keeps the name, and a bare
    /// `HELLO <protocol>` goes over the shared connection in its place.
    Named(Option<Bytes>),
    /// `HELLO 2|3` to the other protocol: goes over the shared connection of that protocol,
    /// once every reply owed on the current one has come.
    Switch(u8),
    /// Needs a connection of its own.
    Pin,
}

/// What a `HELLO` a shared client may send does.
#[derive(Debug, PartialEq, Eq)]
struct Hello {
    /// The protocol it leaves the connection in.
    proto: u8,
    /// The name it gives the client (`SETNAME`; `Some(None)`: an empty name, which removes
    /// it), if it has a `SETNAME`.
    name: Option<Option<Bytes>>,
}

/// `HELLO` alone, or `HELLO 2|3` with any of `AUTH <user> <password>` and `SETNAME <name>`
/// (a name Redis accepts; go-redis v9 and Lettuce send `HELLO 3 … SETNAME` when they connect):
/// the protocol it leaves the connection in (`current` for a bare `HELLO`) and the name. A
/// shared client moves to the shared connection speaking that protocol, where the server
/// answers a `HELLO <protocol>` for it; the name stays with the proxy, like `CLIENT SETNAME`'s.
/// The AUTH pair is never forwarded: without a local password any is accepted, as on every
/// session; with one, only the right one shares (see [`credentials`]). Any other `HELLO` pins
/// the client.
fn hello(cmd: &crate::resp::request::Command<'_>, current: u8) -> Option<Hello> {
    if !cmd.arg_is(0, "hello") {
        return None;
    }
    let proto = match cmd.argc() {
        1 => current,
        _ => match cmd.arg(1)? {
            b"2" => 2,
            b"3" => 3,
            _ => return None,
        },
    };
    let mut name = None;
    let mut i = 2;
    while i < cmd.argc() {
        if cmd.arg_is(i, "auth") && i + 2 < cmd.argc() {
            i += 3;
        } else if cmd.arg_is(i, "setname") && i + 1 < cmd.argc() {
            name = Some(valid_name(cmd.arg(i + 1)?)?);
            i += 2;
        } else {
            return None;
        }
    }
    Some(Hello { proto, name })
}

/// A client name Redis accepts ([`session::valid_client_name`]): the name, `None` for an
/// empty one (which removes the name).
fn valid_name(name: &[u8]) -> Option<Option<Bytes>> {
    session::valid_client_name(name)
        .then(|| (!name.is_empty()).then(|| Bytes::copy_from_slice(name)))
}

/// `CLIENT MAINT_NOTIFICATIONS …` (Lettuce sends it when it connects): refused by the proxy on
/// every connection (the endpoints it announces bypass the proxy), shared or not.
fn client_maint(cmd: &crate::resp::request::Command<'_>) -> bool {
    cmd.arg_is(0, "client") && cmd.arg_is(1, "maint_notifications")
}

/// `AUTH [user] password`: the proxy answers `+OK` to it, shared or not (applications
/// configured with a password go on sharing): to every well-formed AUTH without a local
/// password, as on every session; with one, to the right password (see [`credentials`]).
fn client_auth(cmd: &crate::resp::request::Command<'_>) -> bool {
    cmd.arg_is(0, "auth") && (2..=3).contains(&cmd.argc())
}

/// The user and password a request authenticates with: `AUTH [user] password` (the user is
/// `default` when not given) or `HELLO … AUTH user password`.
fn credentials<'a>(cmd: &'a crate::resp::request::Command<'_>) -> Option<(&'a [u8], &'a [u8])> {
    if client_auth(cmd) {
        return match cmd.argc() {
            2 => Some((b"default", cmd.arg(1)?)),
            _ => Some((cmd.arg(1)?, cmd.arg(2)?)),
        };
    }
    if !cmd.arg_is(0, "hello") {
        return None;
    }
    // The options as `hello` reads them: a `SETNAME` value is never taken for `AUTH`.
    let mut i = 2;
    while i < cmd.argc() {
        if cmd.arg_is(i, "auth") && i + 2 < cmd.argc() {
            return Some((cmd.arg(i + 1)?, cmd.arg(i + 2)?));
        }
        i += if cmd.arg_is(i, "setname") { 2 } else { 1 };
    }
    None
}

/// A command name in upper case, on the stack, for matching against the names of Redis
/// commands; none that matters here is longer than 16 bytes.
struct Upper {
    bytes: [u8; 16],
    len: usize,
}

impl Upper {
    fn of(name: &[u8]) -> Option<Upper> {
        let mut bytes = [0u8; 16];
        let upper = bytes.get_mut(..name.len())?;
        upper.copy_from_slice(name);
        upper.make_ascii_uppercase();
        Some(Upper {
            bytes,
            len: name.len(),
        })
    }
}

impl std::ops::Deref for Upper {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

const OK: &[u8] = b"+OK\r\n";

/// `CLIENT SETINFO LIB-NAME|LIB-VER <value>` with a value Redis accepts (no spaces, newlines
/// or other characters outside `!`..`~`): the library names itself when it connects (recent
/// redis-py, Jedis, Lettuce do). Answered `+OK` by the proxy so that the client can go on
/// sharing; the names are not sent to the server (a shared connection serves many libraries).
/// Anything else about `CLIENT` pins the client.
fn client_setinfo(cmd: &crate::resp::request::Command<'_>) -> bool {
    cmd.argc() == 4
        && cmd.arg_is(0, "client")
        && cmd.arg_is(1, "setinfo")
        && (cmd.arg_is(2, "lib-name") || cmd.arg_is(2, "lib-ver"))
        && cmd.arg(3).is_some_and(session::valid_client_name)
}

/// `CLIENT SETNAME <name>` with a name Redis accepts (no spaces, newlines or other characters
/// outside `!`..`~`; empty removes the name): the name (`None`: removed). The proxy answers
/// it for a shared client and remembers the name: `CLIENT GETNAME` is answered from it, and a
/// client that pins gets a connection named so before its next command. Anything else pins.
fn client_setname(cmd: &crate::resp::request::Command<'_>) -> Option<Option<Bytes>> {
    if cmd.argc() != 3 || !cmd.arg_is(0, "client") || !cmd.arg_is(1, "setname") {
        return None;
    }
    valid_name(cmd.arg(2)?)
}

/// `CLIENT GETNAME`.
fn client_getname(cmd: &crate::resp::request::Command<'_>) -> bool {
    cmd.argc() == 2 && cmd.arg_is(0, "client") && cmd.arg_is(1, "getname")
}

/// The routers of one target, one per session thread and protocol (RESP2 clients share one
/// connection, RESP3 clients another), started on first use.
pub struct Routers {
    by_worker: Mutex<HashMap<(usize, u8), mpsc::UnboundedSender<Submit>>>,
    /// Which session threads the shared clients run on.
    balance: Arc<Balance>,
    /// `--multiplex-max-batches`: batches a shared connection may have owed replies before
    /// new requests are held for the next one; 0: no limit.
    max_batches: usize,
}

impl Routers {
    /// `consolidate`: `--multiplex-consolidate` with more than one session thread.
    pub fn new(max_batches: usize, consolidate: bool) -> Routers {
        Routers {
            by_worker: Mutex::default(),
            balance: Arc::new(Balance::new(consolidate)),
            max_batches,
        }
    }

    /// Whether a new client of this target should start on the home thread.
    pub fn gathering(&self) -> bool {
        self.balance.consolidated()
    }

    /// The session thread a shared client on `worker` should move to, if any: the home
    /// thread while consolidated, a thread with fewer sessions while spread (and moving
    /// leaves the threads more even).
    fn destination(&self, worker: usize, workers: &Workers) -> Option<usize> {
        if !self.balance.enabled() {
            None
        } else if self.balance.consolidated() {
            (worker != Workers::HOME).then_some(Workers::HOME)
        } else {
            workers.lighter_than(worker)
        }
    }

    /// The router of session thread `worker` (the caller runs on it) for protocol `proto`,
    /// started if there is none (or it ended).
    fn get(
        &self,
        worker: usize,
        proto: u8,
        shared: &Arc<Shared>,
        target: &Arc<Target>,
    ) -> mpsc::UnboundedSender<Submit> {
        let mut map = self.by_worker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(&(worker, proto)).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut router = Router::new(proto, self.max_batches, rx);
        router.balance = Some((
            self.balance.clone(),
            balance::Tally::new(worker == Workers::HOME),
        ));
        tokio::spawn(route(router, shared.clone(), target.clone()));
        map.insert((worker, proto), tx.clone());
        tx
    }
}

/// Requests of one client for the shared connection, with where their replies go.
struct Submit {
    frames: Bytes,
    replies: usize,
    /// Every request is plain (a command that shares), so `replies` is also their number.
    plain: bool,
    link: Arc<Link>,
}

enum Delivery {
    /// Reply frames, this many whole ones; with 0, part of a big reply (its end comes in a
    /// later delivery, which counts it).
    Replies(Bytes, usize),
    /// The client must close so, without the replies it is still owed (the shared connection
    /// ended before they came, or the client read too slowly).
    End(Outcome),
}

/// What a shared client and the router share: where its replies go, and how far behind it is
/// in reading them.
struct Link {
    to: mpsc::UnboundedSender<Delivery>,
    /// Bytes handed to the client (by the router, and its local replies) and not yet written
    /// to it.
    unsent: AtomicUsize,
    /// The router, when it waits for the client to catch up ([`Link::behind`]).
    router: AtomicWaker,
    /// Why the client pins at its next request, if it does ([`Link::pins`]).
    pin_next: AtomicU8,
}

/// Values of [`Link::pin_next`]: the router handed the client a reply of more than [`PAUSE`]
/// bytes, or had to wait for it to read.
const LARGE_REPLY: u8 = 1;
const SLOW_READER: u8 = 2;

impl Link {
    fn new(to: mpsc::UnboundedSender<Delivery>) -> Arc<Link> {
        Arc::new(Link {
            to,
            unsent: AtomicUsize::new(0),
            router: AtomicWaker::new(),
            pin_next: AtomicU8::new(0),
        })
    }

    /// The client is to pin at its next request, for `why` (unless it already is, for another
    /// reason).
    fn pin_next(&self, why: u8) {
        let _ = self
            .pin_next
            .compare_exchange(0, why, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Why the client pins at its next request (the `reason` of `multiplex_pinned_total`), if
    /// the router decided it does: it was handed a reply long enough to hold every client
    /// behind it while it passed, or the shared connection had to wait for it to read.
    fn pins(&self) -> Option<&'static str> {
        match self.pin_next.load(Ordering::Relaxed) {
            0 => None,
            LARGE_REPLY => Some("large_reply"),
            _ => Some("slow_reader"),
        }
    }

    fn unsent(&self) -> usize {
        self.unsent.load(Ordering::SeqCst)
    }

    /// `n` more bytes were handed to the client.
    fn handed(&self, n: usize) {
        self.unsent.fetch_add(n, Ordering::SeqCst);
    }

    /// Hands the client reply frames, `replies` whole ones (see [`Delivery::Replies`]).
    fn send(&self, frames: Bytes, replies: usize) {
        self.handed(frames.len());
        let _ = self.to.send(Delivery::Replies(frames, replies));
    }

    /// `n` bytes were written to the client: the router goes on if it waited for that.
    fn written(&self, n: usize) {
        let before = self.unsent.fetch_sub(n, Ordering::SeqCst);
        if before > RESUME && before - n <= RESUME {
            self.router.wake();
        }
    }

    /// Whether the router must wait for the client: it is more than [`PAUSE`] behind (more
    /// than [`RESUME`] once the router is `waiting` for it) and still there. `cx` is then woken
    /// once it caught up to [`RESUME`] or is gone.
    fn behind(&self, cx: &Context<'_>, waiting: bool) -> bool {
        let limit = if waiting { RESUME } else { PAUSE };
        if self.unsent() <= limit || self.to.is_closed() {
            return false;
        }
        self.router.register(cx.waker());
        // Checked again: the client may have caught up before the waker was in place.
        self.unsent() > limit && !self.to.is_closed()
    }
}

/// How a shared client's first phase ended.
enum Phase {
    Done(Outcome),
    /// Serve the rest on a connection of its own speaking this protocol and named so (the
    /// client's `CLIENT SETNAME`), these bytes first; `true`: the client gave the local
    /// password. The last: why, for `multiplex_pinned_total` ([`pin_reason`]).
    Pin(BytesMut, u8, Option<Bytes>, bool, &'static str),
    /// Go on on this session thread.
    Move(usize, Carry),
}

/// What a shared client carries to the session thread it moves to.
pub struct Carry {
    /// A request it has begun to send.
    cin: BytesMut,
    proto: u8,
    name: Option<Bytes>,
    /// It gave the local password.
    authenticated: bool,
}

impl Default for Carry {
    /// What a client that just connected has: nothing read, RESP2, no name, no password given.
    fn default() -> Carry {
        Carry {
            cin: BytesMut::new(),
            proto: 2,
            name: None,
            authenticated: false,
        }
    }
}

/// How [`serve`] ended.
pub enum Served<C> {
    Done(Outcome),
    /// Nothing is owed to the client, and it goes on on session thread `to`
    /// (`--multiplex-consolidate`): serve it there, with `carry`.
    Move {
        client: C,
        to: usize,
        carry: Carry,
    },
}

/// Serves a client with multiplexing: shared while it sends only [`shareable`] commands,
/// pinned to a session of its own from its first other command on. `worker`: the session
/// thread this runs on (`workers.rs`), whose shared connection it uses; `carry`: what the
/// client had when it moved here from another thread.
pub async fn serve<C>(
    mut client: C,
    shared: &Arc<Shared>,
    target: &Arc<Target>,
    worker: usize,
    workers: &Workers,
    carry: Option<Carry>,
) -> Served<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Some(routers) = &target.mux else {
        return Served::Done(session::serve(client, shared, target).await);
    };
    let router = |proto| routers.get(worker, proto, shared, target);
    let destination = || routers.destination(worker, workers);
    let m = crate::metrics::handles();
    let sharing = crate::metrics::Active::new(&m.mux_shared, false);
    let phase = shared_phase(&mut client, shared, router, destination, carry).await;
    drop(sharing);
    match phase {
        Phase::Done(outcome) => Served::Done(outcome),
        Phase::Move(to, carry) => Served::Move { client, to, carry },
        Phase::Pin(rest, proto, name, authenticated, reason) => {
            metrics::counter!(crate::metrics::MULTIPLEX_PINNED_TOTAL, "reason" => reason)
                .increment(1);
            tracing::debug!(
                command = %PinnedBy(&rest),
                reason,
                proto,
                "pinned: a connection of its own from now on"
            );
            // The client's connection state starts clean, in the protocol it said it speaks.
            Served::Done(
                session::serve_with(
                    Prefixed {
                        first: rest,
                        inner: client,
                    },
                    shared,
                    target,
                    proto,
                    name.as_deref(),
                    authenticated,
                )
                .await,
            )
        }
    }
}

/// The shared phase of one client. `router(proto)`: the router of this thread for protocol
/// `proto`; `destination()`: the thread the client should move to, if any; `carry`: the
/// state it moved here with.
async fn shared_phase<C>(
    client: &mut C,
    shared: &Shared,
    router: impl Fn(u8) -> mpsc::UnboundedSender<Submit>,
    destination: impl Fn() -> Option<usize>,
    carry: Option<Carry>,
) -> Phase
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let carry = carry.unwrap_or_default();
    let proto = carry.proto;
    let password = shared.local_password.clone();
    let mut c = SharedClient::new(carry, password, router(proto));
    let idle = shared.client_idle_timeout;
    let partial = shared.partial_request_timeout;
    // Made once: the loop turns at every change that matters to it, and a new wait on the
    // shutdown at each turn would cost a registration and a removal under its lock; gated,
    // the polls at every wake of the task cost no lock either.
    let mut stop = Gated::new(Box::pin(shared.shutdown.cancelled()));
    let mut draining = shared.shutdown.is_cancelled();
    // Armed once per idle spell, not at every turn of the loop (one per request of a client
    // that waits for each reply): a timer set and cancelled per request would cost more than
    // the buffers it gives back.
    let mut shrink = std::pin::pin!(tokio::time::sleep(session::IDLE_SHRINK));
    let mut shrink_armed = false;
    loop {
        if draining {
            c.reading = false;
        }
        if c.owed() == 0 {
            if let Some(proto) = c.switch.take() {
                // Nothing is owed on the old protocol's connection: what follows cannot
                // overtake it.
                c.router = router(proto);
                c.proto = proto;
                c.submit();
                continue;
            }
        }
        if c.owed() == 0 && c.out.is_empty() {
            if c.pin {
                let reason = c
                    .pinned_by
                    .unwrap_or_else(|| pin_reason(&c.cin, c.authenticated));
                return Phase::Pin(
                    std::mem::take(&mut c.cin),
                    c.proto,
                    c.name.take(),
                    c.authenticated,
                    reason,
                );
            }
            if !c.reading {
                return Phase::Done(if draining {
                    Outcome::Drained
                } else {
                    Outcome::ClientClosed
                });
            }
            if c.may_move() {
                if let Some(to) = destination() {
                    // Nothing owed, nothing to write: the client can go on elsewhere.
                    return Phase::Move(
                        to,
                        Carry {
                            cin: std::mem::take(&mut c.cin),
                            proto: c.proto,
                            name: c.name.take(),
                            authenticated: c.authenticated,
                        },
                    );
                }
            }
        }
        if !shrink_armed {
            if let Some(at) = c.shrink_at() {
                shrink.as_mut().reset(at);
                shrink_armed = true;
            }
        }
        let deadline = c.deadline(idle, partial);
        let step = tokio::select! {
            biased;
            step = poll_fn(|cx| c.poll(cx, client)) => step,
            _ = &mut stop, if !draining => {
                draining = true;
                continue;
            }
            _ = &mut shrink, if shrink_armed => {
                // Input since it was armed moved the moment on: it is armed again for that.
                shrink_armed = false;
                if c.shrink_at().is_some_and(|at| at <= tokio::time::Instant::now()) {
                    c.shrink();
                }
                continue;
            }
            _ = sleep_until(deadline.as_ref().map(|(at, _)| *at)) => {
                // The deadline may have passed while the loop was not looking: it holds only
                // if it still would.
                match c.deadline(idle, partial) {
                    Some((at, reason)) if at <= tokio::time::Instant::now() => {
                        return Phase::Done(Outcome::Closed(reason));
                    }
                    _ => continue,
                }
            }
        };
        if let Some(outcome) = step {
            return Phase::Done(outcome);
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A client in its shared phase. Its bytes are counted in the metrics by the sessions that
/// carry them: the shared session counts what it reads from and writes to the router, a
/// pinned session what it reads (the bytes handed over first included); only requests no
/// session sees are counted here.
struct SharedClient {
    cin: BytesMut,
    chunk: usize,
    parser: RequestParser,
    /// Replies submitted for, and received, since the client connected (the difference is
    /// what is owed).
    asked: u64,
    received: u64,
    /// Replies the proxy gives itself (`CLIENT SETINFO`, `AUTH`, …), each after the
    /// `asked` count of replies submitted before it: released into `out` once those came.
    locals: VecDeque<(u64, Bytes)>,
    /// The name the client gave itself (`CLIENT SETNAME`, answered by the proxy).
    name: Option<Bytes>,
    /// Replies received, not yet written to the client (the front one perhaps in part).
    out: VecDeque<Bytes>,
    /// A command that cannot share was read, or the router decided the client pins: submit
    /// nothing more.
    pin: bool,
    /// Why it pinned, when the router decided it ([`Link::pins`]).
    pinned_by: Option<&'static str>,
    /// The protocol the client speaks (its shared connection's), 2 until it says `HELLO 3`.
    proto: u8,
    /// A `HELLO` to this protocol waits (first in `cin`) until nothing is owed on the
    /// current protocol's connection.
    switch: Option<u8>,
    /// Still reading the client (not closed by it, not draining).
    reading: bool,
    /// `--local-password`, which the client must give before anything it sends shares.
    password: Option<Arc<Secret>>,
    /// The client gave it (or there is none).
    authenticated: bool,
    /// When bytes last came from the client.
    last_input: tokio::time::Instant,
    /// Its buffers were given back, and nothing came since ([`SharedClient::shrink`]).
    shrunk: bool,
    router: mpsc::UnboundedSender<Submit>,
    /// Where the router sends the replies, which come in `replies`.
    link: Arc<Link>,
    replies: mpsc::UnboundedReceiver<Delivery>,
}

impl SharedClient {
    fn new(
        carry: Carry,
        password: Option<Arc<Secret>>,
        router: mpsc::UnboundedSender<Submit>,
    ) -> SharedClient {
        let authenticated = carry.authenticated || password.is_none();
        let (to_me, replies) = mpsc::unbounded_channel();
        SharedClient {
            chunk: READ_START,
            parser: RequestParser::new(),
            asked: 0,
            received: 0,
            locals: VecDeque::new(),
            out: VecDeque::new(),
            name: carry.name,
            pin: false,
            pinned_by: None,
            proto: carry.proto,
            switch: None,
            reading: true,
            password,
            authenticated,
            last_input: tokio::time::Instant::now(),
            shrunk: false,
            router,
            link: Link::new(to_me),
            replies,
            cin: carry.cin,
        }
    }

    /// Replies submitted for and not yet received.
    fn owed(&self) -> u64 {
        self.asked - self.received
    }

    /// Whether it may go on on another session thread (when nothing is owed to it and nothing
    /// waits to be written): not while a `HELLO` waits to switch protocols, nor once the router
    /// decided that it pins at its next request ([`SharedClient::submit`]).
    fn may_move(&self) -> bool {
        self.switch.is_none() && self.link.pins().is_none()
    }

    fn has_room(&self) -> bool {
        self.owed() < MAX_OWED as u64 && self.link.unsent() < MAX_UNSENT
    }

    /// The reply to `CLIENT GETNAME`: the name, or a null in the client's protocol.
    fn getname_reply(&self) -> Bytes {
        match &self.name {
            Some(name) => {
                let mut reply = BytesMut::with_capacity(name.len() + 16);
                crate::resp::encode::bulk(&mut reply, name);
                reply.freeze()
            }
            None if self.proto == 3 => Bytes::from_static(b"_\r\n"),
            None => Bytes::from_static(b"$-1\r\n"),
        }
    }

    /// Moves the local replies whose turn has come (every reply submitted before them
    /// received) into `out`.
    fn release_locals(&mut self) {
        while self
            .locals
            .front()
            .is_some_and(|(after, _)| *after <= self.received)
        {
            let (_, reply) = self.locals.pop_front().expect("checked above");
            self.link.handed(reply.len());
            self.out.push_back(reply);
        }
    }

    /// When an idle client gives its buffers back (as sessions do, after
    /// [`session::IDLE_SHRINK`] with nothing sent, nothing owed, nothing to write): thousands
    /// of idle shared clients then cost little memory, and a busy one allocates nothing per
    /// request. `None` while there is nothing to give back.
    fn shrink_at(&self) -> Option<tokio::time::Instant> {
        let idle = self.cin.is_empty()
            && self.owed() == 0
            && self.out.is_empty()
            && self.locals.is_empty();
        (idle && !self.shrunk).then(|| self.last_input + session::IDLE_SHRINK)
    }

    /// The next read allocates a buffer of [`READ_START`] again.
    fn shrink(&mut self) {
        self.cin = BytesMut::new();
        self.chunk = READ_START;
        self.out = VecDeque::new();
        self.locals = VecDeque::new();
        self.shrunk = true;
    }

    /// Redis's `timeout` (`idle`), or the limit on one incomplete request (`partial`), with
    /// the close it brings: they run while nothing is owed to the client (the wait is then the
    /// client's), from its last input.
    fn deadline(
        &self,
        idle: Option<Duration>,
        partial: Option<Duration>,
    ) -> Option<(tokio::time::Instant, CloseReason)> {
        if self.owed() > 0 || !self.out.is_empty() {
            return None;
        }
        if self.cin.is_empty() {
            idle.map(|t| (self.last_input + t, CloseReason::ClientIdle(t)))
        } else {
            partial.map(|t| (self.last_input + t, CloseReason::PartialRequest(t)))
        }
    }

    /// Moves bytes until nothing more can move now (`Pending`). `Ready(None)`: bytes moved and
    /// nothing is owed any more, which the loop must look at (an end, a move, a pin, a
    /// protocol switch, a timer); `Ready(Some)`: the end.
    fn poll<C>(&mut self, cx: &mut Context<'_>, client: &mut C) -> Poll<Option<Outcome>>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let mut moved = false;
        loop {
            let mut progress = false;
            while let Poll::Ready(d) = self.replies.poll_recv(cx) {
                match d {
                    Some(Delivery::Replies(frames, n)) => {
                        // The router counted the bytes in `link` as it sent them.
                        self.received += n as u64;
                        self.out.push_back(frames);
                        // A delivery holds replies of one submission: a local reply queued
                        // between two submissions never falls inside one.
                        self.release_locals();
                        progress = true;
                    }
                    Some(Delivery::End(outcome)) => return Poll::Ready(Some(outcome)),
                    None => return Poll::Ready(Some(Outcome::UpstreamClosed)),
                }
            }
            while !self.out.is_empty() {
                // Every reply waiting, in one write.
                let mut slices = [io::IoSlice::new(&[]); 64];
                let mut count = 0;
                for (slot, chunk) in slices.iter_mut().zip(self.out.iter()) {
                    *slot = io::IoSlice::new(chunk);
                    count += 1;
                }
                match Pin::new(&mut *client).poll_write_vectored(cx, &slices[..count]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Some(Outcome::ClientError(
                            io::ErrorKind::WriteZero.into(),
                        )))
                    }
                    Poll::Ready(Ok(mut n)) => {
                        progress = true;
                        self.link.written(n);
                        while n > 0 {
                            let front = self.out.front_mut().expect("written bytes were queued");
                            let take = n.min(front.len());
                            front.advance(take);
                            n -= take;
                            if front.is_empty() {
                                self.out.pop_front();
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Outcome::ClientError(e))),
                    Poll::Pending => break,
                }
            }
            if self.reading && !self.pin && self.switch.is_none() && self.has_room() {
                self.cin.reserve(self.chunk);
                match tokio_util::io::poll_read_buf(Pin::new(&mut *client), cx, &mut self.cin) {
                    Poll::Ready(Ok(0)) => {
                        self.reading = false;
                        progress = true;
                    }
                    Poll::Ready(Ok(n)) => {
                        if n >= self.chunk {
                            self.chunk = (self.chunk * 2).min(READ_MAX);
                        }
                        self.last_input = tokio::time::Instant::now();
                        self.shrunk = false;
                        self.submit();
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Outcome::ClientError(e))),
                    Poll::Pending => {}
                }
            }
            moved |= progress;
            if !progress {
                // While replies are owed, what the loop decides stays as it was (its timers
                // run only while nothing is owed), and they will wake this task again.
                return if moved && self.owed() == 0 {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            }
        }
    }

    /// Sends the complete shareable requests at the front of `cin` to the router (in one
    /// submission, or in two around a request the proxy answers itself, whose reply waits for
    /// those before it); stops at the first request that is not shareable (or malformed: the
    /// pinned session gives Redis's own error for it).
    fn submit(&mut self) {
        let mut end = 0;
        let mut replies = 0;
        // Every request in `..end` is plain.
        let mut plain = true;
        if let Some(why) = self.link.pins().filter(|_| !self.pin) {
            // Its replies are big, or it reads them slowly: from now on they wait in the
            // server for it alone, on a connection of its own, instead of holding up every
            // client behind it on the shared one.
            self.pin = true;
            self.pinned_by = Some(why);
        }
        while !self.pin && self.switch.is_none() {
            // Redis's limits on what an unauthenticated client may announce hold until the
            // request that authenticates it (the parser is between requests then); set here,
            // before every request, for a new parser as for one in use.
            self.parser.set_auth_required(!self.authenticated);
            match self.parser.parse(&self.cin[end..]) {
                Ok(Some(frame)) => {
                    let plan = match &frame {
                        // Nothing is answered for an empty request: it goes along, ignored.
                        Frame::Empty { .. } => Plan::Share {
                            replies: 0,
                            plain: false,
                        },
                        _ => 'plan: {
                            let cmd = self.parser.command(&self.cin[end..], &frame);
                            // With a local password, the proxy answers only what needs no
                            // more than the right password; Redis's NOAUTH and WRONGPASS,
                            // and everything an unauthenticated client sends, are the
                            // pinned session's.
                            let mut authenticates = false;
                            if let Some(password) = &self.password {
                                match credentials(&cmd) {
                                    Some((user, pass))
                                        if user == b"default" && password.matches(pass) =>
                                    {
                                        authenticates = true;
                                    }
                                    Some(_) => break 'plan Plan::Pin,
                                    None if !self.authenticated => break 'plan Plan::Pin,
                                    None => {}
                                }
                            }
                            let plan = match cmd.arg(0) {
                                Some(name) if shareable(name) => Plan::Share {
                                    replies: 1,
                                    // An inline command is re-encoded by the session.
                                    plain: matches!(frame, Frame::Multibulk { .. }),
                                },
                                _ if client_setinfo(&cmd) || client_auth(&cmd) => {
                                    Plan::Local(Bytes::from_static(OK))
                                }
                                _ if client_maint(&cmd) => {
                                    Plan::Local(Bytes::from_static(session::MAINT))
                                }
                                _ if client_getname(&cmd) => Plan::Local(self.getname_reply()),
                                _ => match client_setname(&cmd) {
                                    Some(name) => {
                                        self.name = name;
                                        Plan::Local(Bytes::from_static(OK))
                                    }
                                    None => match hello(&cmd, self.proto) {
                                        Some(Hello { proto, .. }) if proto != self.proto => {
                                            Plan::Switch(proto)
                                        }
                                        Some(Hello { name: None, .. }) => Plan::Share {
                                            replies: 1,
                                            plain: false,
                                        },
                                        Some(Hello {
                                            name: Some(name), ..
                                        }) => Plan::Named(name),
                                        None => Plan::Pin,
                                    },
                                },
                            };
                            if authenticates && !matches!(plan, Plan::Pin) {
                                self.authenticated = true;
                            }
                            plan
                        }
                    };
                    match plan {
                        Plan::Share {
                            replies: n,
                            plain: p,
                        } => {
                            end += frame.len();
                            replies += n;
                            plain &= p;
                        }
                        Plan::Local(reply) => {
                            // The requests before it go first; its reply comes after theirs.
                            self.send(end, replies, plain);
                            (end, replies, plain) = (0, 0, true);
                            self.cin.advance(frame.len());
                            // The only client bytes no session sees (see `SharedClient`).
                            let m = crate::metrics::handles();
                            m.commands.increment(1);
                            m.client_in.increment(frame.len() as u64);
                            m.client_out.increment(reply.len() as u64);
                            self.locals.push_back((self.asked, reply));
                            self.release_locals();
                        }
                        Plan::Named(name) => {
                            // `HELLO <protocol>` goes in its place, alone: the name stays here.
                            self.send(end, replies, plain);
                            (end, replies, plain) = (0, 0, true);
                            self.cin.advance(frame.len());
                            self.name = name;
                            let mut hello = BytesMut::new();
                            crate::resp::encode::hello(&mut hello, self.proto);
                            // The session counts the bytes of the request it sees.
                            crate::metrics::handles()
                                .client_in
                                .increment(frame.len().saturating_sub(hello.len()) as u64);
                            self.submit_frames(hello.freeze(), 1, false);
                        }
                        Plan::Switch(proto) => self.switch = Some(proto),
                        Plan::Pin => self.pin = true,
                    }
                }
                Ok(None) => {
                    // A request with a big argument does not wait here to be whole: its own
                    // session passes it upstream as it arrives.
                    if self.parser.big_bulk() {
                        self.pin = true;
                    }
                    break;
                }
                Err(_) => self.pin = true,
            }
        }
        self.send(end, replies, plain);
        if self.pin || self.switch.is_some() {
            // The parser may hold state for a request it has not finished: the pinned
            // session (or the next call, on the other connection) parses the bytes again
            // from the start.
            self.parser = RequestParser::new();
        }
    }

    /// Submits whole requests answered with `replies` replies, in one submission; `plain`:
    /// they are all plain (one reply each).
    fn submit_frames(&mut self, frames: Bytes, replies: usize, plain: bool) {
        self.asked += replies as u64;
        let sent = self.router.send(Submit {
            frames,
            replies,
            plain,
            link: self.link.clone(),
        });
        if sent.is_err() {
            // The router is gone (shutdown): the replies will not come.
            let _ = self.link.to.send(Delivery::End(Outcome::UpstreamClosed));
        }
    }

    /// Submits the first `end` bytes of `cin`, whole requests answered with `replies`
    /// replies, in one submission; `plain`: they are all plain.
    fn send(&mut self, end: usize, replies: usize, plain: bool) {
        if end > 0 {
            let frames = self.cin.split_to(end).freeze();
            if replies > 0 {
                self.submit_frames(frames, replies, plain);
            } else {
                // Empty requests only: nothing to send, no session sees them.
                crate::metrics::handles()
                    .client_in
                    .increment(frames.len() as u64);
            }
        }
    }
}

impl Drop for SharedClient {
    /// The router may be waiting for this client to read: it goes on, and drops what it reads
    /// for it from now on.
    fn drop(&mut self) {
        self.replies.close();
        self.link.router.wake();
    }
}

/// One thread's router: whenever its shared clients have requests for the shared connection,
/// it runs the shared session with itself as that session's client ([`Router`]'s `AsyncRead`
/// and `AsyncWrite`), in this task; when the session ends, every client still owed a reply
/// is closed, and the next request starts a new session.
async fn route(mut r: Router, shared: Arc<Shared>, target: Arc<Target>) {
    loop {
        // Once the proxy stops, clients submit nothing new: the router ends when nothing is
        // owed.
        let stopping = shared.shutdown.is_cancelled();
        let work = tokio::select! {
            work = poll_fn(|cx| r.wait(cx, stopping)) => work,
            // Look again, stopping.
            _ = shared.shutdown.cancelled(), if !stopping => continue,
        };
        if !work {
            return;
        }
        let (proto, polls) = (r.proto, r.polls.clone());
        // The session starts with nothing read.
        r.framing = session::Framing::default();
        let framing = r.framing.clone();
        let outcome = {
            let mut session = std::pin::pin!(session::serve_shared(
                &mut r, &shared, &target, proto, framing
            ));
            // Counts the polls of this task for the router (see `Router::answered_in`).
            poll_fn(|cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                session.as_mut().poll(cx)
            })
            .await
        };
        tracing::debug!(outcome = %outcome, "shared upstream session ended");
        r.lost();
    }
}

struct Route {
    link: Arc<Link>,
    replies: usize,
    /// Bytes handed so far of a reply handed in parts (see [`PASS_ON`]).
    part: usize,
    /// The client was closed for reading too slowly: its replies are dropped.
    dropped: bool,
}

impl Route {
    fn new(link: Arc<Link>, replies: usize) -> Route {
        Route {
            link,
            replies,
            part: 0,
            dropped: false,
        }
    }
}

/// The client end of a shared session: it reads the requests of the router's clients, in
/// the order they were submitted, and writes their replies, which the router hands to the
/// clients they answer.
///
/// A read that finds nothing to hand out registers for new submissions only. Held requests
/// need no other wake-up: the replies that release them are written by the session in one of
/// its polls, and the read in that poll asks for the next one (see `answered_in`).
struct Router {
    /// The protocol the shared session speaks.
    proto: u8,
    rx: mpsc::UnboundedReceiver<Submit>,
    /// No client can submit any more.
    closed: bool,
    /// The session shut its end (it is closing): reads see the end of the stream, and
    /// submissions wait for the next session.
    shut: bool,
    /// Requests of released batches not yet read by the session, each with the number of
    /// plain requests it is (0: not all plain, or partly read already).
    out: VecDeque<(Bytes, usize)>,
    /// Requests submitted since the last batch was released (as in `out`), with their reply
    /// count and size.
    held: VecDeque<(Bytes, usize)>,
    held_replies: usize,
    held_bytes: usize,
    /// Replies still owed for each released batch, oldest first.
    batches: VecDeque<usize>,
    /// Polls of the session's task so far, and the one in which a batch was last answered:
    /// held requests are released only in a later poll, after the clients that batch woke
    /// and the clients whose requests came meanwhile have run, so that what they submit joins
    /// the batch. Released at once, batches are smaller, and the server does more work per
    /// request (`benches/ab.sh 8 "-c 50 -n 200000 -t get"`, `--multiplex-max-batches 1`:
    /// redis-server 2.60 µs per request instead of 1.85, throughput 10 % less).
    polls: Arc<AtomicU64>,
    answered_in: Option<u64>,
    /// Release a batch only while fewer than this many are owed replies (or once
    /// [`HOLD_BYTES`] are held); `usize::MAX`: at once.
    max_batches: usize,
    /// Who is owed the next replies, in order.
    routes: VecDeque<Route>,
    /// What the session is told of the bytes it reads (which are plain requests); a new one
    /// for each session.
    framing: session::Framing,
    rin: BytesMut,
    /// Bytes at the front of `rin` scanned as part of a reply frame not yet complete.
    scanned: usize,
    scanner: ReplyScanner,
    /// The frame being scanned is a push (RESP3 `>`), which answers no request.
    push: bool,
    /// Where the traffic is counted for placing the shared clients (`None` in unit tests).
    balance: Option<(Arc<Balance>, balance::Tally)>,
    /// Since the router began waiting for the front route's client to read, the end of its
    /// patience ([`SLOW_CLIENT`]).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Router {
    /// `max_batches`: see [`Routers`]; `rx`: the clients' submissions.
    fn new(proto: u8, max_batches: usize, rx: mpsc::UnboundedReceiver<Submit>) -> Router {
        Router {
            proto,
            rx,
            closed: false,
            shut: false,
            out: VecDeque::new(),
            held: VecDeque::new(),
            held_replies: 0,
            held_bytes: 0,
            batches: VecDeque::new(),
            polls: Arc::default(),
            answered_in: None,
            max_batches: if max_batches == 0 {
                usize::MAX
            } else {
                max_batches
            },
            routes: VecDeque::new(),
            framing: session::Framing::default(),
            rin: BytesMut::new(),
            scanned: 0,
            scanner: ReplyScanner::new(),
            push: false,
            balance: None,
            stall: None,
        }
    }

    /// Takes every submission waiting into the next batch.
    fn receive(&mut self, cx: &mut Context<'_>) {
        while !self.closed {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(s)) => self.hold(s),
                Poll::Ready(None) => self.closed = true,
                Poll::Pending => break,
            }
        }
    }

    /// Between sessions: `Ready(true)` once some client is owed a reply (a session must
    /// start), `Ready(false)` once no client can submit any more, or the proxy is `stopping`
    /// and none is owed one.
    fn wait(&mut self, cx: &mut Context<'_>, stopping: bool) -> Poll<bool> {
        self.receive(cx);
        if !self.routes.is_empty() {
            Poll::Ready(true)
        } else if self.closed || stopping {
            Poll::Ready(false)
        } else {
            Poll::Pending
        }
    }

    /// Hands every whole reply frame read so far to its client: consecutive replies for the
    /// same client go together. Pushes are dropped: shared clients never subscribe or track
    /// keys, so none is theirs. An error means the replies are out of step with the requests.
    fn deliver(&mut self) -> Result<(), &'static str> {
        // Bytes at the front of `rin` holding whole replies for the front route, and how many.
        let mut run = 0;
        let mut replies = 0;
        while self.scanned < self.rin.len() {
            if self.scanner.at_boundary() {
                // A frame starts here.
                self.push = self.rin[self.scanned] == b'>';
            }
            // The session checks every reply it relays: a frame it let through that does not
            // scan here is a bug, and the shared session ends rather than misroute.
            let scan = self
                .scanner
                .scan(&self.rin[self.scanned..])
                .map_err(|_| "a relayed reply does not scan")?;
            self.scanned += scan.consumed;
            if !scan.complete {
                break;
            }
            if self.push {
                tracing::debug!(
                    "push on a shared connection dropped: no shared client asked for it"
                );
                self.push = false;
                if replies > 0 {
                    // The replies before it go first.
                    self.send_run(run, replies);
                    (run, replies) = (0, 0);
                }
                self.rin.advance(self.scanned);
                self.scanned = 0;
                continue;
            }
            run = self.scanned;
            replies += 1;
            if let Some(owed) = self.batches.front_mut() {
                *owed -= 1;
                if *owed == 0 {
                    // The next batch may go.
                    self.batches.pop_front();
                    self.answered_in = Some(self.polls.load(Ordering::Relaxed));
                    if let Some((balance, tally)) = &mut self.balance {
                        tally.batch_answered(balance);
                    }
                }
            }
            let Some(route) = self.routes.front_mut() else {
                return Err("a reply nobody asked for");
            };
            if replies == route.replies {
                self.send_run(run, replies);
                self.routes.pop_front();
                (run, replies) = (0, 0);
            }
        }
        if replies > 0 {
            self.send_run(run, replies);
        }
        // What was read of a big frame goes at once: the beginning of a reply to its client
        // (the rest as it comes, counted with its end), that of a push nowhere.
        if self.scanned >= PASS_ON {
            if self.push {
                self.rin.advance(self.scanned);
                self.scanned = 0;
            } else if !self.routes.is_empty() {
                self.send_run(self.scanned, 0);
            }
        }
        Ok(())
    }

    /// Whether replies must wait for the client of the front route, which is more than
    /// [`PAUSE`] bytes behind in reading them, until it is no more than [`RESUME`] behind.
    /// After [`SLOW_CLIENT`] of waiting it is given up on: closed, and its replies dropped as
    /// they come.
    fn wait_for_front(&mut self, cx: &mut Context<'_>) -> bool {
        let waiting = self.stall.is_some();
        let Some(route) = self
            .routes
            .front_mut()
            .filter(|route| !route.dropped && route.link.behind(cx, waiting))
        else {
            self.stall = None;
            return false;
        };
        let stall = self.stall.get_or_insert_with(|| {
            metrics::counter!(crate::metrics::MULTIPLEX_SLOW_READER_WAITS_TOTAL).increment(1);
            route.link.pin_next(SLOW_READER);
            Box::pin(tokio::time::sleep(SLOW_CLIENT))
        });
        if stall.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.stall = None;
        let unread = route.link.unsent();
        tracing::warn!(
            unread,
            "a shared client did not catch up on its replies within {SLOW_CLIENT:?} while \
             its shared connection waited for it: closing it"
        );
        route.dropped = true;
        let _ = route
            .link
            .to
            .send(Delivery::End(Outcome::Closed(CloseReason::SlowClient(
                SLOW_CLIENT,
            ))));
        false
    }

    /// Takes a submission into the next batch.
    fn hold(&mut self, s: Submit) {
        self.held_bytes += s.frames.len();
        self.held_replies += s.replies;
        self.held
            .push_back((s.frames, if s.plain { s.replies } else { 0 }));
        self.routes.push_back(Route::new(s.link, s.replies));
    }

    /// Releases the held requests as one batch, for the session to read, unless
    /// `max_batches` batches are owed replies and the held requests are small.
    fn release_due(&mut self) {
        if self.held_replies == 0
            || (self.batches.len() >= self.max_batches && self.held_bytes < HOLD_BYTES)
        {
            return;
        }
        self.batches.push_back(self.held_replies);
        if let Some((_, tally)) = &mut self.balance {
            tally.count(self.held_replies, self.held_bytes);
        }
        self.out.append(&mut self.held);
        (self.held_replies, self.held_bytes) = (0, 0);
        crate::metrics::handles().mux_batches.increment(1);
    }

    /// Hands the first `run` bytes of `rin`, `replies` whole replies, to the front route.
    fn send_run(&mut self, run: usize, replies: usize) {
        let route = self
            .routes
            .front_mut()
            .expect("replies are counted against the front route");
        let frames = self.rin.split_to(run).freeze();
        if let Some((_, tally)) = &mut self.balance {
            tally.count(0, run);
        }
        if !route.dropped {
            route.link.send(frames, replies);
        }
        // A reply handed in parts ends in the first run that counts a whole reply.
        if (replies == 0 || route.part > 0) && route.part + run > PAUSE {
            // A reply this long holds the shared connection, and every client behind it, for
            // as long as it takes to pass: the client's next big one will wait in the server
            // for it alone.
            route.link.pin_next(LARGE_REPLY);
        }
        route.part = if replies == 0 { route.part + run } else { 0 };
        route.replies -= replies;
        self.scanned -= run;
    }

    /// The shared session ended: every client still owed a reply is closed (requests not
    /// taken from the channel yet go to the next session), and the next session starts clean.
    fn lost(&mut self) {
        self.shut = false;
        self.out.clear();
        self.held.clear();
        (self.held_replies, self.held_bytes) = (0, 0);
        self.batches.clear();
        for route in self.routes.drain(..) {
            if !route.dropped {
                let _ = route.link.to.send(Delivery::End(Outcome::UpstreamClosed));
            }
        }
        self.stall = None;
        self.rin = BytesMut::new();
        self.scanned = 0;
        self.scanner = ReplyScanner::new();
        self.push = false;
    }
}

impl AsyncRead for Router {
    /// The released requests, as many bytes as fit; the end of the stream once the session
    /// shut its end or no client can submit any more.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = &mut *self;
        if r.shut {
            return Poll::Ready(Ok(()));
        }
        r.receive(cx);
        if r.answered_in == Some(r.polls.load(Ordering::Relaxed)) {
            if r.out.is_empty() && r.held_replies > 0 {
                // Poll again once the runtime has run the other ready tasks and polled for
                // I/O (what `yield_now` does for an async fn).
                let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
            }
        } else {
            r.answered_in = None;
            r.release_due();
        }
        if r.out.is_empty() {
            return if r.closed && r.held_replies == 0 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        let mut runs = r.framing.lock();
        while let Some((front, plain)) = r.out.front_mut() {
            let n = front.len().min(buf.remaining());
            if n == 0 {
                break;
            }
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                runs.handed(n, *plain);
                r.out.pop_front();
            } else {
                // Split: neither part is whole requests.
                runs.handed(n, 0);
                *plain = 0;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Router {
    /// Replies from the session: every whole one goes to its client at once, unless the
    /// client they go to is far behind in reading ([`Router::wait_for_front`]).
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.wait_for_front(cx) {
            // The session stops reading from the server once its buffer for the router is
            // full: the rest of the reply waits in the server, not here.
            return Poll::Pending;
        }
        self.rin.extend_from_slice(buf);
        Poll::Ready(match self.deliver() {
            Ok(()) => Ok(buf.len()),
            Err(why) => {
                tracing::error!("shared connection out of step, closing it: {why}");
                Err(io::Error::other(why))
            }
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut = true;
        Poll::Ready(Ok(()))
    }
}

/// The name of the first command in `bytes`: `None` when its request is incomplete or has no
/// name, `Err` when it is malformed.
fn first_command(bytes: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    first_command_by(&mut RequestParser::new(), bytes)
}

/// [`first_command`] with a fresh `parser`, which is left as the parse leaves it.
fn first_command_by(parser: &mut RequestParser, bytes: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    match parser.parse(bytes) {
        Ok(Some(frame)) => Ok(parser.command(bytes, &frame).arg(0).map(<[u8]>::to_vec)),
        Ok(None) => Ok(None),
        Err(_) => Err(()),
    }
}

/// For the log: the name of the command that pinned a client (the first request of the bytes
/// it hands to its own session), when it looks like one; never its arguments, which may be
/// secrets.
struct PinnedBy<'a>(&'a [u8]);

impl std::fmt::Display for PinnedBy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Ok(name) = first_command(self.0) else {
            return f.write_str("(malformed request)");
        };
        match name {
            Some(n) if !n.is_empty() && n.len() <= 32 && n.iter().all(u8::is_ascii_alphabetic) => {
                f.write_str(&String::from_utf8_lossy(&n).to_ascii_uppercase())
            }
            _ => f.write_str("(unknown)"),
        }
    }
}

/// Why a client pinned, for the `reason` label of `multiplex_pinned_total`: a few fixed
/// categories, so that the label stays small whatever clients send (the debug log names the
/// command). `first` is the request that pinned it and what followed; `authenticated`, whether
/// it had given the local password (or there is none).
fn pin_reason(first: &[u8], authenticated: bool) -> &'static str {
    if !authenticated {
        return "auth";
    }
    let mut parser = RequestParser::new();
    let name = match first_command_by(&mut parser, first) {
        // Pinned before the request was whole (`SharedClient::submit`).
        Ok(None) if parser.big_bulk() => return "large_request",
        Ok(name) => name,
        Err(()) => return "malformed",
    };
    let Some(upper) = name.as_deref().and_then(Upper::of) else {
        return "other";
    };
    match &*upper {
        b"AUTH" => "auth",
        b"MULTI" | b"EXEC" | b"DISCARD" | b"WATCH" | b"UNWATCH" => "transaction",
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
        | b"SUNSUBSCRIBE" | b"MONITOR" => "pubsub",
        b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BLMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
        | b"BZMPOP" | b"XREAD" | b"XREADGROUP" | b"WAIT" | b"WAITAOF" => "blocking",
        b"SELECT" | b"CLIENT" | b"HELLO" | b"RESET" | b"READONLY" | b"READWRITE" | b"ASKING"
        | b"SWAPDB" => "connection",
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" | b"SCRIPT"
        | b"FUNCTION" => "script",
        _ => "other",
    }
}

/// A client stream with bytes already read from it put back in front.
struct Prefixed<C> {
    first: BytesMut,
    inner: C,
}

impl<C: AsyncRead + Unpin> AsyncRead for Prefixed<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Prefixed<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            let mut r = Router {
                routes: VecDeque::from([
                    Route::new(a.clone(), 2),
                    Route::new(b, 1),
                    Route::new(a, 2),
                ]),
                ..router(2, 0)
            };
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
        let r = Router {
            routes: VecDeque::from([
                Route::new(Link::new(a_tx), 2),
                Route::new(Link::new(b_tx), 1),
            ]),
            ..router(3, 0)
        };
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
        r.lost();
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
    fn with_command<T>(
        args: &[&[u8]],
        f: impl FnOnce(&crate::resp::request::Command<'_>) -> T,
    ) -> T {
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
}
