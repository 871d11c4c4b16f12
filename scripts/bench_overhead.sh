#!/usr/bin/env bash
# Gateway overhead: the same load sent straight to a fast mock upstream, through a bare proxy (a
# byte-for-byte HTTP/1.1 passthrough on Sluice's own HTTP stack, doing nothing else: the least any
# proxy costs on this machine) and through Sluice (request logging on, SQLite), at concurrency 1,
# 16 and 64, for plain and streaming chat completions.
# Reports requests/s, p50 and p99 latency (wrk, closed loop at saturation), Sluice's peak RSS, and
# the latency Sluice adds at a fixed offered load the machine can carry (latency_probe, open loop).
# Each saturation row also shows the most records waiting in Sluice's log queue and the latest
# wake-up of a 50 ms sleep in this shell: a cell that is slow because the record writer fell behind
# shows a full queue (16384); one that is slow because the whole machine paused shows a late
# wake-up. Warnings Sluice logged (a slow record write, say) are printed at the end, with the
# request records Sluice wrote beside the requests the load generators saw it answer.
#
#   ./scripts/bench_overhead.sh [DURATION_SECONDS]      (default 10)
#
# Installs wrk from Debian if missing. Everything runs on loopback and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_common.sh
DUR="${1:-10}"
UP_PORT=18080
SL_PORT=18081
BP_PORT=18082

bench_need wrk
cargo build --release --locked -q -p sluice --bin sluice
cargo build --release --locked -q -p sluice-testkit --example fast_upstream --example latency_probe --example bare_proxy

work=$(mktemp -d)
bench_start_three "$work" "$UP_PORT" "$BP_PORT" "$SL_PORT"
for _ in $(seq 100); do
  curl -s -o /dev/null -X POST "http://127.0.0.1:$UP_PORT/v1/chat/completions" && break
  sleep 0.1
done
bench_lua "$work/plain.lua" false
bench_lua "$work/stream.lua" true

run() { # target mode conc -> "rps p50 p99 queue_peak late_ms [errors]"
  local url=$1 mode=$2 c=$3 t=2
  [ "$c" -lt 2 ] && t=1
  bench_watch_start "$SL_PORT" "$work/watch"
  wrk -t"$t" -c"$c" -d"${DUR}s" --latency -s "$work/$mode.lua" "$url" > "$work/wrk.txt"
  local watch; watch=$(bench_watch_stop "$work/watch")
  [[ $url == *":$SL_PORT/"* ]] && awk '/requests in/ {print $1}' "$work/wrk.txt" >> "$work/answered"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
  p50=$(awk '$1=="50%" {print $2}' "$work/wrk.txt")
  p99=$(awk '$1=="99%" {print $2}' "$work/wrk.txt")
  local errs; errs=$(awk '/Non-2xx|Socket errors/ {print}' "$work/wrk.txt" | tr '\n' ' ')
  echo "$rps $p50 $p99 $watch ${errs:-}"
}

printf '| mode | concurrency | direct req/s | direct p50 | direct p99 | bare proxy req/s | bare proxy p99 | via Sluice req/s | Sluice p50 | Sluice p99 | Sluice ÷ direct req/s | Sluice ÷ bare proxy req/s | Sluice peak RSS so far | log queue peak | latest wake-up |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
for mode in plain stream; do
  for c in 1 16 64; do
    read -r d_rps d_p50 d_p99 _ d_late d_err <<<"$(run "http://127.0.0.1:$UP_PORT/v1/chat/completions" $mode $c)"
    read -r b_rps _ b_p99 _ b_late b_err <<<"$(run "http://127.0.0.1:$BP_PORT/v1/chat/completions" $mode $c)"
    read -r s_rps s_p50 s_p99 s_queue s_late s_err <<<"$(run "http://127.0.0.1:$SL_PORT/v1/chat/completions" $mode $c)"
    hwm=$(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/$SL_PID/status)
    late=$(( d_late > s_late ? d_late : s_late ))
    late=$(( b_late > late ? b_late : late ))
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s× | %s× | %s | %s | %s ms |\n' "$mode" "$c" "$d_rps" "$d_p50" "$d_p99" "$b_rps" "$b_p99" "$s_rps" "$s_p50" "$s_p99" "$(ratio "$s_rps" "$d_rps")" "$(ratio "$s_rps" "$b_rps")" "$hwm" "$s_queue" "$late"
    [ -n "${s_err}${d_err}${b_err}" ] && echo "  errors: direct: ${d_err:-none}; bare proxy: ${b_err:-none}; sluice: ${s_err:-none}"
  done
done
echo
echo "Added latency at a fixed offered load (open loop, 16 connections, ${DUR} s; latency_probe):"
printf '| mode | offered req/s | direct p50 | direct p99 | via Sluice p50 | via Sluice p99 | added p50 | added p99 | errors | late sends |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
probe() { ./target/release/examples/latency_probe "$1" "$2" 16 "$DUR" "$3"; }
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1==k {print $2}'; }
for mode in plain stream; do
  s_arg=""; [ "$mode" = stream ] && s_arg=stream
  for rate in 2000 5000; do
    d=$(probe "http://127.0.0.1:$UP_PORT/v1/chat/completions" $rate "$s_arg")
    s=$(probe "http://127.0.0.1:$SL_PORT/v1/chat/completions" $rate "$s_arg")
    echo $(( $(field "$s" sent) - $(field "$s" errors) )) >> "$work/answered"
    dp50=$(field "$d" p50_us); dp99=$(field "$d" p99_us); sp50=$(field "$s" p50_us); sp99=$(field "$s" p99_us)
    errs=$(( $(field "$d" errors) + $(field "$s" errors) ))
    late="$(field "$d" late) / $(field "$s" late)"
    printf '| %s | %s | %s µs | %s µs | %s µs | %s µs | %s µs | %s µs | %s | %s |\n' "$mode" "$rate" "$dp50" "$dp99" "$sp50" "$sp99" $((sp50 - dp50)) $((sp99 - dp99)) "$errs" "$late"
  done
done
echo
echo "Sluice peak RSS: $(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/$SL_PID/status)"
kill -TERM "$SL_PID"; wait "$SL_PID" 2>/dev/null || true
echo "request records written: $(grep -o '[0-9]* request records written.*' "$work/sluice.out" || echo '?')"
# wrk does not count the requests still in flight when a cell ends, so the records may exceed
# this by up to one request per connection per cell; fewer records than this would be a loss.
echo "requests Sluice answered, as the load generators counted them: $(awk '{n += $1} END {print n+0}' "$work/answered")"
grep -i 'warn\|error' "$work/sluice.out" | head -20 || true
