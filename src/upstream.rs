//! Upstream connections: TCP (with TCP_NODELAY and keepalive) and, unless disabled for local
//! development, TLS with SNI and certificate checks against the configured server name.
//!
//! It owns connecting; what is said on the connection (AUTH, commands) is the session core's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Idle time before the first TCP keepalive probe: well under the 10-minute idle timeout of
/// Azure load balancers, so an idle proxied connection is not silently dropped.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// Interval between keepalive probes once they start.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream {addr}: name resolution failed: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("upstream {addr}: no address found")]
    NoAddress { addr: String },
    #[error("upstream {addr}: connect failed: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("upstream {addr}: connect timed out after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("upstream {addr}: TLS handshake failed: {source}")]
    Tls { addr: String, source: io::Error },
}

impl ConnectError {
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } | ConnectError::NoAddress { .. } => "resolve",
            ConnectError::Connect { .. } => "connect",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Tls { .. } => "tls",
        }
    }
}

/// Opens upstream connections; built once, shared by every session.
#[derive(Clone)]
pub struct Connector {
    /// `host:port` as configured; resolved at every connect so DNS changes are followed.
    addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

impl Connector {
    pub fn new(
        addr: String,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
        timeout: Duration,
    ) -> Self {
        let tls = tls.map(|(config, name)| (TlsConnector::from(config), name));
        Connector { addr, tls, timeout }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The same TLS settings (server name included) and timeout for another address: a
    /// cluster node, whose certificate names the cache, not the node's address.
    pub fn with_addr(&self, addr: String) -> Connector {
        Connector {
            addr,
            tls: self.tls.clone(),
            timeout: self.timeout,
        }
    }

    /// Connects, within the connect timeout (TCP and TLS handshake together).
    pub async fn connect(&self) -> Result<Upstream, ConnectError> {
        match tokio::time::timeout(self.timeout, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout {
                addr: self.addr.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn connect_inner(&self) -> Result<Upstream, ConnectError> {
        let addr = || self.addr.clone();
        let addrs = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|source| ConnectError::Resolve {
                addr: addr(),
                source,
            })?;
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(s), _) => s,
            (None, Some(source)) => {
                return Err(ConnectError::Connect {
                    addr: addr(),
                    source,
                })
            }
            (None, None) => return Err(ConnectError::NoAddress { addr: addr() }),
        };
        tune(&tcp);
        match &self.tls {
            None => Ok(Upstream::Plain(tcp)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| ConnectError::Tls {
                        addr: addr(),
                        source,
                    })?;
                let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                crate::metrics::handles().tls_handshakes[usize::from(resumed)].increment(1);
                Ok(Upstream::Tls(Box::new(tls)))
            }
        }
    }
}

/// TCP_NODELAY (replies must not wait for delayed ACKs) and keepalive. Failures are ignored:
/// the connection still works without them.
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

/// An upstream connection, plain or TLS.
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
