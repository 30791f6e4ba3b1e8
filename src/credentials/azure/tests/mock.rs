//! Loopback test doubles for the Entra sources: a tiny HTTP/1.1 server on 127.0.0.1 that
//! records requests and answers with canned responses, and [`Redirect`], an `HttpClient` that
//! records each request as the real code path built it (original URL and headers) and sends it
//! to the mock instead. `Redirect` only ever connects to the mock's loopback address, so a
//! request meant for IMDS, Entra or anywhere else never leaves the machine.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::http::headers::Headers;
use azure_core::http::{AsyncRawResponse, Body, HttpClient, Request, StatusCode, Url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bound on any one mock exchange: generous, only there so that no test can hang; the timeout
/// test relies on the source's own, shorter bound firing first.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// One request, as sent (by [`Redirect`]) or as received (by [`MockServer`]).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The full URL: the original one for [`Redirect`], `http://127.0.0.1:PORT/…` for the
    /// server.
    pub url: Url,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, key: &str) -> Option<String> {
        pairs(self.url.query_pairs(), key)
    }

    /// A field of an `application/x-www-form-urlencoded` body.
    pub fn form(&self, key: &str) -> Option<String> {
        let url = Url::parse(&format!("http://form/?{}", self.body)).ok()?;
        pairs(url.query_pairs(), key)
    }
}

fn pairs<'a>(
    mut it: impl Iterator<Item = (std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
    key: &str,
) -> Option<String> {
    it.find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

type Responder = Arc<dyn Fn(&Recorded) -> (u16, String) + Send + Sync>;

/// The loopback server. Dropping it stops the accept loop.
pub struct MockServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockServer {
    /// Answers every request with `respond(request)`; `None` never answers (hangs).
    pub async fn start(respond: Option<Responder>) -> MockServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, respond) = (seen.clone(), respond.clone());
                tokio::spawn(tokio::time::timeout(EXCHANGE_TIMEOUT, async move {
                    serve(stream, addr, seen, respond).await;
                }));
            }
        });
        MockServer {
            addr,
            requests,
            task,
        }
    }

    pub async fn answering(status: u16, body: impl Into<String>) -> MockServer {
        let body = body.into();
        Self::start(Some(Arc::new(move |_: &Recorded| (status, body.clone())))).await
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    respond: Option<Responder>,
) {
    let Some((head, body)) = read_message(&mut stream, true).await else {
        return;
    };
    let mut lines = head.lines();
    let mut start = lines.next().unwrap_or_default().split(' ');
    let method = start.next().unwrap_or_default().to_owned();
    let target = start.next().unwrap_or_default();
    let Ok(url) = Url::parse(&format!("http://{addr}{target}")) else {
        return;
    };
    let request = Recorded {
        method,
        url,
        headers: parse_headers(lines),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    seen.lock().expect("lock").push(request.clone());
    let Some(respond) = respond else {
        // Hold the connection open without answering.
        std::future::pending::<()>().await;
        return;
    };
    let (status, body) = respond(&request);
    let answer = format!(
        "HTTP/1.1 {status} Mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// Reads a head and a body of `content-length` bytes (a response without one: to EOF).
async fn read_message(stream: &mut TcpStream, is_request: bool) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf[head_end + 4..].to_vec();
    let length = parse_headers(head.lines().skip(1))
        .into_iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(len) => {
            while body.len() < len {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None if !is_request => {
            stream.read_to_end(&mut body).await.ok()?;
        }
        None => {}
    }
    Some((head, body))
}

/// Sends every request to the mock at `to`, whatever its URL, and records it as built.
#[derive(Debug, Clone)]
pub struct Redirect {
    to: SocketAddr,
    sent: Arc<Mutex<Vec<Recorded>>>,
}

impl Redirect {
    pub fn to(server: &MockServer) -> Arc<Redirect> {
        Self::to_addr(server.addr)
    }

    /// To a mock in another process (the App Service child test).
    pub fn to_addr(to: SocketAddr) -> Arc<Redirect> {
        assert!(to.ip().is_loopback(), "mocks live on loopback only");
        Arc::new(Redirect {
            to,
            sent: Arc::default(),
        })
    }

    pub fn sent(&self) -> Vec<Recorded> {
        self.sent.lock().expect("lock").clone()
    }
}

fn io_error(message: String) -> azure_core::Error {
    azure_core::Error::with_message(ErrorKind::Io, message)
}

#[async_trait::async_trait]
impl HttpClient for Redirect {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let Body::Bytes(body) = request.body() else {
            return Err(io_error("streamed bodies are not supported".into()));
        };
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_ascii_lowercase(), v.as_str().to_owned()))
            .collect();
        let method = format!("{:?}", request.method()).to_ascii_uppercase();
        self.sent.lock().expect("lock").push(Recorded {
            method: method.clone(),
            url: request.url().clone(),
            headers: headers.clone(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        let mut raw = format!(
            "{method} {} HTTP/1.1\r\nhost: {}\r\n",
            request.path_and_query(),
            request.url().host_str().unwrap_or_default()
        );
        for (name, value) in headers.iter().filter(|(n, _)| n != "content-length") {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str(&format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        ));
        let mut raw = raw.into_bytes();
        raw.extend_from_slice(body);
        let exchange = async {
            let mut stream = TcpStream::connect(self.to).await.ok()?;
            stream.write_all(&raw).await.ok()?;
            read_message(&mut stream, false).await
        };
        let (head, body) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| io_error(format!("no answer from the mock at {}", self.to)))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io_error("bad status line from the mock".into()))?;
        let mut response_headers = Headers::new();
        for (name, value) in parse_headers(head.lines().skip(1)) {
            response_headers.insert(name, value);
        }
        Ok(AsyncRawResponse::from_bytes(
            StatusCode::from(status),
            response_headers,
            body,
        ))
    }
}
