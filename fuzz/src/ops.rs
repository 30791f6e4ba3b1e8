//! Decoding of the `session_core` target's input into a connection's life: a configuration
//! byte, then operations. The encoding is byte oriented so that corpus files can be written
//! by hand and libFuzzer's dictionary tokens land inside raw byte runs; the `Cmd` and `Reply`
//! operations build well-formed traffic from short indices, so that the fuzzer reaches deep
//! states (subscribed, translating, in MULTI) without guessing exact bytes.
//!
//! Layout: byte 0 is the configuration (bits 0–1: local password none, `pw` or empty; the
//! rest: first credentials, as for `Rotate`). Then each operation is an opcode byte
//! (`opcode % 16`) and its operands; a missing byte reads as 0.

use std::time::{Duration, SystemTime};

use redis_entra_proxy::credentials::Credentials;
use redis_entra_proxy::secret::Secret;

/// What the harness does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Client bytes; `deliver` false keeps them on the wire for a later `DeliverClient`.
    Client {
        bytes: Vec<u8>,
        deliver: bool,
    },
    /// Upstream bytes, likewise.
    Upstream {
        bytes: Vec<u8>,
        deliver: bool,
    },
    /// Hand up to this many wire bytes to the core.
    DeliverClient(usize),
    DeliverUpstream(usize),
    /// New credentials (operand: see [`Creds`]).
    Rotate(u8),
    RetryReauth,
    Expire,
    Shrink,
    /// The driver writes this many bytes of the core's output (`usize::MAX`: all of it).
    DrainClient(usize),
    DrainUpstream(usize),
}

/// Command names the fuzzer picks by index (upper and lower case both matter).
const NAMES: &[&str] = &[
    "GET",
    "SET",
    "PING",
    "ECHO",
    "AUTH",
    "HELLO",
    "QUIT",
    "CLIENT",
    "MULTI",
    "EXEC",
    "DISCARD",
    "RESET",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PSUBSCRIBE",
    "PUNSUBSCRIBE",
    "SSUBSCRIBE",
    "SUNSUBSCRIBE",
    "MONITOR",
    "ASKING",
    "PUBLISH",
    "BLPOP",
    "WATCH",
    "auth",
    "hello",
    "client",
    "subscribe",
    "ping",
];

/// Arguments the fuzzer picks by index.
const WORDS: &[&str] = &[
    "REPLY",
    "ON",
    "OFF",
    "SKIP",
    "CACHING",
    "YES",
    "MAINT_NOTIFICATIONS",
    "INFO",
    "AUTH",
    "SETNAME",
    "default",
    "pw",
    "wrong",
    "2",
    "3",
    "4",
    "c1",
    "c2",
    "p*",
    "0",
    "k",
    "",
    "a b",
    "on",
    "reply",
];

/// Upstream replies the fuzzer picks by index; `{n}` is replaced by the operand.
const REPLIES: &[&str] = &[
    "+OK\r\n",
    "+QUEUED\r\n",
    "+PONG\r\n",
    "-ERR some error\r\n",
    "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    "-NOAUTH Authentication required.\r\n",
    ":{n}\r\n",
    "$5\r\nhello\r\n",
    "$-1\r\n",
    "*-1\r\n",
    "_\r\n",
    "*2\r\n$1\r\na\r\n:1\r\n",
    ">3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:{n}\r\n",
    "*3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:{n}\r\n",
    ">3\r\n$11\r\nunsubscribe\r\n$2\r\nc1\r\n:{n}\r\n",
    "*3\r\n$11\r\nunsubscribe\r\n$2\r\nc1\r\n:{n}\r\n",
    ">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n",
    "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n",
    ">3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:{n}\r\n",
    ">3\r\n$10\r\nssubscribe\r\n$2\r\nc2\r\n:{n}\r\n",
    ">3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$2\r\nhi\r\n",
    "*3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$2\r\nhi\r\n",
    ">4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\nc1\r\n$2\r\nhi\r\n",
    "%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n",
    "*6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:2\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n",
    "|1\r\n+key\r\n+val\r\n+OK\r\n",
    "*2\r\n$4\r\npong\r\n$0\r\n\r\n",
    "+1700000000.000000 [0 127.0.0.1:1234] \"GET\" \"k\"\r\n",
    ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
    "*2\r\n+OK\r\n:1\r\n",
    "-EXECABORT Transaction discarded because of previous errors.\r\n",
    "$300\r\n{x300}\r\n",
];

/// Credentials chosen by a `Rotate` operand (or the configuration byte shifted right by 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    /// bit 0: keep the current generation (the core must ignore it).
    pub same_generation: bool,
    /// bit 1: an empty username.
    pub empty_username: bool,
    /// bits 2–3: token shape (see the target).
    pub token: u8,
    /// bits 4–5: expiry: none, in an hour, already past, at the epoch.
    pub expiry: u8,
}

impl Creds {
    pub fn from_byte(b: u8) -> Creds {
        Creds {
            same_generation: b & 1 != 0,
            empty_username: b & 2 != 0,
            token: (b >> 2) & 3,
            expiry: (b >> 4) & 3,
        }
    }

    /// The credentials of this shape for `generation`.
    pub fn build(self, generation: u64) -> Credentials {
        let username = if self.empty_username {
            String::new()
        } else {
            format!("oid-{generation}")
        };
        let token = match self.token {
            0 => format!("tok{generation}"),
            1 => String::new(),
            // Entra tokens are 1.5–2.5 KB.
            2 => "t".repeat(2_000),
            // Bytes a RESP encoder must not take for a frame's end.
            _ => format!("tok\r\n{generation} x"),
        };
        let expires_at = match self.expiry {
            0 => None,
            1 => Some(SystemTime::now() + Duration::from_secs(3_600)),
            2 => Some(SystemTime::now() - Duration::from_secs(1)),
            _ => Some(SystemTime::UNIX_EPOCH),
        };
        Credentials {
            username,
            token: Secret::new(token),
            expires_at,
            generation,
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos += n;
        self.data[start..end].to_vec()
    }

    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// The configuration byte and the operations.
pub fn decode(data: &[u8]) -> (u8, Vec<Op>) {
    let mut r = Reader { data, pos: 0 };
    let config = r.u8();
    let mut ops = Vec::new();
    while !r.done() {
        let code = r.u8() % 16;
        let op = match code {
            0 | 4 => {
                let deliver = code == 0;
                let n = usize::from(r.u8());
                Op::Client {
                    bytes: r.bytes(n),
                    deliver,
                }
            }
            1 | 15 => {
                let deliver = code == 1;
                Op::Client {
                    bytes: command(&mut r),
                    deliver,
                }
            }
            2 | 14 => {
                let deliver = code == 2;
                let n = usize::from(r.u8());
                Op::Upstream {
                    bytes: r.bytes(n),
                    deliver,
                }
            }
            3 | 5 => {
                let deliver = code == 3;
                let (i, n) = (r.u8(), r.u8());
                let reply = REPLIES[usize::from(i) % REPLIES.len()]
                    .replace("{n}", &(n % 4).to_string())
                    .replace("{x300}", &"x".repeat(300));
                Op::Upstream {
                    bytes: reply.into_bytes(),
                    deliver,
                }
            }
            6 => Op::DeliverClient(usize::from(r.u8()) + 1),
            7 => Op::DeliverUpstream(usize::from(r.u8()) + 1),
            8 => Op::Rotate(r.u8()),
            9 => Op::RetryReauth,
            10 => Op::Expire,
            11 => Op::Shrink,
            12 => Op::DrainClient(drain_amount(r.u8())),
            _ => Op::DrainUpstream(drain_amount(r.u8())),
        };
        ops.push(op);
    }
    (config, ops)
}

fn drain_amount(b: u8) -> usize {
    if b == 255 {
        usize::MAX
    } else {
        (usize::from(b) + 1) * 8
    }
}

/// A command from the dictionaries: name byte, then `argc % 8` (bit 7: inline), then per
/// argument a word index, or for bytes 0xf0 and up `b & 0x0f` raw bytes.
fn command(r: &mut Reader<'_>) -> Vec<u8> {
    let name = NAMES[usize::from(r.u8()) % NAMES.len()].as_bytes().to_vec();
    let shape = r.u8();
    let mut args = vec![name];
    for _ in 0..shape % 8 {
        let b = r.u8();
        args.push(if b >= 0xf0 {
            r.bytes(usize::from(b & 0x0f))
        } else {
            WORDS[usize::from(b) % WORDS.len()].as_bytes().to_vec()
        });
    }
    let mut out = Vec::new();
    if shape & 0x80 != 0 {
        // Inline, as typed in a terminal: arguments joined by spaces.
        out.extend(args.join(&b' '));
        out.extend_from_slice(b"\r\n");
    } else {
        redis_entra_proxy::resp::encode::command(
            &mut out,
            args.iter()
                .map(Vec::as_slice)
                .collect::<Vec<_>>()
                .into_iter(),
        );
    }
    out
}
