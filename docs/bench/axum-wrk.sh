#!/usr/bin/env bash
# The README's axum figures: wrk against one axum Router served two ways,
# in one run, interleaved (steered, plain, steered, plain, ...) so that a
# noisy neighbour hits both alike:
#   steered: examples/axum_hello, a steered group, one worker per CPU (cpu policy)
#   plain:   the same Router with axum::serve on one listener (tokio multi-thread)
# Each: keep-alive and `Connection: close`, requests/s and p99 latency.
# Usage (as root, after `cargo build --release -p reuseport-user --example axum_hello`):
#   docs/bench/axum-wrk.sh [path/to/axum_hello]
# Loopback only; every wrk run is bounded by DURATION.
set -euo pipefail
BIN=${1:-target/release/examples/axum_hello}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-3}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

out=$(mktemp -d)
"$BIN" 127.0.0.1:18080 >"$out/steered.log" 2>&1 &
steered=$!
"$BIN" 127.0.0.1:18081 plain >"$out/plain.log" 2>&1 &
plain=$!
trap 'kill $steered $plain 2>/dev/null; wait $steered $plain 2>/dev/null' EXIT
for _ in $(seq 50); do
    grep -q ready "$out/steered.log" && grep -q ready "$out/plain.log" && break
    sleep 0.2
done
grep -q ready "$out/steered.log" && grep -q ready "$out/plain.log" || {
    cat "$out"/*.log >&2; exit 1; }

# One wrk run: prints "REQS P99_MS".
measure() {
    local port=$1 mode=$2 header=()
    [ "$mode" = close ] && header=(-H "Connection: close")
    wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "http://127.0.0.1:$port/" |
        awk '/Requests\/sec/ {r=$2}
             $1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000}
                        else if (v ~ /ms$/) {sub(/ms/,"",v)}
                        else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}
                        p=v}
             END {printf "%s %s\n", r, p}'
}

for round in $(seq "$ROUNDS"); do
    for mode in keep-alive close; do
        for server in steered plain; do
            port=18080; [ $server = plain ] && port=18081
            read -r reqs p99 < <(measure $port $mode)
            echo "$round $server $mode $reqs $p99" | tee -a "$out/runs"
        done
    done
done

# The median of the rounds, per server and mode.
echo
echo "| server | keep-alive req/s | keep-alive p99 | Connection: close req/s | close p99 |"
echo "|---|---:|---:|---:|---:|"
for server in steered plain; do
    row="| $server |"
    for mode in keep-alive close; do
        r=$(awk -v s=$server -v m=$mode '$2==s && $3==m {print $4}' "$out/runs" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
        p=$(awk -v s=$server -v m=$mode '$2==s && $3==m {print $5}' "$out/runs" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
        row="$row $(printf '%.0f' "$r") | $(printf '%.2f' "$p") ms |"
    done
    echo "$row"
done
