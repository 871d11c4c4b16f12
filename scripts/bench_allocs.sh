#!/usr/bin/env bash
# Heap allocations per proxied request: Sluice (request logging on, SQLite) under heaptrack in
# front of the fast mock upstream, a fixed closed-loop load of plain chat completions (wrk, 16
# connections), then heaptrack's count of calls to allocation functions divided by the requests
# served. Start-up allocations are included, so longer runs give slightly lower figures; compare
# builds with the same duration. Unlike timings, the count does not depend on how busy the
# machine is.
#
#   ./scripts/bench_allocs.sh [DURATION_SECONDS] [SLUICE_BINARY]
#
# Default 6 s, and a Sluice built with the system allocator (`--no-default-features`, in
# target/system-alloc); a binary given must use the system allocator too.
#
# Installs wrk and heaptrack from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_common.sh
DUR="${1:-6}"
BIN="${2:-./target/release/sluice}"
UP_PORT=18090
SL_PORT=18091

bench_need wrk heaptrack
# heaptrack sees calls to the system allocator only, so the default binary (mimalloc) would show
# almost nothing: build one with the system allocator, in its own target directory.
if [ "$#" -lt 2 ]; then
  cargo build --release --locked -q -p sluice --bin sluice --no-default-features --target-dir target/system-alloc
  BIN=./target/system-alloc/release/sluice
fi
cargo build --release --locked -q -p sluice-testkit --example fast_upstream

work=$(mktemp -d)
cleanup() { kill "${UP_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

bench_upstream "$UP_PORT"
bench_config "$work/sluice.toml" "$SL_PORT" "$UP_PORT" "$work/sluice.db"
UPSTREAM_KEY=bench SLUICE_LOG=warn heaptrack -o "$work/heap" "$BIN" serve --config "$work/sluice.toml" >"$work/sluice.out" 2>&1 &
HT_PID=$!
bench_wait_ready "$SL_PORT"
bench_lua "$work/plain.lua" false
wrk -t1 -c16 -d"${DUR}s" -s "$work/plain.lua" "http://127.0.0.1:$SL_PORT/v1/chat/completions" > "$work/wrk.txt"
requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
sleep 1
# Sluice shuts down on SIGINT (the log writer drains), then heaptrack writes its file.
pkill -INT -f "$work/sluice.toml" || true
wait "$HT_PID" 2>/dev/null || true
file=$(ls "$work"/heap*)
calls=$(heaptrack_print -f "$file" 2>/dev/null | awk '/^calls to allocation functions:/ {print $5}')
awk -v a="$calls" -v n="$requests" 'BEGIN { printf "requests %d, allocation calls %d, per request %.1f\n", n, a, a / n }'
