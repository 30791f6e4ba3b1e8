//! A small RESP2 client for the local setup: the admin connection `RedisServer` keeps to its
//! redis-server, and raw connections tests open to act as a plain Redis client.
//!
//! Owns: command encoding (multibulk), an incremental RESP2 reply parser, and dialling
//! 127.0.0.1 in clear text or over TLS with the dev CA as the only trust root. It does not own
//! the proxy's own RESP codec (`crate::resp`); keeping this one separate means the fixture
//! never trusts the code under test to tell it what Redis said.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::DevError;

/// A RESP2 reply. The admin connection never sends `HELLO 3`, so RESP2 is all it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:...`
    Integer(i64),
    /// `$...`; `None` is the null bulk.
    Bulk(Option<Vec<u8>>),
    /// `*...`; `None` is the null array.
    Array(Option<Vec<Reply>>),
}

/// Deepest array nesting accepted. Redis replies seen here nest a few levels at most; the
/// bound keeps a misbehaving peer from overflowing the stack of the recursive parser.
const MAX_DEPTH: usize = 32;
/// Largest bulk length accepted: Redis' own `proto-max-bulk-len` default (512 MiB).
const MAX_BULK: i64 = 512 * 1024 * 1024;
/// Bytes reserved before each socket read.
const READ_CHUNK: usize = 16 * 1024;

/// A byte stream a [`RespConn`] runs over (TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One client connection speaking RESP2. Not cancel-safe mid-reply: a caller that times out a
/// read must drop the connection, because the stream position is then unknown.
pub struct RespConn {
    stream: Box<dyn Io>,
    /// Bytes read but not yet parsed into a reply.
    buf: Vec<u8>,
}

impl std::fmt::Debug for RespConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespConn")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// A rustls client configuration whose only trust roots are the certificates in `ca_pem`.
/// The ring provider is named explicitly because the process may not install a default one.
pub fn client_tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, DevError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| DevError::Tls(format!("reading CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| DevError::Tls(format!("adding CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(DevError::Tls("CA PEM holds no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DevError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

impl RespConn {
    /// Connects in clear text.
    pub async fn connect_plain(addr: SocketAddr) -> Result<RespConn, DevError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(RespConn::over(Box::new(tcp)))
    }

    /// Connects and completes a TLS handshake, checking the certificate against `server_name`
    /// (a DNS name or an IP address literal).
    pub async fn connect_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<RespConn, DevError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| DevError::Tls(format!("server name {server_name:?}: {e}")))?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| DevError::Tls(format!("handshake: {e}")))?;
        Ok(RespConn::over(Box::new(tls)))
    }

    fn over(stream: Box<dyn Io>) -> RespConn {
        RespConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// The underlying stream, for byte-level tests. Bytes already buffered by
    /// [`RespConn::read_reply`] are not in it: call this between replies only.
    pub fn stream_mut(&mut self) -> &mut Box<dyn Io> {
        &mut self.stream
    }

    /// Sends one command as a multibulk and reads its reply.
    pub async fn command(&mut self, args: &[&[u8]]) -> Result<Reply, DevError> {
        self.send(args).await?;
        self.read_reply().await
    }

    /// Sends one command as a multibulk without reading a reply (for pipelining).
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), DevError> {
        self.write_raw(&encode(args)).await
    }

    /// Writes bytes as they are: inline commands, malformed input, partial frames.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), DevError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads the next reply. `DevError::Closed` means the server closed the connection
    /// between replies (a TLS peer that vanishes without close_notify counts too).
    pub async fn read_reply(&mut self) -> Result<Reply, DevError> {
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            self.buf.reserve(READ_CHUNK);
            let read = self.stream.read_buf(&mut self.buf).await;
            match read {
                Ok(0) if self.buf.is_empty() => return Err(DevError::Closed),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && self.buf.is_empty() => {
                    return Err(DevError::Closed)
                }
                Ok(0) => return Err(DevError::Protocol("connection closed mid-reply".into())),
                Ok(_) => {}
                Err(e) => return Err(DevError::Io(e)),
            }
        }
    }
}

/// Encodes a command as a RESP multibulk.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the front of `buf`: `Ok(None)` while it is incomplete, otherwise the
/// reply and how many bytes it used. Re-parsing from the start on every read is quadratic in
/// the worst case, which is fine for an admin connection and keeps the parser obviously right.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, DevError> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Reply, usize)>, DevError> {
    if depth > MAX_DEPTH {
        return Err(DevError::Protocol("reply nested too deeply".into()));
    }
    let Some(&tag) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(rel) = memchr::memmem::find(&buf[pos + 1..], b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[pos + 1..pos + 1 + rel];
    let next = pos + 1 + rel + 2;
    let text = || String::from_utf8_lossy(line).into_owned();
    let reply = match tag {
        b'+' => (Reply::Simple(text()), next),
        b'-' => (Reply::Error(text()), next),
        b':' => (Reply::Integer(parse_int(line)?), next),
        b'$' => {
            let len = parse_int(line)?;
            if len < 0 {
                (Reply::Bulk(None), next)
            } else if len > MAX_BULK {
                return Err(DevError::Protocol(format!("bulk length {len} too large")));
            } else {
                let end = next + len as usize;
                let Some(trailer) = buf.get(end..end + 2) else {
                    return Ok(None);
                };
                if trailer != b"\r\n" {
                    return Err(DevError::Protocol("bulk not followed by CRLF".into()));
                }
                (Reply::Bulk(Some(buf[next..end].to_vec())), end + 2)
            }
        }
        b'*' => {
            let len = parse_int(line)?;
            if len < 0 {
                (Reply::Array(None), next)
            } else {
                // Capacity is capped: the length is the peer's claim, not yet backed by bytes.
                let mut items = Vec::with_capacity((len as usize).min(1024));
                let mut at = next;
                for _ in 0..len {
                    match parse_at(buf, at, depth + 1)? {
                        Some((item, after)) => {
                            items.push(item);
                            at = after;
                        }
                        None => return Ok(None),
                    }
                }
                (Reply::Array(Some(items)), at)
            }
        }
        other => {
            return Err(DevError::Protocol(format!(
                "unexpected reply type byte 0x{other:02x}"
            )))
        }
    };
    Ok(Some(reply))
}

fn parse_int(line: &[u8]) -> Result<i64, DevError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| DevError::Protocol("invalid integer in reply header".into()))
}
