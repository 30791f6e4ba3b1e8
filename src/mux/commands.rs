//! What a shared client's request means to the multiplexer: which commands share a
//! connection ([`shareable`]), which the proxy answers itself (`CLIENT SETINFO`, `CLIENT
//! SETNAME`, `AUTH`, …), which `HELLO` switches protocol, and, for a client that pins, why.
//! Decisions only: the client ([`super::client`]) acts on them.

use bytes::{Bytes, BytesMut};

use crate::resp::request::{Command, RequestParser};
use crate::secret::Secret;
use crate::session;

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
pub(super) enum Plan {
    /// Goes over the shared connection, answered with this many replies; `plain`: a command
    /// that shares, which the shared session only forwards (see [`session::Framing`]).
    Share { replies: usize, plain: bool },
    /// Answered by the proxy with `reply`; `name`: the name the client gives itself, if it
    /// does (`CLIENT SETNAME`; `Some(None)` removes it).
    Local {
        reply: Bytes,
        name: Option<Option<Bytes>>,
    },
    /// `HELLO` in the current protocol with `SETNAME`: the proxy keeps the name, and a bare
    /// `HELLO <protocol>` goes over the shared connection in its place.
    Named(Option<Bytes>),
    /// `HELLO 2|3` to the other protocol: goes over the shared connection of that protocol,
    /// once every reply owed on the current one has come.
    Switch(u8),
    /// Needs a connection of its own.
    Pin,
}

/// What a shared client's whole request `cmd` gets (`multibulk`: it is not an inline
/// command, which the session re-encodes), for a client speaking `proto`, named `name`, with
/// the local `password` if there is one, which the client gave if `authenticated`. The
/// second value: the request authenticates the client (it gives the right password and does
/// not pin).
pub(super) fn plan(
    cmd: &Command<'_>,
    multibulk: bool,
    proto: u8,
    name: Option<&Bytes>,
    password: Option<&Secret>,
    authenticated: bool,
) -> (Plan, bool) {
    // With a local password, the proxy answers only what needs no more than the right
    // password; Redis's NOAUTH and WRONGPASS, and everything an unauthenticated client sends,
    // are the pinned session's.
    let mut authenticates = false;
    if let Some(password) = password {
        match credentials(cmd) {
            Some((user, pass)) if user == b"default" && password.matches(pass) => {
                authenticates = true;
            }
            Some(_) => return (Plan::Pin, false),
            None if !authenticated => return (Plan::Pin, false),
            None => {}
        }
    }
    let local = |reply| Plan::Local { reply, name: None };
    let plan = match cmd.arg(0) {
        Some(name) if shareable(name) => Plan::Share {
            replies: 1,
            plain: multibulk,
        },
        _ if client_setinfo(cmd) || client_auth(cmd) => local(Bytes::from_static(OK)),
        _ if client_maint(cmd) => local(Bytes::from_static(session::MAINT)),
        _ if client_getname(cmd) => local(getname_reply(name, proto)),
        _ => match client_setname(cmd) {
            Some(name) => Plan::Local {
                reply: Bytes::from_static(OK),
                name: Some(name),
            },
            None => match hello(cmd, proto) {
                Some(Hello { proto: to, .. }) if to != proto => Plan::Switch(to),
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
    let authenticates = authenticates && !matches!(plan, Plan::Pin);
    (plan, authenticates)
}

/// The reply to `CLIENT GETNAME` from a client named `name` speaking `proto`: the name, or a
/// null in that protocol.
fn getname_reply(name: Option<&Bytes>, proto: u8) -> Bytes {
    match name {
        Some(name) => {
            let mut reply = BytesMut::with_capacity(name.len() + 16);
            crate::resp::encode::bulk(&mut reply, name);
            reply.freeze()
        }
        None if proto == 3 => Bytes::from_static(b"_\r\n"),
        None => Bytes::from_static(b"$-1\r\n"),
    }
}

/// What a `HELLO` a shared client may send does.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Hello {
    /// The protocol it leaves the connection in.
    pub(super) proto: u8,
    /// The name it gives the client (`SETNAME`; `Some(None)`: an empty name, which removes
    /// it), if it has a `SETNAME`.
    pub(super) name: Option<Option<Bytes>>,
}

/// `HELLO` alone, or `HELLO 2|3` with any of `AUTH <user> <password>` and `SETNAME <name>`
/// (a name Redis accepts; go-redis v9 and Lettuce send `HELLO 3 … SETNAME` when they connect):
/// the protocol it leaves the connection in (`current` for a bare `HELLO`) and the name. A
/// shared client moves to the shared connection speaking that protocol, where the server
/// answers a `HELLO <protocol>` for it; the name stays with the proxy, like `CLIENT SETNAME`'s.
/// The AUTH pair is never forwarded: without a local password any is accepted, as on every
/// session; with one, only the right one shares (see [`credentials`]). Any other `HELLO` pins
/// the client.
pub(super) fn hello(cmd: &Command<'_>, current: u8) -> Option<Hello> {
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
fn client_maint(cmd: &Command<'_>) -> bool {
    cmd.arg_is(0, "client") && cmd.arg_is(1, "maint_notifications")
}

/// `AUTH [user] password`: the proxy answers `+OK` to it, shared or not (applications
/// configured with a password go on sharing): to every well-formed AUTH without a local
/// password, as on every session; with one, to the right password (see [`credentials`]).
fn client_auth(cmd: &Command<'_>) -> bool {
    cmd.arg_is(0, "auth") && (2..=3).contains(&cmd.argc())
}

/// The user and password a request authenticates with: `AUTH [user] password` (the user is
/// `default` when not given) or `HELLO … AUTH user password`.
pub(super) fn credentials<'a>(cmd: &'a Command<'_>) -> Option<(&'a [u8], &'a [u8])> {
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
    pub(super) bytes: [u8; 16],
    pub(super) len: usize,
}

impl Upper {
    pub(super) fn of(name: &[u8]) -> Option<Upper> {
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

pub(super) const OK: &[u8] = b"+OK\r\n";

/// `CLIENT SETINFO LIB-NAME|LIB-VER <value>` with a value Redis accepts (no spaces, newlines
/// or other characters outside `!`..`~`): the library names itself when it connects (recent
/// redis-py, Jedis, Lettuce do). Answered `+OK` by the proxy so that the client can go on
/// sharing; the names are not sent to the server (a shared connection serves many libraries).
/// Anything else about `CLIENT` pins the client.
fn client_setinfo(cmd: &Command<'_>) -> bool {
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
pub(super) fn client_setname(cmd: &Command<'_>) -> Option<Option<Bytes>> {
    if cmd.argc() != 3 || !cmd.arg_is(0, "client") || !cmd.arg_is(1, "setname") {
        return None;
    }
    valid_name(cmd.arg(2)?)
}

/// `CLIENT GETNAME`.
pub(super) fn client_getname(cmd: &Command<'_>) -> bool {
    cmd.argc() == 2 && cmd.arg_is(0, "client") && cmd.arg_is(1, "getname")
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
pub(super) struct PinnedBy<'a>(pub(super) &'a [u8]);

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
pub(super) fn pin_reason(first: &[u8], authenticated: bool) -> &'static str {
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
