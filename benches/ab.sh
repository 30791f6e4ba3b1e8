#!/usr/bin/env bash
# A/B of proxy builds or options on the built-in `dev` setup: starts one `redis-entra-proxy dev`
# (its own TLS redis-server and token issuer, all on 127.0.0.1) per variant, then runs the same
# `redis-benchmark` against each in turn for ROUNDS interleaved rounds (the order rotates each
# round: the variant run first in a round measured up to 10 % better, whichever it was), and
# prints, per run, throughput, p50/p99 latency, and CPU per request of the proxy and of its
# redis-server (utime + stime from /proc/PID/stat around the run), then each variant's medians.
# Compare variants within one invocation: only the ratios mean something on a shared 2-core
# machine.
#
# Usage: benches/ab.sh ROUNDS "BENCH ARGS" VARIANT...
#   VARIANT is "OPTIONS" (the proxy built from this tree) or "BINARY|OPTIONS".
#   benches/ab.sh 3 "-c 50 -n 200000 -t get" "--multiplex" "--multiplex --worker-threads 1"
#   benches/ab.sh 3 "-3 -c 50 -n 200000 -t get" "/tmp/old-build|--multiplex" "--multiplex"
# BENCH ARGS must include -n (requests per test); use one test (-t) so that CPU per request
# is that test's. PREPARE, if set, are redis-benchmark arguments run once against each variant
# before the rounds, unmeasured: GETs of 16 KiB values need the value set first,
#   PREPARE="-n 1 -d 16384 -t set" benches/ab.sh 3 "-c 50 -n 20000 -d 16384 -t get" "" "--multiplex"
# ALONGSIDE, if set, are redis-benchmark arguments run against the same variant, in a loop,
# during each measured run (a competing load; its CPU counts in the figures, and the mean rate
# of the loops it completed is the last column), e.g. clients reading 4 MB values while 20
# others GET a small one:
#   PREPARE="-n 1 -d 4000000 -t set" ALONGSIDE="-c 3 -n 100 -t get" \
#     benches/ab.sh 3 "-c 20 -n 40000 get small" "--multiplex"
# Every process it starts is stopped by PID on exit.
set -euo pipefail

(($# >= 3)) || { sed -n '2,/^set /{/^#/p}' "$0" >&2; exit 2; }
ROUNDS=$1 BARGS=$2
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release/redis-entra-proxy"
for cmd in redis-benchmark redis-cli python3; do
    command -v "$cmd" >/dev/null || { echo "ab.sh: $cmd is missing (apt-get install -y redis-tools python3)" >&2; exit 2; }
done
# Build this tree's proxy when a variant runs it.
if printf '%s\n' "$@" | grep -qv '|'; then
    (cd "$ROOT" && timeout 1500 cargo build --release --quiet)
fi

TCK=$(getconf CLK_TCK)
ticks() { # utime + stime of a process, all threads
    local s f
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    read -r -a f <<<"$s"
    echo $((f[11] + f[12]))
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
n=$(awk '{for (i = 1; i <= NF; i++) if ($i == "-n") print $(i + 1)}' <<<"$BARGS")
[[ -n "$n" ]] || { echo "ab.sh: BENCH ARGS need -n" >&2; exit 2; }

WORK="$(mktemp -d /tmp/redis-entra-ab.XXXXXX)"
PIDS=() BG=
cleanup() {
    local pid
    for pid in $BG "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

PORTS=() RPIDS=() NAMES=()
# The password redis-benchmark gives (-a), for the readiness PING of a proxy that wants one.
CLI_AUTH=()
read -r -a bargs <<<"$BARGS"
for ((k = 0; k + 1 < ${#bargs[@]}; k++)); do
    if [[ ${bargs[k]} == -a ]]; then CLI_AUTH=(-a "${bargs[k + 1]}" --no-auth-warning); fi
done
i=0
for v in "$@"; do
    bin=$BIN opts=$v
    if [[ "$v" == *"|"* ]]; then bin=${v%%|*} opts=${v#*|}; fi
    port=$(free_port)
    # shellcheck disable=SC2086
    "$bin" dev --listen "127.0.0.1:$port" --admin-listen none --rotate-every 600s $opts \
        >"$WORK/proxy-$i.log" 2>&1 &
    PIDS+=($!)
    ok=
    for ((k = 0; k < 100; k++)); do
        if [[ "$(timeout 2 redis-cli -p "$port" ${CLI_AUTH[@]+"${CLI_AUTH[@]}"} PING 2>/dev/null)" == PONG ]]; then ok=1; break; fi
        sleep 0.1
    done
    [[ -n "$ok" ]] || { echo "ab.sh: variant '$v' does not answer: $(tail -n 5 "$WORK/proxy-$i.log")" >&2; exit 1; }
    RPIDS+=("$(pgrep -P "${PIDS[$i]}" redis-server)")
    if [[ -n "${PREPARE:-}" ]]; then
        # shellcheck disable=SC2086
        timeout 300 redis-benchmark -p "$port" -q $PREPARE >/dev/null ||
            { echo "ab.sh: PREPARE failed on variant '$v'" >&2; exit 1; }
    fi
    PORTS+=("$port") NAMES+=("$v")
    i=$((i + 1))
done

printf 'round\tvariant\ttest\trps\tp50_ms\tp99_ms\tproxy_us_per_req\tredis_us_per_req\talongside_rps\n'
for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < i; k++)); do
        j=$(((k + r - 1) % i))
        if [[ -n "${ALONGSIDE:-}" ]]; then
            # shellcheck disable=SC2086
            timeout 600 redis-benchmark -p "${PORTS[$j]}" -q -l $ALONGSIDE >"$WORK/alongside" 2>&1 &
            BG=$!
            sleep 0.5
        fi
        m0=$(ticks "${PIDS[$j]}") r0=$(ticks "${RPIDS[$j]}")
        # shellcheck disable=SC2086
        out=$(timeout 300 redis-benchmark -p "${PORTS[$j]}" -q --csv $BARGS | tail -n 1 | tr -d '"')
        m1=$(ticks "${PIDS[$j]}") r1=$(ticks "${RPIDS[$j]}")
        along=-
        if [[ -n "$BG" ]]; then
            kill -TERM "$BG" 2>/dev/null || true
            wait "$BG" 2>/dev/null || true
            BG=
            along=$(grep -o '[0-9.]* requests per second' "$WORK/alongside" |
                awk '{ s += $1; c++ } END { if (c) printf "%.1f", s / c; else print "-" }')
        fi
        IFS=, read -r test rps _avg _min p50 _p95 p99 _max <<<"$out"
        awk -v r="$r" -v v="${NAMES[$j]}" -v t="$test" -v rps="$rps" -v p50="$p50" -v p99="$p99" \
            -v m="$((m1 - m0))" -v rd="$((r1 - r0))" -v tck="$TCK" -v n="$n" -v a="$along" 'BEGIN {
                printf "%s\t%s\t%s\t%s\t%s\t%s\t%.2f\t%.2f\t%s\n", r, v, t, rps, p50, p99,
                    m * 1e6 / tck / n, rd * 1e6 / tck / n, a }' | tee -a "$WORK/runs.tsv"
    done
done
echo
echo "medians of $ROUNDS round(s):"
python3 - "$WORK/runs.tsv" "${NAMES[@]}" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
print("variant\trps\tp50_ms\tp99_ms\tproxy_us_per_req\tredis_us_per_req\talongside_rps")
for name in sys.argv[2:]:
    mine = [r for r in rows if r[1] == name]
    cols = []
    for c in (3, 4, 5, 6, 7, 8):
        xs = [float(r[c]) for r in mine if r[c] != "-"]
        cols.append(f"{statistics.median(xs):g}" if xs else "-")
    print(name, "\t".join(cols), sep="\t")
PY
