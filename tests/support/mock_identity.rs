//! A scripted managed-identity token endpoint on 127.0.0.1, for fault tests of the real binary.
//!
//! It speaks the IMDS protocol in its App Service / Container Apps flavour: `GET
//! <IDENTITY_ENDPOINT>?api-version=2019-08-01&resource=https://redis.azure.com` with the
//! `x-identity-header` secret, answered by JSON holding `access_token`, `expires_on` (unix
//! seconds as a string), `resource` and `token_type`. The proxy reaches it when started with
//! `--credential managed-identity` and `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` in its
//! environment, as Azure sets them: `azure_identity` then sends every request to that URL and
//! never to IMDS (169.254.169.254), and, unlike its IMDS flavour, retries nothing inside one
//! fetch, so every answer here is exactly one fetch attempt of the proxy's refresher.
//!
//! Each request takes the next [`Answer`] of the script, or the fallback once the script is
//! used up. What was asked and answered is recorded ([`Served`]). This module owns only the
//! endpoint; it knows nothing of Redis or of the proxy.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The `IDENTITY_HEADER` secret the proxy's environment carries and every request must echo.
pub const IDENTITY_HEADER: &str = "token-faults-identity-header";
/// Path of the endpoint; any path works, this one shows up in the proxy's errors.
const PATH: &str = "/msi/token";
/// Bound on one exchange, so that no connection task outlives a test by much; longer than the
/// proxy's own 20 s HTTP timeout, which the slow-endpoint test waits for.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head read; the proxy's requests are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;

/// What the endpoint does with one request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// `200` with a well-formed token answer.
    Token { token: String, expires_on: u64 },
    /// `200` with this body, as it is (malformed JSON, missing fields).
    Body(String),
    /// This status with this body (`text/html` unless it starts with `{`).
    Status(u16, String),
    /// Reads the request, then resets the connection (RST) without answering.
    Reset,
    /// Reads the request and never answers; records when the client gives up.
    Hang,
}

impl Answer {
    fn kind(&self) -> &'static str {
        match self {
            Answer::Token { .. } => "token",
            Answer::Body(_) => "body",
            Answer::Status(..) => "status",
            Answer::Reset => "reset",
            Answer::Hang => "hang",
        }
    }
}

/// One request and what it got.
#[derive(Debug, Clone)]
pub struct Served {
    pub at: Instant,
    /// [`Answer`] kind: `token`, `body`, `status`, `reset`, `hang`.
    pub answer: &'static str,
    pub method: String,
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: Vec<(String, String)>,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    /// For [`Answer::Hang`]: when the client closed the connection (gave up).
    pub client_gone: Option<Instant>,
}

impl Served {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    script: VecDeque<Answer>,
    fallback: Answer,
    served: Vec<Served>,
}

/// The endpoint. Dropping it stops accepting.
pub struct MockIdentity {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for MockIdentity {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockIdentity {
    /// Starts on a free loopback port; answers `fallback` whenever the script is empty.
    pub async fn start(fallback: Answer) -> MockIdentity {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        assert!(addr.ip().is_loopback());
        let state = Arc::new(Mutex::new(State {
            script: VecDeque::new(),
            fallback,
            served: Vec::new(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, serve(stream, state)).await;
                });
            }
        });
        MockIdentity { addr, state, task }
    }

    /// The value of `IDENTITY_ENDPOINT` for the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    /// Appends to the script.
    pub fn push(&self, answer: Answer) {
        lock(&self.state).script.push_back(answer);
    }

    /// Every request so far, in order.
    pub fn served(&self) -> Vec<Served> {
        lock(&self.state).served.clone()
    }

    /// Waits until `n` requests have been served (bounded by `within`).
    pub async fn wait_served(&self, n: usize, within: Duration) -> Vec<Served> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let served = self.served();
            if served.len() >= n {
                return served;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the token endpoint got {} requests within {within:?}, expected {n}",
                served.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let mut lines = head.lines();
    let mut start = lines.next().unwrap_or_default().split(' ');
    let method = start.next().unwrap_or_default().to_owned();
    let target = start.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let (answer, index) = {
        let mut s = lock(&state);
        let answer = s.script.pop_front().unwrap_or_else(|| s.fallback.clone());
        s.served.push(Served {
            at: Instant::now(),
            answer: answer.kind(),
            method,
            path: path.to_owned(),
            query: query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
            headers,
            client_gone: None,
        });
        (answer, s.served.len() - 1)
    };
    let (status, body) = match answer {
        Answer::Token { token, expires_on } => (
            200,
            serde_json::json!({
                "access_token": token,
                "expires_on": expires_on.to_string(),
                "resource": "https://redis.azure.com",
                "token_type": "Bearer",
            })
            .to_string(),
        ),
        Answer::Body(body) => (200, body),
        Answer::Status(status, body) => (status, body),
        Answer::Reset => {
            // SO_LINGER 0: closing sends RST instead of FIN.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        }
        Answer::Hang => {
            // Read until the client closes its side: that is when it abandoned the attempt.
            let mut sink = [0u8; 1024];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
            lock(&state).served[index].client_gone = Some(Instant::now());
            return;
        }
    };
    let kind = if body.starts_with('{') {
        "application/json"
    } else {
        "text/html"
    };
    let answer = format!(
        "HTTP/1.1 {status} Mock\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The request head (a GET has no body), or `None` if the client left or sent too much.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > MAX_HEAD {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Percent-decoding of a query component (`+` is a space, as in forms).
fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
