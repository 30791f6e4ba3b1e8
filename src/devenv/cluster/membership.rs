//! Primaries joining and leaving a running cluster, as when Azure scales an OSS-clustered
//! cache out or in: `add_primary` starts a node like the others, gives it the users and
//! introduces it; `forget_primary` and `remove_primary` make the others forget a node that
//! serves no slots (move them away with `reshard` first).
//!
//! Indices: a node added gets the next index; removing node `i` shifts the nodes after it down
//! by one, as `Vec::remove` does. Node 0 never leaves (see `RedisCluster::seed`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    bulk_text, meet, poll_settled, unsettled_among, Member, RedisCluster, MAX_POLLS, MAX_PRIMARIES,
    POLL_INTERVAL,
};
use crate::devenv::{DevError, RedisServer, Reply};

/// Bound on waiting for the other holders of a leaving node's handle to let go: a user change
/// or settle check in flight holds one for at most a few admin commands.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(6);

impl RedisCluster {
    /// Starts one more primary like the others (same CA, certificate, admin password and
    /// command line), introduces it to node 0, waits until every node, the new one included,
    /// agrees that it is a member (serving no slots: move some to it with `reshard`), gives it
    /// every user `acl_setuser` created and `acl_deluser` has not deleted, and returns its
    /// index. From then on `acl_setuser`/`acl_deluser` reach it too.
    pub async fn add_primary(&self) -> Result<usize, DevError> {
        let _change = self.membership.lock().await;
        let current = self.nodes();
        if current.len() >= MAX_PRIMARIES {
            return Err(DevError::Cluster(format!(
                "the cluster has {} primaries; at most {MAX_PRIMARIES} supported",
                current.len()
            )));
        }
        let server = Arc::new(RedisServer::start(self.node_options.clone()).await?);
        let id = bulk_text(server.command(&[b"CLUSTER", b"MYID"]).await?)?;
        let joined = self.join(&current, &server, &id).await;
        if joined.is_err() {
            // Best effort, so the others do not keep a dead member around: the node itself is
            // killed when `server` drops.
            for node in &current {
                let _ = node.command(&[b"CLUSTER", b"FORGET", id.as_bytes()]).await;
            }
        }
        joined
    }

    async fn join(
        &self,
        current: &[Arc<RedisServer>],
        server: &Arc<RedisServer>,
        id: &str,
    ) -> Result<usize, DevError> {
        meet(&self.seed, server).await?;
        let mut all = current.to_vec();
        all.push(server.clone());
        poll_settled("adding a primary", || unsettled_among(&all)).await?;
        // Users are given and the node published with `users` held: a user created meanwhile
        // waits and then reaches the new member too; one deleted meanwhile is not replayed.
        let users = self.users.lock().await;
        for (name, password) in users.iter() {
            server.acl_setuser(name, password).await?;
        }
        let mut members = self.write_members();
        members.push(Member {
            server: server.clone(),
            id: id.to_owned(),
        });
        Ok(members.len() - 1)
    }

    /// Makes every other node forget node `index` (`CLUSTER FORGET`, repeated on any node that
    /// learns of it again from gossip) and waits until they agree on a cluster without it.
    /// The node keeps running, unaware, until the returned handle is dropped or killed: what a
    /// client connected to it sees while the topology no longer lists it.
    ///
    /// Fails, changing nothing, if `index` is 0 or out of range, if the node still serves
    /// slots, or if a handle to it (from `nodes()` or `node()`) is still held elsewhere.
    pub async fn forget_primary(&self, index: usize) -> Result<RedisServer, DevError> {
        let _change = self.membership.lock().await;
        if index == 0 {
            return Err(DevError::Cluster(
                "node 0 cannot leave: the cluster was formed around it and it holds the CA \
                 file clients are given"
                    .to_owned(),
            ));
        }
        let id = self.node_id(index)?;
        let owners = self.slot_owners().await?;
        let owned = owners.iter().filter(|o| **o == index).count();
        if owned > 0 {
            return Err(DevError::Cluster(format!(
                "node {index} still serves {owned} slots; move them away with `reshard` first"
            )));
        }
        let member = {
            // With `users` held, no user change is running on a snapshot that includes it.
            let _users = self.users.lock().await;
            self.write_members().remove(index)
        };
        let server = match release(member.server).await {
            Ok(server) => server,
            Err(server) => {
                self.write_members().insert(index, Member { server, id });
                return Err(DevError::Cluster(format!(
                    "node {index} is still in use elsewhere (a handle from `nodes()` or \
                     `node()` is held); drop it before removing the node"
                )));
            }
        };
        let remaining = self.nodes();
        // Every node forgets it within milliseconds of the first, well inside the 60 s for
        // which a forgetting node ignores gossip about it; a node that re-learnt it anyway is
        // told again on the next round.
        poll_settled("removing a primary", || forget_round(&remaining, &id)).await?;
        Ok(server)
    }

    /// `forget_primary`, then kills the node and waits for its process to exit.
    pub async fn remove_primary(&self, index: usize) -> Result<(), DevError> {
        let mut server = self.forget_primary(index).await?;
        server.kill().await
    }
}

/// `server` itself once this is the only handle to it (waiting, bounded, for snapshots in
/// flight to be dropped); the handle back if another holder keeps it.
async fn release(mut server: Arc<RedisServer>) -> Result<RedisServer, Arc<RedisServer>> {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    for _ in 0..MAX_POLLS {
        match Arc::try_unwrap(server) {
            Ok(server) => return Ok(server),
            Err(shared) => server = shared,
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Err(server)
}

/// Tells each of `nodes` that still lists `id` to forget it, then says why `nodes` are not
/// yet settled as a cluster of exactly themselves (`None` once they are).
async fn forget_round(nodes: &[Arc<RedisServer>], id: &str) -> Result<Option<String>, DevError> {
    for node in nodes {
        let known = bulk_text(node.command(&[b"CLUSTER", b"NODES"]).await?)?;
        if !known.lines().any(|l| l.split(' ').next() == Some(id)) {
            continue;
        }
        match node
            .command(&[b"CLUSTER", b"FORGET", id.as_bytes()])
            .await?
        {
            Reply::Simple(ok) if ok == "OK" => {}
            // Forgotten between the two commands: what was wanted.
            Reply::Error(e) if e.contains("Unknown node") => {}
            Reply::Error(e) => return Err(DevError::Reply(e)),
            other => {
                return Err(DevError::Protocol(format!(
                    "CLUSTER FORGET replied {other:?}"
                )))
            }
        }
    }
    unsettled_among(nodes).await
}
