//! The built-in local setup: a TLS `redis-server` on 127.0.0.1 standing in for Azure Managed
//! Redis, with certificates generated at run time and unsigned JWTs for the mock token issuer;
//! and a cluster of such servers standing in for AMR's OSS cluster policy. Used by the `dev`
//! subcommand and by the integration tests.
//!
//! # Layout
//! - `devenv/certs.rs`: `DevCerts`, a fresh CA and server certificate (rcgen).
//! - `devenv/server.rs`: `RedisServer`, the redis-server child process, its temporary
//!   directory, readiness, kill and restart; `devenv/server/ops.rs`: its admin connection,
//!   ACL users and `CLIENT LIST`.
//! - `devenv/workdir.rs`: the server's private temporary directory, config file and logs.
//! - `devenv/cluster.rs`: `RedisCluster`, N TLS cluster nodes (each a `RedisServer`) formed
//!   into one Redis Cluster standing in for AMR's OSS cluster policy;
//!   `devenv/cluster/state.rs`: reading CLUSTER INFO/SLOTS/NODES; `devenv/cluster/reshard.rs`:
//!   moving slots with `redis-cli --cluster reshard`; `devenv/cluster/membership.rs`: primaries
//!   joining and leaving a running cluster; `devenv/cluster/keyslot.rs`: `key_slot`.
//! - `devenv/admin.rs`: `RespConn` and `Reply`, the small RESP2 client the fixture uses.
//! - `devenv/token.rs`: `mint_token`, unsigned JWTs with the claims the proxy reads.
//!
//! How the stand-in mimics AMR: each token generation is an ACL user named after the token's
//! `oid` with the token as password; `ACL DELUSER` disconnects every connection authenticated
//! as that user, which is what AMR does when a token expires.
//!
//! This module owns only fixtures. It does not own the proxy, the token sources, or anything
//! that leaves the loopback interface.

mod admin;
mod certs;
mod cluster;
mod server;
#[cfg(test)]
mod tests;
mod token;
mod workdir;

pub use admin::{client_tls_config, encode, parse, Io, Reply, RespConn};
pub use certs::DevCerts;
pub use cluster::{key_slot, ClusterOptions, RedisCluster, CLUSTER_SLOTS};
pub use server::{RedisOptions, RedisServer};
pub use token::mint_token;

/// Everything that can go wrong in the local setup. Messages never carry passwords or tokens.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The redis-server binary is not installed (or not where `REDIS_SERVER` points).
    #[error("redis-server not found at {path}: install it with `apt-get install -y redis-server`")]
    RedisServerMissing {
        /// The path that was tried.
        path: String,
    },
    /// The process could not be spawned.
    #[error("could not start redis-server: {0}")]
    Spawn(#[source] std::io::Error),
    /// The process exited, or did not answer AUTH and PING in time.
    #[error("redis-server did not become ready: {reason}\n--- end of its logs ---\n{log_tail}")]
    NotReady {
        /// Why readiness failed (exit status, or the last probe's error).
        reason: String,
        /// The last lines of its stdout/stderr and log file, passwords redacted.
        log_tail: String,
    },
    /// Files in the temporary directory or a socket.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Trust store, server name or handshake.
    #[error("TLS error: {0}")]
    Tls(String),
    /// rcgen could not build the CA or server certificate.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    /// redis-server sent something that is not a RESP2 reply.
    #[error("RESP protocol error: {0}")]
    Protocol(String),
    /// The connection ended between replies.
    #[error("connection closed by redis-server")]
    Closed,
    /// An error reply to an admin command.
    #[error("redis-server replied with an error: {0}")]
    Reply(String),
    /// An admin command did not finish within its bound.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// A cluster did not form or settle in time, its nodes disagree, a reshard failed, or a
    /// node index is out of range. The text quotes redis-cli's output with passwords redacted.
    #[error("redis cluster: {0}")]
    Cluster(String),
    /// An admin operation between `kill` and `restart`.
    #[error("redis-server is not running (killed and not restarted)")]
    NotRunning,
}

/// Bytes from the operating system's random source (through the ring provider rustls uses).
pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buf)
        .expect("the operating system's random source is available");
    buf
}

pub(crate) fn random_hex(bytes: usize) -> String {
    random_bytes(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
