#!/usr/bin/env bash
# Where a proxied request's CPU goes: the same closed-loop load (plain chat completions, wrk) sent
# through the bare proxy (crates/sluice-testkit/examples/bare_proxy.rs, a passthrough on Sluice's
# own HTTP stack that does nothing else) and through Sluice (the benchmark configuration: request
# logging on, SQLite), alternating, and for each run the proxy's user and system CPU time per
# request (from /proc), the mock upstream's, and the context switches of the whole machine per
# request. Sluice's threads are listed apart for its last run (runtime workers, SQLite workers).
#
#   ./scripts/bench_cpu.sh [ROUNDS] [SECONDS] [CONNECTIONS]      (default 2, 6, 16)
#
# Installs wrk from Debian if missing. Everything runs on loopback and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_common.sh
ROUNDS="${1:-2}"
DUR="${2:-6}"
CONN="${3:-16}"
UP_PORT=18170
SL_PORT=18171
BP_PORT=18172

bench_need wrk
cargo build --release --locked -q -p sluice --bin sluice
cargo build --release --locked -q -p sluice-testkit --example fast_upstream --example bare_proxy

work=$(mktemp -d)
bench_start_three "$work" "$UP_PORT" "$BP_PORT" "$SL_PORT"
bench_lua "$work/plain.lua" false

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }                 # user system (clock ticks)
switches() { awk '/^ctxt/ {print $2}' /proc/stat; }
threads() { for t in /proc/"$SL_PID"/task/*; do echo "$(basename "$t") $(tr ' ' _ <"$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done; }
hz=$(getconf CLK_TCK)
us() { awk -v t="$1" -v n="$2" -v hz="$hz" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }'; }

measure() { # name pid port
  wrk -t2 -c"$CONN" -d1s -s "$work/plain.lua" "http://127.0.0.1:$3/v1/chat/completions" >/dev/null
  local u0 s0 a0 b0 c0 u1 s1 a1 b1 c1 n rps
  read -r u0 s0 <<<"$(ticks "$2")"; read -r a0 b0 <<<"$(ticks "$UP_PID")"; c0=$(switches)
  [ "$1" = sluice ] && threads >"$work/threads.0"
  wrk -t2 -c"$CONN" -d"${DUR}s" -s "$work/plain.lua" "http://127.0.0.1:$3/v1/chat/completions" >"$work/wrk.txt"
  read -r u1 s1 <<<"$(ticks "$2")"; read -r a1 b1 <<<"$(ticks "$UP_PID")"; c1=$(switches)
  [ "$1" = sluice ] && threads >"$work/threads.1"
  n=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$work/wrk.txt")
  printf '| %s | %s | %s µs | %s µs | %s µs | %s µs | %s |\n' "$1" "$rps" "$(us $((u1 - u0)) "$n")" "$(us $((s1 - s0)) "$n")" \
    "$(us $((a1 - a0)) "$n")" "$(us $((b1 - b0)) "$n")" "$(awk -v c=$((c1 - c0)) -v n="$n" 'BEGIN { printf "%.2f", c / n }')"
  echo "$n" >"$work/n"
}

echo "| proxy | req/s | proxy user CPU/request | proxy system CPU/request | upstream user | upstream system | context switches/request (machine) |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for _ in $(seq "$ROUNDS"); do
  measure "bare proxy" "$BP_PID" "$BP_PORT"
  measure sluice "$SL_PID" "$SL_PORT"
done
echo
echo "Sluice's threads in its last run (CPU time per request, user and system):"
join "$work/threads.0" "$work/threads.1" | awk -v n="$(cat "$work/n")" -v hz="$hz" \
  '{ t = ($5 - $3) * 1e6 / hz / n; if (t > 0) printf "  %-18s %6.1f µs\n", $2, t }'
