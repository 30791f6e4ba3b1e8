"""redis-py's RedisCluster through the proxy, for tests/cluster.rs.

Usage: cluster_client.py PORT KEYS SECONDS

Connects to 127.0.0.1:PORT in cluster mode (the client reads CLUSTER SLOTS and follows MOVED
and ASK on its own), writes KEYS keys spread over every slot, then for SECONDS reads and
rewrites them in turn, checking every value. Prints one JSON line: operations done, errors
(each with its text, at most 20 kept), and the node addresses the client learnt. Exits 0
even when errors occurred: the caller judges the figures.
"""

import json
import sys
import time

from redis.cluster import RedisCluster
from redis.exceptions import RedisError


def main() -> None:
    port, nkeys, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    rc = RedisCluster(
        host="127.0.0.1",
        port=port,
        socket_timeout=10,
        socket_connect_timeout=10,
    )
    ops = 0
    errors = []
    values = {}

    def record(e: Exception) -> None:
        if len(errors) < 20:
            errors.append(f"{type(e).__name__}: {e}")
        else:
            errors.append("...")

    for i in range(nkeys):
        key, value = f"key:{i}", f"v0:{i}"
        try:
            rc.set(key, value)
            values[key] = value
            ops += 1
        except RedisError as e:
            record(e)

    deadline = time.monotonic() + seconds
    generation = 0
    while time.monotonic() < deadline and len(errors) < 1000:
        generation += 1
        for i in range(nkeys):
            if time.monotonic() >= deadline:
                break
            key = f"key:{i}"
            try:
                got = rc.get(key)
                want = values.get(key)
                if want is not None and (got is None or got.decode() != want):
                    record(AssertionError(f"{key}: got {got!r}, want {want!r}"))
                value = f"v{generation}:{i}"
                rc.set(key, value)
                values[key] = value
                ops += 2
            except RedisError as e:
                record(e)

    nodes = sorted(f"{n.host}:{n.port}" for n in rc.get_nodes())
    print(json.dumps({"ops": ops, "errors": errors, "nodes": nodes}))


if __name__ == "__main__":
    main()
