//! A small model of a Redis server for property tests of the core: enough of RESP2/RESP3,
//! MULTI/EXEC, ASKING, HELLO, pub/sub (channels and prefix patterns) and CLIENT REPLY to tell a correct proxy from a broken
//! one. It also records protocol violations only a proxy could commit: an AUTH queued inside
//! MULTI, sent right after ASKING, or refused in RESP2 subscribed mode; a CLIENT REPLY that
//! reached the server although the proxy emulates it. One channel, `denied`, is refused, as
//! an ACL would refuse it.

use std::collections::BTreeSet;

use bytes::BytesMut;

use crate::resp::encode;
use crate::resp::request::{Frame, RequestParser};

#[derive(Debug, Default)]
pub struct Model {
    parser: RequestParser,
    pub input: BytesMut,
    pub output: Vec<u8>,
    proto: u8,
    multi: Option<Vec<Vec<Vec<u8>>>>,
    asking: bool,
    subs: BTreeSet<Vec<u8>>,
    /// Patterns, all of the form `prefix*`.
    pats: BTreeSet<Vec<u8>>,
    reply_off: bool,
    /// `CLIENT_REPLY_SKIP`: the current command's replies are dropped.
    skip: bool,
    /// `CLIENT_REPLY_SKIP_NEXT`: set by SKIP, becomes `skip` after the command.
    skip_next: bool,
    /// Whether the client talks to the model directly (the reference run): then it answers
    /// client AUTH like the proxy does and implements CLIENT REPLY itself.
    pub direct: bool,
    in_exec: bool,
    deferred: Vec<u8>,
    pub violations: Vec<String>,
    pub auths: u32,
}

fn bulk(out: &mut Vec<u8>, s: &[u8]) {
    encode::bulk(out, s);
}

impl Model {
    pub fn new(direct: bool) -> Model {
        Model {
            proto: 2,
            direct,
            ..Default::default()
        }
    }

    /// Processes every complete command in `input`.
    pub fn run(&mut self) {
        loop {
            let frame = match self.parser.parse(&self.input) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => panic!("the proxy forwarded malformed bytes: {e}"),
            };
            let args: Vec<Vec<u8>> = match frame {
                Frame::Empty { .. } => Vec::new(),
                _ => self
                    .parser
                    .command(&self.input, &frame)
                    .args()
                    .map(<[u8]>::to_vec)
                    .collect(),
            };
            let _ = self.input.split_to(frame.len());
            if !args.is_empty() {
                self.command(args);
            }
        }
    }

    fn reply(&mut self, bytes: &[u8]) {
        if !self.reply_off && !self.skip {
            self.output.extend_from_slice(bytes);
        }
    }

    fn push(&mut self, parts: &[&[u8]], count: Option<usize>) {
        // Pub/sub frames are pushed: Redis sends them even under CLIENT REPLY OFF.
        let mut f = Vec::new();
        encode::header(
            &mut f,
            if self.proto == 3 { b'>' } else { b'*' },
            parts.len() + usize::from(count.is_some()),
        );
        for p in parts {
            if p.is_empty() && count.is_some() {
                f.extend_from_slice(if self.proto == 3 {
                    b"_\r\n"
                } else {
                    b"$-1\r\n"
                });
            } else {
                bulk(&mut f, p);
            }
        }
        if let Some(c) = count {
            f.extend_from_slice(format!(":{c}\r\n").as_bytes());
        }
        if self.in_exec {
            self.deferred.extend_from_slice(&f);
        } else {
            self.output.extend_from_slice(&f);
        }
    }

    /// What Redis reports in a channel or pattern confirmation: both kinds together.
    fn subscribed(&self) -> usize {
        self.subs.len() + self.pats.len()
    }

    /// `(P)SUBSCRIBE`: `kind` is `subscribe` or `psubscribe`.
    fn subscribe(&mut self, kind: &[u8], names: &[Vec<u8>]) {
        for name in names {
            let set = if kind == b"subscribe" {
                &mut self.subs
            } else {
                &mut self.pats
            };
            set.insert(name.clone());
            self.push(&[kind, name], Some(self.subscribed()));
        }
    }

    /// `(P)UNSUBSCRIBE`, of the names given or of all of the kind: `kind` is `unsubscribe`
    /// or `punsubscribe`.
    fn unsubscribe(&mut self, kind: &[u8], names: &[Vec<u8>]) {
        let channels = kind == b"unsubscribe";
        let set = if channels { &self.subs } else { &self.pats };
        let names: Vec<Vec<u8>> = if names.is_empty() {
            set.iter().cloned().collect()
        } else {
            names.to_vec()
        };
        if names.is_empty() {
            self.push(&[kind, b""], Some(self.subscribed()));
        }
        for name in names {
            let set = if channels {
                &mut self.subs
            } else {
                &mut self.pats
            };
            set.remove(&name);
            self.push(&[kind, &name], Some(self.subscribed()));
        }
    }

    fn command(&mut self, args: Vec<Vec<u8>>) {
        let name = String::from_utf8_lossy(&args[0]).to_uppercase();
        let was_asking = std::mem::take(&mut self.asking);
        self.dispatch(&name, &args, was_asking);
        // Redis's resetClient: the skip ends with the command, SKIP arms the next one.
        self.skip = std::mem::take(&mut self.skip_next);
    }

    fn dispatch(&mut self, name: &str, args: &[Vec<u8>], was_asking: bool) {
        let allowed_sub = matches!(
            name,
            "SUBSCRIBE" | "UNSUBSCRIBE" | "PSUBSCRIBE" | "PUNSUBSCRIBE" | "PING" | "QUIT" | "RESET"
        );
        if name == "AUTH" && !self.direct {
            self.auths += 1;
            if self.multi.is_some() {
                self.violations.push("AUTH inside MULTI".into());
            }
            if was_asking {
                self.violations.push("AUTH right after ASKING".into());
            }
            if self.proto == 2 && self.subscribed() > 0 {
                self.violations.push("AUTH in RESP2 subscribed mode".into());
            }
        }
        if name == "CLIENT" && !self.direct {
            self.violations
                .push("CLIENT REPLY reached the server".into());
        }
        if self.proto == 2 && self.subscribed() > 0 && !allowed_sub {
            let mut full = name.to_lowercase();
            if name == "CLIENT" {
                full = format!(
                    "client|{}",
                    String::from_utf8_lossy(&args[1]).to_lowercase()
                );
            }
            // A refused EXEC is answered EXECABORT, with the reason.
            let prefix = if name == "EXEC" {
                "EXECABORT Transaction discarded because of:"
            } else {
                "ERR"
            };
            let msg = format!("-{prefix} Can't execute '{full}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n");
            return self.reply(msg.as_bytes());
        }
        if let Some(queue) = &mut self.multi {
            if !matches!(name, "EXEC" | "DISCARD" | "MULTI") {
                queue.push(args.to_vec());
                return self.reply(b"+QUEUED\r\n");
            }
        }
        match name {
            "ECHO" => {
                let mut r = Vec::new();
                bulk(&mut r, &args[1]);
                self.reply(&r)
            }
            "AUTH" => self.reply(b"+OK\r\n"),
            "ASKING" => {
                self.asking = true;
                self.reply(b"+OK\r\n")
            }
            "PING" if self.proto == 2 && self.subscribed() > 0 => {
                self.reply(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
            }
            "PING" => self.reply(b"+PONG\r\n"),
            "MULTI" if args.len() > 1 => {
                self.reply(b"-ERR wrong number of arguments for 'multi' command\r\n")
            }
            "MULTI" if self.multi.is_some() => {
                self.reply(b"-ERR MULTI calls can not be nested\r\n")
            }
            "MULTI" => {
                self.multi = Some(Vec::new());
                self.reply(b"+OK\r\n")
            }
            "DISCARD" => {
                self.multi = None;
                self.reply(b"+OK\r\n")
            }
            "EXEC" => {
                let queue = self.multi.take().unwrap_or_default();
                // Pushes raised inside the transaction follow the EXEC reply, as Redis 7.2+
                // sends them (7.0 embeds them in the array, which no client can parse).
                self.in_exec = true;
                let mut r = Vec::new();
                encode::header(&mut r, b'*', queue.len());
                for cmd in queue {
                    let before = std::mem::take(&mut self.output);
                    let (off, skip, next) = (self.reply_off, self.skip, self.skip_next);
                    (self.reply_off, self.skip, self.skip_next) = (false, false, false);
                    self.command(cmd);
                    (self.reply_off, self.skip, self.skip_next) = (off, skip, next);
                    r.extend(std::mem::replace(&mut self.output, before));
                }
                // Redis clears ASKING after EXEC even if the transaction ran it.
                self.asking = false;
                self.in_exec = false;
                self.reply(&r);
                let deferred = std::mem::take(&mut self.deferred);
                self.output.extend(deferred);
            }
            "HELLO" => {
                self.proto = if args[1] == b"3" { 3 } else { 2 };
                let kind = if self.proto == 3 { "%1" } else { "*2" };
                self.reply(format!("{kind}\r\n$5\r\nproto\r\n:{}\r\n", self.proto).as_bytes())
            }
            // An ACL that keeps the user out of one channel refuses the whole command.
            "SUBSCRIBE" if args[1..].iter().any(|ch| ch == b"denied") => {
                self.reply(b"-NOPERM User has no permissions to access the 'denied' channel\r\n")
            }
            "SUBSCRIBE" => self.subscribe(b"subscribe", &args[1..]),
            "PSUBSCRIBE" => self.subscribe(b"psubscribe", &args[1..]),
            "UNSUBSCRIBE" => self.unsubscribe(b"unsubscribe", &args[1..]),
            "PUNSUBSCRIBE" => self.unsubscribe(b"punsubscribe", &args[1..]),
            "PUBLISH" => {
                let (channel, message) = (&args[1], &args[2]);
                let mut n = 0;
                if self.subs.contains(channel) {
                    self.push(&[b"message", channel, message], None);
                    n += 1;
                }
                let matching: Vec<Vec<u8>> = (self.pats.iter())
                    .filter(|p| channel.starts_with(&p[..p.len() - 1]))
                    .cloned()
                    .collect();
                for pattern in matching {
                    self.push(&[b"pmessage", &pattern, channel, message], None);
                    n += 1;
                }
                self.reply(format!(":{n}\r\n").as_bytes())
            }
            "CLIENT" => match String::from_utf8_lossy(&args[2]).to_uppercase().as_str() {
                "ON" => {
                    // Redis clears both flags before replying: ON is answered even when it
                    // is the command a SKIP applied to.
                    (self.reply_off, self.skip) = (false, false);
                    self.reply(b"+OK\r\n")
                }
                "OFF" => self.reply_off = true,
                _ => self.skip_next = !self.reply_off,
            },
            other => panic!("model does not know {other}"),
        }
    }
}
