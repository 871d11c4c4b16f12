#!/usr/bin/env bash
# Instructions per proxied request: Sluice (the benchmark configuration: request logging on,
# SQLite) runs under valgrind's callgrind while wrk sends plain chat completions at 4 connections;
# the count starts after a warm-up and stops before shutdown. Unlike wall-clock figures, which move
# by 10-20 % from run to run on a shared 2-core machine, the count repeats within about 1 %, so it
# can tell apart changes of a few per cent. It leaves out the kernel (system calls, context
# switches: see bench_cpu.sh) and counts a `rep movsb` copy one instruction per byte, so large
# moves weigh more here than in time. Under valgrind the gateway is ~50× slower, so the log writer
# sees small batches (its per-batch costs weigh more than under real load).
#
#   ./scripts/bench_instructions.sh [SECONDS]          (default 6)
#   SLUICE_BIN=/path/to/sluice ./scripts/bench_instructions.sh    (another build, for an A/B)
#
# Installs wrk and valgrind from Debian if missing. Prints the total per request and the
# inclusive count per request of the main parts of the request path.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_common.sh
DUR="${1:-6}"
UP_PORT=18175
SL_PORT=18176

bench_need wrk valgrind
cargo build --release --locked -q -p sluice-testkit --example fast_upstream
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release --locked -q -p sluice --bin sluice
  SLUICE_BIN=./target/release/sluice
fi

work=$(mktemp -d)
trap 'kill "${UP_PID:-}" "${SL_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
bench_upstream "$UP_PORT"
bench_config "$work/sluice.toml" "$SL_PORT" "$UP_PORT" "$work/sluice.db"
bench_lua "$work/plain.lua" false
UPSTREAM_KEY=bench SLUICE_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" \
  "$SLUICE_BIN" serve --config "$work/sluice.toml" >"$work/sluice.out" 2>&1 &
SL_PID=$!
ready=0
for _ in $(seq 600); do
  curl -s -o /dev/null "http://127.0.0.1:$SL_PORT/health" && { ready=1; break; }
  sleep 0.1
done
[ "$ready" = 1 ] || { echo "Sluice did not start under valgrind within 60 s:" >&2; cat "$work/sluice.out" >&2; exit 1; }
url="http://127.0.0.1:$SL_PORT/v1/chat/completions"
wrk -t1 -c4 -d3s -s "$work/plain.lua" "$url" >/dev/null
sleep 0.5
callgrind_control -z "$SL_PID" >/dev/null
wrk -t1 -c4 -d"${DUR}s" -s "$work/plain.lua" "$url" >"$work/wrk.txt"
sleep 0.5
callgrind_control -d "$SL_PID" >/dev/null
n=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
[ "${n:-0}" -gt 0 ] || { echo "wrk completed no request:" >&2; cat "$work/wrk.txt" >&2; exit 1; }
kill -INT "$SL_PID"
wait "$SL_PID" || true
dump=$(ls "$work"/cg.*.1)
callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | python3 -c '
import re, sys
n = int(sys.argv[1])
rows = {}
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)", line)
    if m:
        rows.setdefault(m.group(2).split(" [")[0].strip(), int(m.group(1).replace(",", "")))
total = rows["PROGRAM TOTALS"]
print(f"{n} requests, {total // n} instructions per request")
parts = [
    ("HTTP server connection (hyper), handler included", "sluice_server::conn::serve::{{closure}}::{{closure}}"),
    ("chat completions handler", "sluice_server::openai::chat_completions::{{closure}}"),
    ("gateway (routing, limits, record)", "sluice_gateway::Gateway::chat::{{closure}}"),
    ("provider call (serialize, send, parse)", "<sluice_providers::openai::OpenAi as sluice_core::provider::ChatProvider>::chat::{{closure}}"),
    ("log writer task", "sluice_store::writer::LogWriter::spawn_observed::{{closure}}"),
    ("SQLite statements (connection thread)", "<sqlx_sqlite::connection::execute::ExecuteIter as core::iter::traits::iterator::Iterator>::next"),
    ("memcpy", "__memcpy_avx_unaligned_erms"),
    ("malloc", "mi_malloc_aligned"),
]
for label, suffix in parts:
    v = next((v for k, v in rows.items() if k.endswith(suffix)), 0)
    print(f"  {v // n:>8} {label}")
' "$n"
