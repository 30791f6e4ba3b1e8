//! `redis-entra-proxy dev`: the built-in local setup. Starts a TLS `redis-server` standing in
//! for Azure Managed Redis, a token issuer that mints a new identity per token generation
//! (registered as an ACL user, deleted when the token expires, which makes Redis close every
//! connection still using it, exactly as Azure does), and the proxy in front of it.
//!
//! A new user sees re-authentication happen live: connections stay open across rotations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::process::ExitCode;

use crate::cli::{DevArgs, Options};
use crate::credentials::{CredentialError, Token, TokenFuture, TokenSource};
use crate::devenv::{mint_token, DevError, RedisCluster, RedisOptions, RedisServer};
use crate::secret::Secret;

/// Issues tokens for the local stand-in server, or for every node of a stand-in cluster.
#[derive(Debug)]
pub struct DevTokenSource {
    /// Where each generation's identity is registered and, at expiry, deleted (AMR accepts a
    /// token on every node of a cache).
    registry: Arc<Registry>,
    lifetime: Duration,
    generation: AtomicU64,
    prefix: String,
    /// Generations from which on tokens are not registered with the server (so AUTH with them
    /// fails), for tests of refused re-authentication.
    refuse_from: Option<u64>,
    /// Whether an identity is deleted when its token expires (as Azure does).
    expire_users: bool,
}

/// Where a [`DevTokenSource`] registers identities.
#[derive(Debug)]
enum Registry {
    /// These servers, in order.
    Servers(Vec<Arc<RedisServer>>),
    /// Whatever nodes the cluster has at the time, nodes added later included: the cluster
    /// remembers its users and gives them to a node that joins.
    Cluster(Arc<RedisCluster>),
}

impl Registry {
    async fn setuser(&self, name: &str, password: &str) -> Result<(), DevError> {
        match self {
            Registry::Servers(servers) => {
                for server in servers {
                    server.acl_setuser(name, password).await?;
                }
                Ok(())
            }
            Registry::Cluster(cluster) => cluster.acl_setuser(name, password).await,
        }
    }

    /// Deletes `name` everywhere, logging (not stopping at) a server that fails.
    async fn deluser(&self, name: &str) {
        let outcome = match self {
            Registry::Servers(servers) => {
                for server in servers {
                    if let Err(e) = server.acl_deluser(name).await {
                        tracing::debug!(oid = %name, error = %e, "expiring dev identity failed");
                    }
                }
                Ok(())
            }
            Registry::Cluster(cluster) => cluster.acl_deluser(name).await,
        };
        if let Err(e) = outcome {
            tracing::debug!(oid = %name, error = %e, "expiring dev identity failed");
        }
    }
}

impl DevTokenSource {
    /// Tokens named `<prefix>-<n>` living `lifetime` each.
    pub fn new(server: Arc<RedisServer>, lifetime: Duration, prefix: &str) -> Self {
        Self::for_servers(vec![server], lifetime, prefix)
    }

    /// Like [`DevTokenSource::new`], registering and deleting each identity on every server,
    /// in order.
    pub fn for_servers(servers: Vec<Arc<RedisServer>>, lifetime: Duration, prefix: &str) -> Self {
        Self::with_registry(Registry::Servers(servers), lifetime, prefix)
    }

    /// Like [`DevTokenSource::new`], registering and deleting each identity on every node the
    /// cluster has, nodes added later by `RedisCluster::add_primary` included.
    pub fn for_cluster(cluster: Arc<RedisCluster>, lifetime: Duration, prefix: &str) -> Self {
        Self::with_registry(Registry::Cluster(cluster), lifetime, prefix)
    }

    fn with_registry(registry: Registry, lifetime: Duration, prefix: &str) -> Self {
        DevTokenSource {
            registry: Arc::new(registry),
            lifetime,
            generation: AtomicU64::new(0),
            prefix: prefix.to_owned(),
            refuse_from: None,
            expire_users: true,
        }
    }

    /// Keeps identities after their tokens expire: the server then never closes a
    /// connection, so only the proxy's own deadline can (tests).
    pub fn keep_users(mut self) -> Self {
        self.expire_users = false;
        self
    }

    /// Tokens from generation `n` on are not registered: the server refuses them (tests).
    pub fn refuse_from(mut self, n: u64) -> Self {
        self.refuse_from = Some(n);
        self
    }
}

impl TokenSource for DevTokenSource {
    fn name(&self) -> &'static str {
        "dev"
    }

    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            let n = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
            let oid = format!("{}-{n}", self.prefix);
            let expires_at = SystemTime::now() + self.lifetime;
            let exp = expires_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let token = mint_token(&oid, exp);
            if self.refuse_from.is_some_and(|r| n >= r) {
                return Ok(Token {
                    token: Secret::new(token),
                    expires_at: Some(expires_at),
                    username: None,
                });
            }
            self.registry
                .setuser(&oid, &token)
                .await
                .map_err(|e| CredentialError::Source(format!("registering {oid}: {e}")))?;
            if !self.expire_users {
                return Ok(Token {
                    token: Secret::new(token),
                    expires_at: Some(expires_at),
                    username: None,
                });
            }
            // At expiry, the identity goes away and Redis closes its connections, as AMR does.
            let registry = self.registry.clone();
            let lifetime = self.lifetime;
            tokio::spawn(async move {
                tokio::time::sleep(lifetime).await;
                registry.deluser(&oid).await;
            });
            Ok(Token {
                token: Secret::new(token),
                expires_at: Some(expires_at),
                username: None,
            })
        })
    }
}

/// The stand-in the proxy talks to: one server, or a cluster (`dev --cluster`). Held for the
/// life of the setup; dropping it stops the processes.
enum StandIn {
    Server(Arc<RedisServer>),
    Cluster(Arc<RedisCluster>),
}

/// Runs the local setup until Ctrl-C.
pub async fn run(args: DevArgs, options: Options) -> ExitCode {
    let started = if args.cluster {
        RedisCluster::start(crate::devenv::ClusterOptions::default())
            .await
            .map(|c| StandIn::Cluster(Arc::new(c)))
    } else {
        RedisServer::start(RedisOptions::default())
            .await
            .map(|s| StandIn::Server(Arc::new(s)))
    };
    let stand_in = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("redis-entra-proxy dev: cannot start the local redis-server: {e}");
            return ExitCode::from(1);
        }
    };
    let ratio = options
        .refresh_ratio
        .unwrap_or(crate::credentials::refresh::DEFAULT_REFRESH_RATIO);
    // A token lives long enough that the refresher, at `ratio` of its life, rotates every
    // `rotate_every`.
    let lifetime = args.rotate_every.div_f64(ratio);
    let mut opts = options;
    opts.upstream_tls = Some(true);
    let (source, description) = match &stand_in {
        StandIn::Server(server) => {
            opts.upstream = Some(server.addr().to_string());
            opts.upstream_ca_file = server.ca_file().map(|p| p.to_path_buf());
            opts.upstream_server_name = Some("localhost".into());
            (
                DevTokenSource::new(server.clone(), lifetime, "dev-identity"),
                format!(
                    "TLS redis-server on {} (pid {:?}, ACL user per token)",
                    server.addr(),
                    server.pid()
                ),
            )
        }
        StandIn::Cluster(cluster) => {
            let addrs = cluster.addrs();
            opts.upstream = Some(addrs[0].to_string());
            opts.upstream_ca_file = Some(cluster.ca_file().to_path_buf());
            opts.upstream_server_name = Some(cluster.server_name().to_owned());
            opts.cluster_mode = opts.cluster_mode.or(Some(crate::cluster::ClusterMode::On));
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            (
                DevTokenSource::for_cluster(cluster.clone(), lifetime, "dev-identity"),
                format!(
                    "a Redis Cluster of {} TLS primaries on {} (their certificate names only \
                     {}; ACL user per token on every node)",
                    addrs.len(),
                    list.join(", "),
                    cluster.server_name()
                ),
            )
        }
    };
    let mut config = match crate::config::validate(opts, None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redis-entra-proxy dev: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    crate::open_files::fit(&mut config);
    let listeners = match crate::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("redis-entra-proxy dev: {e}");
            return ExitCode::from(3);
        }
    };
    let listen = config.listen.map(|a| a.to_string()).unwrap_or_default();
    let (host, port) = listen.rsplit_once(':').unwrap_or(("127.0.0.1", "6379"));
    let cluster_flag = if args.cluster { " -c" } else { "" };
    eprintln!(
        "\nredis-entra-proxy dev is running.\n\
         \x20 stand-in for Azure Managed Redis: {description}\n\
         \x20 tokens rotate every {:?}; each expires {:?} after issue and the server then drops\n\
         \x20 connections still using it, as Azure does. The proxy re-authenticates them live.\n\n\
         Connect with:   redis-cli{cluster_flag} -h {host} -p {port}\n\
         Watch it work:  redis-cli -h {host} -p {port} CLIENT LIST   (user=dev-identity-N changes)\n\
         Benchmark:      redis-benchmark{} -h {host} -p {port} -q -n 100000\n\
         Stop with Ctrl-C.\n",
        args.rotate_every,
        lifetime,
        if args.cluster { " --cluster" } else { "" },
    );
    let shutdown = crate::Shutdown::default();
    tokio::spawn(crate::signals(shutdown.clone()));
    let source = Arc::new(source);
    match crate::run_with_source(config, listeners, source, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redis-entra-proxy dev: {e}");
            ExitCode::from(1)
        }
    }
}
