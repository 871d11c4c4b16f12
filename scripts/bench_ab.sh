#!/usr/bin/env bash
# Alternating A/B runs of two Sluice binaries under the same closed-loop load: the fast mock
# upstream, the benchmark configuration (request logging on, SQLite, a fresh database per run),
# a 2 s warm-up and then wrk with plain chat completions. Each run prints requests/s, p99, Sluice's
# CPU time per request (user + system, read from /proc before and after the timed part) and its
# peak RSS. Runs alternate A, B, A, B… so that a machine whose speed drifts affects both builds
# alike; compare the pairs, not runs from different days. MODE=stream sends streamed requests.
# The same binary may run on both sides with a difference in its environment or store settings:
# A_ENV / B_ENV (`VAR=VALUE …`, e.g. B_ENV=TOKIO_WORKER_THREADS=1) and A_STORE / B_STORE (lines
# added to the `[store]` table, e.g. B_STORE='bodies = "none"'; a `url = …` line replaces the
# SQLite file, e.g. B_STORE='url = "sqlite::memory:"').
#
#   [MODE=stream] ./scripts/bench_ab.sh BINARY_A BINARY_B [PAIRS] [SECONDS] [CONNECTIONS]
#                                                                    (default 3, 6, 64)
#
# Installs wrk from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_common.sh
if [ "$#" -lt 2 ]; then
  echo "usage: $0 BINARY_A BINARY_B [PAIRS] [SECONDS] [CONNECTIONS]" >&2
  exit 2
fi
A="$1"
B="$2"
PAIRS="${3:-3}"
DUR="${4:-6}"
CONN="${5:-64}"
UP_PORT=18070
SL_PORT=18071

bench_need wrk
cargo build --release --locked -q -p sluice-testkit --example fast_upstream

work=$(mktemp -d)
cleanup() { kill "${UP_PID:-}" "${SL_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

bench_upstream "$UP_PORT"
MODE="${MODE:-plain}"
case "$MODE" in
  plain) bench_lua "$work/load.lua" false ;;
  stream) bench_lua "$work/load.lua" true ;;
  *) echo "MODE must be plain or stream, not $MODE" >&2; exit 2 ;;
esac
url="http://127.0.0.1:$SL_PORT/v1/chat/completions"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

one() { # label binary env store-lines
  rm -f "$work"/run.db*
  bench_config "$work/sluice.toml" "$SL_PORT" "$UP_PORT" "$work/run.db"
  if [ -n "$4" ]; then
    local lines="$4"
    awk -v lines="$lines" '
      /^url = / && in_store && lines ~ /(^|\n)url = / { next }
      { print }
      /^\[store\]$/ { in_store = 1; print lines; next }
      /^\[/ { in_store = 0 }' "$work/sluice.toml" >"$work/sluice.toml.new"
    mv "$work/sluice.toml.new" "$work/sluice.toml"
  fi
  # shellcheck disable=SC2086 # the variables are lists of assignments
  env $3 UPSTREAM_KEY=bench SLUICE_LOG=warn "$2" serve --config "$work/sluice.toml" >"$work/sluice.out" 2>&1 &
  SL_PID=$!
  bench_wait_ready "$SL_PORT"
  wrk -t2 -c"$CONN" -d2s -s "$work/load.lua" "$url" >/dev/null
  local t0 t1 hz
  hz=$(getconf CLK_TCK)
  t0=$(cpu_ticks "$SL_PID")
  wrk -t2 -c"$CONN" -d"${DUR}s" --latency -s "$work/load.lua" "$url" >"$work/wrk.txt"
  t1=$(cpu_ticks "$SL_PID")
  local rss
  rss=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$SL_PID/status")
  kill -INT "$SL_PID"
  wait "$SL_PID" 2>/dev/null || true
  awk -v label="$1" -v t0="$t0" -v t1="$t1" -v hz="$hz" -v rss="$rss" '
    /Requests\/sec/ { rps = $2 }
    /requests in/ { n = $1 }
    $1 == "99%" { p99 = $2 }
    END { printf "%s  req/s %9.0f  p99 %8s  CPU/request %6.1f µs  peak RSS %5s MB\n",
          label, rps, p99, (t1 - t0) * 1e6 / hz / n, rss }' "$work/wrk.txt"
}

for _ in $(seq "$PAIRS"); do
  one A "$A" "${A_ENV:-}" "${A_STORE:-}"
  one B "$B" "${B_ENV:-}" "${B_STORE:-}"
done
