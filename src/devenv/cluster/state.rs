//! Reading what one cluster node says about the cluster: `CLUSTER INFO` fields, the slot map
//! of `CLUSTER SLOTS`, and the health of every peer in `CLUSTER NODES`. Pure parsing, so the
//! rules for "settled" are unit-tested without a server; asking the nodes is `cluster.rs`'s job.

use std::collections::HashMap;

use super::CLUSTER_SLOTS;
use crate::devenv::{DevError, Reply};

/// The only address a node may announce: everything in the fixture stays on loopback.
const LOOPBACK: &str = "127.0.0.1";

/// One contiguous range of slots and the port of the primary serving it, as in a
/// `CLUSTER SLOTS` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct SlotRange {
    pub(super) start: u16,
    pub(super) end: u16,
    pub(super) port: u16,
}

/// `CLUSTER INFO`'s `field:value` lines.
pub(super) fn parse_info(text: &str) -> HashMap<&str, &str> {
    text.lines()
        .filter_map(|line| line.trim_end().split_once(':'))
        .collect()
}

/// Why a node's `CLUSTER INFO` does not yet show a healthy cluster of `nodes` nodes with
/// every slot served, or `None` once it does.
pub(super) fn info_unsettled(info: &HashMap<&str, &str>, nodes: usize) -> Option<String> {
    let slots = CLUSTER_SLOTS.to_string();
    let nodes = nodes.to_string();
    let want = [
        ("cluster_state", "ok"),
        ("cluster_slots_assigned", slots.as_str()),
        ("cluster_slots_ok", slots.as_str()),
        ("cluster_known_nodes", nodes.as_str()),
    ];
    want.iter().find_map(|(field, value)| {
        let got = info.get(field).copied().unwrap_or("<missing>");
        (got != *value).then(|| format!("{field} is {got}, want {value}"))
    })
}

/// The primaries' slot ranges from a `CLUSTER SLOTS` reply, sorted by first slot. Fails on an
/// entry announcing anything but 127.0.0.1: a node must never point a client elsewhere.
pub(super) fn parse_slots(reply: Reply) -> Result<Vec<SlotRange>, DevError> {
    let bad = |what: &str| DevError::Protocol(format!("CLUSTER SLOTS: {what}"));
    let entries = match reply {
        Reply::Array(Some(entries)) => entries,
        Reply::Error(e) => return Err(DevError::Reply(e)),
        other => return Err(bad(&format!("expected an array, got {other:?}"))),
    };
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let Reply::Array(Some(fields)) = entry else {
            return Err(bad("entry is not an array"));
        };
        let [Reply::Integer(start), Reply::Integer(end), Reply::Array(Some(primary)), ..] =
            fields.as_slice()
        else {
            return Err(bad("entry is not [start, end, [ip, port, id, ...], ...]"));
        };
        let [Reply::Bulk(Some(ip)), Reply::Integer(port), ..] = primary.as_slice() else {
            return Err(bad("node is not [ip, port, ...]"));
        };
        if ip.as_slice() != LOOPBACK.as_bytes() {
            let ip = String::from_utf8_lossy(ip);
            return Err(bad(&format!("a node announces {ip}, not {LOOPBACK}")));
        }
        let slot = |n: i64| u16::try_from(n).ok().filter(|s| *s < CLUSTER_SLOTS);
        let (Some(start), Some(end), Ok(port)) = (slot(*start), slot(*end), u16::try_from(*port))
        else {
            return Err(bad("slot or port out of range"));
        };
        ranges.push(SlotRange { start, end, port });
    }
    ranges.sort();
    Ok(ranges)
}

/// Why a node's `CLUSTER NODES` text does not yet show `nodes` healthy, connected primaries on
/// 127.0.0.1 with no slot half-way through a migration, or `None` once it does.
pub(super) fn nodes_unsettled(text: &str, nodes: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != nodes {
        return Some(format!("knows {} nodes, want {nodes}", lines.len()));
    }
    for line in lines {
        // <id> <ip:port@cport> <flags> <primary> <ping-sent> <pong-recv> <epoch> <link> <slot>...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(id), Some(addr), Some(flags), Some(link)) =
            (fields.first(), fields.get(1), fields.get(2), fields.get(7))
        else {
            return Some(format!("unreadable line {line:?}"));
        };
        if !addr.starts_with(&format!("{LOOPBACK}:")) {
            return Some(format!("node {id} announces {addr}"));
        }
        let bad_flag = flags
            .split(',')
            .find(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr" | "slave"));
        if let Some(flag) = bad_flag {
            return Some(format!("node {id} is {flag}"));
        }
        if *link != "connected" {
            return Some(format!("node {id} link is {link}"));
        }
        // Open slots show as `[slot->-id]` (migrating) or `[slot-<-id]` (importing).
        if fields[8..].iter().any(|s| s.starts_with('[')) {
            return Some(format!("node {id} has a slot in migration"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    fn entry(start: i64, end: i64, ip: &str, port: i64) -> Reply {
        Reply::Array(Some(vec![
            Reply::Integer(start),
            Reply::Integer(end),
            Reply::Array(Some(vec![
                bulk(ip),
                Reply::Integer(port),
                bulk("0123456789012345678901234567890123456789"),
                Reply::Array(Some(vec![])),
            ])),
        ]))
    }

    #[test]
    fn slots_are_parsed_sorted_and_loopback_only() {
        let reply = Reply::Array(Some(vec![
            entry(5461, 16383, "127.0.0.1", 7001),
            entry(0, 5460, "127.0.0.1", 7000),
        ]));
        assert_eq!(
            parse_slots(reply).expect("valid"),
            vec![
                SlotRange {
                    start: 0,
                    end: 5460,
                    port: 7000
                },
                SlotRange {
                    start: 5461,
                    end: 16383,
                    port: 7001
                },
            ]
        );
        let elsewhere = Reply::Array(Some(vec![entry(0, 16383, "10.0.0.1", 7000)]));
        assert!(parse_slots(elsewhere).is_err());
        let out_of_range = Reply::Array(Some(vec![entry(0, 16384, "127.0.0.1", 7000)]));
        assert!(parse_slots(out_of_range).is_err());
    }

    #[test]
    fn info_is_settled_only_when_every_field_is() {
        let ok = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n\
                  cluster_known_nodes:3\r\n";
        assert_eq!(info_unsettled(&parse_info(ok), 3), None);
        assert!(info_unsettled(&parse_info(ok), 2).is_some());
        let failing = ok.replace("state:ok", "state:fail");
        let why = info_unsettled(&parse_info(&failing), 3).expect("unsettled");
        assert!(why.contains("cluster_state is fail"), "{why}");
    }

    #[test]
    fn nodes_are_settled_only_when_healthy_and_not_migrating() {
        let a = "aaaa 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460";
        let b = "bbbb 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-16383";
        let cases = [
            ("healthy", format!("{a}\n{b}\n"), true),
            ("too few", format!("{a}\n"), false),
            (
                "handshake",
                format!("{a}\n{}\n", b.replace("master", "handshake")),
                false,
            ),
            (
                "pfail",
                format!("{a}\n{}\n", b.replace("master", "master,fail?")),
                false,
            ),
            (
                "link down",
                format!("{a}\n{}\n", b.replace("connected", "disconnected")),
                false,
            ),
            ("migrating", format!("{a} [5->-bbbb]\n{b}\n"), false),
            (
                "elsewhere",
                format!("{a}\n{}\n", b.replace("127.0.0.1", "10.0.0.1")),
                false,
            ),
        ];
        for (name, text, settled) in cases {
            assert_eq!(nodes_unsettled(&text, 2).is_none(), settled, "{name}");
        }
    }
}
