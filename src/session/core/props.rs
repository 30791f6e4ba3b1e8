//! Property tests of the core against the model server: for any sequence of client commands,
//! token rotations and ways of cutting both byte streams, the client sees exactly what it
//! would see talking to the server directly, no injected reply leaks, none is lost, and the
//! server never receives an AUTH where Redis would mishandle it.

use std::sync::Arc;

use bytes::BytesMut;
use proptest::prelude::*;

use super::model::Model;
use super::*;
use crate::credentials::Credentials;

#[derive(Debug, Clone)]
enum Op {
    /// A client command (already rendered).
    Cmd(Vec<u8>),
    /// The token rotates.
    Rotate,
    /// Move up to this many bytes proxy→server and server→proxy.
    Pump(usize),
}

fn creds(generation: u64) -> Arc<Credentials> {
    Arc::new(Credentials {
        username: format!("oid-{generation}"),
        token: Secret::new(format!("tok{generation}")),
        expires_at: None,
        generation,
    })
}

fn render(args: &[&str], inline: bool) -> Vec<u8> {
    if inline {
        return format!("{}\r\n", args.join(" ")).into_bytes();
    }
    let mut out = Vec::new();
    crate::resp::encode::command(
        &mut out,
        args.iter()
            .map(|a| a.as_bytes())
            .collect::<Vec<_>>()
            .into_iter(),
    );
    out
}

/// Commands that are valid in the state the generator tracks, so that the direct and the
/// proxied runs are comparable (the proxy refuses AUTH, HELLO and CLIENT REPLY in MULTI).
fn script(choices: Vec<(u8, u8, bool)>) -> Vec<Op> {
    let mut in_multi = false;
    let mut ops = Vec::new();
    for (kind, arg, inline) in choices {
        let a = format!("v{arg}");
        let cmd: Option<Vec<&str>> = match kind % 16 {
            0..=2 => Some(vec!["ECHO", &a]),
            3 if !in_multi && arg % 8 == 0 => Some(vec!["MULTI", "x"]),
            3 if !in_multi => {
                in_multi = true;
                Some(vec!["MULTI"])
            }
            4 if in_multi => {
                in_multi = false;
                Some(vec![if arg % 2 == 0 { "EXEC" } else { "DISCARD" }])
            }
            5 => Some(vec!["ASKING"]),
            6 if !in_multi => Some(vec!["SUBSCRIBE", ["c1", "c2", "denied"][arg as usize % 3]]),
            7 if !in_multi => Some(if arg % 3 == 0 {
                vec!["UNSUBSCRIBE", "c1"]
            } else {
                vec!["UNSUBSCRIBE"]
            }),
            8 => Some(vec!["PING"]),
            9 if !in_multi => Some(vec!["HELLO", if arg % 2 == 0 { "3" } else { "2" }]),
            10 => Some(vec!["PUBLISH", "c1", &a]),
            11 if !in_multi => Some(vec![
                "CLIENT",
                "REPLY",
                ["ON", "OFF", "SKIP"][arg as usize % 3],
            ]),
            12 if !in_multi => Some(vec!["AUTH", "pw"]),
            13 => {
                ops.push(Op::Rotate);
                None
            }
            14 if !in_multi => Some(match arg % 4 {
                0 => vec!["PSUBSCRIBE", "c*"],
                1 => vec!["PSUBSCRIBE", "x*"],
                2 => vec!["PUNSUBSCRIBE", "c*"],
                _ => vec!["PUNSUBSCRIBE"],
            }),
            // Now and then a request with a big argument, which the core passes upstream as it
            // arrives: written in three parts, with a token rotation or a pump in between.
            15 if arg % 4 == 0 => {
                let big = "b".repeat(crate::resp::request::STREAM_MIN + arg as usize);
                let bytes = render(&["ECHO", &big], false);
                let (a, rest) = bytes.split_at(bytes.len() / 3);
                let (b, c) = rest.split_at(rest.len() / 2);
                ops.push(Op::Cmd(a.to_vec()));
                ops.push(if arg % 8 == 0 {
                    Op::Rotate
                } else {
                    Op::Pump(1000)
                });
                ops.push(Op::Cmd(b.to_vec()));
                ops.push(Op::Pump(1 + arg as usize * 3));
                ops.push(Op::Cmd(c.to_vec()));
                None
            }
            _ => {
                ops.push(Op::Pump(1 + arg as usize * 3));
                None
            }
        };
        if let Some(cmd) = cmd {
            ops.push(Op::Cmd(render(
                &cmd,
                inline && !cmd.iter().any(|c| c.is_empty()),
            )));
        }
    }
    if in_multi {
        ops.push(Op::Cmd(render(&["DISCARD"], false)));
    }
    ops.push(Op::Cmd(render(&["UNSUBSCRIBE"], false)));
    ops.push(Op::Cmd(render(&["PUNSUBSCRIBE"], false)));
    ops.push(Op::Cmd(render(&["CLIENT", "REPLY", "ON"], false)));
    ops.push(Op::Cmd(render(&["ECHO", "end"], false)));
    ops
}

/// Moves bytes both ways; returns whether anything moved. `uin` holds upstream bytes the
/// core has not consumed yet (a partial frame), as the driver's buffer does.
fn pump(
    core: &mut Core,
    server: &mut Model,
    uin: &mut BytesMut,
    up_to: usize,
    sent: &mut Vec<u8>,
) -> bool {
    let n = core.to_upstream.len().min(up_to);
    let to_server = core.to_upstream.split_to(n);
    sent.extend_from_slice(&to_server);
    server.input.extend_from_slice(&to_server);
    server.run();
    let m = server.output.len().min(up_to);
    uin.extend_from_slice(&server.output[..m]);
    server.output.drain(..m);
    let before = uin.len();
    core.upstream_input(uin);
    n > 0 || m > 0 || uin.len() != before
}

/// Whether the router of shared clients would say `bytes` (one command) is plain: a
/// multibulk command that shares. Said here in states of the core the router never brings
/// about (MULTI, subscribed, replies off), which the core must see to.
fn plain(bytes: &[u8]) -> bool {
    let mut parser = crate::resp::request::RequestParser::new();
    match parser.parse(bytes) {
        Ok(Some(frame @ Frame::Multibulk { .. })) => parser
            .command(bytes, &frame)
            .arg(0)
            .is_some_and(crate::mux::shareable),
        _ => false,
    }
}

/// Hands the core the client's bytes, with their runs when `framed`, as the driver does.
fn feed(core: &mut Core, cin: &mut BytesMut, runs: &mut Runs, framed: bool) {
    if framed {
        core.client_input_framed(cin, Some(runs));
        assert_eq!(runs.pending(), cin.len(), "runs out of step");
    } else {
        core.client_input(cin);
    }
}

/// Every third command comes in two parts; `framed`: the commands come with runs, as from the
/// router of shared clients: plain ones whole and marked, the parts unmarked. Returns what the
/// client received, the server, the core, and every byte the server received.
fn run_proxied(ops: &[Op], framed: bool) -> (Vec<u8>, Model, Core, Vec<u8>) {
    let mut core = Core::new(creds(1), None);
    let mut server = Model::new(false);
    let mut generation = 1;
    let mut client_out = Vec::new();
    let mut cin = BytesMut::new();
    let mut uin = BytesMut::new();
    let mut runs = Runs::default();
    runs.start();
    let mut sent = Vec::new();
    for op in ops {
        match op {
            Op::Cmd(bytes) => {
                // Every third command comes in two parts, fed one after the other (unmarked
                // when framed), in both runs: what reaches the core at each feed is the same,
                // so that a request held back by the high-water mark is held back in both.
                let parts = if bytes.len() % 3 == 0 {
                    let (a, b) = bytes.split_at(bytes.len() / 2);
                    vec![(a, 0), (b, 0)]
                } else {
                    vec![(&bytes[..], usize::from(plain(bytes)))]
                };
                for (part, plain) in parts {
                    cin.extend_from_slice(part);
                    if framed {
                        runs.handed(part.len(), plain);
                    }
                    feed(&mut core, &mut cin, &mut runs, framed);
                }
            }
            Op::Rotate => {
                generation += 1;
                core.set_credentials(creds(generation));
            }
            Op::Pump(n) => {
                pump(&mut core, &mut server, &mut uin, *n, &mut sent);
            }
        }
        client_out.extend(core.to_client.split());
        assert!(
            core.close_reason().is_none(),
            "closed: {:?}",
            core.close_reason()
        );
    }
    for _ in 0..100_000 {
        // Requests held back while the upstream side was full, as the driver feeds them.
        let before = cin.len();
        feed(&mut core, &mut cin, &mut runs, framed);
        let fed = cin.len() != before;
        if !pump(&mut core, &mut server, &mut uin, 64, &mut sent)
            && !fed
            && core.to_upstream.is_empty()
        {
            break;
        }
        client_out.extend(core.to_client.split());
    }
    assert!(cin.is_empty(), "client bytes never consumed");
    assert!(
        uin.is_empty(),
        "upstream bytes never consumed: {:?}",
        String::from_utf8_lossy(&uin)
    );
    (client_out, server, core, sent)
}

fn run_direct(ops: &[Op]) -> Vec<u8> {
    let mut server = Model::new(true);
    for op in ops {
        if let Op::Cmd(bytes) = op {
            server.input.extend_from_slice(bytes);
            server.run();
        }
    }
    server.output
}

/// Splits a client's reply stream into (replies, messages). The proxy answers some commands
/// itself (AUTH, CLIENT REPLY ON, refusals); it cannot know whether the server will push a
/// message before the next reply, so a message may reach the client after such a local
/// answer instead of before it. Both sequences must still be identical and in order.
fn split(stream: &[u8]) -> (Vec<String>, Vec<String>) {
    let (mut replies, mut messages) = (Vec::new(), Vec::new());
    let mut rest = stream;
    while !rest.is_empty() {
        let mut scanner = crate::resp::reply::ReplyScanner::new();
        let n = scanner.scan(rest).expect("valid RESP").consumed;
        let frame = String::from_utf8_lossy(&rest[..n]).into_owned();
        let is_message = [
            ">3\r\n$7\r\nmessage",
            "*3\r\n$7\r\nmessage",
            ">4\r\n$8\r\npmessage",
            "*4\r\n$8\r\npmessage",
        ]
        .iter()
        .any(|kind| frame.starts_with(kind));
        if is_message {
            messages.push(frame)
        } else {
            replies.push(frame)
        }
        rest = &rest[n..];
    }
    (replies, messages)
}

/// 2,000 cases by default; `PROPTEST_CASES` sets more for a long run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn proxied_equals_direct(choices in prop::collection::vec((any::<u8>(), any::<u8>(), any::<bool>()), 0..120)) {
        let ops = script(choices);
        let want = run_direct(&ops);
        let (got, server, core, sent) = run_proxied(&ops, false);
        prop_assert!(server.violations.is_empty(), "violations: {:?}", server.violations);
        prop_assert_eq!(split(&got), split(&want));
        // Quiescent, not subscribed, not in MULTI: the upstream ends on the newest token.
        prop_assert!(core.current(), "not re-authenticated at the end");
        prop_assert!(core.idle());
        // Told which requests are plain, the core does exactly what it does parsing them.
        let (framed_got, _, framed_core, framed_sent) = run_proxied(&ops, true);
        prop_assert_eq!(framed_got, got);
        prop_assert_eq!(framed_sent, sent);
        prop_assert_eq!(framed_core.stats.commands, core.stats.commands);
    }
}
