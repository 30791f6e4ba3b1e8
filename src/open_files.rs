//! The open-file limit, fitted to `--max-connections` at startup.
//!
//! Every client connection takes two file descriptors (its socket and its upstream's), and a
//! Linux process usually starts with a soft limit of 1,024 (systemd's default, and many
//! shells'), which would hold about 480 clients: the next ones would fail at `accept` or at
//! their upstream connect. So, like Redis with `maxclients`, the proxy raises its soft limit
//! as far as the hard limit allows, and when even that cannot hold `--max-connections`, it
//! lowers the connection limit to what fits and says so: a client past it gets Redis's own
//! `max number of clients reached` at once instead of a connection that hangs or fails.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::config::Config;

/// Descriptors kept beside the clients': listeners, the admin endpoint and its connections,
/// each session thread's poller, the token source's requests, cluster node listeners and the
/// shared connections of `--multiplex`. Redis keeps 32 for less.
pub const RESERVED: u64 = 64;

/// Descriptors the proxy needs at most: two per client connection, one per warm connection,
/// and [`RESERVED`].
pub fn needed(max_connections: usize, warm_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(warm_connections as u64)
        .saturating_add(RESERVED)
}

/// The client connections `limit` descriptors hold beside the warm pool and [`RESERVED`]; at
/// least one, so that a proxy squeezed below its reserve still serves someone and says why.
pub fn clients_within(limit: u64, warm_connections: usize) -> usize {
    let spare = limit.saturating_sub(warm_connections as u64 + RESERVED) / 2;
    usize::try_from(spare).unwrap_or(usize::MAX).max(1)
}

/// The soft limit to ask for, if the current one is short of `need`: `need` itself, or the
/// hard limit when that is lower (`None` is unlimited).
pub fn target(current: Option<u64>, maximum: Option<u64>, need: u64) -> Option<u64> {
    match current {
        Some(soft) if soft < need => {
            let want = maximum.map_or(need, |hard| hard.min(need));
            (want > soft).then_some(want)
        }
        _ => None,
    }
}

/// Raises this process's soft open-file limit towards what `config.max_connections` needs and
/// lowers that limit to what fits in the result, logging any change. A limit the kernel
/// refuses to raise (beyond `fs.nr_open`, say) is left as it was.
pub fn fit(config: &mut Config) {
    let (max_connections, warm_connections) = (config.max_connections, config.warm_connections);
    let need = needed(max_connections, warm_connections);
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let mut after = current;
    if let Some(want) = target(current, maximum, need) {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum,
            },
        ) {
            Ok(()) => {
                tracing::info!(from = current, to = want, "raised the open-file limit");
                after = Some(want);
            }
            Err(e) => tracing::warn!(
                error = %e,
                from = current,
                to = want,
                "cannot raise the open-file limit"
            ),
        }
    }
    let fits = match after {
        Some(limit) if limit < need => clients_within(limit, warm_connections),
        _ => max_connections,
    };
    if fits < max_connections && !config.max_connections_set {
        // Nobody asked for the default's 10,000: say so, but it is no fault.
        tracing::info!(
            open_file_limit = after,
            hard_limit = maximum,
            "the open-file limit holds {fits} client connections; serving at most that many \
             (--max-connections sets how many; its default is {max_connections})"
        );
    } else if fits < max_connections {
        tracing::warn!(
            open_file_limit = after,
            hard_limit = maximum,
            needed = need,
            max_connections,
            "the open-file limit holds only {fits} client connections; serving at most that \
             many. Raise it (`ulimit -n`, systemd's LimitNOFILE, the container's nofile \
             ulimit) or lower --max-connections"
        );
    }
    config.max_connections = fits;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_per_client_beside_the_pool_and_the_reserve() {
        assert_eq!(needed(10_000, 0), 20_064);
        assert_eq!(needed(100, 32), 296);
        assert_eq!(needed(usize::MAX, usize::MAX), u64::MAX);
    }

    #[test]
    fn a_short_soft_limit_is_raised_to_the_need_or_the_hard_limit() {
        // Enough already, or unlimited: nothing to do.
        assert_eq!(target(Some(20_064), Some(20_064), 20_064), None);
        assert_eq!(target(None, None, 20_064), None);
        // Short: up to the need when the hard limit allows it...
        assert_eq!(target(Some(1_024), Some(524_288), 20_064), Some(20_064));
        assert_eq!(target(Some(1_024), None, 20_064), Some(20_064));
        // ...and to the hard limit when it does not.
        assert_eq!(target(Some(1_024), Some(4_096), 20_064), Some(4_096));
        // Nothing to gain when soft and hard are the same.
        assert_eq!(target(Some(1_024), Some(1_024), 20_064), None);
    }

    #[test]
    fn the_clients_that_fit_leave_the_pool_and_the_reserve() {
        assert_eq!(clients_within(1_024, 0), 480);
        assert_eq!(clients_within(4_096, 32), 2_000);
        // What fits needs no more than the limit...
        let fits = clients_within(1_024, 32);
        assert!(needed(fits, 32) <= 1_024);
        assert!(needed(fits + 1, 32) > 1_024);
        // ...and a limit below the reserve still serves one.
        assert_eq!(clients_within(10, 0), 1);
    }
}
