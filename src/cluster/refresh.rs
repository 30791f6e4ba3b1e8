//! The topology refresh: reads `CLUSTER NODES` from the configured upstream through an
//! authenticated connection of its own, at start, every `--cluster-refresh-interval`, and soon
//! after a redirection names a node not seen before. New nodes get listeners before clients
//! hear of them; nodes gone from the list are retired once their clients leave.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;

use super::{Cluster, ClusterMode};
use crate::resp::value::Value;
use crate::session::{self, Core, Shared};

/// Shortest time between two reads of the topology, however many redirections ask for one.
const MIN_SPACING: Duration = Duration::from_secs(1);
/// First wait after a failed read; doubles up to the refresh interval.
const RETRY_INITIAL: Duration = Duration::from_secs(1);

/// What one read of the topology found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// The nodes' `host:port`s.
    Nodes(Vec<(String, u16)>),
    /// The server has cluster support disabled.
    NotCluster,
}

/// Runs until shutdown, or (in `auto` mode) until the upstream turns out not to be a cluster.
pub async fn run(cluster: Arc<Cluster>, shared: Arc<Shared>, interval: Duration) {
    let mut creds = shared.credentials.clone();
    let mut retry = RETRY_INITIAL;
    let mut reported_not_cluster = false;
    loop {
        let current = creds
            .borrow_and_update()
            .clone()
            .filter(|c| !c.is_expired(SystemTime::now()));
        let wait = match current {
            None => None,
            Some(c) => match read(&shared, c, cluster.seed_host()).await {
                Ok(Found::Nodes(nodes)) => {
                    retry = RETRY_INITIAL;
                    metrics::counter!(crate::metrics::CLUSTER_REFRESH_TOTAL, "outcome" => "ok")
                        .increment(1);
                    tracing::debug!(nodes = nodes.len(), "cluster topology read");
                    cluster.update(&nodes);
                    Some(interval)
                }
                Ok(Found::NotCluster) if cluster.mode() == ClusterMode::Auto => {
                    tracing::info!("upstream has cluster support disabled: cluster mode stays off (--cluster-mode auto)");
                    return;
                }
                Ok(Found::NotCluster) => {
                    metrics::counter!(crate::metrics::CLUSTER_REFRESH_TOTAL, "outcome" => "not_cluster")
                        .increment(1);
                    if !reported_not_cluster {
                        tracing::error!(
                            "--cluster-mode on, but the upstream has cluster support disabled"
                        );
                        reported_not_cluster = true;
                    }
                    Some(interval)
                }
                Err(e) => {
                    metrics::counter!(crate::metrics::CLUSTER_REFRESH_TOTAL, "outcome" => "error")
                        .increment(1);
                    tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "cannot read the cluster topology");
                    let wait = retry;
                    retry = (retry * 2).min(interval.max(RETRY_INITIAL));
                    Some(wait)
                }
            },
        };
        // Without credentials, the next token is what to wait for.
        let sleep = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = cluster.refresh_now.notified(), if wait.is_some() => {
                // Many redirections may ask at once: one read answers them all.
                tokio::select! {
                    _ = tokio::time::sleep(MIN_SPACING) => {}
                    _ = shared.shutdown.cancelled() => return,
                }
            }
            changed = creds.changed(), if wait.is_none() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// One read: connect, AUTH, `CLUSTER NODES`, within the connect timeout.
async fn read(
    shared: &Shared,
    creds: Arc<crate::credentials::Credentials>,
    origin: &str,
) -> Result<Found, String> {
    let mut upstream = session::connect(&shared.connector)
        .await
        .map_err(|e| e.to_string())?;
    let mut core = Core::new(creds, None);
    let mut cmd = BytesMut::from(&b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nNODES\r\n"[..]);
    core.client_input(&mut cmd);
    session::exchange(&mut upstream, &mut core, shared).await?;
    if let Some(reason) = core.close_reason() {
        return Err(reason.to_string());
    }
    parse_reply(&core.to_client, origin)
}

/// The `CLUSTER NODES` reply, or the error a server without cluster support gives.
pub fn parse_reply(reply: &[u8], origin: &str) -> Result<Found, String> {
    if let Some(err) = reply.strip_prefix(b"-") {
        let text = String::from_utf8_lossy(err).trim_end().to_owned();
        if text.contains("cluster support disabled") {
            return Ok(Found::NotCluster);
        }
        return Err(format!("CLUSTER NODES: {text}"));
    }
    let text = Value::decode(reply)
        .and_then(|(v, _)| v.as_str().map(<[u8]>::to_vec))
        .ok_or("CLUSTER NODES: not a string reply")?;
    Ok(Found::Nodes(parse_nodes(
        &String::from_utf8_lossy(&text),
        origin,
    )))
}

/// Node addresses of `CLUSTER NODES` text: `<id> <host:port@cport[,hostname]> <flags> …`.
/// Nodes without an address yet (`noaddr`, `handshake`) are left out; an empty host is the
/// host of the node asked (`origin`). A node that announces a hostname
/// (`cluster-announce-hostname`) is listed under it too, since replies name it by hostname
/// when `cluster-preferred-endpoint-type` is `hostname`: its listener must not close as gone.
pub fn parse_nodes(text: &str, origin: &str) -> Vec<(String, u16)> {
    let mut nodes = Vec::new();
    for line in text.lines() {
        let mut fields = line.split(' ');
        let (Some(_id), Some(addr), Some(flags)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if flags.split(',').any(|f| f == "noaddr" || f == "handshake") {
            continue;
        }
        let hostname = addr
            .split_once(',')
            .map(|(_, h)| h)
            .filter(|h| !h.is_empty());
        let addr = addr.split(['@', ',']).next().unwrap_or_default();
        let Some((host, port)) = super::rewrite::split_addr(addr.as_bytes()) else {
            continue;
        };
        if port == 0 || host == b"?" {
            continue;
        }
        let host = match std::str::from_utf8(host) {
            Ok("") => origin.to_owned(),
            Ok(h) => h.to_owned(),
            Err(_) => continue,
        };
        nodes.push((host, port));
        if let Some(hostname) = hostname {
            nodes.push((hostname.to_owned(), port));
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text =
            "07c3 10.0.0.1:8500@16379,cache.example myself,master - 0 0 1 connected 0-5460\n\
                    67ed :8501@16380 master - 0 1 2 connected 5461-10922\n\
                    2a5d :0@0 master,noaddr - 0 1 3 disconnected\n\
                    9f00 10.0.0.7:8507@18507 handshake - 0 0 0 disconnected\n\
                    1b2c 10.0.0.3:8502@16381 master,fail - 0 1 3 disconnected 10923-16383\n";
        assert_eq!(
            parse_nodes(text, "seed.example"),
            [
                ("10.0.0.1".to_owned(), 8500),
                ("cache.example".to_owned(), 8500),
                ("seed.example".to_owned(), 8501),
                ("10.0.0.3".to_owned(), 8502)
            ]
        );
    }

    #[test]
    fn tells_a_server_without_cluster_support() {
        assert_eq!(
            parse_reply(b"-ERR This instance has cluster support disabled\r\n", "h"),
            Ok(Found::NotCluster)
        );
        assert!(parse_reply(b"-NOPERM no\r\n", "h")
            .unwrap_err()
            .contains("NOPERM"));
        let line = "id 10.0.0.1:8500@1 myself,master - 0 0 1 connected";
        let bulk = format!("${}\r\n{line}\r\n", line.len());
        assert_eq!(
            parse_reply(bulk.as_bytes(), "h"),
            Ok(Found::Nodes(vec![("10.0.0.1".into(), 8500)]))
        );
    }
}
