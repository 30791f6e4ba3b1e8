//! Byte-level tests of the sans-IO core: what it writes upstream and to the client for given
//! inputs, with the upstream's replies scripted by hand.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;

use super::*;
use crate::credentials::Credentials;

fn creds(generation: u64) -> Arc<Credentials> {
    Arc::new(Credentials {
        username: format!("oid-{generation}"),
        token: Secret::new(format!("tok{generation}")),
        expires_at: None,
        generation,
    })
}

fn auth(generation: u64) -> String {
    format!("*3\r\n$4\r\nAUTH\r\n$5\r\noid-{generation}\r\n$4\r\ntok{generation}\r\n")
}

struct T {
    core: Core,
    /// Client bytes the core has not taken yet (behind a barrier, or incomplete), as the
    /// driver's buffer holds them.
    cin: BytesMut,
}

impl T {
    /// A core whose initial AUTH has been written (and is checked and taken here).
    fn new() -> T {
        Self::started(Core::new(creds(1), None))
    }

    fn with_password(pw: &str) -> T {
        Self::started(Core::new(creds(1), Some(Arc::new(Secret::new(pw)))))
    }

    fn started(core: Core) -> T {
        let mut t = T {
            core,
            cin: BytesMut::new(),
        };
        assert_eq!(t.upstream_sent(), auth(1));
        t
    }

    fn client(&mut self, bytes: &str) -> &mut Self {
        self.cin.extend_from_slice(bytes.as_bytes());
        self.core.client_input(&mut self.cin);
        self
    }

    /// Upstream bytes, then the client bytes held back, as the driver feeds them.
    fn server(&mut self, bytes: &str) -> &mut Self {
        let mut buf = BytesMut::from(bytes.as_bytes());
        self.core.upstream_input(&mut buf);
        assert!(
            buf.is_empty() || self.core.close_reason().is_some(),
            "unconsumed upstream bytes"
        );
        if !self.cin.is_empty() && self.core.wants_client_input() {
            self.core.client_input(&mut self.cin);
        }
        self
    }

    fn upstream_sent(&mut self) -> String {
        String::from_utf8_lossy(&self.core.to_upstream.split()).into_owned()
    }

    fn client_got(&mut self) -> String {
        String::from_utf8_lossy(&self.core.to_client.split()).into_owned()
    }
}

#[test]
fn first_auth_is_swallowed_and_commands_pipeline_behind_it() {
    let mut t = T {
        core: Core::new(creds(1), None),
        cin: BytesMut::new(),
    };
    t.client("*1\r\n$4\r\nPING\r\n");
    assert_eq!(
        t.upstream_sent(),
        format!("{}*1\r\n$4\r\nPING\r\n", auth(1))
    );
    t.server("+OK\r\n+PONG\r\n");
    assert_eq!(t.client_got(), "+PONG\r\n");
    assert!(t.core.current());
}

#[test]
fn failed_first_auth_gives_one_error_and_closes() {
    let mut t = T::new();
    t.client("PING\r\nGET k\r\n");
    t.server("-WRONGPASS invalid username-password pair or user is disabled.\r\n-NOAUTH x\r\n");
    let got = t.client_got();
    assert!(
        got.starts_with("-WRONGPASS invalid username-password pair"),
        "{got}"
    );
    assert!(
        got.contains("redis-entra-proxy") && got.contains("oid-1") && !got.contains("tok1"),
        "{got}"
    );
    assert_eq!(got.matches("\r\n").count(), 1);
    assert!(matches!(
        t.core.close_reason(),
        Some(CloseReason::UpstreamAuth(_))
    ));
}

#[test]
fn client_auth_is_answered_locally_in_order() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("GET a\r\nAUTH pw\r\nAUTH u p\r\nGET b\r\n");
    let sent = t.upstream_sent();
    assert!(!sent.contains("pw") && !sent.contains("AUTH"), "{sent}");
    assert_eq!(t.client_got(), "");
    t.server("$1\r\na\r\n");
    assert_eq!(t.client_got(), "$1\r\na\r\n+OK\r\n+OK\r\n");
    t.server("$-1\r\n");
    assert_eq!(t.client_got(), "$-1\r\n");
}

/// Local replies between relayed ones, all answered by one read: each in its place.
#[test]
fn local_replies_keep_their_place_among_relayed_ones_of_one_read() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("GET a\r\nAUTH pw\r\nGET b\r\nGET c\r\nAUTH u p\r\n");
    t.upstream_sent();
    t.server("$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n");
    assert_eq!(
        t.client_got(),
        "$1\r\na\r\n+OK\r\n$1\r\nb\r\n$1\r\nc\r\n+OK\r\n"
    );
}

/// Replies relayed before the upstream goes out of step still reach the client.
#[test]
fn replies_before_a_desync_are_delivered() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("GET a\r\n");
    t.server("$1\r\na\r\n+EXTRA\r\n");
    assert_eq!(t.core.close_reason(), Some(&CloseReason::UpstreamDesync));
    assert_eq!(t.client_got(), "$1\r\na\r\n");
}

/// A client that reads slowly: relaying stops at the high-water mark, counting the replies
/// of the same read, and the rest waits in the read buffer.
#[test]
fn relaying_stops_at_the_high_water_mark() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client(&"GET k\r\n".repeat(4));
    t.upstream_sent();
    let value = "x".repeat(100 * 1024);
    let reply = format!("${}\r\n{value}\r\n", value.len());
    let mut read = BytesMut::from(reply.repeat(4).as_bytes());
    t.core.upstream_input(&mut read);
    assert_eq!(t.core.to_client.len(), 3 * reply.len());
    assert_eq!(read.len(), reply.len(), "the fourth reply waits");
    assert!(!t.core.wants_upstream_input());
    t.client_got();
    t.core.upstream_input(&mut read);
    assert!(read.is_empty());
    assert_eq!(t.client_got(), reply);
}

#[test]
fn local_password_like_requirepass() {
    let mut t = T::with_password("s3cret");
    t.server("+OK\r\n");
    t.client("PING\r\nAUTH nope\r\nAUTH other s3cret\r\nAUTH s3cret\r\nPING\r\n");
    assert_eq!(
        t.client_got(),
        "-NOAUTH Authentication required.\r\n\
         -WRONGPASS invalid username-password pair or user is disabled.\r\n\
         -WRONGPASS invalid username-password pair or user is disabled.\r\n+OK\r\n"
    );
    assert_eq!(t.upstream_sent(), "*1\r\n$4\r\nPING\r\n");
}

/// A client that has not given the password and reads nothing cannot make the proxy hold
/// more than 1 KiB of refusals for it: it is closed, as Redis closes it. One that gives the
/// password may pipeline as much as it likes.
#[test]
fn an_unauthenticated_client_reading_nothing_is_closed_past_1_kib() {
    let mut t = T::with_password("pw");
    t.client(&"PING\r\n".repeat(20));
    assert_eq!(t.core.close_reason(), None, "680 bytes owed");
    t.client(&"PING\r\n".repeat(20));
    assert_eq!(
        t.core.close_reason(),
        Some(&CloseReason::UnauthenticatedOutput)
    );
    assert!(!t.core.wants_client_input());

    // Read as it comes, the refusals never pile up.
    let mut t = T::with_password("pw");
    t.server("+OK\r\n");
    for _ in 0..100 {
        t.client("PING\r\n");
        assert_eq!(t.client_got(), "-NOAUTH Authentication required.\r\n");
    }
    assert_eq!(t.core.close_reason(), None);
    t.client(&format!("AUTH pw\r\n{}", "ECHO a\r\n".repeat(200)));
    assert_eq!(t.core.close_reason(), None);
}

/// A core for a client that owes the password writes nothing upstream until it gives it: then
/// its first AUTH, ahead of the client's commands, whose replies follow the client's `+OK`.
#[test]
fn an_unconnected_core_writes_its_first_auth_when_the_password_comes() {
    let mut t = T {
        core: Core::unconnected(creds(1), Some(Arc::new(Secret::new("pw")))),
        cin: BytesMut::new(),
    };
    t.client("PING\r\nAUTH nope\r\nRESET\r\nHELLO 3\r\n");
    assert_eq!(t.upstream_sent(), "");
    assert!(!t.core.auth_written());
    assert_eq!(
        t.client_got(),
        "-NOAUTH Authentication required.\r\n\
         -WRONGPASS invalid username-password pair or user is disabled.\r\n\
         +RESET\r\n-NOAUTH HELLO must be called with the client already authenticated, \
         otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate \
         the client and select the RESP protocol version at the same time\r\n"
    );
    // A new token meanwhile changes nothing yet.
    t.core.set_credentials(creds(2));
    assert_eq!(t.upstream_sent(), "");
    t.client("AUTH pw\r\nGET k\r\n");
    assert_eq!(
        t.client_got(),
        "+OK\r\n",
        "answered before the upstream is there"
    );
    assert_eq!(
        t.upstream_sent(),
        format!("{}*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", auth(2))
    );
    t.server("+OK\r\n$1\r\nv\r\n");
    assert_eq!(t.client_got(), "$1\r\nv\r\n");
    assert!(t.core.current());

    // HELLO with the password: the AUTH goes before the HELLO it carried.
    let mut t = T {
        core: Core::unconnected(creds(1), Some(Arc::new(Secret::new("pw")))),
        cin: BytesMut::new(),
    };
    t.client("HELLO 3 AUTH default pw\r\n");
    assert_eq!(
        t.upstream_sent(),
        format!("{}*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n", auth(1))
    );
}

/// On a pooled connection, authenticated with the same token, an unconnected core drops the
/// first AUTH it had not written yet; with another token it keeps it.
#[test]
fn an_unconnected_core_adopts_a_pooled_connections_authentication() {
    let pw = || Some(Arc::new(Secret::new("pw")));
    let pooled = |generation| {
        let mut t = T {
            core: Core::new(creds(generation), pw()),
            cin: BytesMut::new(),
        };
        assert_eq!(t.upstream_sent(), auth(generation));
        t.server("+OK\r\n");
        assert!(t.core.current());
        t.core
    };
    let mut t = T {
        core: Core::unconnected(creds(1), pw()),
        cin: BytesMut::new(),
    };
    t.client("AUTH pw\r\nGET k\r\n");
    assert!(!t.core.adopt_authentication(&pooled(2)), "another token");
    assert!(t.core.adopt_authentication(&pooled(1)));
    assert_eq!(t.upstream_sent(), "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    assert!(t.core.current());
    t.server("$1\r\nv\r\n");
    assert_eq!(t.client_got(), "+OK\r\n$1\r\nv\r\n");
    assert!(t.core.idle());
    // Once adopted, or once its AUTH is out, there is nothing to adopt.
    assert!(!t.core.adopt_authentication(&pooled(1)));
}

#[test]
fn a_refused_exec_gets_execabort_with_the_reason() {
    let mut t = T::with_password("pw");
    t.server("+OK\r\n");
    t.client("MULTI\r\nPING\r\nEXEC\r\nAUTH pw\r\nSUBSCRIBE a\r\nEXEC\r\n");
    t.upstream_sent();
    t.server(HELLO_REPLY)
        .server(">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
    // As redis-server 7.0.15 with requirepass answers the same bytes.
    assert_eq!(
        t.client_got(),
        "-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n\
         -EXECABORT Transaction discarded because of: NOAUTH Authentication required.\r\n\
         +OK\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n\
         -EXECABORT Transaction discarded because of: Can't execute 'exec': only (P|S)SUBSCRIBE \
         / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );
}

#[test]
fn hello_auth_is_checked_and_stripped() {
    let mut t = T::with_password("pw");
    t.server("+OK\r\n");
    t.client("*7\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$2\r\npw\r\n$7\r\nSETNAME\r\n$1\r\nn\r\n");
    assert_eq!(
        t.upstream_sent(),
        "*4\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$7\r\nSETNAME\r\n$1\r\nn\r\n"
    );
    t.server("%1\r\n$5\r\nproto\r\n:3\r\n");
    assert_eq!(t.client_got(), "%1\r\n$5\r\nproto\r\n:3\r\n");
    assert_eq!(t.core.state.proto, 3);
    t.client("HELLO 2 AUTH default wrong\r\nHELLO 3 FOO\r\n");
    assert_eq!(t.upstream_sent(), "");
    assert_eq!(
        t.client_got(),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n\
         -ERR Syntax error in HELLO option 'FOO'\r\n"
    );
}

#[test]
fn rotation_injects_between_commands_and_swallows_reply() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("GET a\r\n");
    t.core.set_credentials(creds(2));
    t.client("GET b\r\n");
    assert_eq!(
        t.upstream_sent(),
        format!(
            "*2\r\n$3\r\nGET\r\n$1\r\na\r\n{}*2\r\n$3\r\nGET\r\n$1\r\nb\r\n",
            auth(2)
        )
    );
    t.server("$1\r\n1\r\n+OK\r\n$1\r\n2\r\n");
    assert_eq!(t.client_got(), "$1\r\n1\r\n$1\r\n2\r\n");
    assert!(t.core.current());
    assert_eq!(t.core.stats.reauth_ok, 1);
}

#[test]
fn an_older_token_heard_late_changes_nothing() {
    // A session hears of a token from the refresher's channel when it starts and from its
    // group's later (credentials::fanout): the second time, or an older one, is no rotation.
    let mut t = T::new();
    t.server("+OK\r\n");
    t.core.set_credentials(creds(3));
    t.server("+OK\r\n");
    assert!(t.core.current());
    assert!(t.upstream_sent().contains(&auth(3)));
    for generation in [3, 2, 1] {
        t.core.set_credentials(creds(generation));
        t.client("GET a\r\n");
    }
    // No AUTH among them.
    assert_eq!(
        t.upstream_sent(),
        "*2\r\n$3\r\nGET\r\n$1\r\na\r\n".repeat(3)
    );
    assert!(t.core.current());
}

#[test]
fn rotation_waits_for_exec() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("MULTI\r\nSET a 1\r\n");
    t.core.set_credentials(creds(2));
    assert!(!t.upstream_sent().contains("AUTH"));
    t.client("EXEC\r\n");
    assert!(t.upstream_sent().ends_with(&format!("EXEC\r\n{}", auth(2))));
    t.server("+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n+OK\r\n");
    assert_eq!(t.client_got(), "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
}

#[test]
fn rotation_waits_after_asking() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("ASKING\r\n");
    t.core.set_credentials(creds(2));
    assert!(!t.upstream_sent().contains("AUTH"));
    t.client("GET k\r\n");
    assert!(t.upstream_sent().ends_with(&auth(2)));
}

#[test]
fn failed_reauth_keeps_connection() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.core.set_credentials(creds(2));
    t.upstream_sent();
    t.server("-WRONGPASS nope\r\n");
    assert_eq!(t.client_got(), "");
    assert!(t.core.close_reason().is_none());
    assert!(!t.core.current());
    assert_eq!(t.core.stats.reauth_failed, 1);
    t.core.retry_reauth();
    assert_eq!(t.upstream_sent(), auth(2));
}

#[test]
fn client_reply_is_emulated() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("CLIENT REPLY OFF\r\nSET a 1\r\nCLIENT REPLY SKIP\r\nCLIENT REPLY ON\r\nGET a\r\nCLIENT REPLY SKIP\r\nGET a\r\nGET a\r\n");
    let sent = t.upstream_sent();
    assert!(!sent.contains("REPLY"), "{sent}");
    t.server("+OK\r\n$1\r\n1\r\n$1\r\n1\r\n$1\r\n1\r\n");
    assert_eq!(t.client_got(), "+OK\r\n$1\r\n1\r\n$1\r\n1\r\n");
}

const HELLO3: &str = "*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n";
const HELLO2: &str = "*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n";
const HELLO_REPLY: &str = "%1\r\n$5\r\nproto\r\n:3\r\n";

#[test]
fn resp2_subscriber_is_moved_to_resp3_and_translated_back() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("SUBSCRIBE a b\r\nPSUBSCRIBE p*\r\nPING\r\nGET k\r\nUNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nAUTH x\r\n");
    // Each subscription command waits for the confirmations of the one before.
    assert_eq!(
        t.upstream_sent(),
        format!("{HELLO3}*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n")
    );
    // The server speaks RESP3 now.
    t.server(HELLO_REPLY);
    t.server(
        ">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
    );
    assert_eq!(t.upstream_sent(), "*2\r\n$10\r\nPSUBSCRIBE\r\n$2\r\np*\r\n");
    t.server(">3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n");
    // PING goes, GET is refused as Redis refuses it from a RESP2 subscriber.
    assert_eq!(
        t.upstream_sent(),
        "*1\r\n$4\r\nPING\r\n*1\r\n$11\r\nUNSUBSCRIBE\r\n"
    );
    t.server(">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n");
    t.server("+PONG\r\n");
    t.server(">3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n>3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n");
    assert_eq!(t.upstream_sent(), "*1\r\n$12\r\nPUNSUBSCRIBE\r\n");
    t.server(">3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:0\r\n");
    // Nothing left: back to RESP2, before the client's next command (answered locally).
    assert_eq!(t.upstream_sent(), HELLO2);
    t.server("%1\r\n$5\r\nproto\r\n:2\r\n");
    let want = "*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n\
                *3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n\
                *3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n\
                *2\r\n$4\r\npong\r\n$0\r\n\r\n\
                -ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n\
                *3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n\
                *3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:0\r\n+OK\r\n";
    assert_eq!(t.client_got(), want);
    assert!(t.core.idle());
    assert_eq!((t.core.state.proto, t.core.state.translate), (2, false));
}

#[test]
fn translated_subscriber_reauthenticates_in_band() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("SUBSCRIBE a\r\n");
    t.upstream_sent();
    t.server(HELLO_REPLY)
        .server(">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
    t.core.set_credentials(creds(2));
    assert_eq!(t.upstream_sent(), auth(2));
    t.server(">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nx\r\n+OK\r\n");
    assert_eq!(
        t.client_got(),
        "*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nx\r\n"
    );
    assert!(t.core.current());
    // Null channel of an unsubscribe with nothing left becomes a RESP2 null bulk.
    t.client("UNSUBSCRIBE\r\nUNSUBSCRIBE\r\n");
    t.server(">3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n");
    t.server(HELLO_REPLY.replace(":3", ":2").as_str());
    t.server("*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");
    assert_eq!(
        t.client_got(),
        "*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
    );
}

#[test]
fn resp2_subscriber_defers_reauth_when_resp3_is_refused() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("SUBSCRIBE a\r\n");
    assert!(t.upstream_sent().starts_with(HELLO3));
    t.server("-ERR unknown command 'HELLO'\r\n");
    t.core.set_credentials(creds(2));
    assert!(!t.upstream_sent().contains("AUTH"));
    t.server("*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
    assert_eq!(t.client_got(), "*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
    t.client("UNSUBSCRIBE\r\n");
    t.server("*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n");
    assert!(t.upstream_sent().ends_with(&auth(2)));
}

#[test]
fn resp3_pushes_bypass_the_ledger() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("HELLO 3\r\nSUBSCRIBE a\r\nGET k\r\n");
    t.server("%1\r\n$5\r\nproto\r\n:3\r\n");
    t.core.set_credentials(creds(2));
    t.upstream_sent();
    let push = ">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nx\r\n";
    t.server(">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
    // RESP3 subscribers re-authenticate in band, here as soon as the subscription is
    // confirmed, before the command that waited for it.
    assert_eq!(
        t.upstream_sent(),
        format!("{}*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", auth(2))
    );
    t.server(push)
        .server("+OK\r\n")
        .server("_\r\n")
        .server(push);
    let got = t.client_got();
    assert_eq!(got.matches(">3").count(), 3);
    assert!(got.contains("_\r\n") && !got.contains("+OK\r\n"));
    assert!(t.core.current());
}

#[test]
fn reset_reauthenticates_right_behind() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("RESET\r\nPING\r\n");
    // A barrier: what it does is known from its reply.
    assert_eq!(t.upstream_sent(), "*1\r\n$5\r\nRESET\r\n");
    t.server("+RESET\r\n");
    assert_eq!(
        t.upstream_sent(),
        format!("{}*1\r\n$4\r\nPING\r\n", auth(1))
    );
    t.server("+OK\r\n+PONG\r\n");
    assert_eq!(t.client_got(), "+RESET\r\n+PONG\r\n");
    assert!(t.core.current());
}

#[test]
fn quit_answers_after_pending_replies_then_closes() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("GET a\r\nQUIT\r\nGET b\r\n");
    assert_eq!(t.upstream_sent(), "*2\r\n$3\r\nGET\r\n$1\r\na\r\n");
    assert!(t.core.close_reason().is_none());
    t.server("$-1\r\n");
    assert_eq!(t.client_got(), "$-1\r\n+OK\r\n");
    assert_eq!(t.core.close_reason(), Some(&CloseReason::ClientQuit));
}

#[test]
fn protocol_error_after_earlier_replies() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("PING\r\n*x\r\nPING\r\n");
    assert_eq!(t.upstream_sent(), "*1\r\n$4\r\nPING\r\n");
    t.server("+PONG\r\n");
    assert_eq!(
        t.client_got(),
        "+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"
    );
    assert!(matches!(
        t.core.close_reason(),
        Some(CloseReason::ClientProtocol(_))
    ));
}

#[test]
fn dirty_transaction_aborts_like_redis() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("MULTI\r\nAUTH x\r\nEXEC\r\n");
    assert_eq!(
        t.upstream_sent(),
        "*1\r\n$5\r\nMULTI\r\n*1\r\n$7\r\nDISCARD\r\n"
    );
    t.server("+OK\r\n+OK\r\n");
    let got = t.client_got();
    assert!(
        got.starts_with("+OK\r\n-ERR")
            && got.ends_with("-EXECABORT Transaction discarded because of previous errors.\r\n"),
        "{got}"
    );
}

#[test]
fn unexpected_reply_closes_as_desync() {
    let mut t = T::new();
    t.server("+OK\r\n+EXTRA\r\n");
    assert_eq!(t.core.close_reason(), Some(&CloseReason::UpstreamDesync));
}

#[test]
fn large_reply_is_streamed_not_held() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("GET big\r\n");
    t.server("$100000\r\n");
    t.server(&"x".repeat(50_000));
    assert_eq!(t.client_got().len(), 9 + 50_000);
    assert!(t.core.held.is_empty());
    t.server(&format!("{}\r\n", "x".repeat(50_000)));
    assert_eq!(t.client_got().len(), 50_002);
    assert!(t.core.idle());
}

#[test]
fn unchanged_when_time_passes() {
    // Credentials without expiry stay current.
    let c = creds(1);
    assert!(!c.is_expired(SystemTime::now()));
}

#[test]
fn unsubscribe_when_not_subscribed() {
    for cmd in ["PUNSUBSCRIBE\r\n", "*1\r\n$12\r\nPUNSUBSCRIBE\r\n"] {
        let mut t = T::new();
        t.server("+OK\r\n");
        t.client(cmd);
        t.server("*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n");
        assert_eq!(
            t.client_got(),
            "*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n",
            "{cmd:?}"
        );
    }
}

/// Cluster mode: maps 10.0.0.N:P to 127.0.0.1:(7000 + N).
#[derive(Debug)]
struct Nodes;

impl crate::cluster::Remap for Nodes {
    fn local(&self, host: &str, _port: u16) -> Option<crate::cluster::Local> {
        let n: u16 = host.rsplit('.').next()?.parse().ok()?;
        Some(crate::cluster::Local {
            host: "127.0.0.1".into(),
            port: 7000 + n,
        })
    }
}

fn clustered() -> T {
    let mut t = T::new();
    t.core.set_rewriter(Some(crate::cluster::Rewriter {
        map: Arc::new(Nodes),
        origin: "10.0.0.9".into(),
        tls: true,
    }));
    t.server("+OK\r\n");
    t
}

#[test]
fn cluster_redirections_and_topology_name_local_listeners() {
    let mut t = clustered();
    t.client("*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n*2\r\n$7\r\ncluster\r\n$5\r\nnodes\r\n");
    t.upstream_sent();
    // Split inside a reply, the replies come out whole and rewritten.
    let line = "ab 10.0.0.1:8500@18500 myself,master - 0 0 1 connected 0-16383\n";
    let replies = format!(
        "-MOVED 12182 10.0.0.2:8501\r\n${}\r\n{line}\r\n",
        line.len()
    );
    let (a, b) = replies.split_at(40);
    t.server(a);
    assert_eq!(t.client_got(), "-MOVED 12182 127.0.0.1:7002\r\n");
    t.server(b);
    let want = "ab 127.0.0.1:7001@18500 myself,master - 0 0 1 connected 0-16383\n";
    assert_eq!(t.client_got(), format!("${}\r\n{want}\r\n", want.len()));
    // Other errors and replies pass as they are.
    t.client("*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n");
    t.server("-ERR MOVED somewhere\r\n$10\r\n10.0.0.1:1\r\n");
    assert_eq!(
        t.client_got(),
        "-ERR MOVED somewhere\r\n$10\r\n10.0.0.1:1\r\n"
    );
    // A failed topology command is relayed as it is.
    t.client("*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n");
    t.server("-ERR This instance has cluster support disabled\r\n");
    assert_eq!(
        t.client_got(),
        "-ERR This instance has cluster support disabled\r\n"
    );
}

#[test]
fn cluster_topology_is_refused_inside_multi() {
    refused_inside_multi(&mut clustered(), "CLUSTER SLOTS\r\n");
}

/// `command` between MULTI and EXEC: MULTI is forwarded, the command refused, and EXEC turned
/// into DISCARD and answered EXECABORT, as after a queue-time error.
fn refused_inside_multi(t: &mut T, command: &str) {
    t.client(&format!("MULTI\r\n{command}EXEC\r\n"));
    assert_eq!(
        t.upstream_sent(),
        "*1\r\n$5\r\nMULTI\r\n*1\r\n$7\r\nDISCARD\r\n"
    );
    t.server("+OK\r\n+OK\r\n");
    assert_eq!(
        t.client_got(),
        "+OK\r\n-ERR this command is not supported inside MULTI by redis-entra-proxy\r\n\
         -EXECABORT Transaction discarded because of previous errors.\r\n"
    );
}

#[test]
fn without_cluster_mode_nothing_is_rewritten() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n");
    t.server("-MOVED 12182 10.0.0.2:8501\r\n");
    assert_eq!(t.client_got(), "-MOVED 12182 10.0.0.2:8501\r\n");
}

/// A request with a bulk argument of [`STREAM_MIN`] bytes or more, and what follows it.
fn big_set(key: &str, len: usize) -> String {
    format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${len}\r\n{}\r\n",
        key.len(),
        "v".repeat(len)
    )
}

/// Feeds `input` to the core in reads of `chunk` bytes through one client buffer, as the
/// driver does, taking what it writes upstream after each read; returns everything written
/// upstream and the most bytes the client buffer held after a read was handled.
fn feed_in_reads(t: &mut T, input: &str, chunk: usize) -> (String, usize) {
    let mut buf = BytesMut::new();
    let mut sent = String::new();
    let mut most = 0;
    for part in input.as_bytes().chunks(chunk) {
        buf.extend_from_slice(part);
        t.core.client_input(&mut buf);
        most = most.max(buf.len());
        sent.push_str(&t.upstream_sent());
    }
    (sent, most)
}

/// A big request goes upstream byte for byte as it arrives, whatever the reads: the client
/// buffer never holds more than a read and a header line, and the commands around it keep
/// their order and their replies.
#[test]
fn a_big_request_goes_upstream_as_it_arrives() {
    let len = crate::resp::request::STREAM_MIN + 1000;
    let input = format!(
        "GET a\r\n{}*2\r\n$3\r\nGET\r\n$1\r\nb\r\n",
        big_set("big", len)
    );
    for chunk in [1, 7, 1000, 4096, 16 * 1024, len + 100] {
        let mut t = T::new();
        t.server("+OK\r\n");
        let (sent, most) = feed_in_reads(&mut t, &input, chunk);
        let want = format!(
            "*2\r\n$3\r\nGET\r\n$1\r\na\r\n{}*2\r\n$3\r\nGET\r\n$1\r\nb\r\n",
            big_set("big", len)
        );
        assert!(sent == want, "chunk {chunk}: upstream bytes differ");
        if chunk < len / 2 {
            assert!(
                most <= chunk + 64,
                "chunk {chunk}: the buffer held {most} bytes"
            );
        }
        assert!(!t.core.mid_request());
        t.server("$1\r\na\r\n+OK\r\n$1\r\nb\r\n");
        assert_eq!(
            t.client_got(),
            "$1\r\na\r\n+OK\r\n$1\r\nb\r\n",
            "chunk {chunk}"
        );
        assert!(t.core.idle());
    }
}

/// New credentials arriving while a big request is half written are not injected in its
/// middle: the AUTH follows its last byte.
#[test]
fn no_auth_is_injected_into_a_request_passed_on() {
    let mut t = T::new();
    t.server("+OK\r\n");
    let req = big_set("k", crate::resp::request::STREAM_MIN);
    let (head, tail) = req.split_at(req.len() / 2);
    let mut buf = BytesMut::from(head.as_bytes());
    t.core.client_input(&mut buf);
    assert!(buf.is_empty() && t.core.mid_request());
    t.core.set_credentials(creds(2));
    assert_eq!(t.upstream_sent(), head, "nothing but the request so far");
    buf.extend_from_slice(tail.as_bytes());
    t.core.client_input(&mut buf);
    assert_eq!(t.upstream_sent(), format!("{tail}{}", auth(2)));
    t.server("+OK\r\n+OK\r\n");
    assert_eq!(t.client_got(), "+OK\r\n");
    assert!(t.core.current());
}

/// A protocol error in the rest of a request passed on: the server holds only its beginning
/// and will never answer it, so the client gets the replies owed before it, then Redis's
/// error, and the connection closes.
#[test]
fn a_protocol_error_after_a_big_argument_closes_after_earlier_replies() {
    let mut t = T::new();
    t.server("+OK\r\n");
    let len = crate::resp::request::STREAM_MIN;
    let req = format!(
        "GET a\r\n*4\r\n$3\r\nSET\r\n$1\r\nk\r\n${len}\r\n{}\r\n!\r\n",
        "v".repeat(len)
    );
    let mut buf = BytesMut::from(&req.as_bytes()[..req.len() - 100]);
    t.core.client_input(&mut buf);
    assert!(t.core.mid_request());
    buf.extend_from_slice(&req.as_bytes()[req.len() - 100..]);
    t.core.client_input(&mut buf);
    let sent = t.upstream_sent();
    assert!(!sent.contains('!'), "the bad line is not passed on");
    assert_eq!(t.client_got(), "");
    t.server("$1\r\na\r\n");
    assert_eq!(
        t.client_got(),
        "$1\r\na\r\n-ERR Protocol error: expected '$', got '!'\r\n"
    );
    assert!(matches!(
        t.core.close_reason(),
        Some(CloseReason::ClientProtocol(_))
    ));
    assert_eq!(t.core.in_flight(), 0);
}

/// A client that closes in the middle of a big request owes the server nothing more: no
/// reply waits for it (the session can end at once).
#[test]
fn a_client_gone_mid_request_leaves_no_reply_owed() {
    let mut t = T::new();
    t.server("+OK\r\n");
    let req = big_set("k", crate::resp::request::STREAM_MIN);
    let mut buf = BytesMut::from(&req.as_bytes()[..req.len() / 2]);
    t.core.client_input(&mut buf);
    assert_eq!(t.core.in_flight(), 1);
    t.core.client_closed();
    assert_eq!(t.core.in_flight(), 0);
    assert!(t.core.idle());
}

/// What needs all its arguments, or a request whose big argument is the command name, is held
/// whole as before; so is a request below the threshold.
#[test]
fn only_ordinary_commands_with_a_big_argument_are_passed_on() {
    let big = "n".repeat(crate::resp::request::STREAM_MIN);
    for (req, streams) in [
        (big_set("k", crate::resp::request::STREAM_MIN), true),
        (big_set("k", crate::resp::request::STREAM_MIN - 1), false),
        (
            format!(
                "*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n${}\r\n{big}\r\n",
                big.len()
            ),
            false,
        ),
        (
            format!("*2\r\n$7\r\nPUBLISH\r\n${}\r\n{big}\r\n", big.len()),
            true,
        ),
        (
            format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{big}\r\n", big.len()),
            false,
        ),
        (format!("*1\r\n${}\r\n{big}\r\n", big.len()), false),
    ] {
        let mut t = T::new();
        t.server("+OK\r\n");
        let mut buf = BytesMut::from(&req.as_bytes()[..req.len() - 10]);
        t.core.client_input(&mut buf);
        let sent = t.upstream_sent();
        assert_eq!(!sent.is_empty(), streams, "{}", &req[..40]);
        assert_eq!(buf.is_empty(), streams, "{}", &req[..40]);
        buf.extend_from_slice(&req.as_bytes()[req.len() - 10..]);
        t.core.client_input(&mut buf);
        assert!(buf.is_empty() && !t.core.mid_request());
    }
}

/// A timeout in the middle of a big request (`--partial-request-timeout`, token expiry): the
/// request will not complete, so the connection closes once the replies owed before it were
/// delivered, without waiting for a reply to it.
#[test]
fn closing_mid_request_waits_only_for_earlier_replies() {
    let mut t = T::new();
    t.server("+OK\r\n");
    let req = format!(
        "GET a\r\n{}",
        big_set("k", crate::resp::request::STREAM_MIN)
    );
    let mut buf = BytesMut::from(&req.as_bytes()[..req.len() / 2]);
    t.core.client_input(&mut buf);
    assert_eq!(t.core.in_flight(), 2);
    t.core
        .close_after_replies(CloseReason::PartialRequest(std::time::Duration::from_secs(
            1,
        )));
    assert!(!t.core.wants_client_input());
    assert_eq!(t.core.close_reason(), None);
    t.server("$1\r\na\r\n");
    assert_eq!(t.client_got(), "$1\r\na\r\n");
    assert!(matches!(
        t.core.close_reason(),
        Some(CloseReason::PartialRequest(_))
    ));
}

const MONITOR_LINE: &str = "+1796625724.098137 [0 127.0.0.1:45990] \"PING\"\r\n";

#[test]
fn a_refused_subscription_leaves_the_client_unsubscribed() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("SSUBSCRIBE a b\r\nGET a\r\n");
    assert_eq!(
        t.upstream_sent(),
        format!("{HELLO3}*3\r\n$10\r\nSSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n")
    );
    t.server(HELLO_REPLY)
        .server("-CROSSSLOT Keys in request don't hash to the same slot\r\n");
    // Back to RESP2, then the GET, forwarded: the client never subscribed.
    assert_eq!(
        t.upstream_sent(),
        format!("{HELLO2}*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    );
    t.server("%1\r\n$5\r\nproto\r\n:2\r\n").server("$-1\r\n");
    assert_eq!(
        t.client_got(),
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n$-1\r\n"
    );
    assert!(!t.core.streaming() && t.core.idle());
}

#[test]
fn a_subscription_the_server_ends_is_over() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("SSUBSCRIBE b\r\n");
    t.upstream_sent();
    t.server(HELLO_REPLY)
        .server(">3\r\n$10\r\nssubscribe\r\n$1\r\nb\r\n:1\r\n");
    // The slot moved away: the server unsubscribes the client on its own.
    t.server(">3\r\n$12\r\nsunsubscribe\r\n$1\r\nb\r\n:0\r\n");
    assert_eq!(t.upstream_sent(), HELLO2);
    t.client("GET b\r\n");
    assert_eq!(t.upstream_sent(), "*2\r\n$3\r\nGET\r\n$1\r\nb\r\n");
    t.server("%1\r\n$5\r\nproto\r\n:2\r\n").server("$-1\r\n");
    assert_eq!(
        t.client_got(),
        "*3\r\n$10\r\nssubscribe\r\n$1\r\nb\r\n:1\r\n\
         *3\r\n$12\r\nsunsubscribe\r\n$1\r\nb\r\n:0\r\n$-1\r\n"
    );
    assert!(!t.core.streaming());
}

#[test]
fn subscribing_inside_multi_is_refused() {
    for command in ["SUBSCRIBE c\r\n", "PUNSUBSCRIBE\r\n", "SSUBSCRIBE s\r\n"] {
        let mut t = T::new();
        t.server("+OK\r\n");
        refused_inside_multi(&mut t, command);
    }
}

#[test]
fn replies_of_a_monitoring_client_are_told_from_monitor_lines() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("MONITOR\r\n");
    t.upstream_sent();
    t.server("+OK\r\n");
    assert!(t.core.streaming());
    // A second MONITOR gets no reply from Redis; PING gets its own, before its line.
    t.client("MONITOR\r\nPING\r\n");
    assert_eq!(t.upstream_sent(), "*1\r\n$4\r\nPING\r\n");
    t.server("+PONG\r\n").server(MONITOR_LINE);
    // RESET: its reply, then the AUTH it calls for, swallowed.
    t.client("RESET\r\n");
    assert_eq!(t.upstream_sent(), "*1\r\n$5\r\nRESET\r\n");
    t.server(MONITOR_LINE).server("+RESET\r\n");
    assert_eq!(t.upstream_sent(), auth(1));
    t.server("+OK\r\n");
    assert_eq!(
        t.client_got(),
        format!("+OK\r\n+PONG\r\n{MONITOR_LINE}{MONITOR_LINE}+RESET\r\n")
    );
    assert!(t.core.current() && !t.core.streaming());
    // QUIT after MONITOR and a command is answered and closes.
    t.client("MONITOR\r\n");
    t.server("+OK\r\n");
    t.client("PING\r\nQUIT\r\n");
    t.server("+PONG\r\n");
    assert_eq!(t.client_got(), "+OK\r\n+PONG\r\n+OK\r\n");
    assert_eq!(t.core.close_reason(), Some(&CloseReason::ClientQuit));
}

#[test]
fn a_refused_reset_changes_nothing() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("HELLO 3\r\n");
    t.upstream_sent();
    t.server(HELLO_REPLY);
    // Azure Managed Redis refuses RESET: the client is still RESP3, so its SUBSCRIBE needs
    // no switch of protocol.
    t.client("RESET\r\nSUBSCRIBE c\r\n");
    assert_eq!(t.upstream_sent(), "*1\r\n$5\r\nRESET\r\n");
    t.server("-ERR unknown command 'RESET'\r\n");
    assert_eq!(t.upstream_sent(), "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n");
    t.server(">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    assert_eq!(
        t.client_got(),
        format!("{HELLO_REPLY}-ERR unknown command 'RESET'\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")
    );
    assert!(t.core.current());
}

#[test]
fn reset_is_answered_under_client_reply_off_not_skip() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("CLIENT REPLY OFF\r\nRESET\r\n");
    t.server("+RESET\r\n+OK\r\n");
    t.client("CLIENT REPLY SKIP\r\nRESET\r\nPING\r\n");
    t.server("+RESET\r\n+OK\r\n").server("+PONG\r\n");
    assert_eq!(t.client_got(), "+RESET\r\n+PONG\r\n");
}

#[test]
fn a_refused_monitor_or_multi_does_not_stop_reauthentication() {
    for (commands, replies) in [
        ("MONITOR\r\n", "-ERR unknown command 'MONITOR'\r\n"),
        (
            "MULTI\r\nSET a 1\r\n",
            "-NOPERM this user has no permissions to run the 'multi' command\r\n+OK\r\n",
        ),
    ] {
        let mut t = T::new();
        t.server("+OK\r\n");
        t.client(commands);
        t.upstream_sent();
        t.server(replies);
        t.core.set_credentials(creds(2));
        assert_eq!(t.upstream_sent(), auth(2), "{commands:?}");
        assert!(!t.core.streaming());
    }
    // MULTI with arguments is refused as Redis refuses it, and opens no transaction.
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("MULTI x\r\n");
    assert_eq!(t.upstream_sent(), "");
    assert_eq!(
        t.client_got(),
        "-ERR wrong number of arguments for 'multi' command\r\n"
    );
    t.core.set_credentials(creds(2));
    assert_eq!(t.upstream_sent(), auth(2));
}

#[test]
fn hello_with_a_bad_name_inside_multi_switches_nothing() {
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("MULTI\r\nHELLO 3 SETNAME \"a b\"\r\nEXEC\r\n");
    t.upstream_sent();
    t.server("+OK\r\n+QUEUED\r\n*1\r\n-ERR Client names cannot contain spaces, newlines or special characters.\r\n");
    assert_eq!((t.core.state.proto, t.core.state.wproto), (2, 2));
}

#[test]
fn invalidations_reach_a_resp2_subscriber_as_redis_sends_them() {
    const CHANNEL_ACK: &str = ">3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n";
    const KEYS: &str = ">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nrk1\r\n";
    const FLUSH: &str = ">2\r\n$10\r\ninvalidate\r\n_\r\n";
    // The target of another connection's CLIENT TRACKING … REDIRECT: a message on the channel.
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("SUBSCRIBE __redis__:invalidate\r\n");
    t.upstream_sent();
    t.server(HELLO_REPLY).server(CHANNEL_ACK);
    t.client_got();
    t.server(KEYS).server(FLUSH);
    assert_eq!(
        t.client_got(),
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$3\r\nrk1\r\n\
         *3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n"
    );
    // A client tracking keys itself gets nothing in RESP2, subscribed or not.
    let mut t = T::new();
    t.server("+OK\r\n");
    t.client("SUBSCRIBE ch\r\n");
    t.upstream_sent();
    t.server(HELLO_REPLY)
        .server(">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n");
    t.client_got();
    t.server(KEYS).server(FLUSH);
    assert_eq!(t.client_got(), "");
}
