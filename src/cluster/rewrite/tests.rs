use std::sync::Mutex;

use super::*;

/// Maps 10.0.0.N:85xx to 127.0.0.1:70xx and records what it was asked.
#[derive(Debug, Default)]
struct Fake {
    asked: Mutex<Vec<String>>,
    full: bool,
}

impl Remap for Fake {
    fn local(&self, host: &str, port: u16) -> Option<Local> {
        self.asked.lock().unwrap().push(join(host, port));
        if self.full {
            return None;
        }
        let n: u16 = host.rsplit('.').next()?.parse().ok()?;
        Some(Local {
            host: "127.0.0.1".into(),
            port: (7000 + port % 100).checked_add(n.checked_mul(10)?)?,
        })
    }
}

fn rewriter(fake: Fake) -> (Rewriter, Arc<Fake>) {
    let fake = Arc::new(fake);
    let r = Rewriter {
        map: fake.clone(),
        origin: "10.0.0.9".into(),
        tls: true,
    };
    (r, fake)
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

#[test]
fn redirections() {
    let (r, fake) = rewriter(Fake::default());
    assert_eq!(
        r.redirect(b"-MOVED 3999 10.0.0.1:8501\r\n").unwrap(),
        b"-MOVED 3999 127.0.0.1:7011\r\n"
    );
    assert_eq!(
        r.redirect(b"-ASK 12 10.0.0.2:8500\r\n").unwrap(),
        b"-ASK 12 127.0.0.1:7020\r\n"
    );
    // An empty host is the host of the node the connection is to.
    assert_eq!(
        r.redirect(b"-MOVED 1 :8502\r\n").unwrap(),
        b"-MOVED 1 127.0.0.1:7092\r\n"
    );
    // `?`: the server knows no endpoint; nothing to map.
    assert_eq!(
        r.redirect(b"-MOVED 1 ?:8502\r\n").unwrap(),
        b"-MOVED 1 ?:8502\r\n"
    );
    // Not a redirection after all.
    assert_eq!(r.redirect(b"-MOVED\r\n").unwrap(), b"-MOVED\r\n");
    assert_eq!(
        *fake.asked.lock().unwrap(),
        ["10.0.0.1:8501", "10.0.0.2:8500", "10.0.0.9:8502"]
    );
    assert!(is_redirect(b"MOVED 1 a:1"));
    assert!(is_redirect(b"ASK 1 a:1"));
    assert!(!is_redirect(b"ERR MOVED"));
}

#[test]
fn no_port_left_is_an_error_not_a_leak() {
    let (r, _) = rewriter(Fake {
        full: true,
        ..Fake::default()
    });
    let e = r.redirect(b"-MOVED 3999 10.0.0.1:8501\r\n").unwrap_err();
    assert_eq!(e, RewriteError::NoPort("10.0.0.1:8501".into()));
    assert!(e.to_string().contains("--cluster-ports"));
}

#[test]
fn cluster_slots_resp2_and_resp3() {
    let (r, _) = rewriter(Fake::default());
    // Redis 7.0: [start, end, [host, port, id, metadata]…]; metadata is empty unless a
    // hostname is announced, then it holds `hostname` (and `ip` when the endpoint is a name).
    let id = "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca";
    let node = |host: &str, port: u16, meta: &str| {
        format!("*4\r\n{}:{port}\r\n{}{meta}", bulk(host), bulk(id))
    };
    let frame = format!(
        "*2\r\n*3\r\n:0\r\n:5460\r\n{}*4\r\n:5461\r\n:16383\r\n{}{}",
        node("10.0.0.1", 8500, "*0\r\n"),
        node(
            "10.0.0.2",
            8501,
            &format!(
                "*4\r\n{}{}{}{}",
                bulk("ip"),
                bulk("10.0.0.2"),
                bulk("hostname"),
                bulk("n2.example")
            )
        ),
        node("", 8502, "*0\r\n"),
    );
    let out = r.topology(Topology::Slots, frame.as_bytes()).unwrap();
    let expected = format!(
        "*2\r\n*3\r\n:0\r\n:5460\r\n{}*4\r\n:5461\r\n:16383\r\n{}{}",
        node("127.0.0.1", 7010, "*0\r\n"),
        node(
            "127.0.0.1",
            7021,
            &format!(
                "*4\r\n{}{}{}{}",
                bulk("ip"),
                bulk("127.0.0.1"),
                bulk("hostname"),
                bulk("127.0.0.1")
            )
        ),
        node("127.0.0.1", 7092, "*0\r\n"),
    );
    assert_eq!(String::from_utf8(out).unwrap(), expected);

    // RESP3: the metadata is a map.
    let frame = format!(
        "*1\r\n*3\r\n:0\r\n:16383\r\n{}",
        node(
            "10.0.0.3",
            8500,
            &format!("%1\r\n{}{}", bulk("ip"), bulk("10.0.0.3"))
        ),
    );
    let out = r.topology(Topology::Slots, frame.as_bytes()).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n{}",
            node(
                "127.0.0.1",
                7030,
                &format!("%1\r\n{}{}", bulk("ip"), bulk("127.0.0.1"))
            ),
        )
    );
}

#[test]
fn cluster_slots_with_a_null_host_names_the_node_asked() {
    // `cluster-preferred-endpoint-type unknown-endpoint`: the host is null, in RESP2 and RESP3.
    let (r, _) = rewriter(Fake::default());
    for null in ["$-1\r\n", "_\r\n"] {
        let reply = format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n{null}:8500\r\n{}",
            bulk("id1")
        );
        let want = format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n{}:7090\r\n{}",
            bulk("127.0.0.1"),
            bulk("id1")
        );
        let got = r.topology(Topology::Slots, reply.as_bytes()).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
}

#[test]
fn cluster_shards_uses_the_tls_port_and_drops_it_and_rewrites_every_address() {
    let (r, _) = rewriter(Fake::default());
    let node = |fields: &[(&str, &str)]| {
        let mut s = format!("*{}\r\n", fields.len() * 2);
        for (k, v) in fields {
            s.push_str(&bulk(k));
            match v.parse::<i64>() {
                Ok(n) if *k != "endpoint" && *k != "ip" => s.push_str(&format!(":{n}\r\n")),
                _ => s.push_str(&bulk(v)),
            }
        }
        s
    };
    let shard = |nodes: &str| {
        format!(
            "*4\r\n{}*2\r\n:0\r\n:16383\r\n{}*1\r\n{nodes}",
            bulk("slots"),
            bulk("nodes")
        )
    };
    let before = node(&[
        ("id", "abc"),
        ("port", "6379"),
        ("tls-port", "8501"),
        ("ip", "10.0.0.4"),
        ("endpoint", "10.0.0.4"),
        ("hostname", "n4.example"),
        ("role", "master"),
    ]);
    let after = node(&[
        ("id", "abc"),
        ("port", "7041"),
        ("ip", "127.0.0.1"),
        ("endpoint", "127.0.0.1"),
        ("hostname", "127.0.0.1"),
        ("role", "master"),
    ]);
    let out = r
        .topology(
            Topology::Shards,
            format!("*1\r\n{}", shard(&before)).as_bytes(),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("*1\r\n{}", shard(&after))
    );
}

#[test]
fn cluster_nodes_lines() {
    let (r, _) = rewriter(Fake::default());
    // A hostname, announced or not (7.0 writes the comma only with one, 7.2 always, with
    // auxiliary fields behind it), is an address a client may use: the local host too.
    let text = "07c3 10.0.0.1:8500@16379,cache.example myself,master - 0 0 1 connected 0-5460\n\
                67ed 10.0.0.2:8501@16380 master - 0 1 2 connected 5461-10922\n\
                5b1e 10.0.0.3:8502@16381,,shard-id=f00 master - 0 1 4 connected\n\
                9c0d 10.0.0.4:8503@16382,n4.example,shard-id=ba7 master - 0 1 5 connected\n\
                2a5d :0@0 master,noaddr - 0 1 3 disconnected\n";
    let want = "07c3 127.0.0.1:7010@16379,127.0.0.1 myself,master - 0 0 1 connected 0-5460\n\
                67ed 127.0.0.1:7021@16380 master - 0 1 2 connected 5461-10922\n\
                5b1e 127.0.0.1:7032@16381,,shard-id=f00 master - 0 1 4 connected\n\
                9c0d 127.0.0.1:7043@16382,127.0.0.1,shard-id=ba7 master - 0 1 5 connected\n\
                2a5d :0@0 master,noaddr - 0 1 3 disconnected\n";
    let out = r.topology(Topology::Nodes, bulk(text).as_bytes()).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), bulk(want));
    // RESP3 sends a verbatim string.
    let verbatim = |s: &str| format!("={}\r\ntxt:{s}\r\n", s.len() + 4);
    let out = r
        .topology(Topology::Nodes, verbatim(text).as_bytes())
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), verbatim(want));
    // CLUSTER REPLICAS: an array of such lines.
    let line = "67ed 10.0.0.2:8501@16380 slave 07c3 0 1 2 connected\n";
    let out = r
        .topology(
            Topology::Replicas,
            format!("*1\r\n{}", bulk(line)).as_bytes(),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "*1\r\n{}",
            bulk("67ed 127.0.0.1:7021@16380 slave 07c3 0 1 2 connected\n")
        )
    );
}

#[test]
fn malformed_topology_is_an_error() {
    let (r, _) = rewriter(Fake::default());
    assert!(r.topology(Topology::Slots, b"+OK\r\n").is_err());
    assert!(r.topology(Topology::Nodes, b"*1\r\n:1\r\n").is_err());
    assert!(r
        .topology(Topology::Slots, b"*1\r\n*3\r\n:0\r\n:1\r\n:5\r\n")
        .is_err());
    assert!(r.topology(Topology::Slots, b"*1\r\n*3\r\n:0\r\n").is_err());
}

#[test]
fn subcommands() {
    assert_eq!(Topology::of_subcommand(b"SLOTS"), Some(Topology::Slots));
    assert_eq!(Topology::of_subcommand(b"shards"), Some(Topology::Shards));
    assert_eq!(Topology::of_subcommand(b"Nodes"), Some(Topology::Nodes));
    assert_eq!(Topology::of_subcommand(b"slaves"), Some(Topology::Replicas));
    assert_eq!(
        Topology::of_subcommand(b"replicas"),
        Some(Topology::Replicas)
    );
    assert_eq!(Topology::of_subcommand(b"info"), None);
    assert_eq!(Topology::of_subcommand(b"countkeysinslot"), None);
}

mod arbitrary {
    use super::*;
    use proptest::prelude::*;

    /// Frames made of RESP-looking pieces, so that most of them decode and reach the
    /// rewriting, not only the decoder's refusals.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"*2\r\n".to_vec()),
            Just(b"*4\r\n".to_vec()),
            Just(b"%2\r\n".to_vec()),
            Just(b":8500\r\n".to_vec()),
            Just(b":0\r\n".to_vec()),
            Just(b"$8\r\n10.0.0.1\r\n".to_vec()),
            Just(b"$0\r\n\r\n".to_vec()),
            Just(b"$4\r\nport\r\n".to_vec()),
            Just(b"$8\r\ntls-port\r\n".to_vec()),
            Just(b"$5\r\nnodes\r\n".to_vec()),
            Just(b"$2\r\nip\r\n".to_vec()),
            Just(b"$1\r\n?\r\n".to_vec()),
            Just(b"$-1\r\n".to_vec()),
            Just(b"_\r\n".to_vec()),
            Just(b"$19\r\na 10.0.0.1:1@2 x y\n\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn rewriting_never_panics(frame in frame(), line in proptest::collection::vec(any::<u8>(), 0..40)) {
            let (r, _) = rewriter(Fake::default());
            for kind in [Topology::Slots, Topology::Shards, Topology::Nodes, Topology::Replicas] {
                if let Ok(out) = r.topology(kind, &frame) {
                    // What is rewritten is one whole frame again.
                    let (_, used) = Value::decode(&out).expect("a frame");
                    prop_assert_eq!(used, out.len());
                }
            }
            let mut error = b"-MOVED ".to_vec();
            error.extend_from_slice(&line);
            error.extend_from_slice(b"\r\n");
            let _ = r.redirect(&error);
        }
    }
}
