//! Upstream connections: TCP (with TCP_NODELAY and keepalive) and, unless disabled for local
//! development, TLS with SNI and certificate checks against the configured server name.
//!
//! It owns connecting; what is said on the connection (AUTH, commands) is the session core's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::io::poll_read_buf;

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
    /// Cluster mode: only a redirection named the node, and the proxy's own reads of the
    /// topology do not list it (a script can answer any `MOVED` it likes).
    #[error("upstream {addr}: not a node of the cluster's topology (only a redirection named it)")]
    NotInTopology { addr: String },
}

impl ConnectError {
    /// The same error again (its I/O cause by kind and text), for each of several clients
    /// it ended.
    pub fn duplicate(&self) -> ConnectError {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            ConnectError::Resolve { addr, source } => ConnectError::Resolve {
                addr: addr.clone(),
                source: io(source),
            },
            ConnectError::NoAddress { addr } => ConnectError::NoAddress { addr: addr.clone() },
            ConnectError::Connect { addr, source } => ConnectError::Connect {
                addr: addr.clone(),
                source: io(source),
            },
            ConnectError::Timeout { addr, timeout } => ConnectError::Timeout {
                addr: addr.clone(),
                timeout: *timeout,
            },
            ConnectError::Tls { addr, source } => ConnectError::Tls {
                addr: addr.clone(),
                source: io(source),
            },
            ConnectError::NotInTopology { addr } => {
                ConnectError::NotInTopology { addr: addr.clone() }
            }
        }
    }

    /// The server did not take the connection, or dropped it before the handshake ended: a
    /// server down, restarting or failing over, which a client connected to it directly
    /// would see as a connection error (and which client libraries retry). Name resolution,
    /// certificate and protocol failures, and nodes outside the topology, are not: a
    /// configuration to fix, which the client is told about.
    pub fn transient(&self) -> bool {
        match self {
            ConnectError::Connect { .. } | ConnectError::Timeout { .. } => true,
            // rustls reports a refused certificate or a protocol failure as InvalidData.
            ConnectError::Tls { source, .. } => source.kind() != io::ErrorKind::InvalidData,
            ConnectError::Resolve { .. }
            | ConnectError::NoAddress { .. }
            | ConnectError::NotInTopology { .. } => false,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } | ConnectError::NoAddress { .. } => "resolve",
            ConnectError::Connect { .. } => "connect",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Tls { .. } => "tls",
            ConnectError::NotInTopology { .. } => "not_in_topology",
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
                    .connect(name.clone(), ReadAhead::new(tcp))
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
    Tls(Box<TlsStream<ReadAhead>>),
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

/// The socket under a TLS upstream connection. rustls asks for at most 4 KiB per read (its
/// record buffer grows by 4 KiB at a time), so a 16 KiB reply took five `recvfrom` calls. When
/// a read fills all the room rustls gave it, more is probably waiting: the next read takes up
/// to [`ReadAhead::SIZE`] bytes into a buffer of its own, and rustls's reads are served from
/// it until it is empty. Reads keep going ahead while they bring more than rustls had room
/// for, so on a connection that carries large replies a 16 KiB reply costs one system call
/// and a copy. The buffer exists only while it holds bytes, so an idle connection costs
/// nothing more, and small replies never use it.
pub struct ReadAhead {
    tcp: TcpStream,
    /// Bytes read from the socket that rustls has not taken yet. Unallocated whenever
    /// everything read has been taken.
    ahead: BytesMut,
    /// The last read from the socket filled all the room rustls gave it, or more: the next
    /// read goes ahead.
    filled: bool,
}

impl ReadAhead {
    /// The most one read ahead takes: four TLS records of 16 KiB.
    pub const SIZE: usize = 64 * 1024;

    pub fn new(tcp: TcpStream) -> Self {
        ReadAhead {
            tcp,
            ahead: BytesMut::new(),
            filled: false,
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.ahead.is_empty() {
            let room = buf.remaining();
            if !this.filled || room >= Self::SIZE {
                // Straight into the caller's buffer, no copy.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
                let got = buf.filled().len() - before;
                this.filled = got > 0 && got == room;
                return Poll::Ready(Ok(()));
            }
            // Allocate only when the socket has something to read (no system call).
            ready!(this.tcp.poll_read_ready(cx))?;
            this.ahead.reserve(Self::SIZE);
            let got = match poll_read_buf(Pin::new(&mut this.tcp), cx, &mut this.ahead) {
                Poll::Ready(Ok(got)) => got,
                other => {
                    // Nothing read (nothing waiting, or failed): give the buffer back. Nothing
                    // waiting says nothing of the next reply's size, so `filled` stays.
                    this.ahead = BytesMut::new();
                    return other.map_ok(|_| ());
                }
            };
            // More than a direct read could have taken: stay ahead for the next reply.
            this.filled = got > room;
        }
        let n = this.ahead.len().min(buf.remaining());
        buf.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        if this.ahead.is_empty() {
            this.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (ReadAhead, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ReadAhead::new(near.unwrap()), far.unwrap().0)
    }

    /// What rustls does: reads of at most 4 KiB.
    async fn read_4k(r: &mut ReadAhead) -> Vec<u8> {
        let mut buf = vec![0; 4096];
        let n = r.read(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Waits until `len` bytes are in the socket's receive queue, so a read can take them all.
    async fn queued(r: &ReadAhead, len: usize) {
        for _ in 0..1000 {
            let mut probe = vec![0; len];
            if r.tcp.peek(&mut probe).await.unwrap() >= len {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{len} bytes never arrived");
    }

    #[tokio::test]
    async fn small_reads_go_straight_to_the_caller() {
        let (mut r, mut far) = pair().await;
        far.write_all(b"+OK\r\n").await.unwrap();
        assert_eq!(read_4k(&mut r).await, b"+OK\r\n");
        assert!(!r.filled);
        assert_eq!(r.ahead.capacity(), 0);
    }

    #[tokio::test]
    async fn a_read_that_fills_its_room_makes_the_next_go_ahead_and_keeps_every_byte() {
        let (mut r, mut far) = pair().await;
        let sent = pattern(40_000);
        far.write_all(&sent).await.unwrap();
        queued(&r, sent.len()).await;

        // The first read fills rustls's 4 KiB: the second takes the rest in one go.
        let mut got = read_4k(&mut r).await;
        assert_eq!(got.len(), 4096);
        assert!(r.filled);
        got.extend(read_4k(&mut r).await);
        assert_eq!(
            r.ahead.len(),
            sent.len() - 8192,
            "the rest waits in the buffer"
        );
        for _ in 0..sent.len() / 4096 + 1 {
            if got.len() < sent.len() {
                got.extend(read_4k(&mut r).await);
            }
        }
        assert_eq!(got, sent);
        assert_eq!(r.ahead.capacity(), 0, "an emptied buffer is given back");
        assert!(
            r.filled,
            "it brought more than 4 KiB: the next reply goes ahead too"
        );

        // Nothing waiting: no read, and the connection stays ahead for its next reply.
        let mut room = [0u8; 4096];
        let mut none = ReadBuf::new(&mut room);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut none).is_pending());
        assert!(r.filled);
        assert_eq!(r.ahead.capacity(), 0);
        let reply = pattern(16_400);
        far.write_all(&reply).await.unwrap();
        queued(&r, reply.len()).await;
        let mut got = read_4k(&mut r).await;
        assert_eq!(
            r.ahead.len(),
            reply.len() - 4096,
            "one read took the whole reply"
        );
        for _ in 0..4 {
            got.extend(read_4k(&mut r).await);
        }
        assert_eq!(got, reply);

        // A small reply after that: read ahead, taken whole, and the next one goes direct.
        far.write_all(b"$1\r\nx\r\n").await.unwrap();
        assert_eq!(read_4k(&mut r).await, b"$1\r\nx\r\n");
        assert!(!r.filled);
        assert_eq!(r.ahead.capacity(), 0);
    }

    #[tokio::test]
    async fn bytes_read_ahead_come_before_the_end_of_the_stream() {
        let (mut r, mut far) = pair().await;
        let sent = pattern(10_000);
        far.write_all(&sent).await.unwrap();
        drop(far);
        queued(&r, sent.len()).await;
        let mut got = Vec::new();
        for _ in 0..sent.len() / 4096 + 1 {
            got.extend(read_4k(&mut r).await);
        }
        assert_eq!(got, sent);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.extend(read_4k(&mut r).await);
        }
        assert!(got.is_empty(), "then the end, every time");
    }
}
