#!/usr/bin/env bash
# Heap allocations per proxied request: Sluice (request logging on, SQLite) under heaptrack in
# front of the fast mock upstream, a fixed closed-loop load of plain chat completions (wrk, 16
# connections), then heaptrack's count of calls to allocation functions divided by the requests
# served. Start-up allocations are included, so longer runs give slightly lower figures; compare
# builds with the same duration. Unlike timings, the count does not depend on how busy the
# machine is.
#
#   ./scripts/bench_allocs.sh [DURATION_SECONDS] [SLUICE_BINARY]    (default 6, target/release/sluice)
#
# Installs wrk and heaptrack from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-6}"
BIN="${2:-./target/release/sluice}"
UP_PORT=18090
SL_PORT=18091

command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
command -v heaptrack >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq heaptrack >/dev/null; }
[ "$#" -ge 2 ] || cargo build --release --locked -q -p sluice --bin sluice
cargo build --release --locked -q -p sluice-testkit --example fast_upstream

work=$(mktemp -d)
cleanup() { kill "${UP_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

./target/release/examples/fast_upstream "127.0.0.1:$UP_PORT" >/dev/null &
UP_PID=$!
cat > "$work/sluice.toml" <<TOML
[server]
listen = "127.0.0.1:$SL_PORT"
[store]
url = "sqlite://$work/sluice.db"
[providers.upstream]
type = "openai"
base_url = "http://127.0.0.1:$UP_PORT/v1"
api_key = "env::UPSTREAM_KEY"
[models."bench-model"]
deployments = [{ provider = "upstream", model = "gpt-4o-mini" }]
TOML
UPSTREAM_KEY=bench SLUICE_LOG=warn heaptrack -o "$work/heap" "$BIN" serve --config "$work/sluice.toml" >"$work/sluice.out" 2>&1 &
HT_PID=$!
for _ in $(seq 200); do
  curl -s -o /dev/null "http://127.0.0.1:$SL_PORT/health" && break
  sleep 0.1
done
cat > "$work/plain.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
wrk.body = '{"model":"bench-model","stream":false,"messages":[{"role":"user","content":"Hello, how are you?"}]}'
LUA
wrk -t1 -c16 -d"${DUR}s" -s "$work/plain.lua" "http://127.0.0.1:$SL_PORT/v1/chat/completions" > "$work/wrk.txt"
requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
sleep 1
# Sluice shuts down on SIGINT (the log writer drains), then heaptrack writes its file.
pkill -INT -f "$work/sluice.toml" || true
wait "$HT_PID" 2>/dev/null || true
file=$(ls "$work"/heap*)
calls=$(heaptrack_print -f "$file" 2>/dev/null | awk '/^calls to allocation functions:/ {print $5}')
awk -v a="$calls" -v n="$requests" 'BEGIN { printf "requests %d, allocation calls %d, per request %.1f\n", n, a, a / n }'
