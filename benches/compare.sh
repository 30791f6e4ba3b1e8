#!/usr/bin/env bash
# Compares redis-entra-proxy with its peers in front of one TLS redis-server on 127.0.0.1:
#
#   direct   redis-benchmark --tls ──TLS──▶ redis-server
#   proxy    redis-benchmark ──plain──▶ redis-entra-proxy (injects AUTH) ──TLS──▶ redis-server
#   stunnel  redis-benchmark ──plain──▶ stunnel (client mode)            ──TLS──▶ redis-server
#   haproxy  redis-benchmark ──plain──▶ haproxy (mode tcp, ssl backend)  ──TLS──▶ redis-server
#
# stunnel and haproxy cannot inject AUTH, so through them (and direct) redis-benchmark
# authenticates itself (`--user bench -a <token>`); through the proxy it sends no AUTH.
#
# Measures, for each target, in ROUNDS interleaved rounds (the order rotates each round):
# throughput and latency (redis-benchmark --csv) for 50 clients (RESP2, and RESP3: `-3`), 50
# clients pipelining 16, 16 KiB values, a single client (as the processes fall on the CPUs,
# and again with all three on one CPU), and a new connection per request (the proxy with a
# warm pool of WARM_CONNECTIONS, default 32); CPU per request of the process
# in the middle (utime + stime from /proc/PID/stat around each run); for the single client,
# latency again with every request timed to the nanosecond (benches/latency.rs: the buckets of
# redis-benchmark's histogram are 8 µs wide); and, once, on fresh
# processes, resident memory per idle connection (IDLE_CONNS connections each sent one PING,
# VmRSS before and after).
# Prints one markdown report: medians, and ratios to direct TLS and to the peers; against each
# goal of issue #6, also the lowest and highest figure of single rounds, which shows how far the
# median sits from the round-to-round noise.
#
# Usage: benches/compare.sh            (about 10 minutes on a 2-core machine)
#        PROXY_ARGS="--worker-threads 1" benches/compare.sh   (more options for the proxy)
#        ROUNDS=1 QUICK=1 benches/compare.sh   (a smoke run: one round, a tenth of the requests)
#        CASES="c1" ROUNDS=9 benches/compare.sh   (some cases only: c50 c50_resp3 c50_p16 v16k c1
#                                                  c1_pinned churn)
#        PROXY_BIN=/tmp/old-build benches/compare.sh   (that binary instead of this tree's build)
# Needs root or the packages already installed (redis-server, redis-tools, stunnel4, haproxy,
# openssl, python3: installed with apt-get when missing). Uses only 127.0.0.1, ports chosen by
# the system. Every process it starts is stopped by PID on exit; its files live in a temporary
# directory that is removed on exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
IDLE_CONNS=${IDLE_CONNS:-2000}
# A run that takes longer than this is hung (the slowest, 16 KiB through the slowest peer,
# takes well under a minute).
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
# Divides every request count (QUICK=1: a tenth), for smoke runs of the script itself.
SCALE=1
[[ "${QUICK:-0}" == 1 ]] && SCALE=10

export PATH="$PATH:/usr/sbin:/sbin"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[compare %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- packages -----------------------------------------------------------------------------
missing=()
for pair in redis-server:redis-server redis-benchmark:redis-tools redis-cli:redis-tools \
    stunnel4:stunnel4 haproxy:haproxy openssl:openssl python3:python3 taskset:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    # shellcheck disable=SC2046
    timeout 600 apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u)
fi

if [[ -n "${PROXY_BIN:-}" ]]; then
    BIN="$PROXY_BIN"
else
    log "building the proxy (release)"
    timeout 1500 cargo build --release --quiet
    BIN="$ROOT/target/release/redis-entra-proxy"
fi
[[ -x "$BIN" ]] || die "no $BIN"
log "building the latency probe (benches/latency.rs)"
PROBE=$(timeout 1500 cargo bench --bench latency --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "latency" and m.get("executable"):
        print(m["executable"])')
[[ -x "$PROBE" ]] || die "the latency probe did not build: cargo bench --bench latency --no-run"

# --- scratch space and cleanup ------------------------------------------------------------
WORK="$(mktemp -d /tmp/redis-entra-compare.XXXXXX)"
PIDS=()
cleanup() {
    local pid i
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        # The proxy drains on SIGTERM; with no client left that takes milliseconds.
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 2,000 idle connections cost stunnel and haproxy two descriptors each, the proxy two, and
# redis-server one: raise the soft limit (children inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(($(ulimit -n) >= 2 * IDLE_CONNS + 100)) || die "ulimit -n $(ulimit -n) is too low for $IDLE_CONNS connections"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
P_REDIS=$(free_port) P_PROXY=$(free_port) P_STUNNEL=$(free_port) P_HAPROXY=$(free_port)

# --- certificates and token ---------------------------------------------------------------
cat >"$WORK/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = redis-entra-proxy bench
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
(
    cd "$WORK"
    openssl req -x509 -config openssl.cnf -extensions ca_ext -newkey ec \
        -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 \
        -subj "/CN=bench CA"
    openssl req -new -config openssl.cnf -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout server.key -out server.csr -subj "/CN=localhost"
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out server.pem -days 2 -extfile openssl.cnf -extensions server_ext
) >"$WORK/openssl.log" 2>&1 || die "openssl failed: $(cat "$WORK/openssl.log")"

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
# JWT-shaped, RS256-sized (Entra tokens are about 1.5-2.5 KB); the proxy reads `oid` as the
# username and never checks the signature; Redis treats the whole token as a password.
TOKEN="$(printf '{"alg":"RS256","typ":"JWT"}' | b64url).$(printf '{"oid":"bench","exp":%d,"aud":"https://redis.azure.com"}' $(($(date +%s) + 3600)) | b64url).$(openssl rand 256 | b64url)"

# --- the four processes -------------------------------------------------------------------
cat >"$WORK/redis.conf" <<EOF
bind 127.0.0.1
port 0
tls-port $P_REDIS
tls-cert-file $WORK/server.pem
tls-key-file $WORK/server.key
tls-ca-cert-file $WORK/ca.pem
tls-auth-clients no
save ""
appendonly no
daemonize no
maxclients 10000
logfile $WORK/redis.log
dir $WORK
# As on Azure Managed Redis: no default user, one identity authenticated by its token.
user default off
user bench on >$TOKEN ~* &* +@all
EOF
redis-server "$WORK/redis.conf" &
PID_REDIS=$!
PIDS+=("$PID_REDIS")

REDIS_ENTRA_PROXY_TOKEN="$TOKEN" "$BIN" --listen "127.0.0.1:$P_PROXY" \
    --upstream "127.0.0.1:$P_REDIS" --upstream-ca-file "$WORK/ca.pem" \
    --upstream-server-name localhost --admin-listen none \
    --warm-connections "${WARM_CONNECTIONS:-32}" ${PROXY_ARGS:-} >"$WORK/proxy.log" 2>&1 &
PID_PROXY=$!
PIDS+=("$PID_PROXY")

cat >"$WORK/stunnel.conf" <<EOF
foreground = yes
pid =
output = $WORK/stunnel.log
debug = warning
; As the proxy and haproxy do.
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[redis]
client = yes
accept = 127.0.0.1:$P_STUNNEL
connect = 127.0.0.1:$P_REDIS
CAfile = $WORK/ca.pem
verifyChain = yes
checkHost = localhost
sni = localhost
EOF
stunnel4 "$WORK/stunnel.conf" >"$WORK/stunnel.out" 2>&1 &
PID_STUNNEL=$!
PIDS+=("$PID_STUNNEL")

cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 5000
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 15m
    timeout server 15m
frontend redis
    bind 127.0.0.1:$P_HAPROXY
    default_backend redis
backend redis
    server redis 127.0.0.1:$P_REDIS ssl verify required ca-file $WORK/ca.pem sni str(localhost) verifyhost localhost
EOF
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PID_HAPROXY=$!
PIDS+=("$PID_HAPROXY")

TARGETS=(direct proxy stunnel haproxy)
declare -A FLAGS=(
    [direct]="--tls --cacert $WORK/ca.pem --sni localhost -h 127.0.0.1 -p $P_REDIS --user bench -a $TOKEN"
    [proxy]="-h 127.0.0.1 -p $P_PROXY"
    [stunnel]="-h 127.0.0.1 -p $P_STUNNEL --user bench -a $TOKEN"
    [haproxy]="-h 127.0.0.1 -p $P_HAPROXY --user bench -a $TOKEN"
)
# The same connections for the latency probe.
declare -A PROBE_FLAGS=(
    [direct]="127.0.0.1:$P_REDIS --tls $WORK/ca.pem localhost --user bench --pass $TOKEN"
    [proxy]="127.0.0.1:$P_PROXY"
    [stunnel]="127.0.0.1:$P_STUNNEL --user bench --pass $TOKEN"
    [haproxy]="127.0.0.1:$P_HAPROXY --user bench --pass $TOKEN"
)
declare -A PID_OF=([direct]=$PID_REDIS [proxy]=$PID_PROXY [stunnel]=$PID_STUNNEL [haproxy]=$PID_HAPROXY)
declare -A PORT_OF=([proxy]=$P_PROXY [stunnel]=$P_STUNNEL [haproxy]=$P_HAPROXY)

# Polls until every target answers PING through the whole chain (10 s at most).
for t in "${TARGETS[@]}"; do
    ok=
    for ((i = 0; i < 100; i++)); do
        kill -0 "${PID_OF[$t]}" 2>/dev/null || break
        # shellcheck disable=SC2086
        if [[ "$(timeout 2 redis-cli ${FLAGS[$t]} --no-auth-warning PING 2>/dev/null)" == PONG ]]; then
            ok=1
            break
        fi
        sleep 0.1
    done
    [[ -n "$ok" ]] || die "$t does not answer PING; logs in $WORK: $(tail -n 5 "$WORK"/*.log "$WORK"/*.out 2>/dev/null)"
done
log "redis-server :$P_REDIS (pid $PID_REDIS), proxy :$P_PROXY (pid $PID_PROXY), stunnel :$P_STUNNEL (pid $PID_STUNNEL), haproxy :$P_HAPROXY (pid $PID_HAPROXY)"

# --- memory per idle connection (first, while the processes are fresh) --------------------
cat >"$WORK/idle.py" <<'EOF'
# Opens N connections to PORT, sends PING on each and waits for the answer (so that the
# upstream TLS connection exists), then reports PID's VmRSS growth per connection.
import resource, socket, sys, time
pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 100)), hard))

def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def open_pinged(count):
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"PING\r\n")
        # +PONG through the proxy; -NOAUTH through the peers (the client did not AUTH): any
        # reply proves the upstream TLS connection is up.
        if not s.recv(256):
            sys.exit(f"connection closed by :{port}")
        socks.append(s)
    return socks

# Warm up once (thread pools, TLS contexts, allocator arenas), so that only the per-connection
# cost is measured.
for s in open_pinged(50):
    s.close()
time.sleep(1)
before = rss_kb()
socks = open_pinged(n)
time.sleep(1)
after = rss_kb()
for s in socks:
    s.close()
print(before, after, f"{(after - before) / n:.1f}")
EOF
: >"$WORK/memory.tsv"
for t in proxy stunnel haproxy; do
    log "memory: $IDLE_CONNS idle connections to $t"
    read -r before after per < <(timeout 300 python3 "$WORK/idle.py" "${PID_OF[$t]}" "${PORT_OF[$t]}" "$IDLE_CONNS") ||
        die "idle connections to $t failed"
    printf '%s\t%s\t%s\t%s\n' "$t" "$before" "$after" "$per" >>"$WORK/memory.tsv"
    # Let the server side of the closed connections go before the next target.
    sleep 2
done

# --- throughput, latency, CPU -------------------------------------------------------------
# CASES="c1 v16k" runs only those (the report then says n/a for the others).
read -r -a CASES <<<"${CASES:-c50 c50_resp3 c50_p16 v16k c1 c1_pinned churn}"
declare -A CASE_ARGS=(
    [c50]="-c 50 -n $((100000 / SCALE)) -t set,get"
    # Clients that say HELLO 3 first (go-redis v9, Lettuce, redis-py with protocol=3).
    [c50_resp3]="-3 -c 50 -n $((100000 / SCALE)) -t set,get"
    [c50_p16]="-c 50 -P 16 -n $((500000 / SCALE)) -t set,get"
    # Runs of a second or less measure the start as much as the steady state (50 new
    # connections, the proxy settling its threads). On the dev setup, six runs alternating,
    # 20,000 16 KiB SETs went at 25.0-30.3k/s (median 27.2k), 100,000 at 29.3-31.4k (30.5k).
    [v16k]="-c 50 -d 16384 -n $((100000 / SCALE)) -t set,get"
    [c1]="-c 1 -n $((20000 / SCALE)) -t set,get"
    # The same with redis-benchmark, redis-server and the process in the middle all on one CPU.
    # One request in flight is a chain of wake-ups, one process at a time: spread over idle
    # CPUs, each wake-up costs an inter-processor interrupt and a CPU leaving its idle state,
    # which on a virtual machine cost more than the work of all three processes, and vary with
    # where the scheduler happens to put them. On one CPU, the figures are the processes' own.
    [c1_pinned]="-c 1 -n $((40000 / SCALE)) -t set,get"
    # A new connection for every request (`-k 0`): what the warm pool is for.
    [churn]="-c 10 -k 0 -n $((4000 / SCALE)) -t set,get"
)
# Direct TLS stalls on 16 KiB SETs (redis-benchmark leaves Nagle on: about 1,100 SETs a
# second), so it runs fewer of them; its rate is a figure of the report, not of any goal.
declare -A DIRECT_CASE_ARGS=(
    [v16k]="-c 50 -d 16384 -n $((20000 / SCALE)) -t set,get"
)
TCK=$(getconf CLK_TCK)
# The CPUs this script may use (its processes inherit them): `c1_pinned` runs on the first,
# and gives the processes all of them back afterwards.
CPUS=$(taskset -c -p $$ | sed 's/.*: //')
FIRST_CPU=${CPUS%%[,-]*}
cpu_ticks() { # utime + stime of the whole process (all threads)
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) } # fields after the command name; utime and stime are fields 14 and 15
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}

# The machine is shared: how busy it was with other work during a run (all CPU time minus that
# of redis-server, the process in the middle and redis-benchmark), in percent of all cores.
machine_ticks() { # total and busy jiffies, all cores
    local _cpu user nice system idle iowait rest
    read -r _cpu user nice system idle iowait rest </proc/stat
    local irq softirq steal
    read -r irq softirq steal _ <<<"$rest"
    echo $((user + nice + system + idle + iowait + irq + softirq + steal)) $((user + nice + system + irq + softirq + steal))
}
children_ticks() { # user + system of waited-for children, from the output of `times` in $1
    awk -v tck="$TCK" 'NR == 2 {
        n = 0
        for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); n += a[1] * 60 + a[2] }
        printf "%d\n", n * tck }' "$1"
}

printf 'round\ttarget\tcase\ttest\trps\tp50_ms\tp99_ms\tmid_cpu_us_per_req\tredis_cpu_us_per_req\tothers_busy_pct\n' >"$WORK/results.tsv"
printf 'round\ttarget\tcase\ttest\trps\tp50_ms\tp99_ms\tp999_ms\tmax_ms\n' >"$WORK/latency.tsv"
for ((round = 1; round <= ROUNDS; round++)); do
    order=()
    for ((k = 0; k < ${#TARGETS[@]}; k++)); do
        order+=("${TARGETS[$(((k + round - 1) % ${#TARGETS[@]}))]}")
    done
    for c in "${CASES[@]}"; do
        for t in "${order[@]}"; do
            log "round $round/$ROUNDS: $c via $t"
            mid=${PID_OF[$t]}
            pin=()
            if [[ "$c" == c1_pinned ]]; then
                pin=(taskset -c "$FIRST_CPU")
                for pid in "$PID_REDIS" "$mid"; do taskset -a -p -c "$FIRST_CPU" "$pid" >/dev/null; done
            fi
            read -r tot0 busy0 < <(machine_ticks)
            # `times` must run in this shell: a subshell does not see its parent's children.
            times >"$WORK/times0"
            m0=$(cpu_ticks "$mid") r0=$(cpu_ticks "$PID_REDIS")
            ok=1
            args=${CASE_ARGS[$c]}
            [[ "$t" == direct && -n "${DIRECT_CASE_ARGS[$c]:-}" ]] && args=${DIRECT_CASE_ARGS[$c]}
            # shellcheck disable=SC2086
            out=$(timeout "$RUN_TIMEOUT" "${pin[@]}" redis-benchmark ${FLAGS[$t]} $args -q --csv 2>"$WORK/bench.err") || ok=
            m1=$(cpu_ticks "$mid") r1=$(cpu_ticks "$PID_REDIS")
            times >"$WORK/times1"
            read -r tot1 busy1 < <(machine_ticks)
            if [[ -n "$ok" && "$c" == c1* ]]; then
                # Latency once more, every request timed (same placement, after the CPU figures).
                # shellcheck disable=SC2086
                if lat=$(timeout "$RUN_TIMEOUT" "${pin[@]}" "$PROBE" ${PROBE_FLAGS[$t]} -n "$((20000 / SCALE))" 2>"$WORK/probe.err"); then
                    awk -v r="$round" -v t="$t" -v c="$c" '{ print r "\t" t "\t" c "\t" $0 }' <<<"$lat" >>"$WORK/latency.tsv"
                else
                    log "warning: latency probe, $c via $t: $(tail -n 2 "$WORK/probe.err")"
                fi
            fi
            if ((${#pin[@]})); then
                for pid in "$PID_REDIS" "$mid"; do taskset -a -p -c "$CPUS" "$pid" >/dev/null; done
            fi
            if [[ -z "$ok" ]]; then
                log "warning: $c via $t failed or timed out: $(tail -n 2 "$WORK/bench.err")"
                continue
            fi
            b0=$(children_ticks "$WORK/times0") b1=$(children_ticks "$WORK/times1")
            ours=$(((r1 - r0) + (b1 - b0)))
            [[ "$t" == direct ]] || ours=$((ours + m1 - m0))
            others=$(((busy1 - busy0 - ours) * 100 / (tot1 - tot0 > 0 ? tot1 - tot0 : 1)))
            ((others >= 0)) || others=0
            n=$(awk '{for (i = 1; i <= NF; i++) if ($i == "-n") print $(i + 1)}' <<<"$args")
            reqs=$((2 * n)) # two tests, SET and GET
            # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
            tr -d '"' <<<"$out" | awk -F, -v r="$round" -v t="$t" -v c="$c" \
                -v mc="$(((m1 - m0) * 1000000 / TCK))" -v rc="$(((r1 - r0) * 1000000 / TCK))" -v q="$reqs" -v o="$others" '
                $1 == "SET" || $1 == "GET" {
                    mid = (t == "direct") ? "" : sprintf("%.2f", mc / q)
                    printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.2f\t%s\n", r, t, c, $1, $2, $5, $7, mid, rc / q, o
                }' >>"$WORK/results.tsv"
        done
    done
done

# --- report -------------------------------------------------------------------------------
cat >"$WORK/report.py" <<'EOF'
import csv, statistics, sys
from collections import defaultdict

results, memory, rounds, idle, latency = sys.argv[1:6]
T = ["direct", "proxy", "stunnel", "haproxy"]
CASES = [("c50", "50 clients"), ("c50_resp3", "50 clients, RESP3"),
         ("c50_p16", "50 clients, pipeline 16"),
         ("v16k", "50 clients, 16 KiB values"), ("c1", "1 client"),
         ("c1_pinned", "1 client, all on one CPU"),
         ("churn", "10 clients, a new connection per request")]
# Each figure by round: {(target, case, test, key): {round: value}}.
vals = defaultdict(dict)
for row in csv.DictReader(open(results), delimiter="\t"):
    for k in ("rps", "p50_ms", "p99_ms", "mid_cpu_us_per_req", "redis_cpu_us_per_req"):
        if row[k]:
            vals[(row["target"], row["case"], row["test"], k)][row["round"]] = float(row[k])
# The latency probe's figures, under keys of their own ("probe_p50_ms", ...).
for row in csv.DictReader(open(latency), delimiter="\t"):
    for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms"):
        vals[(row["target"], row["case"], row["test"], "probe_" + k)][row["round"]] = float(row[k])

def med(t, c, test, k):
    v = vals.get((t, c, test, k))
    return statistics.median(v.values()) if v else None

def by_round(t, c, test, k):
    return vals.get((t, c, test, k), {})

def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "n/a"

def fmt(v, digits=0):
    return "n/a" if v is None else f"{v:,.{digits}f}"

others = [float(r["others_busy_pct"]) for r in csv.DictReader(open(results), delimiter="\t")
          if r["others_busy_pct"]]
print(f"Medians of {rounds} interleaved round(s); ratios are proxy ÷ other.")
if others:
    print(f"Other work on the machine during the runs (shared machine): median "
          f"{statistics.median(others):.0f} %, max {max(others):.0f} % of all cores.")
print()
print("### Throughput (requests/s)\n")
print("| case | test | direct TLS | proxy | stunnel | haproxy | proxy/direct | proxy/haproxy | proxy/stunnel |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for c, name in CASES:
    for test in ("SET", "GET"):
        r = {t: med(t, c, test, "rps") for t in T}
        print(f"| {name} | {test} | " + " | ".join(fmt(r[t]) for t in T) +
              f" | {ratio(r['proxy'], r['direct'])} | {ratio(r['proxy'], r['haproxy'])} | {ratio(r['proxy'], r['stunnel'])} |")

print("\n### Latency, 1 client (µs, every request timed by benches/latency.rs)\n")
print("| case | test | percentile | direct TLS | proxy | stunnel | haproxy | proxy − direct | proxy − haproxy |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")

def gap(a, b):
    return "n/a" if a is None or b is None else f"{(a - b) * 1000:+.1f}"

for c, name in (("c1", "1 client"), ("c1_pinned", "one CPU")):
    for test in ("SET", "GET"):
        for k, label in (("probe_p50_ms", "p50"), ("probe_p99_ms", "p99"), ("probe_p999_ms", "p99.9")):
            r = {t: med(t, c, test, k) for t in T}
            print(f"| {name} | {test} | {label} | " +
                  " | ".join("n/a" if r[t] is None else f"{r[t] * 1000:.1f}" for t in T) +
                  f" | {gap(r['proxy'], r['direct'])} | {gap(r['proxy'], r['haproxy'])} |")

print("\n### Latency, 1 client, as redis-benchmark reports it (ms; its buckets are 8 µs wide)\n")
print("| case | test | percentile | direct TLS | proxy | stunnel | haproxy | proxy/direct | proxy/haproxy |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for c, name in (("c1", "1 client"), ("c1_pinned", "one CPU")):
    for test in ("SET", "GET"):
        for k, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            r = {t: med(t, c, test, k) for t in T}
            print(f"| {name} | {test} | {label} | " + " | ".join(fmt(r[t], 3) for t in T) +
                  f" | {ratio(r['proxy'], r['direct'])} | {ratio(r['proxy'], r['haproxy'])} |")

print("\n### CPU per request (µs, user + system, of the process in the middle; SET and GET together)\n")
print("| case | proxy | stunnel | haproxy | proxy/haproxy | redis-server, direct TLS | redis-server, via proxy |")
print("|---|---:|---:|---:|---:|---:|---:|")
for c, name in CASES:
    r = {t: med(t, c, "SET", "mid_cpu_us_per_req") for t in T}
    rd, rp = med("direct", c, "SET", "redis_cpu_us_per_req"), med("proxy", c, "SET", "redis_cpu_us_per_req")
    print(f"| {name} | {fmt(r['proxy'], 2)} | {fmt(r['stunnel'], 2)} | {fmt(r['haproxy'], 2)} | "
          f"{ratio(r['proxy'], r['haproxy'])} | {fmt(rd, 2)} | {fmt(rp, 2)} |")

mem = {}
for line in open(memory):
    t, before, after, per = line.split("\t")
    mem[t] = (int(before), int(after), float(per))
print(f"\n### Memory per idle connection ({idle} connections, one PING each; VmRSS growth)\n")
print("| | proxy | stunnel | haproxy |")
print("|---|---:|---:|---:|")
print("| VmRSS before → after (KiB) | " + " | ".join(
    f"{mem[t][0]:,} → {mem[t][1]:,}" if t in mem else "n/a" for t in T[1:]) + " |")
print("| per connection (KiB) | " + " | ".join(
    f"{mem[t][2]:.1f}" if t in mem else "n/a" for t in T[1:]) + " |")

def worst(c, fn):
    xs = [fn(test) for test in ("SET", "GET")]
    xs = [x for x in xs if x is not None]
    return min(xs) if xs else None

def rps_ratio(c, other):
    def f(test):
        a, b = med("proxy", c, test, "rps"), med(other, c, test, "rps")
        return a / b if a is not None and b else None
    return worst(c, f)

def check(v, ok):
    return ("n/a", "?") if v is None else (f"{v:.2f}", "yes" if ok(v) else "**no**")

def spread(fn, worse=min, gap=False, tests=("SET", "GET")):
    # The goal's figure in each round (the worse of `tests`, from that round's own
    # measurements), lowest to highest: how far the median sits from the round-to-round noise.
    per = defaultdict(list)
    for test in tests:
        for r, v in fn(test).items():
            per[r].append(v)
    xs = [worse(v) for v in per.values() if len(v) == len(tests)]
    if not xs:
        return "n/a"
    if gap:
        return f"{min(xs):+.1f} to {max(xs):+.1f} µs"
    return f"{min(xs):.2f}–{max(xs):.2f}×"

def round_ratios(c, a_target, b_target, k):
    def f(test):
        a, b = by_round(a_target, c, test, k), by_round(b_target, c, test, k)
        return {r: a[r] / b[r] for r in a if r in b and b[r]}
    return f

print("\n### Goals (the worse of SET and GET)\n")
print("Rounds: the same figure taken from each round alone, lowest to highest.\n")
print("| goal | measured | rounds | met |")
print("|---|---:|---:|---|")
rows = [(goal, rps_ratio(c, other), ok, c, other) for goal, c, other, ok in [
    ("throughput ≥ 1.5× haproxy, 50 clients", "c50", "haproxy", lambda v: v >= 1.5),
    ("throughput ≥ 1.5× haproxy, pipeline 16", "c50_p16", "haproxy", lambda v: v >= 1.5),
    ("throughput ≥ 1.5× haproxy, 50 clients, RESP3", "c50_resp3", "haproxy", lambda v: v >= 1.5),
    ("throughput ≥ 0.8× direct TLS, 50 clients", "c50", "direct", lambda v: v >= 0.8),
    ("throughput ≥ 0.8× direct TLS, 50 clients, RESP3", "c50_resp3", "direct", lambda v: v >= 0.8),
    ("throughput ≥ 0.8× direct TLS, pipeline 16", "c50_p16", "direct", lambda v: v >= 0.8),
    ("16 KiB values ≥ 1.3× haproxy", "v16k", "haproxy", lambda v: v >= 1.3),
    ("new connection per request ≥ 10× direct TLS", "churn", "direct", lambda v: v >= 10),
]]
for goal, v, ok, c, other in rows:
    m, met = check(v, ok)
    rounds = spread(round_ratios(c, "proxy", other, "rps"))
    print(f"| {goal} | {m}{'' if v is None else '×'} | {rounds} | {met} |")
for c, name in CASES:
    p, h = med("proxy", c, "SET", "mid_cpu_us_per_req"), med("haproxy", c, "SET", "mid_cpu_us_per_req")
    v = p / h if p is not None and h else None
    m, met = check(v, lambda v: v < 1)
    # CPU is measured once per round for SET and GET together.
    rounds = spread(round_ratios(c, "proxy", "haproxy", "mid_cpu_us_per_req"), worse=max, tests=("SET",))
    print(f"| CPU per request below haproxy, {name} | {m}{'' if v is None else '×'} | {rounds} | {met} |")

def latency_gap(other, k, c="c1"):
    # The worse of SET and GET: proxy minus other, in µs; the probe's figures, or
    # redis-benchmark's when the probe has none.
    gaps = []
    for test in ("SET", "GET"):
        for key in ("probe_" + k, k):
            a, b = med("proxy", c, test, key), med(other, c, test, key)
            if a is not None and b is not None:
                gaps.append((a - b) * 1000)
                break
    return max(gaps) if gaps else None

def round_gaps(other, k, c):
    # Per round: proxy minus other, in µs, from the probe when it ran that round.
    def f(test):
        key = "probe_" + k if by_round("proxy", c, test, "probe_" + k) else k
        a, b = by_round("proxy", c, test, key), by_round(other, c, test, key)
        return {r: (a[r] - b[r]) * 1000 for r in a if r in b}
    return f

v = latency_gap("direct", "p50_ms")
m, met = ("n/a", "?") if v is None else (f"{v:+.1f} µs", "yes" if v <= 60 else "**no**")
rounds = spread(round_gaps("direct", "p50_ms", "c1"), worse=max, gap=True)
print(f"| 1 client: p50 within 60 µs of direct TLS | {m} | {rounds} | {met} |")
for c, name in (("c1", "1 client"), ("c1_pinned", "1 client, one CPU")):
    v = latency_gap("haproxy", "p99_ms", c)
    m, met = ("n/a", "?") if v is None else (f"{v:+.1f} µs", "yes" if v < 0 else "**no**")
    rounds = spread(round_gaps("haproxy", "p99_ms", c), worse=max, gap=True)
    print(f"| {name}: p99 below haproxy's | {m} | {rounds} | {met} |")
if "proxy" in mem:
    per = mem["proxy"][2]
    print(f"| ≤ 20 KB per idle connection | {per * 1.024:.1f} KB | once | {'yes' if per * 1.024 <= 20 else '**no**'} |")
EOF
echo
echo "## redis-entra-proxy compared ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $(stunnel4 -version 2>&1 | grep -o 'stunnel [0-9.]*' | head -n 1), haproxy $(haproxy -v | head -n 1 | awk '{print $3}'))"
echo
python3 "$WORK/report.py" "$WORK/results.tsv" "$WORK/memory.tsv" "$ROUNDS" "$IDLE_CONNS" "$WORK/latency.tsv"
if [[ -n "${KEEP_RESULTS:-}" ]]; then
    cp "$WORK/results.tsv" "$KEEP_RESULTS.results.tsv"
    cp "$WORK/memory.tsv" "$KEEP_RESULTS.memory.tsv"
    cp "$WORK/latency.tsv" "$KEEP_RESULTS.latency.tsv"
fi
