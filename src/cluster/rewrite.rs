//! Address rewriting: every node address the server tells a client (in `CLUSTER SLOTS`,
//! `CLUSTER SHARDS`, `CLUSTER NODES`, `CLUSTER REPLICAS` and in `-MOVED`/`-ASK` redirections)
//! is replaced by the local address of the proxy's listener for that node. Pure functions over
//! complete frames; the node registry ([`Remap`]) decides the local addresses.

use std::sync::Arc;

use crate::resp::value::Value;

/// The local address standing in for one upstream node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub host: Arc<str>,
    pub port: u16,
}

/// Maps upstream node addresses to local listeners (creating one for a node not seen before).
pub trait Remap: Send + Sync + std::fmt::Debug {
    /// `None` when no local address can be given (no port left in the range): the reply
    /// is then refused rather than leaking an address the client cannot use.
    fn local(&self, host: &str, port: u16) -> Option<Local>;
}

/// Which topology reply a command asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// `CLUSTER SLOTS`.
    Slots,
    /// `CLUSTER SHARDS`.
    Shards,
    /// `CLUSTER NODES`: one string of node lines.
    Nodes,
    /// `CLUSTER REPLICAS`/`SLAVES`: an array of node lines.
    Replicas,
}

impl Topology {
    /// The topology reply `CLUSTER <sub>` returns, if any.
    pub fn of_subcommand(sub: &[u8]) -> Option<Topology> {
        let mut lower = [0u8; 8];
        let lower = lower.get_mut(..sub.len())?;
        lower.copy_from_slice(sub);
        lower.make_ascii_lowercase();
        Some(match &*lower {
            b"slots" => Topology::Slots,
            b"shards" => Topology::Shards,
            b"nodes" => Topology::Nodes,
            b"replicas" | b"slaves" => Topology::Replicas,
            _ => return None,
        })
    }
}

/// Why a reply could not be rewritten: the client gets an error instead of addresses it
/// could not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("unexpected {0} reply shape")]
    Shape(&'static str),
    #[error("no local port free for cluster node {0} (see --cluster-ports)")]
    NoPort(String),
}

/// Rewrites replies on one connection: `origin` is the host of the node it is connected to,
/// which the server leaves out (an empty host) when the node has no known endpoint;
/// `tls` whether the proxy talks TLS upstream (then a node's TLS port is the one to use).
#[derive(Debug, Clone)]
pub struct Rewriter {
    pub map: Arc<dyn Remap>,
    pub origin: Arc<str>,
    pub tls: bool,
}

/// Whether an error line (without its `-`) is a cluster redirection.
pub fn is_redirect(line: &[u8]) -> bool {
    line.starts_with(b"MOVED ") || line.starts_with(b"ASK ")
}

impl Rewriter {
    fn local(&self, host: &[u8], port: u16) -> Result<Option<Local>, RewriteError> {
        // `?`: the server does not know the endpoint either; nothing to map.
        if port == 0 || host == b"?" {
            return Ok(None);
        }
        let host = std::str::from_utf8(host).map_err(|_| RewriteError::Shape("address"))?;
        let host = if host.is_empty() { &*self.origin } else { host };
        match self.map.local(host, port) {
            Some(local) => Ok(Some(local)),
            None => Err(RewriteError::NoPort(join(host, port))),
        }
    }

    /// `-MOVED <slot> <host>:<port>` or `-ASK …` (a whole frame, CRLF included) with the
    /// local address. Anything else comes back unchanged.
    pub fn redirect(&self, frame: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let Some(text) = frame
            .strip_prefix(b"-")
            .and_then(|f| f.strip_suffix(b"\r\n"))
        else {
            return Ok(frame.to_vec());
        };
        let mut parts = text.splitn(3, |&b| b == b' ');
        let (Some(kind), Some(slot), Some(addr)) = (parts.next(), parts.next(), parts.next())
        else {
            return Ok(frame.to_vec());
        };
        let Some((host, port)) = split_addr(addr) else {
            return Ok(frame.to_vec());
        };
        let Some(local) = self.local(host, port)? else {
            return Ok(frame.to_vec());
        };
        let kind_label = if kind == b"ASK" { "ask" } else { "moved" };
        metrics::counter!(crate::metrics::CLUSTER_REDIRECTS_TOTAL, "kind" => kind_label)
            .increment(1);
        let mut out = Vec::with_capacity(frame.len() + 8);
        out.push(b'-');
        out.extend_from_slice(kind);
        out.push(b' ');
        out.extend_from_slice(slot);
        out.push(b' ');
        out.extend_from_slice(join(&local.host, local.port).as_bytes());
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }

    /// A topology reply (a whole frame) with every node address made local.
    pub fn topology(&self, kind: Topology, frame: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let what = match kind {
            Topology::Slots => "CLUSTER SLOTS",
            Topology::Shards => "CLUSTER SHARDS",
            Topology::Nodes => "CLUSTER NODES",
            Topology::Replicas => "CLUSTER REPLICAS",
        };
        let shape = || RewriteError::Shape(what);
        let (mut value, used) = Value::decode(frame).ok_or_else(shape)?;
        if used != frame.len() {
            return Err(shape());
        }
        match kind {
            Topology::Slots => {
                for range in value.items_mut().ok_or_else(shape)? {
                    // [start, end, node, node…]
                    let nodes = range.items_mut().ok_or_else(shape)?;
                    for node in nodes.iter_mut().skip(2) {
                        self.slots_node(node).ok_or_else(shape)??;
                    }
                }
            }
            Topology::Shards => {
                for shard in value.items_mut().ok_or_else(shape)? {
                    let fields = shard.items_mut().ok_or_else(shape)?;
                    for pair in fields.chunks_mut(2) {
                        if let [key, nodes] = pair {
                            if key.as_str() == Some(b"nodes") {
                                for node in nodes.items_mut().ok_or_else(shape)? {
                                    self.shards_node(node).ok_or_else(shape)??;
                                }
                            }
                        }
                    }
                }
            }
            Topology::Nodes => {
                let text = value.as_str().ok_or_else(shape)?;
                let text = self.node_lines(text)?;
                value.set_str(text);
            }
            Topology::Replicas => {
                for line in value.items_mut().ok_or_else(shape)? {
                    let text = line.as_str().ok_or_else(shape)?;
                    let text = self.node_lines(text)?;
                    line.set_str(text);
                }
            }
        }
        let mut out = Vec::with_capacity(frame.len() + 64);
        value.encode(&mut out);
        Ok(out)
    }

    /// `[host, port, id, metadata]` of `CLUSTER SLOTS`; metadata (Redis 7) is a map (an
    /// array in RESP2) whose `ip` and `hostname` are addresses too. A null host (`cluster-preferred-endpoint-
    /// type unknown-endpoint`) is the node asked. `None`: not that shape.
    fn slots_node(&self, node: &mut Value) -> Option<Result<(), RewriteError>> {
        let items = node.items_mut()?;
        let host = match items.first()? {
            host if host.is_null() => Vec::new(),
            host => host.as_str()?.to_vec(),
        };
        let port = u16::try_from(items.get(1)?.as_int()?).ok()?;
        let local = match self.local(&host, port) {
            Ok(Some(local)) => local,
            Ok(None) => return Some(Ok(())),
            Err(e) => return Some(Err(e)),
        };
        if items[0].is_null() {
            items[0] = Value::Bulk(local.host.as_bytes().to_vec());
        } else {
            items[0].set_str(local.host.as_bytes().to_vec());
        }
        items[1] = Value::Int(i64::from(local.port));
        if let Some(meta) = items.get_mut(3).and_then(Value::items_mut) {
            for pair in meta.chunks_mut(2) {
                if let [key, value] = pair {
                    if let Some(b"ip" | b"hostname") = key.as_str() {
                        value.set_str(local.host.as_bytes().to_vec());
                    }
                }
            }
        }
        Some(Ok(()))
    }

    /// A node map of `CLUSTER SHARDS`: `ip`, `endpoint` and `hostname` become the local host, `port` the
    /// local port; `tls-port` goes (the local listener speaks plain RESP).
    fn shards_node(&self, node: &mut Value) -> Option<Result<(), RewriteError>> {
        let fields = node.items_mut()?;
        let field = |name: &[u8]| {
            fields
                .chunks(2)
                .find(|p| p.first().and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get(1))
        };
        let port_of = |name: &[u8]| field(name).and_then(Value::as_int).filter(|p| *p > 0);
        let port = if self.tls {
            port_of(b"tls-port").or_else(|| port_of(b"port"))
        } else {
            port_of(b"port").or_else(|| port_of(b"tls-port"))
        };
        let host = field(b"endpoint")
            .or_else(|| field(b"ip"))
            .and_then(Value::as_str)
            .map(<[u8]>::to_vec);
        let (Some(host), Some(port)) = (host, port) else {
            return Some(Ok(()));
        };
        let port = u16::try_from(port).ok()?;
        let local = match self.local(&host, port) {
            Ok(Some(local)) => local,
            Ok(None) => return Some(Ok(())),
            Err(e) => return Some(Err(e)),
        };
        let old = std::mem::take(fields);
        let mut port_written = false;
        for pair in old.chunks(2) {
            let [key, value] = pair else { continue };
            let mut value = value.clone();
            match key.as_str() {
                Some(b"port" | b"tls-port") => {
                    if port_written {
                        continue;
                    }
                    port_written = true;
                    fields.push(Value::Bulk(b"port".to_vec()));
                    fields.push(Value::Int(i64::from(local.port)));
                    continue;
                }
                Some(b"ip" | b"endpoint" | b"hostname") => {
                    value.set_str(local.host.as_bytes().to_vec())
                }
                _ => {}
            }
            fields.push(key.clone());
            fields.push(value);
        }
        Some(Ok(()))
    }

    /// `CLUSTER NODES` text: the second field of each line, `host:port@cport[,hostname[,aux]…]`,
    /// gets the local host and port, and the local host for a hostname.
    fn node_lines(&self, text: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let mut out = Vec::with_capacity(text.len() + 64);
        for line in text.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(&self.node_line(line)?);
        }
        Ok(out)
    }

    fn node_line(&self, line: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let unchanged = || Ok(line.to_vec());
        let Some(start) = memchr::memchr(b' ', line).map(|i| i + 1) else {
            return unchanged();
        };
        let len = memchr::memchr(b' ', &line[start..]).unwrap_or(line.len() - start);
        let field = &line[start..start + len];
        let at = memchr::memchr2(b'@', b',', field).unwrap_or(field.len());
        let Some((host, port)) = split_addr(&field[..at]) else {
            return unchanged();
        };
        let Some(local) = self.local(host, port)? else {
            return unchanged();
        };
        let mut out = Vec::with_capacity(line.len() + 16);
        out.extend_from_slice(&line[..start]);
        out.extend_from_slice(join(&local.host, local.port).as_bytes());
        let rest = &field[at..];
        match memchr::memchr(b',', rest) {
            Some(comma) => {
                let hostname = &rest[comma + 1..];
                let end = memchr::memchr(b',', hostname).unwrap_or(hostname.len());
                out.extend_from_slice(&rest[..=comma]);
                if end > 0 {
                    out.extend_from_slice(local.host.as_bytes());
                }
                out.extend_from_slice(&hostname[end..]);
            }
            None => out.extend_from_slice(rest),
        }
        out.extend_from_slice(&line[start + len..]);
        Ok(out)
    }
}

/// `host:port` as Redis writes it (IPv6 literals without brackets: the last colon splits).
pub fn split_addr(addr: &[u8]) -> Option<(&[u8], u16)> {
    let colon = memchr::memrchr(b':', addr)?;
    let port = std::str::from_utf8(&addr[colon + 1..]).ok()?.parse().ok()?;
    Some((&addr[..colon], port))
}

/// `host:port` the way Redis writes it.
pub fn join(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests;
