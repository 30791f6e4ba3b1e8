//! What the session core does with each client command: forward it as it is (the common
//! case), answer it locally, or rewrite it. This is where client credentials are kept from
//! the upstream (`AUTH`, `HELLO … AUTH`), where `CLIENT REPLY` is emulated, and where the
//! write-side connection state (MULTI, one-shot flags, QUIT) is tracked.

use bytes::{Bytes, BytesMut};

use super::core::Core;
use super::ledger::{Effect, Expect, SubKind};
use super::state::ReplyMode;
use crate::log_budget::LogBudget;
use crate::resp::encode;
use crate::resp::request::{string2ll, Command};

const OK: &[u8] = b"+OK\r\n";
const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const SYNTAX: &[u8] = b"-ERR syntax error\r\n";
const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
const EXECABORT_NOAUTH: &[u8] =
    b"-EXECABORT Transaction discarded because of: NOAUTH Authentication required.\r\n";
/// Redis's rule for a client name (`CLIENT SETNAME`, `HELLO … SETNAME`) and for the library
/// name and version of `CLIENT SETINFO`: no spaces, newlines or other characters outside
/// `!`..`~`.
pub(crate) fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|b| (b'!'..=b'~').contains(b))
}

pub(crate) const MAINT: &[u8] = b"-ERR CLIENT MAINT_NOTIFICATIONS is not supported through redis-entra-proxy: endpoints it would announce bypass the proxy\r\n";
const IN_MULTI: &[u8] = b"-ERR this command is not supported inside MULTI by redis-entra-proxy\r\n";

/// Commands the core treats specially; everything else is forwarded untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    Auth,
    Hello,
    Quit,
    Client,
    Multi,
    Exec,
    Discard,
    Reset,
    Subscribe(SubKind, bool),
    Monitor,
    Asking,
    /// May wait for other clients: `BLPOP` and the other blocking pops and moves, `WAIT`,
    /// `WAITAOF`; `XREAD` and `XREADGROUP` with `BLOCK` ([`blocks`]).
    Blocking,
    Other,
}

/// Why a command is refused before it runs ([`Core::refusal`]).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NoAuth,
    Resp2Subscriber,
}

fn classify(name: &[u8]) -> Special {
    // Most traffic is GET/SET/…: one length check rules nearly all of it out.
    if !(4..=12).contains(&name.len()) {
        return Special::Other;
    }
    let mut lower = [0u8; 12];
    let lower = &mut lower[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    match &*lower {
        b"auth" => Special::Auth,
        b"hello" => Special::Hello,
        b"quit" => Special::Quit,
        b"client" => Special::Client,
        b"multi" => Special::Multi,
        b"exec" => Special::Exec,
        b"discard" => Special::Discard,
        b"reset" => Special::Reset,
        b"monitor" => Special::Monitor,
        b"asking" => Special::Asking,
        b"subscribe" => Special::Subscribe(SubKind::Channel, true),
        b"unsubscribe" => Special::Subscribe(SubKind::Channel, false),
        b"psubscribe" => Special::Subscribe(SubKind::Pattern, true),
        b"punsubscribe" => Special::Subscribe(SubKind::Pattern, false),
        b"ssubscribe" => Special::Subscribe(SubKind::Shard, true),
        b"sunsubscribe" => Special::Subscribe(SubKind::Shard, false),
        b"blpop" | b"brpop" | b"brpoplpush" | b"blmove" | b"blmpop" | b"bzpopmin" | b"bzpopmax"
        | b"bzmpop" | b"wait" | b"waitaof" | b"xread" | b"xreadgroup" => Special::Blocking,
        _ => Special::Other,
    }
}

/// Whether a command classified [`Special::Blocking`] may block: `XREAD` and `XREADGROUP`
/// only with `BLOCK` among their options (before `STREAMS`, after which come key names).
fn blocks(cmd: &Command<'_>) -> bool {
    if !(cmd.arg_is(0, "xread") || cmd.arg_is(0, "xreadgroup")) {
        return true;
    }
    (1..cmd.argc())
        .take_while(|&i| !cmd.arg_is(i, "streams"))
        .any(|i| cmd.arg_is(i, "block"))
}

/// Commands whose name Redis reports as `command|subcommand`.
const CONTAINERS: &[&str] = &[
    "acl", "client", "cluster", "command", "config", "function", "latency", "memory", "module",
    "object", "pubsub", "script", "slowlog", "xgroup", "xinfo",
];

/// The command's name as Redis's `fullname` prints it.
fn full_name(cmd: &Command<'_>) -> String {
    let name = String::from_utf8_lossy(cmd.arg(0).unwrap_or_default()).to_lowercase();
    match cmd.arg(1) {
        Some(sub) if CONTAINERS.contains(&name.as_str()) => {
            format!("{name}|{}", String::from_utf8_lossy(sub).to_lowercase())
        }
        _ => name,
    }
}

impl Core {
    /// Whether [`Core::on_command`] would forward this command as it is, with one plain
    /// reply, whatever its arguments after those given (the command name at least): then a
    /// request with a big argument can go upstream before all of it arrived.
    pub(super) fn may_stream(&self, cmd: &Command<'_>) -> bool {
        let Some(name) = cmd.arg(0) else {
            return false;
        };
        // An ordinary command `on_command` does not refuse (a RESP2 subscriber's PING, whose
        // reply may be rewritten, counts as refused), and not CLUSTER, whose reply may have to
        // be rewritten.
        classify(name) == Special::Other
            && !name.eq_ignore_ascii_case(b"cluster")
            && self.refusal(Special::Other, false).is_none()
    }

    /// Why Redis would refuse this command in the connection's state before running it:
    /// before the client authenticated, or from a RESP2 subscriber (`ping`: it is PING).
    fn refusal(&self, special: Special, ping: bool) -> Option<Refusal> {
        if !self.client_authenticated
            && !matches!(
                special,
                Special::Auth | Special::Hello | Special::Quit | Special::Reset
            )
        {
            return Some(Refusal::NoAuth);
        }
        if self.state.client_resp2_subscribed()
            && !ping
            && !matches!(
                special,
                Special::Subscribe(..) | Special::Quit | Special::Reset
            )
        {
            return Some(Refusal::Resp2Subscriber);
        }
        None
    }

    /// Handles one client command. `raw` holds its bytes when it can be forwarded as it is
    /// (multibulk); inline commands are re-encoded.
    pub(super) fn on_command(&mut self, cmd: Command<'_>, raw: Option<&[u8]>) {
        let special = cmd.arg(0).map_or(Special::Other, classify);
        // CLIENT REPLY SKIP silences exactly the next command, whatever it is (another
        // CLIENT REPLY included), as Redis's resetClient does.
        self.relay_current = match self.state.reply_mode {
            ReplyMode::On => true,
            ReplyMode::Off => false,
            ReplyMode::Skip => {
                self.state.reply_mode = ReplyMode::On;
                false
            }
        };
        let ping = special == Special::Other && cmd.arg_is(0, "ping");
        // Redis answers a refused EXEC with EXECABORT and the reason.
        let exec = special == Special::Exec;
        match self.refusal(special, ping) {
            Some(Refusal::NoAuth) if exec => return self.reject(EXECABORT_NOAUTH),
            Some(Refusal::NoAuth) => return self.reject(NOAUTH),
            Some(Refusal::Resp2Subscriber) => {
                // What Redis answers a RESP2 subscriber; said by the proxy because the
                // upstream may have been switched to RESP3, where it would accept the command.
                let msg = format!(
                    "{} Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                    if exec { "EXECABORT Transaction discarded because of:" } else { "ERR" },
                    full_name(&cmd)
                );
                return self.reject_with(&msg);
            }
            None => {}
        }
        if ping && self.state.emulating && self.state.subs.any() {
            return self.forward(cmd, raw, Effect::Pong);
        }
        match special {
            Special::Auth => self.client_auth(cmd),
            Special::Hello => self.client_hello(cmd),
            Special::Quit => {
                self.local(Bytes::from_static(OK));
                self.ledger.push(Expect::Close);
                self.state.quit = true;
            }
            Special::Client => self.client_subcommand(cmd, raw),
            Special::Multi if cmd.argc() != 1 => {
                self.reject(b"-ERR wrong number of arguments for 'multi' command\r\n")
            }
            // Nested: refused by the server, and the transaction goes on.
            Special::Multi if self.state.in_multi => self.forward(cmd, raw, Effect::None),
            Special::Multi => {
                self.state.multi_seq = self.state.multi_seq.wrapping_add(1);
                self.forward(cmd, raw, Effect::Multi(self.state.multi_seq));
                self.state.in_multi = true;
            }
            Special::Exec if self.state.multi_dirty => {
                // The proxy refused a command of this transaction, as Redis would have at
                // queue time: Redis's answer to EXEC is then EXECABORT.
                encode::command(&mut self.to_upstream, [&b"DISCARD"[..]].into_iter());
                self.ledger.push(Expect::Reply {
                    effect: Effect::None,
                    relay: false,
                });
                self.local(Bytes::from_static(EXECABORT));
                self.end_multi();
            }
            Special::Exec => {
                let effect = match self.state.multi_hello.take() {
                    Some(v) => {
                        self.state.wproto = v;
                        Effect::Hello(v)
                    }
                    None => Effect::None,
                };
                self.forward(cmd, raw, effect);
                self.end_multi();
            }
            Special::Discard => {
                self.forward(cmd, raw, Effect::None);
                self.end_multi();
            }
            // Before the password, RESET changes nothing but what it answers; without an
            // upstream yet, it is answered here.
            Special::Reset if self.deferred_auth => self.local(Bytes::from_static(b"+RESET\r\n")),
            Special::Reset => {
                // Redis clears CLIENT REPLY OFF (not SKIP) before it answers RESET; Azure
                // Managed Redis refuses RESET. What it did is applied when its reply is read
                // (`Core::reset`): a barrier.
                self.relay_current |= self.state.reply_mode == ReplyMode::Off;
                self.forward(cmd, raw, Effect::Reset);
                self.state.barrier = true;
            }
            // Their confirmations would come inside EXEC's reply, where the proxy does not
            // follow them.
            Special::Subscribe(..) if self.state.in_multi => self.reject(IN_MULTI),
            Special::Subscribe(kind, subscribe) => {
                if subscribe && cmd.argc() < 2 {
                    // Redis answers the arity error with a plain reply.
                    return self.forward(cmd, raw, Effect::None);
                }
                let s = &self.state;
                if subscribe
                    && s.client_proto() == 2
                    && !s.emulating
                    && !s.resp3_refused
                    && !s.subs.any()
                {
                    // A RESP2 subscriber cannot be re-authenticated (Redis refuses AUTH in
                    // that state), a RESP3 one can: move the upstream to RESP3 and
                    // translate its replies back to RESP2 for the client.
                    self.inject_hello(3, true);
                }
                let remaining = (cmd.argc() > 1).then(|| (cmd.argc() - 1) as u32);
                self.write(cmd, raw);
                self.ledger.push(Expect::Acks {
                    kind,
                    subscribe,
                    remaining,
                    relay: self.relay_current,
                });
                // The server may refuse it (MOVED, CROSSSLOT, NOPERM): the confirmations say
                // what it did (`Subscriptions`), and the commands behind it wait for them.
                self.state.barrier = true;
            }
            // Refused inside MULTI (queued with an error): nothing changes.
            Special::Monitor if self.state.in_multi => self.forward(cmd, raw, Effect::None),
            // Redis ignores MONITOR from a client that monitors already: no reply.
            Special::Monitor if self.state.monitor => {}
            Special::Monitor => {
                // Azure Managed Redis refuses MONITOR: a barrier, so that only a MONITOR that
                // succeeded stops re-authentication.
                self.forward(cmd, raw, Effect::Monitor);
                self.state.barrier = true;
            }
            Special::Asking => {
                self.forward(cmd, raw, Effect::None);
                self.state.one_shot = true;
            }
            Special::Other if self.rewriter.is_some() && cmd.arg_is(0, "cluster") => {
                match cmd.arg(1).and_then(crate::cluster::Topology::of_subcommand) {
                    // Inside MULTI the reply would come back within EXEC's array, where the
                    // proxy does not look: node addresses would reach the client unchanged.
                    Some(_) if self.state.in_multi => self.reject(IN_MULTI),
                    Some(kind) => self.forward(cmd, raw, Effect::Topology(kind)),
                    None => self.forward(cmd, raw, Effect::None),
                }
            }
            // Inside MULTI nothing blocks: EXEC runs it at once.
            Special::Blocking if !self.state.in_multi && blocks(&cmd) => {
                self.forward(cmd, raw, Effect::Blocks)
            }
            Special::Blocking | Special::Other => self.forward(cmd, raw, Effect::None),
        }
    }

    pub(super) fn end_multi(&mut self) {
        self.state.in_multi = false;
        self.state.multi_dirty = false;
        self.state.multi_hello = None;
    }

    /// Writes the command upstream and expects one reply.
    fn forward(&mut self, cmd: Command<'_>, raw: Option<&[u8]>, effect: Effect) {
        self.write(cmd, raw);
        self.ledger.push(Expect::Reply {
            effect,
            relay: self.relay_current,
        });
    }

    fn write(&mut self, cmd: Command<'_>, raw: Option<&[u8]>) {
        match raw {
            Some(bytes) => self.to_upstream.extend_from_slice(bytes),
            None => encode::command(
                &mut self.to_upstream,
                cmd.args().collect::<Vec<_>>().into_iter(),
            ),
        }
        self.state.one_shot = false;
    }

    /// Answers with an error the proxy decided on; inside MULTI that dooms the transaction,
    /// as a queue-time error does in Redis.
    fn reject(&mut self, reply: &'static [u8]) {
        if self.state.in_multi {
            self.state.multi_dirty = true;
        }
        self.local(Bytes::from_static(reply));
    }

    fn reject_with(&mut self, msg: &str) {
        let mut reply = BytesMut::new();
        encode::error(&mut reply, msg);
        if self.state.in_multi {
            self.state.multi_dirty = true;
        }
        self.local(reply.freeze());
    }

    fn check_password(&self, user: &[u8], password: &[u8]) -> bool {
        match &self.local_password {
            None => true,
            // Like `requirepass`: the password belongs to the `default` user.
            Some(secret) => user == b"default" && secret.matches(password),
        }
    }

    fn client_auth(&mut self, cmd: Command<'_>) {
        let (user, password) = match (cmd.argc(), cmd.arg(1), cmd.arg(2)) {
            (2, Some(p), _) => (&b"default"[..], p),
            (3, Some(u), Some(p)) => (u, p),
            (0 | 1, _, _) => {
                return self.reject(b"-ERR wrong number of arguments for 'auth' command\r\n")
            }
            _ => return self.reject(SYNTAX),
        };
        if self.state.in_multi {
            // Forwarding would send the client's secret upstream; answering would diverge
            // from Redis, which queues AUTH. Refusing keeps the transaction's outcome exact.
            return self.reject(IN_MULTI);
        }
        if self.check_password(user, password) {
            // Answered before the first AUTH of an unconnected core is written: the client
            // need not wait for the connection to be opened.
            self.local(Bytes::from_static(OK));
            self.client_gave_password();
        } else {
            self.wrong_password();
        }
    }

    /// A wrong local password: refused as Redis refuses it, counted, and logged (at most a
    /// few lines a second: guesses come fast).
    fn wrong_password(&mut self) {
        ::metrics::counter!(crate::metrics::LOCAL_AUTH_FAILURES_TOTAL).increment(1);
        static WRONG: LogBudget = LogBudget::new("client gave a wrong local password");
        if let Some(suppressed) = WRONG.take() {
            tracing::warn!(suppressed, "client gave a wrong local password");
        }
        self.reject(WRONGPASS);
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`: the AUTH pair is checked locally
    /// and removed; the rest is forwarded so the upstream switches protocol and sets the name.
    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`: the AUTH pair is checked locally
    /// and removed; the rest is forwarded so the upstream switches protocol and sets the name.
    ///
    /// Outside MULTI, every error Redis could answer is answered here with Redis's text, so
    /// that a forwarded HELLO does not fail and the predicted protocol holds. Inside MULTI,
    /// Redis queues HELLO and reports errors in the EXEC reply: the proxy forwards a HELLO
    /// that fails the same way, without the AUTH pair.
    fn client_hello(&mut self, cmd: Command<'_>) {
        if !cmd.complete() {
            return self.reject(SYNTAX);
        }
        let in_multi = self.state.in_multi;
        let mut version = None;
        let mut auth = None;
        let mut setname = None;
        if let Some(v) = cmd.arg(1) {
            match string2ll(v) {
                Some(n @ 2..=3) => version = Some(n as u8),
                _ if in_multi => return self.forward_hello(vec![b"HELLO", v], None),
                Some(_) => return self.reject(b"-NOPROTO unsupported protocol version\r\n"),
                None => {
                    return self
                        .reject(b"-ERR Protocol version is not an integer or out of range\r\n")
                }
            }
        }
        let mut j = 2;
        while j < cmd.argc() {
            let more = cmd.argc() - 1 - j;
            if cmd.arg_is(j, "auth") && more >= 2 {
                auth = Some((
                    cmd.arg(j + 1).unwrap_or_default(),
                    cmd.arg(j + 2).unwrap_or_default(),
                ));
                j += 3;
            } else if cmd.arg_is(j, "setname") && more >= 1 {
                setname = cmd.arg(j + 1);
                j += 2;
            } else {
                let opt = cmd.arg(j).unwrap_or_default();
                if in_multi {
                    // The offending token is an option name, never a password.
                    return self
                        .forward_hello(vec![b"HELLO", cmd.arg(1).unwrap_or_default(), opt], None);
                }
                let opt = String::from_utf8_lossy(opt);
                return self.reject_with(&format!("ERR Syntax error in HELLO option '{opt}'"));
            }
        }
        if let Some((user, password)) = auth {
            if !self.check_password(user, password) {
                return self.wrong_password();
            }
            self.client_gave_password();
        }
        if !self.client_authenticated {
            return self.reject(HELLO_NOAUTH);
        }
        // Inside MULTI, a name Redis refuses fails the queued HELLO when EXEC runs it, and
        // with it the switch of protocol.
        let switch = if setname.is_none_or(valid_client_name) {
            version
        } else if in_multi {
            None
        } else {
            return self.reject(
                b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
            );
        };
        let digit = [b'0' + version.unwrap_or(0)];
        let mut args: Vec<&[u8]> = vec![b"HELLO"];
        if version.is_some() {
            args.push(&digit);
        }
        if let Some(name) = setname {
            args.extend([&b"SETNAME"[..], name]);
        }
        self.forward_hello(args, switch)
    }

    fn forward_hello(&mut self, args: Vec<&[u8]>, version: Option<u8>) {
        encode::command(&mut self.to_upstream, args.into_iter());
        self.state.one_shot = false;
        let effect = match version {
            // Queued: the switch happens when EXEC runs.
            Some(v) if self.state.in_multi => {
                self.state.multi_hello = Some(v);
                Effect::None
            }
            Some(v) => {
                self.state.wproto = v;
                Effect::Hello(v)
            }
            None => Effect::None,
        };
        self.ledger.push(Expect::Reply {
            effect,
            relay: self.relay_current,
        });
    }

    fn client_subcommand(&mut self, cmd: Command<'_>, raw: Option<&[u8]>) {
        if cmd.arg_is(1, "maint_notifications") {
            return self.reject(MAINT);
        }
        if cmd.arg_is(1, "reply") && cmd.argc() == 3 {
            if self.state.in_multi {
                return self.reject(IN_MULTI);
            }
            // Emulated so the server always answers, which keeps injected AUTHs exact.
            if cmd.arg_is(2, "on") {
                self.state.reply_mode = ReplyMode::On;
                self.relay_current = true;
                return self.local(Bytes::from_static(OK));
            } else if cmd.arg_is(2, "off") {
                self.state.reply_mode = ReplyMode::Off;
                return;
            } else if cmd.arg_is(2, "skip") {
                if self.state.reply_mode != ReplyMode::Off {
                    self.state.reply_mode = ReplyMode::Skip;
                }
                return;
            }
            return self.reject(SYNTAX);
        }
        let caching = cmd.arg_is(1, "caching");
        self.forward(cmd, raw, Effect::None);
        if caching {
            self.state.one_shot = true;
        }
    }
}
